"""The admin's part of docs/services.md ("The team server"), run as written: the block brings
PostgreSQL, SeaweedFS and MLflow up on a fresh folder with scripts/team_services.py and adds two
users. Then, against those real servers: the bucket and MLflow refuse strangers and take a user's
run, whose artifact lands in the bucket; a second start on the same folder still has the run and
the logins; a stop leaves no process behind.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from services import free_ports

pytestmark = pytest.mark.services

REPO = Path(__file__).resolve().parents[1]


def _processes() -> dict[int, tuple[int, int, str, str]]:
    """pid -> (parent, process group, state, start time), from /proc."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        found[int(stat.parent.name)] = (int(fields[1]), int(fields[2]), fields[0], fields[19])
    return found


def _tree(root: int) -> set[tuple[int, str]]:
    """The process and all its descendants, as (pid, start time) so a reused pid does not count."""
    table = _processes()
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid in table:
            found.add((pid, table[pid][3]))
            todo += [child for child, (parent, *_) in table.items() if parent == pid]
    return found


def _still_running(processes: set[tuple[int, str]], groups: list[int]) -> list[int]:
    """Those of `processes` (or members of `groups`) that live; a zombie has ended."""
    table = _processes()
    return sorted(pid for pid, (_, group, state, started) in table.items() if state != "Z"
                  and ((pid, started) in processes or group in groups))


LOOPBACK = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1 and ::1 as /proc/net/tcp{,6} write them


def _listening(pids: set[int]) -> set[tuple[bool, int]]:
    """(on loopback only?, port) of each socket that one of `pids` listens on, from /proc."""
    sockets = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                address, port = fields[1].split(":")
                sockets[f"socket:[{fields[9]}]"] = (address in LOOPBACK, int(port, 16))
    found = set()
    for pid in pids:
        for descriptor in Path(f"/proc/{pid}/fd").glob("*"):
            with contextlib.suppress(OSError):
                if (target := os.readlink(descriptor)) in sockets:
                    found.add(sockets[target])
    return found


def _env_file(path: Path) -> dict[str, str]:
    """The `export NAME=value` lines of a handout the script wrote."""
    return dict(line.removeprefix("export ").split("=", 1) for line in path.read_text().splitlines()
                if line.startswith("export "))


def _wait_ready(directory: Path, process: subprocess.Popen | None = None, timeout: float = 120) -> dict:
    """services.json once it says ready (for `process` when given: a second start)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = json.loads((directory / "services.json").read_text())
        except (OSError, ValueError):
            state = {}
        if state.get("state") == "ready" and (process is None or state["pid"] == process.pid):
            return state
        assert process is None or process.poll() is None, f"the start ended with code {process.returncode}: {state}"
        time.sleep(0.3)
    raise AssertionError(f"the services in {directory} were not ready after {timeout} s")


def _stop(state: dict, ports: list[int]) -> None:
    """SIGTERM to the script, as a service manager sends it: all of it ends, and the ports are free."""
    pid = state["pid"]
    processes = _tree(pid)
    assert len(processes) > 3, processes  # the script, three servers and their workers
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 40
    while _still_running(processes, list(state["groups"].values())) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _still_running(processes, list(state["groups"].values())) == []
    for port in ports:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("0.0.0.0", port))  # raises if a server still holds it, on any address


def _kill_leftovers(directory: Path, mlflow_port: int) -> None:
    """After a failed check: the script's own stop first, then SIGKILL to whatever still names the
    folder (the script, PostgreSQL, SeaweedFS) or MLflow's port."""
    def ours() -> list[int]:
        found = []
        for pid, (*_, state, _started) in _processes().items():
            with contextlib.suppress(OSError):
                command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if state != "Z" and pid != os.getpid() and (str(directory) in command or f"--port {mlflow_port}" in command):
                    found.append(pid)
        return found

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in ours():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 30
        while ours() and time.monotonic() < deadline:
            time.sleep(0.5)


