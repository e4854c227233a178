"""Sharing with a team, against real services on 127.0.0.1 (tests/services.py): the commands of the
docs/services.md "Sharing with a team".

Two people, two clones, two HOMEs: Ada runs the pipeline and pushes to the S3 remote; Ben clones,
pulls with his own credentials and gets byte-identical artifacts. The pipeline logs to an MLflow
server (PostgreSQL store, artifacts in the same bucket, basic-auth): with a user's credentials from
the environment it lands; anonymous clients are refused; a read-only user can look but not write.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from projects import (SMALL, copy_project, distilled_bytes as _bytes, dvc as _dvc, env_for as _env, make_project,
                      run as _run, write_params)
from services import mlflow_server, postgres_server, s3_server

pytestmark = pytest.mark.services

READER = ("reader", "kip-reader-password-1")
ADA = ("ada", "kip-ada-password-123")


@pytest.fixture(scope="module")
def s3():
    with s3_server() as server:
        yield server


@pytest.fixture(scope="module")
def tracking(s3):
    with postgres_server(("mlflow", "mlflow_auth")) as database, mlflow_server(database, s3) as server:
        yield server


def _clean_env(home: Path) -> dict[str, str]:
    """A person's shell: no cloud or MLflow settings inherited from whoever runs the tests."""
    env = {k: v for k, v in _env(home).items() if not k.startswith(("AWS_", "MLFLOW_"))}
    env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"  # a refused login fails now, not after retries
    return env


def _use_remote(root: Path, env: dict[str, str], s3) -> None:
    """The remote lives in the committed .dvc/config; nobody's keys do (they go in the environment)."""
    _dvc(root, env, "remote", "add", "-d", "-f", "team", f"s3://{s3.bucket}/dvc")
    _dvc(root, env, "remote", "modify", "team", "endpointurl", s3.endpoint)


