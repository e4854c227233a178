"""The pipeline as users run it: `dvc repro`, `dvc push`/`pull`, `dvc exp run`, through DVC itself.

The project's dvc.yaml, stages/, pipeline/ and DVC config in a scratch git repo with small params
(tests/projects.py: embedded digits, a few hundred cheap KIP steps); this module works on a copy of
the session's finished `dvc repro` of it (`small_project`).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from projects import (REPO, SMALL, copy_project, distilled_bytes as _bytes, dvc as _dvc, run as _run, stages_ran as _ran,
                      write_params)

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


@pytest.fixture(scope="module")
def project(small_project, tmp_path_factory):
    """A copy of the finished small project, for this module to change."""
    copy = copy_project(small_project, tmp_path_factory.mktemp("dvc") / "project")
    return copy.root, copy.env, copy.printed


def test_repro_runs_every_stage_and_writes_metrics_artifacts_and_plots(project):
    root, env, first = project
    assert _ran(first) == {"prepare", "distill", "evaluate", "train"}
    metrics = json.loads((root / "metrics" / "evaluate.json").read_text())
    assert metrics["support_size"] == 20
    assert metrics["krr_test_accuracy"] > metrics["baseline_test_accuracy"]
    trained = json.loads((root / "metrics" / "train.json").read_text())
    assert trained["seeds"] == 2 and trained["support_size"] == 20
    curve = (root / "plots" / "distill_accuracy.csv").read_text().splitlines()
    assert curve[0] == "step,val_accuracy" and [row.split(",")[0] for row in curve[1:]] == [str(s) for s in range(0, 401, 20)]
    html = _dvc(root, env, "plots", "show", "-o", "dvc_plots")
    assert (root / "dvc_plots" / "index.html").exists(), html
    shown = json.loads(_dvc(root, env, "metrics", "show", "--json"))
    assert "krr_test_accuracy" in json.dumps(shown)


def test_the_stages_metrics_are_the_library_run_on_their_artifacts(project):
    """What DVC recorded is what the library computes from the files the stages wrote: KRR scored
    directly on the distilled set, the evaluate and train stages' whole metrics recomputed in this
    process from distilled.npz and prepared.npz. Equal, not close: the same computation on the same
    machine (the README's determinism promise)."""
    from pipeline.artifacts import npz as artifacts
    from pipeline.data import prepared as prep_io
    from pipeline.evaluate import transfer
    from pipeline.evaluate.scoring import krr_scores
    from pipeline.kernels import functions as kernels
    from pipeline.run import workflow
    from pipeline.run.config import EvaluateConfig, KernelConfig, TrainConfig
    from pipeline.run.params import read_params, section, seed

    root, _, _ = project
    distilled = artifacts.load_npz(root / "artifacts" / "distilled.npz")
    prepared = prep_io.load(root / "data" / "prepared.npz")
    written = json.loads((root / "metrics" / "evaluate.json").read_text())
    direct = krr_scores(kernels.make(KernelConfig(**distilled.metadata["kernel"])), distilled.images, distilled.labels,
                        prepared.x_test, prepared.y_test, prepared.num_classes, EvaluateConfig().reg)
    assert (written["krr_test_accuracy"], written["krr_test_mse"]) == (direct["accuracy"], direct["mse"])
    params = read_params(root / "params.yaml")  # the stages' configs, as they read them
    assert written == workflow.evaluate(distilled, prepared, section(params, "evaluate", EvaluateConfig, seed=seed(params)))
    trained = json.loads((root / "metrics" / "train.json").read_text())
    train = section(params, "train", TrainConfig, seed=seed(params))
    assert trained == transfer.transfer(distilled, prepared, train, progress=False)[0]


def _mlflow(root: Path):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("kip-pipeline")
    assert experiment is not None, "the stages logged nothing to the project's mlflow.db"
    return client, experiment.experiment_id


def _first_execution(client, experiment_id: str):
    parents = client.search_runs(
        [experiment_id], filter_string="tags.`kip.role` = 'pipeline'", order_by=["attributes.start_time ASC"]
    )
    children = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    return parents[0], {run.info.run_name: run for run in children}


def test_mlflow_records_params_metrics_lineage_and_images_as_the_stages_wrote_them(project):
    root, env, _ = project
    client, experiment_id = _mlflow(root)
    parent, stages = _first_execution(client, experiment_id)
    assert set(stages) == {"prepare", "distill", "evaluate", "train"}
    assert all(run.info.status == "FINISHED" for run in stages.values())
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    out_md5 = {out["path"]: out["md5"] for out in lock["distill"]["outs"]}

    evaluate = stages["evaluate"]
    written = json.loads((root / "metrics" / "evaluate.json").read_text())
    for key, value in written.items():
        if isinstance(value, str):  # a label, not a number: a tag
            assert evaluate.data.tags[f"kip.{key}"] == value, key
            continue
        assert evaluate.data.metrics[key] == pytest.approx(value), key
        assert parent.data.metrics[key] == pytest.approx(value), key  # the runs table compares executions
    assert evaluate.data.params["evaluate.baseline_repeats"] == "2" and evaluate.data.params["seed"] == "0"
    assert evaluate.data.tags["kip.in.artifacts/distilled.npz"] == out_md5["artifacts/distilled.npz"]
    head = _run(root, env, "git", "rev-parse", "HEAD~1").strip()  # the commit the first repro ran on
    assert evaluate.data.tags["kip.git_commit"] == head and evaluate.data.tags["kip.git_dirty"] == "false"

    distill = stages["distill"]
    assert distill.data.params["distill.steps"] == "400" and distill.data.params["kernel.architecture"] == "fc"
    written = json.loads((root / "metrics" / "distill.json").read_text())
    assert distill.data.metrics["final_loss"] == pytest.approx(written["final_loss"])
    losses = client.get_metric_history(distill.info.run_id, "loss")
    assert sorted(m.step for m in losses) == list(range(1, 401))
    curve = (root / "plots" / "distill_accuracy.csv").read_text().splitlines()[1:]
    monitored = {m.step: m.value for m in client.get_metric_history(distill.info.run_id, "val_accuracy")}
    assert monitored == pytest.approx({int(r.split(",")[0]): float(r.split(",")[1]) for r in curve})
    tags = distill.data.tags
    assert tags["kip.out.artifacts/distilled.parquet"] == out_md5["artifacts/distilled.parquet"]
    assert tags["kip.in.data/prepared.npz"] == {d["path"]: d["md5"] for d in lock["distill"]["deps"]}["data/prepared.npz"]
    assert parent.data.tags["kip.out.artifacts/distilled.npz"] == out_md5["artifacts/distilled.npz"]
    assert tags["kip.dataset.name"] == "digits" and tags["kip.dataset.source"] == "embedded"
    assert len(tags["kip.dataset.fingerprint"]) == 64 and tags["kip.version.neural-tangents"] == "0.6.5"
    assert tags["kip.seed"] == "0" and "kip.git_commit" in tags and "kip.params_hash" in tags

    inputs = {(d.dataset.name, d.tags[0].value): d.dataset for d in distill.inputs.dataset_inputs}
    assert inputs[("distilled", "distilled")].digest == out_md5["artifacts/distilled.parquet"]
    assert inputs[("embedded:digits", "training")].digest == tags["kip.dataset.fingerprint"][:32]
    assert inputs[("embedded:digits", "training")].source_type == "code"  # scikit-learn supplies it: no URL to claim
    assert inputs[("distilled", "distilled")].source_type == "local"
    assert {a.path for a in client.list_artifacts(distill.info.run_id, "images")} == {
        "images/support_images.png", "images/learning_curves.png"}
    assert {a.path for a in client.list_artifacts(distill.info.run_id, "distilled")} == {
        "distilled/distilled.npz", "distilled/distilled.parquet"}
    assert parent.data.params["distill.support_per_class"] == "2" and parent.data.params["data.name"] == "digits"

    train = stages["train"]
    written = json.loads((root / "metrics" / "train.json").read_text())
    for key in ("nn_test_accuracy", "nn_test_accuracy_std", "nn_baseline_test_accuracy"):
        assert train.data.metrics[key] == pytest.approx(written[key])
        assert parent.data.metrics[key] == pytest.approx(written[key])
    assert train.data.params["train.width"] == "64" and train.data.params["seed"] == "0"
    assert [m.step for m in client.get_metric_history(train.info.run_id, "distilled_val_accuracy")] == [20, 40]


def test_kip_ui_serves_the_store_and_prints_the_runs_view_of_the_deciding_metrics(project):
    """`kip ui` in the project: one line on stdout, the address of the runs view; behind it `mlflow ui`
    serves the project's store, whose experiment carries the view in MLflow's shared-view tag, naming
    metrics the parent run really has, best validation accuracy first."""
    import signal
    import socket
    import time
    import urllib.parse
    import urllib.request

    from pipeline.run import tracking

    root, env, _ = project
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ui = subprocess.Popen([sys.executable, "-m", "pipeline.run.cli", "ui", "--port", str(port)], cwd=root, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        address = ui.stdout.readline().strip()
        assert address.startswith(f"http://127.0.0.1:{port}/#/experiments/"), (address, ui.stderr.read() if ui.poll() is not None else "")
        base, fragment = address.split("/#/", 1)
        query = urllib.parse.parse_qs(fragment.split("?", 1)[1])
        assert query["viewStateShareKey"] == [tracking.RUNS_VIEW_KEY] and query["workflowType"] == ["machine_learning"]
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2).read()
                break
            except OSError:
                assert ui.poll() is None, f"kip ui exited: {ui.stderr.read()}"
                assert time.monotonic() < deadline, "kip ui's server did not come up in 120 s"
                time.sleep(1)
        with urllib.request.urlopen(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=kip-pipeline") as r:
            experiment = json.load(r)["experiment"]
        assert fragment.startswith(f"experiments/{experiment['experiment_id']}/runs?")
        tags = {tag["key"]: tag["value"] for tag in experiment["tags"]}
        view = json.loads(tags[f"mlflow.sharedViewState.{tracking.RUNS_VIEW_KEY}"])
        request = urllib.request.Request(
            f"{base}/api/2.0/mlflow/runs/search", method="POST", headers={"Content-Type": "application/json"},
            data=json.dumps({"experiment_ids": [experiment["experiment_id"]], "filter": view["searchFilter"]}).encode(),
        )
        with urllib.request.urlopen(request) as r:
            (parent,) = json.load(r)["runs"]  # the view lists executions: one here, not its four stages
        logged = {m["key"] for m in parent["data"]["metrics"]}
        shown = {column.removeprefix("metrics.`").removesuffix("`") for column in view["selectedColumns"]}
        assert shown <= logged, shown - logged  # every column has numbers
        assert {"krr_val_accuracy", "nn_val_accuracy"} <= shown
        assert view["orderByKey"] == "metrics.`krr_val_accuracy`" and view["orderByAsc"] is False
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        try:
            ui.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(ui.pid, signal.SIGKILL)
            ui.wait()


def test_second_repro_does_nothing(project):
    root, env, _ = project
    before = _bytes(root)
    assert _ran(_dvc(root, env, "repro")) == set()
    assert _bytes(root) == before


def test_changing_evaluate_params_reruns_only_evaluate(project):
    root, env, _ = project
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["evaluate"]["baseline_repeats"] = 3
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        status = _dvc(root, env, "status")
        assert "evaluate" in status and "distill:" not in status and "prepare:" not in status
        assert _ran(_dvc(root, env, "repro")) == {"evaluate"}
    finally:
        _run(root, env, "git", "checkout", "--", "params.yaml", "dvc.lock", "metrics")
    assert _ran(_dvc(root, env, "repro")) == set()  # back to the committed state: nothing to do


def test_same_params_from_scratch_give_byte_identical_artifacts(project):
    root, env, _ = project
    before = _bytes(root)
    shutil.rmtree(root / "checkpoints")  # no resuming: a genuine second computation
    assert _ran(_dvc(root, env, "repro", "--force")) == {"prepare", "distill", "evaluate", "train"}
    assert _bytes(root) == before
    assert _run(root, env, "git", "status", "--porcelain").strip() == ""
    client, experiment_id = _mlflow(root)
    (latest,) = client.search_runs([experiment_id], "tags.`kip.stage` = 'evaluate'", order_by=["attributes.start_time DESC"], max_results=1)
    assert latest.data.tags["kip.git_dirty"] == "false"  # DVC deleting tracked metrics/ before the stage is not an edit


def _outputs(root: Path) -> dict[str, bytes]:
    """Every output of the four stages, by path."""
    found = {}
    for folder in ("artifacts", "metrics", "plots", "data"):
        for path in sorted((root / folder).glob("*")):
            if path.is_file() and path.name != ".gitignore":
                found[f"{folder}/{path.name}"] = path.read_bytes()
    return found


@pytest.mark.parametrize("section", ["distill", "evaluate"])
def test_a_misspelt_params_section_loses_no_output_after_the_documented_recovery(project, section):
    """DVC deletes a stage's outputs before it finds the stage's params section missing
    ("Parameters 'distill' are missing"), committed or not. The documented recovery (README,
    "Guarantees"): fix the name and run `dvc repro`. Every stage is deterministic, so what it rewrites
    is byte-identical; distill resumes from its last checkpoint instead of computing again, and
    evaluate comes from DVC's run cache. The evaluate metrics here exist only in the working tree."""
    root, env, _ = project
    params_path = root / "params.yaml"
    committed = params_path.read_text()
    try:
        params = yaml.safe_load(committed)
        params["evaluate"]["baseline_repeats"] = 4 if section == "distill" else 5  # a result not yet in the run cache
        params_path.write_text(yaml.safe_dump(params, sort_keys=False))
        assert _ran(_dvc(root, env, "repro")) == {"evaluate"}
        edited = params_path.read_text()
        before = _outputs(root)
        typo = section[:-1]
        params_path.write_text(edited.replace(f"\n{section}:", f"\n{typo}:"))
        failed = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert failed.returncode != 0 and f"'{section}' are missing" in failed.stdout + failed.stderr
        lost = sorted(set(before) - set(_outputs(root)))
        assert lost, "DVC no longer deletes outputs before the params check: the README's recovery note can go"
        params_path.write_text(edited)
        recovered = _dvc(root, env, "repro")
        assert _ran(recovered) <= {"distill"}, recovered
        if "distill" in _ran(recovered):
            assert "kip: resuming from" in recovered and "at step 400" in recovered, recovered
        assert _outputs(root) == before, sorted(name for name in before if _outputs(root).get(name) != before[name])
    finally:
        params_path.write_text(committed)
        _run(root, env, "git", "checkout", "--", "dvc.lock", "metrics")
    assert _ran(_dvc(root, env, "repro")) == set()


def test_push_then_pull_in_a_fresh_clone_restores_identical_artifacts(project, tmp_path):
    root, env, _ = project
    _dvc(root, env, "push")
    clone = tmp_path / "clone"
    _run(tmp_path, env, "git", "clone", "-q", str(root), str(clone))
    assert not (clone / "artifacts" / "distilled.parquet").exists()
    _dvc(clone, env, "pull", "distill")
    assert _bytes(clone) == _bytes(root)
    report = _run(clone, env, sys.executable, "-m", "pipeline.run.cli", "inspect", "artifacts/distilled.parquet")
    summary = json.loads(report[report.index("{"):])
    assert summary["valid"] and summary["images"] == 20 and summary["dataset"]["name"] == "digits"


def test_artifacts_get_fetches_a_tagged_version_without_a_checkout(project, tmp_path):
    root, env, _ = project
    _dvc(root, env, "push")
    _run(root, env, "git", "tag", "-a", "distilled@v0.1.0", "-m", "first distilled set")
    _dvc(tmp_path, env, "artifacts", "get", str(root), "distilled", "--rev", "v0.1.0", "-o", "got.parquet")
    assert (tmp_path / "got.parquet").read_bytes() == _bytes(root)["distilled.parquet"]


def test_experiment_with_a_changed_key_is_compared_by_exp_show(project):
    root, env, _ = project
    _dvc(root, env, "exp", "run", "-n", "spc3", "-S", "distill.support_per_class=3")
    table = json.loads(_dvc(root, env, "exp", "show", "--json"))
    runs = json.dumps(table)
    assert "spc3" in runs
    experiment = _find_experiment(table, "spc3")
    metrics = experiment["metrics"]["metrics/evaluate.json"]["data"]
    assert metrics["support_size"] == 30
    assert experiment["params"]["params.yaml"]["data"]["distill"]["support_per_class"] == 3


def _find_experiment(table: list[dict], name: str) -> dict:
    for baseline in table:
        for run in baseline.get("experiments") or []:
            for revision in run.get("revs") or []:
                if revision.get("name") == name:
                    return revision["data"]
    raise AssertionError(f"experiment {name} not in `dvc exp show --json`: {json.dumps(table)[:2000]}")


def test_a_convnet_kernel_experiment_runs_through_dvc(project):
    """docs/stages.md's ConvNet example, shrunk: `dvc exp run -S kernel.architecture=conv_rf ...` distils with
    the random-feature ConvNet kernel, evaluates under its fixed draw and trains ConvNets; exp show
    has the kept step, the KRR test accuracy beside its baselines, and the ConvNets' accuracy."""
    root, env, _ = project
    settings = ["distill.steps=30", "distill.eval_every=10", "distill.keep=best_validation", "kernel.architecture=conv_rf", "kernel.kind=nngp", "kernel.depth=2", "kernel.rf_width=8",
                "kernel.rf_networks=2", "kernel.rf_eval_networks=2", "distill.learn_labels=true",
                "distill.learning_rate=0.01", "train.architecture=conv", "train.conv_depth=2", "train.conv_width=8",
                "train.labels_choice=fixed"]
    _dvc(root, env, "exp", "run", "-n", "convrf", *[arg for s in settings for arg in ("-S", s)])
    experiment = _find_experiment(json.loads(_dvc(root, env, "exp", "show", "--json")), "convrf")
    distill = experiment["metrics"]["metrics/distill.json"]["data"]
    evaluate = experiment["metrics"]["metrics/evaluate.json"]["data"]
    train = experiment["metrics"]["metrics/train.json"]["data"]
    assert experiment["params"]["params.yaml"]["data"]["kernel"]["architecture"] == "conv_rf"
    # `dvc exp run` leaves the experiment's outputs in the workspace: its numbers are those files'
    from pipeline.artifacts import npz as artifacts
    from pipeline.data import prepared as prep_io
    from pipeline.evaluate.scoring import krr_scores
    from pipeline.kernels import functions as kernels
    from pipeline.run.config import KernelConfig

    distilled = artifacts.load_npz(root / "artifacts" / "distilled.npz")
    assert distilled.metadata["kernel"]["architecture"] == "conv_rf"
    curve = (root / "plots" / "distill_accuracy.csv").read_text().splitlines()[1:]
    kept = max(curve, key=lambda row: float(row.split(",")[1]))  # the first best validation step is kept
    assert [row.split(",")[0] for row in curve] == ["0", "10", "20", "30"]
    assert (distill["kept_step"], distill["kept_val_accuracy"]) == (int(kept.split(",")[0]), float(kept.split(",")[1]))
    prepared = prep_io.load(root / "data" / "prepared.npz")
    direct = krr_scores(kernels.make(KernelConfig(**distilled.metadata["kernel"])), distilled.images, distilled.labels,
                        prepared.x_test, prepared.y_test, prepared.num_classes, 1e-6, 500)
    assert (evaluate["krr_test_accuracy"], evaluate["krr_test_mse"]) == (direct["accuracy"], direct["mse"])
    assert 0 < evaluate["label_solve_test_accuracy"] <= 1 and 0 < evaluate["baseline_test_accuracy"] <= 1
    assert train["support_size"] == len(distilled.images) and train["seeds"] == 2


def test_the_committed_lock_records_the_code_and_params_in_the_tree(tmp_path):
    """`dvc repro` after a code or params change must be committed with its dvc.lock: otherwise a
    fresh clone's `dvc repro` re-runs stages that were already run (and leaves git dirty). DVC itself
    compares: no stage may report a changed source file or param (data and outputs a fresh clone
    does not have are not counted)."""
    from projects import REPO, env_for

    result = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=REPO, env=env_for(tmp_path),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    stale = {}
    for stage, changes in json.loads(result.stdout or "{}").items():
        for change in changes:
            deps = {path: what for path, what in change.get("changed deps", {}).items()
                    if path.startswith(("pipeline", "stages/")) or path == "params.yaml"}
            if deps or change.get("changed params") or "changed command" in change:
                stale[stage] = {**deps, **change.get("changed params", {}), **({"cmd": "changed"} if "changed command" in change else {})}
    assert not stale, f"dvc.lock is stale (run `dvc repro` and commit dvc.lock): {stale}"


def test_a_queued_experiment_records_its_own_checkout_as_dirty(small_project, tmp_path):
    """`dvc exp run --queue -S ...` from a clean project: DVC runs the stages in a checkout of its own
    (.dvc/tmp/exps/...) with the changed params applied there, and DVC_ROOT names the clean project.
    The runs must say dirty (params differ from the commit) and name the commit they started from."""
    copy = copy_project(small_project, tmp_path / "project")  # clean, whatever this module's other tests did
    root, env = copy.root, copy.env
    assert _run(root, env, "git", "status", "--porcelain", "--untracked-files=no").strip() == ""
    _dvc(root, env, "exp", "run", "--queue", "-n", "queued-dirty", "-S", "evaluate.baseline_repeats=7")  # a value no other test runs
    _dvc(root, env, "exp", "run", "--run-all")
    head = _run(root, env, "git", "rev-parse", "HEAD").strip()
    client, experiment_id = _mlflow(root)
    (parent,) = client.search_runs([experiment_id], "tags.`kip.role` = 'pipeline' and attributes.run_name LIKE 'queued-dirty%'")
    children = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert "evaluate" in {run.info.run_name for run in children}
    for run in (parent, *children):
        assert run.data.tags["kip.git_dirty"] == "true", run.info.run_name
        assert run.data.tags["kip.git_commit"] == head
    assert parent.info.run_name == "queued-dirty · digits fc-ntk 2/class · evaluate.baseline_repeats=7"


def as_written(document: Path, name: str) -> str:
    """The bash block the docs mark `<!-- as-written: name -->`, exactly as a reader copies it."""
    import re

    found = re.search(rf"<!-- as-written: {name} -->\n```bash\n(.*?)```", document.read_text(), re.S)
    assert found, f"{document} has no as-written block {name!r}"
    return found.group(1)


def run_as_written(script: str, cwd: Path, env: dict[str, str], fill: dict[str, str]) -> str:
    """Run a docs block under bash -e, with only its placeholders filled in (each must be there)."""
    for placeholder, value in fill.items():
        assert placeholder in script, f"the block no longer has {placeholder!r}"
        script = script.replace(placeholder, value)
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, f"{script}\nfailed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def test_the_readme_sharing_block_runs_as_written(small_project, tmp_path):
    """README "Sharing with a team and comparing runs": after a changed run, commit, push, clone
    beside it, pull: the copy holds the same bytes, and its lock is the one that names them."""
    project = copy_project(small_project, tmp_path / "project")
    root, env = project.root, project.env
    write_params(root, {"distill": {"steps": 240}})  # what a user does before sharing: a run of their own
    assert "distill" in _ran(_dvc(root, env, "repro"))
    run_as_written(as_written(REPO / "README.md", "local"), root, env, {})
    copy = tmp_path / "kip-copy"
    assert _bytes(copy) == _bytes(root)
    assert (copy / "dvc.lock").read_bytes() == (root / "dvc.lock").read_bytes()