def test_the_admin_block_brings_the_team_services_up_as_written(monkeypatch):
    from test_dvc_pipeline import as_written, run_as_written

    import boto3
    import botocore.exceptions
    import mlflow.exceptions
    from botocore.config import Config

    base = Path(tempfile.mkdtemp(prefix="kip-team-setup-"))
    base.chmod(0o755)  # as /srv: under root the postgres account passes through to its cluster
    directory = base / "kip-team"
    s3_port, postgres_port, mlflow_port = ports = free_ports(3)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "KIP_TEAM_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # the venv the admin activated
    block = as_written(REPO / "docs" / "services.md", "admin")
    try:
        said = run_as_written(block, REPO, env, {
            "/srv/kip-team": str(directory), "--s3-port 8333": f"--s3-port {s3_port}",
            "--postgres-port 5432": f"--postgres-port {postgres_port}", "--mlflow-port 5000": f"--mlflow-port {mlflow_port}"})
        state = _wait_ready(directory, timeout=10)  # add-user already waited for it
        assert f"{directory}/users/ada.env" in said and f"{directory}/users/ben.env" in said

        # on every address: MLflow and the script's relay to the S3 gateway; all of SeaweedFS
        # (its gateway's gRPC port adds keys without asking for one) and PostgreSQL on loopback only
        groups = state["groups"]
        assert (False, s3_port) in _listening({state["pid"]})
        assert (False, mlflow_port) in _listening({pid for pid, _ in _tree(groups["mlflow server"])})
        for server in ("SeaweedFS", "PostgreSQL"):
            listening = _listening({pid for pid, _ in _tree(groups[server])})
            assert listening and all(loopback for loopback, _ in listening), (server, listening)

        keys = json.loads((directory / "secrets.json").read_text())
        logged = said + (base / "kip-team.log").read_text()
        assert "up (Ctrl-C or SIGTERM stops them)" in logged
        assert not [name for name, secret in keys.items() if secret in logged]  # no secret printed
        for private in ("secrets.json", "s3-keys.env", "users/ada.env", "users/ben.env", "mlflow/auth.ini"):
            assert (directory / private).stat().st_mode & 0o777 == 0o600, private
        assert f"database_uri = postgresql+psycopg2://mlflow:{keys['postgres_password']}@127.0.0.1:{postgres_port}/mlflow_auth" \
            in (directory / "mlflow" / "auth.ini").read_text()

        # the bucket: a signed put with the team's keys lands; a wrong key is refused
        team = _env_file(directory / "s3-keys.env")

        def s3(secret: str):
            return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{s3_port}", region_name="us-east-1",
                                aws_access_key_id=team["AWS_ACCESS_KEY_ID"], aws_secret_access_key=secret,
                                config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))

        s3(team["AWS_SECRET_ACCESS_KEY"]).put_object(Bucket="kip-team", Key="dvc/probe", Body=b"signed")
        assert s3(team["AWS_SECRET_ACCESS_KEY"]).get_object(Bucket="kip-team", Key="dvc/probe")["Body"].read() == b"signed"
        with pytest.raises(botocore.exceptions.ClientError) as refused:
            s3("not-the-secret-key-000000").put_object(Bucket="kip-team", Key="dvc/intruder", Body=b"x")
        assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403

        # MLflow: anonymous 401; Ada, with the login the block made, logs a run whose artifact lands in the bucket
        uri = f"http://127.0.0.1:{mlflow_port}"
        with pytest.raises(urllib.error.HTTPError) as anonymous:
            urllib.request.urlopen(f"{uri}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
        assert anonymous.value.code == 401
        ada = _env_file(directory / "users" / "ada.env")
        assert ada["MLFLOW_TRACKING_URI"].endswith(f":{mlflow_port}") and ada["AWS_ACCESS_KEY_ID"] == team["AWS_ACCESS_KEY_ID"]
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            monkeypatch.setenv(name, ada[name])
        client = mlflow.MlflowClient(uri)  # the login is read from the environment at each request
        experiment_id = client.create_experiment("team-kip")
        run = client.create_run(experiment_id).info.run_id
        client.log_metric(run, "krr_val_accuracy", 0.875)
        client.log_text(run, "100 MNIST images", "distilled/notes.txt")
        client.set_terminated(run)
        artifact = f"mlflow/{experiment_id}/{run}/artifacts/distilled/notes.txt"
        stored = s3(team["AWS_SECRET_ACCESS_KEY"]).get_object(Bucket="kip-team", Key=artifact)["Body"].read()
        assert stored == b"100 MNIST images"

        # Ben, granted READ on Ada's experiment, reads her run and cannot write to it
        granted = subprocess.run([sys.executable, "scripts/team_services.py", "add-user", "ben", "--dir", str(directory),
                                  "--experiment", "team-kip", "--permission", "READ"], cwd=REPO, env=env,
                                 capture_output=True, text=True, timeout=120)
        assert granted.returncode == 0, granted.stderr
        assert "ben already has a login" in granted.stdout and "READ on experiment team-kip" in granted.stdout
        ben = _env_file(directory / "users" / "ben.env")
        for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            monkeypatch.setenv(name, ben[name])
        assert client.get_run(run).data.metrics == {"krr_val_accuracy": 0.875}
        with pytest.raises(mlflow.exceptions.MlflowException) as denied:
            client.log_metric(run, "krr_val_accuracy", 1.0)
        assert denied.value.error_code == "PERMISSION_DENIED"

        _stop(state, ports)
        assert json.loads((directory / "services.json").read_text())["state"] == "stopped"

        # a second start on the same folder: same secrets, Ada's login and run still there
        secrets_before = (directory / "secrets.json").read_bytes()
        (directory / "admin-notes.txt").write_text("the admin's own file")
        with open(base / "second.log", "wb") as log:
            again = subprocess.Popen([sys.executable, "scripts/team_services.py", "--dir", str(directory), "--host", "0.0.0.0",
                                      "--bucket", "kip-team", "--s3-port", str(s3_port), "--postgres-port", str(postgres_port),
                                      "--mlflow-port", str(mlflow_port)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        state = _wait_ready(directory, again)
        for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            monkeypatch.setenv(name, ada[name])
        assert client.get_run(run).data.metrics == {"krr_val_accuracy": 0.875}
        assert Path(client.download_artifacts(run, "distilled/notes.txt", str(base))).read_text() == "100 MNIST images"
        assert (directory / "secrets.json").read_bytes() == secrets_before
        _stop(state, ports)
        assert again.wait(5) == 0
        assert (directory / "admin-notes.txt").read_text() == "the admin's own file"
    finally:
        _kill_leftovers(directory, mlflow_port)
        shutil.rmtree(base, ignore_errors=True)