def _client(server, user: tuple[str, str] | None, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    for name, value in zip(("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"), user or (None, None)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    return mlflow.MlflowClient(tracking_uri=server.uri)


# The tracking tests come first: Ada's clone further down copies the session's `small_project`,
# which under xdist the other worker may still be building when this module starts.
@pytest.fixture(scope="module")
def logged(tracking, s3, tmp_path_factory):
    """Ada (a user the admin created) runs `dvc repro` and one `dvc exp run` logging to the server
    with her login from the environment. Returns her project root and the experiment's id."""
    from mlflow.server.auth.client import AuthServiceClient

    with pytest.MonkeyPatch.context() as patch:
        _client(tracking, (tracking.admin, tracking.admin_password), patch)
        AuthServiceClient(tracking.uri).create_user(*ADA)
    base = tmp_path_factory.mktemp("ada-tracked")
    (base / "home").mkdir()
    env = _clean_env(base / "home")
    root = base / "project"
    make_project(root, env, {**SMALL, "tracking": {"enabled": True, "uri": tracking.uri, "experiment": "team-kip"}})
    user = {"MLFLOW_TRACKING_USERNAME": ADA[0], "MLFLOW_TRACKING_PASSWORD": ADA[1], **s3.env()}
    # the experiment changes an evaluate key, so only evaluate runs again: what is under test is where
    # the runs land, not the stages' work
    for command in (["repro"], ["exp", "run", "-n", "one-repeat", "-S", "evaluate.baseline_repeats=1"]):
        run = _dvc_as(root, env, user, *command)
        assert run.returncode == 0, run.stderr
    with pytest.MonkeyPatch.context() as patch:
        experiment = _client(tracking, ADA, patch).get_experiment_by_name("team-kip")
    return root, experiment.experiment_id, env, user


def test_the_pipeline_logs_to_the_team_server_with_a_users_credentials(logged, tracking, s3, monkeypatch):
    root, experiment_id, *_ = logged
    client = _client(tracking, ADA, monkeypatch)
    runs = client.search_runs([experiment_id], "tags.`kip.stage` = 'evaluate'")
    assert len(runs) == 2  # the repro and the experiment, both landed, not merged
    metrics = json.loads((root / "metrics" / "evaluate.json").read_text())
    assert metrics["krr_test_accuracy"] in {r.data.metrics["krr_test_accuracy"] for r in runs}
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=s3.bucket, Prefix="mlflow/").get("Contents", [])]
    assert any(key.endswith(".png") for key in keys), keys  # the support images went to the bucket
    assert client.get_experiment(experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_anonymous_clients_are_refused(logged, tracking, monkeypatch):
    import mlflow.exceptions

    with pytest.raises(mlflow.exceptions.MlflowException, match="401|UNAUTHENTICATED|credentials"):
        _client(tracking, None, monkeypatch).search_experiments()
    with pytest.raises(urllib.error.HTTPError) as anonymous:
        urllib.request.urlopen(f"{tracking.uri}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
    assert anonymous.value.code == 401


def test_a_read_only_teammate_can_look_but_not_write(logged, tracking, monkeypatch):
    import mlflow.exceptions
    from mlflow.server.auth.client import AuthServiceClient

    _, experiment_id, *_ = logged
    _client(tracking, (tracking.admin, tracking.admin_password), monkeypatch)
    admin = AuthServiceClient(tracking.uri)
    admin.create_user(*READER)
    admin.grant_user_permission(READER[0], "experiment", experiment_id, "READ")
    reader = _client(tracking, READER, monkeypatch)
    (run,) = reader.search_runs([experiment_id], "tags.`kip.stage` = 'evaluate'", max_results=1)
    assert "krr_test_accuracy" in reader.get_run(run.info.run_id).data.metrics
    with pytest.raises(mlflow.exceptions.MlflowException) as denied:
        reader.log_metric(run.info.run_id, "krr_test_accuracy", 1.0)
    assert denied.value.error_code == "PERMISSION_DENIED"
    with pytest.raises(mlflow.exceptions.MlflowException):
        reader.create_run(experiment_id)


SCREENSHOTS = os.environ.get("KIP_SCREENSHOTS")  # a folder: keep the screenshots there (docs/ for the README)


def _as_the_ui_shows(value: float) -> str:
    """A metric in (0.001, 10) as MLflow 3.17's UI writes it (Utils.formatMetric:
    (Math.round(1e3 * v) / 1e3).toString(); JavaScript's shortest form is Python's repr)."""
    import math

    return repr(math.floor(1000 * value + 0.5) / 1000)


def _cells_in_view(page) -> list[tuple[str, dict[str, str]]]:
    """Each row of the runs table, top to bottom: its run name and the metric cells that lie wholly
    inside the window (ag-grid renders a row's pinned and scrolled parts as separate elements)."""
    rows = page.evaluate("""(() => {
        const rows = {};
        for (const cell of document.querySelectorAll('.ag-row [col-id]')) {
            const row = cell.closest('.ag-row'), id = row.getAttribute('row-index'), box = cell.getBoundingClientRect();
            const entry = rows[id] = rows[id] || {top: row.getBoundingClientRect().top, cells: {}};
            if (box.left >= 0 && box.right <= window.innerWidth && box.bottom <= window.innerHeight)
                entry.cells[cell.getAttribute('col-id')] = cell.innerText.trim();
        }
        return Object.entries(rows).sort((a, b) => Number(a[0]) - Number(b[0])).map(([, r]) => r.cells);
    })()""")
    shown = []
    for cells in rows:
        name = cells.get("attributes.`Run Name`", "").splitlines()[-1:] or [""]
        metrics = {key[len("metrics.`"):-1]: value for key, value in cells.items() if key.startswith("metrics.`")}
        shown.append((name[0], metrics))
    return shown


def test_the_ui_shows_the_runs_the_comparison_and_the_support_images(logged, tracking, monkeypatch, tmp_path):
    """Through a real browser, logged in as Ada: the runs-view address (`kip ui` prints it) opens on
    the executions, best first, each with its deciding metrics in the window without a click; the
    compare view shows both executions' metrics, and a support-image PNG decodes."""
    from browser import chromium

    from pipeline.run import tracking as tracking_view
    from pipeline.run.tracking import experiment_url

    root, experiment_id, env, user = logged
    ui = subprocess.run([sys.executable, "-m", "pipeline.run.cli", "ui"], cwd=root, env={**env, **user},
                        capture_output=True, text=True, timeout=120)
    assert ui.returncode == 0 and ui.stdout == experiment_url(tracking.uri, experiment_id) + "\n", ui.stderr
    client = _client(tracking, ADA, monkeypatch)
    parents = client.search_runs([experiment_id], "tags.`kip.role` = 'pipeline'", order_by=["attributes.start_time ASC"])
    assert len(parents) == 2
    names = [run.info.run_name for run in parents]
    assert names == ["digits fc-ntk 2/class", "one-repeat · digits fc-ntk 2/class · evaluate.baseline_repeats=1"]
    assert all("krr_val_accuracy" in run.data.metrics for run in parents)  # the deciding number, on the parent
    accuracy = [_as_the_ui_shows(run.data.metrics["krr_test_accuracy"]) for run in parents]
    shots = Path(SCREENSHOTS) if SCREENSHOTS else tmp_path
    with chromium(login=ADA) as page:
        text = page.open(experiment_url(tracking.uri, experiment_id), *names, *tracking_view.RUNS_VIEW_METRICS[:2])
        page.screenshot(shots / "mlflow-runs.png")
        assert "Run Name" in text and "Observability" not in text  # the runs table, not MLflow 3's GenAI overview
        shown = _cells_in_view(page)
        assert sorted(name for name, _ in shown) == sorted(names)  # the executions, not their stage runs
        by_name = {run.info.run_name: run.data.metrics for run in parents}
        for name, cells in shown:
            for metric in ("krr_val_accuracy", "nn_val_accuracy"):  # the deciding numbers, on screen without a click
                expected = repr(by_name[name][metric]) if metric in by_name[name] else "-"  # train skipped: no number
                assert cells.get(metric) == expected, (name, metric, cells)
        ranked = [by_name[name]["krr_val_accuracy"] for name, _ in shown]
        assert ranked == sorted(ranked, reverse=True)  # best first

        ids = json.dumps([run.info.run_id for run in parents])
        text = page.open(f"{tracking.uri}/#/compare-runs?runs={ids}&experiments={json.dumps([experiment_id])}"
                         "&workflowType=machine_learning",
                         *names, "krr_test_accuracy", "krr_val_accuracy")
        page.screenshot(shots / "mlflow-compare.png")
        assert all(value in text for value in accuracy), (accuracy, text[:500])

        (distill,) = client.search_runs([experiment_id], f"tags.`kip.stage` = 'distill' and tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
        images = [a.path for a in client.list_artifacts(distill.info.run_id, "images")]
        assert "images/support_images.png" in images, images
        page.open(f"{tracking.uri}/#/experiments/{experiment_id}/runs/{distill.info.run_id}/artifacts/images/"
                  "support_images.png?workflowType=machine_learning", "support_images.png")
        deadline = time.monotonic() + 30
        while not page.evaluate("[...document.images].some(i => i.complete && i.naturalWidth > 100)"):
            assert time.monotonic() < deadline, "the support-image PNG never decoded in the page"
            time.sleep(0.3)
        page.screenshot(shots / "mlflow-support-images.png")
    for name in ("mlflow-runs.png", "mlflow-compare.png", "mlflow-support-images.png"):
        assert (shots / name).read_bytes()[:4] == b"\x89PNG"


def test_two_queued_experiments_run_at_once_and_both_land_with_their_lineage(logged, tracking, monkeypatch):
    """`dvc exp run --queue` twice, then `--run-all -j 2`: two temp-directory executions at once, each
    its own parent run with its own params, marked dirty against the commit they started from. Each
    changes a train key: a temp directory lacks the uncached prepared data, so `prepare` runs there
    too, and `train` with that execution's params; distill and evaluate come from DVC's run cache."""
    root, experiment_id, env, user = logged
    for name, steps in (("queued-a", 20), ("queued-b", 30)):
        queued = _dvc_as(root, env, user, "exp", "run", "--queue", "-n", name, "-S", f"train.steps={steps}")
        assert queued.returncode == 0, queued.stderr
    ran = _dvc_as(root, env, user, "exp", "run", "--run-all", "-j", "2")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    head = _run(root, env, "git", "rev-parse", "HEAD").strip()
    client = _client(tracking, ADA, monkeypatch)
    for name, steps in (("queued-a", "20"), ("queued-b", "30")):
        (parent,) = client.search_runs([experiment_id], f"tags.`kip.role` = 'pipeline' and attributes.run_name LIKE '{name} · %'")
        children = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        stages = {run.info.run_name: run for run in children}
        assert {"prepare", "train"} <= set(stages), sorted(stages)
        assert stages["train"].data.params["train.steps"] == steps
        for run in (parent, *children):
            assert run.data.tags["mlflow.source.git.commit"] == head
            assert run.data.tags["kip.git_dirty"] == "true"  # params.yaml differs from that commit


@pytest.fixture(scope="module")
def ada(tmp_path_factory, s3, small_project):
    """Ada's clone after `dvc repro` (the session's finished small project, copied: tracking is no
    stage's param, so turning it off re-runs nothing) and `dvc push` to the S3 remote, tagged
    distilled@v1.0.0."""
    base = tmp_path_factory.mktemp("ada")
    (base / "home").mkdir()
    env = _clean_env(base / "home")
    root = copy_project(small_project, base / "project", home=base / "home").root
    write_params(root, {"tracking": {"enabled": False}})
    _use_remote(root, env, s3)
    assert "Running stage" not in _dvc(root, env, "repro")
    _run(root, env, "git", "add", "-A")
    _run(root, env, "git", "commit", "-qm", "tracking off, S3 remote")
    _run(root, env, "git", "tag", "-a", "distilled@v1.0.0", "-m", "first distilled set")
    pushed = _dvc_as(root, env, s3.env(), "push")
    assert pushed.returncode == 0, pushed.stderr
    return root, env


def _ben(tmp_path: Path, ada_root: Path) -> tuple[Path, dict[str, str]]:
    (tmp_path / "home").mkdir()
    env = _clean_env(tmp_path / "home")
    clone = tmp_path / "clone"
    _run(tmp_path, env, "git", "clone", "-q", str(ada_root), str(clone))
    return clone, env


@pytest.mark.registry  # Ben's install comes from PyPI (pip's cache when warm)
def test_the_team_sharing_blocks_run_as_written(s3, small_project, tmp_path):
    """docs/services.md "Sharing with a team", both blocks exactly as written, placeholders filled in:
    Ada (her clone, her HOME) distils, commits, pushes the data, the commit and the tag to a shared
    git repository and the S3 bucket; Ben (another HOME) clones it, makes a venv with the `read`
    install only (no JAX, no TensorFlow), pulls, loads the set with pandas, and fetches the tagged
    version without a clone. Both get Ada's bytes."""
    from test_dvc_pipeline import REPO, as_written, run_as_written

    document = REPO / "docs" / "services.md"
    team = tmp_path / "team.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(team)], check=True)
    (tmp_path / "ada-home").mkdir()
    ada_env = _clean_env(tmp_path / "ada-home")
    root = copy_project(small_project, tmp_path / "ada", home=tmp_path / "ada-home").root
    for name in ("pyproject.toml", "README.md", "constraints.txt"):  # what an install from a clone reads
        (root / name).write_bytes((REPO / name).read_bytes())
    _run(root, ada_env, "git", "add", "pyproject.toml", "README.md", "constraints.txt")
    _run(root, ada_env, "git", "commit", "-qm", "the package's install files")
    write_params(root, {"tracking": {"enabled": False}, "distill": {"steps": 260}})  # a run of her own
    _run(root, ada_env, "git", "remote", "add", "origin", str(team))
    _run(root, ada_env, "git", "push", "-q", "origin", "main")  # the team's repository, before today
    keys = {"AWS_ACCESS_KEY_ID=...": f"AWS_ACCESS_KEY_ID={s3.access_key}",
            "AWS_SECRET_ACCESS_KEY=...": f"AWS_SECRET_ACCESS_KEY={s3.secret_key}"}
    run_as_written(as_written(document, "sharer"), root, ada_env,
                   {"https://s3.example.org": s3.endpoint, "s3://kip-team/dvc": f"s3://{s3.bucket}/dvc", **keys})

    (tmp_path / "ben").mkdir()
    (tmp_path / "ben-home").mkdir()
    ben_env = _clean_env(tmp_path / "ben-home")
    ben_env.update(_pip_settings_of_this_machine())
    said = run_as_written(as_written(document, "teammate"), tmp_path / "ben", ben_env, {"<repo>": str(team), **keys})
    clone = tmp_path / "ben" / "kip"
    assert _bytes(clone) == _bytes(root)
    assert json.loads(said[said.index("{"):said.rindex("}") + 1])["valid"] is True
    rows = int(yaml.safe_load((root / "params.yaml").read_text())["distill"]["support_per_class"]) * 10
    assert f"({rows}, " in said  # pandas loaded the rows
    assert (clone / "v1.parquet").read_bytes() == _bytes(root)["distilled.parquet"]
    installed = subprocess.run([str(clone / ".venv" / "bin" / "python"), "-c",
                                "import importlib.util as u; print([m for m in ('jax', 'tensorflow', 'mlflow', 'flax') if u.find_spec(m)])"],
                               capture_output=True, text=True, check=True)
    assert installed.stdout.strip() == "[]"  # the read install, nothing of the pipeline's


def _pip_settings_of_this_machine() -> dict[str, str]:
    """Ben's HOME is a scratch folder: give his pip this machine's cache and configuration (its
    package index mirrors), as his own machine would have its own."""
    settings = {"PIP_CACHE_DIR": os.environ.get("PIP_CACHE_DIR") or str(Path.home() / ".cache" / "pip")}
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "pip" / "pip.conf"
    if "PIP_CONFIG_FILE" in os.environ or config.is_file():
        settings["PIP_CONFIG_FILE"] = os.environ.get("PIP_CONFIG_FILE") or str(config)
    return settings


def test_a_wrong_mlflow_password_names_the_login_and_keeps_every_tracked_file(logged):
    """DVC deletes the evaluate metrics (`cache: false`) before the stage runs; the stage then finds
    the server refusing the login. It says so (not "fix tracking.uri") and puts back what DVC deleted,
    as dvc.lock records it: no file git tracks is lost or changed."""
    import yaml

    root, _, env, user = logged
    _run(root, env, "git", "add", "-A")
    _run(root, env, "git", "commit", "-qm", "Ada's results")  # the metrics are now files git tracks
    listed = _run(root, env, "git", "ls-files").split()
    before = {path: (root / path).read_bytes() for path in listed if (root / path).is_file()}
    assert "metrics/evaluate.json" in before
    params_text = (root / "params.yaml").read_text()
    params = yaml.safe_load(params_text)
    params["evaluate"]["baseline_repeats"] = 5  # evaluate must run: DVC deletes its output first
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        failed = _dvc_as(root, env, {**user, "MLFLOW_TRACKING_PASSWORD": "not-adas-password"}, "repro")
    finally:
        (root / "params.yaml").write_text(params_text)
    assert failed.returncode != 0
    (line,) = [text for text in failed.stderr.splitlines() if text.startswith("stage evaluate: error:")]
    assert "the server refused the login: check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in line, line
    assert "put back metrics/evaluate.json" in line and "not-adas-password" not in failed.stderr + failed.stdout
    changed = sorted(path for path, content in before.items()
                     if not (root / path).is_file() or (root / path).read_bytes() != content)
    assert changed == [], changed


def _dvc_as(root: Path, env: dict[str, str], extra: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env={**env, **extra},
                          capture_output=True, text=True, timeout=600)


def test_the_bucket_refuses_unknown_keys_and_wrong_secrets(s3):
    from botocore.exceptions import ClientError

    client = s3.client()
    client.put_object(Bucket=s3.bucket, Key="probe", Body=b"kip")
    for key, secret in (("nobody", "nothing-at-all-here"), (s3.access_key, "not-the-secret-key")):
        with pytest.raises(ClientError) as refused:
            s3.client(key, secret).get_object(Bucket=s3.bucket, Key="probe")
        assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_a_teammate_pulls_byte_identical_artifacts_from_s3(ada, s3, tmp_path):
    root, _ = ada
    clone, env = _ben(tmp_path, root)
    assert not (clone / "artifacts" / "distilled.npz").exists()
    pulled = _dvc_as(clone, env, s3.env(), "pull", "distill")
    assert pulled.returncode == 0, pulled.stderr
    assert _bytes(clone) == _bytes(root)
    report = _run(clone, env, sys.executable, "-m", "pipeline.run.cli", "inspect", "artifacts/distilled.parquet")
    assert json.loads(report[report.index("{"):])["valid"]


def test_artifacts_get_fetches_a_tagged_version_from_s3(ada, s3, tmp_path):
    root, env = ada
    got = _dvc_as(tmp_path, env, s3.env(), "artifacts", "get", str(root), "distilled", "--rev", "v1.0.0", "-o", "got.parquet")
    assert got.returncode == 0, got.stderr
    assert (tmp_path / "got.parquet").read_bytes() == _bytes(root)["distilled.parquet"]


@pytest.mark.parametrize("keys", [{"AWS_SECRET_ACCESS_KEY": "not-the-secret-key"}, {}], ids=["wrong-secret", "no-keys"])
def test_bad_credentials_fail_clearly_and_leave_nothing(ada, s3, tmp_path, keys):
    root, _ = ada
    clone, env = _ben(tmp_path, root)
    credentials = {**s3.env(), **keys} if keys else {k: v for k, v in s3.env().items() if not k.startswith("AWS_")}
    pulled = _dvc_as(clone, env, credentials, "pull", "distill")
    assert pulled.returncode != 0
    errors = [line for line in pulled.stderr.splitlines() if line.startswith("ERROR")]
    assert errors, pulled.stderr
    assert not (clone / "artifacts" / "distilled.npz").exists() and not (clone / "artifacts" / "distilled.parquet").exists()


def test_a_stopped_server_fails_clearly_and_leaves_nothing(ada, tmp_path):
    root, _ = ada
    clone, env = _ben(tmp_path, root)
    _dvc(clone, env, "remote", "modify", "--local", "team", "endpointurl", "http://127.0.0.1:9")  # nothing listens
    pulled = _dvc_as(clone, env, {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"}, "pull", "distill")
    assert pulled.returncode != 0 and any(line.startswith("ERROR") for line in pulled.stderr.splitlines())
    assert not (clone / "artifacts" / "distilled.npz").exists()
