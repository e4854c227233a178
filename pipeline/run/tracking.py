"""MLflow tracking for pipeline stages: one parent run per pipeline execution, a child per stage.

DVC runs each stage in its own process, and runs only the stages that are out of date. So a stage
cannot count on a parent run started by an earlier one; instead each stage finds (or creates) the
parent run for the current *pipeline execution* and nests its own run under it. The execution is
identified by `DVC_EXP_NAME` when DVC runs an experiment, else by the git commit plus a hash of
params.yaml: every stage of one `dvc repro` lands under the same parent, and a rerun with other
params gets a new one. Stages DVC skipped log nothing.

Lineage is recorded from the files themselves, not from dvc.lock (DVC rewrites it only after a
stage finishes): each stage tags the md5 of every file it read (`kip.in.<path>`) and wrote
(`kip.out.<path>`), the same md5 DVC puts in dvc.lock, on its own run and on the parent.

The store defaults to a SQLite file in the project (`sqlite:///<root>/mlflow.db`), never a network
address; `tracking.uri` or `MLFLOW_TRACKING_URI` points elsewhere. A store that cannot be reached
stops the stage with one line naming the URI; `tracking.enabled: false` skips tracking entirely.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence


from pipeline.artifacts.atomic import file_digest
from pipeline.errors import UserError
from pipeline.run.config import TrackingConfig
from pipeline.run.params import load_yaml

PIPELINE_ROLE = "pipeline"
PIPELINE_OUTPUTS = ("dvc.lock", "metrics", "plots")
_CHUNK = 1000  # MLflow's log_batch limit on metrics per call


def resolve_uri(config: TrackingConfig, project_root: Path) -> str:
    """params.yaml `tracking.uri`, else $MLFLOW_TRACKING_URI, else the project's SQLite file."""
    if config.uri:
        return config.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(Path(project_root) / 'mlflow.db').resolve()}"


def project_config(root: Path) -> TrackingConfig:
    """The `tracking` section of the project's params.yaml, as the stages read it (defaults if absent)."""
    params_file = Path(root) / "params.yaml"
    section: Any = {}
    if params_file.is_file():
        document = load_yaml(params_file.read_text(), str(params_file)) or {}
        section = (document.get("tracking") or {}) if isinstance(document, dict) else {}
    if not isinstance(section, Mapping):
        raise UserError(f"tracking={section!r} in {params_file} is not allowed; expected a mapping")
    return TrackingConfig(**section)


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"distill": {"steps": 10}} -> {"distill.steps": "10"}: MLflow params are flat strings."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if not isinstance(value, str) else value
    return flat


def file_md5(path: Path) -> str:
    """The md5 DVC records for a file (dvc.lock), so MLflow and DVC name artifacts alike."""
    return file_digest(path, "md5")


class Tracker:
    """Logging into one stage run. Every call turns a store failure into one line naming the URI."""

    def __init__(self, run_id: str, uri: str, parent_id: str = ""):
        self.run_id = run_id
        self.uri = uri
        self.parent_id = parent_id

    def log_summary(self, metrics: Mapping[str, Any]) -> None:
        """Final numbers on the parent run too, so the runs table compares executions directly."""
        import mlflow
        from mlflow.entities import Metric

        now = int(time.time() * 1000)  # the latest rerun under the same parent must win
        values = [
            Metric(key=k, value=float(v), timestamp=now, step=0)
            for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        with self._store():
            mlflow.MlflowClient().log_batch(self.parent_id, metrics=values)

    def log_params(self, params: Mapping[str, Any]) -> None:
        import mlflow

        with self._store():
            mlflow.log_params({key: redact(value) for key, value in flatten(params).items()})

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        import mlflow

        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        with self._store():
            mlflow.log_metrics(numeric, step=step)

    def log_history(self, history: Sequence[Mapping[str, float]]) -> None:
        """Per-step metrics (everything but `step`) in batches: one call per 1000 values, not per step."""
        import mlflow
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(key=key, value=float(value), timestamp=now, step=int(record["step"]))
            for record in history for key, value in record.items() if key != "step"
        ]
        client = mlflow.MlflowClient()
        with self._store():
            for start in range(0, len(metrics), _CHUNK):
                client.log_batch(self.run_id, metrics=metrics[start:start + _CHUNK])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        import mlflow

        with self._store():
            mlflow.set_tags({k: redact(str(v)) for k, v in tags.items()})

    def tag_files(self, *, read: Sequence[Path] = (), wrote: Sequence[Path] = ()) -> None:
        """md5 of the files this stage read and wrote, on its run and on the parent (lineage)."""
        import mlflow

        tags = {f"kip.in.{Path(p).as_posix()}": file_md5(p) for p in read}
        tags.update({f"kip.out.{Path(p).as_posix()}": file_md5(p) for p in wrote})
        client = mlflow.MlflowClient()
        with self._store():
            mlflow.set_tags(tags)
            for name, value in tags.items():
                client.set_tag(self.parent_id, name, value)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        import mlflow

        with self._store():
            mlflow.log_artifact(str(path), artifact_path)

    def log_input(self, name: str, source: Path | Mapping[str, Any], digest: str, context: str) -> None:
        """Record a dataset by reference (where it is + digest): lineage without copying data.

        `source` is a local file (a Path), or the source dataset's description (`Dataset.describe()`),
        which becomes the MLflow source type that says where that data comes from (`dataset_source`).
        """
        import mlflow
        from mlflow.data.meta_dataset import MetaDataset

        where = _file_source(source) if isinstance(source, Path) else dataset_source(source)
        dataset = MetaDataset(where, name=name, digest=digest[:32])
        with self._store():
            mlflow.log_input(dataset, context=context)

    @contextlib.contextmanager
    def _store(self) -> Iterator[None]:
        try:
            yield
        except UserError:
            raise
        except Exception as err:  # MLflow raises many types (MlflowException, requests, sqlalchemy)
            hint = _refused_login(err)
            raise UserError(redact(f"tracking.uri={self.uri}: the MLflow store failed ({_first_line(err)})"
                                   + (f"; {hint}" if hint else ""))) from None


class NullTracker(Tracker):
    """`tracking.enabled: false`: every call does nothing."""

    def __init__(self) -> None:
        super().__init__(run_id="", uri="")

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_summary(self, metrics: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None: ...
    def log_history(self, history: Sequence[Mapping[str, float]]) -> None: ...
    def set_tags(self, tags: Mapping[str, Any]) -> None: ...
    def tag_files(self, *, read: Sequence[Path] = (), wrote: Sequence[Path] = ()) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def log_input(self, name: str, source: Path | Mapping[str, Any], digest: str, context: str) -> None: ...


@contextlib.contextmanager
def stage_run(stage: str, config: TrackingConfig, *, params_file: Path, project_root: Path,
              workspace: Path | None = None) -> Iterator[Tracker]:
    """An MLflow run for `stage`, nested under this pipeline execution's parent run.

    `project_root` locates the default store; `workspace` (default: the same) is the git checkout the
    stage runs in, whose commit and dirty flag are recorded. They differ for queued and `--temp`
    experiments, which DVC runs in a checkout of their own under `.dvc/tmp/exps/` with the
    experiment's params applied there, not in the project. The run ends FAILED if the stage raises,
    FINISHED otherwise.
    """
    if not config.enabled:
        yield NullTracker()
        return
    # mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI; put it back afterwards, or the next
    # stage run in this process would take our resolved URI for a user setting.
    exported = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with _stage_run(stage, config, Path(params_file), Path(project_root), Path(workspace or project_root)) as tracker:
            yield tracker
    finally:
        if exported is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = exported


@contextlib.contextmanager
def _stage_run(stage: str, config: TrackingConfig, params_file: Path, project_root: Path,
               workspace: Path) -> Iterator[Tracker]:
    import mlflow

    # Fail fast on an unreachable server instead of retrying for minutes.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    uri = resolve_uri(config, project_root)
    user_chose_store = bool(config.uri or os.environ.get("MLFLOW_TRACKING_URI"))
    params_text = params_file.read_text()
    git = _git_state(workspace)
    key = _execution_key(git["commit"], params_text)
    try:
        mlflow.set_tracking_uri(uri)
        # Artifacts of the default store live beside it (not in ./mlruns of whatever directory a
        # stage happens to run in: `dvc exp run --temp` runs in a temporary copy).
        artifacts = None if user_chose_store else (project_root / "mlruns").resolve().as_uri()
        experiment_id = _experiment_id(config.experiment, artifacts)
        params = load_yaml(params_text, str(params_file)) or {}
        name = run_name(params, _committed_params(workspace, params_file), os.environ.get("DVC_EXP_NAME"))
        parent_id = _parent_run(experiment_id, key, git, params, name)
    except UserError:
        raise
    except Exception as err:
        raise UserError(redact(
            f"tracking.uri={uri}: cannot use the MLflow store ({_first_line(err)}); "
            + (_refused_login(err) or _store_problem(uri)
               or "fix tracking.uri / MLFLOW_TRACKING_URI, or set tracking.enabled: false")
        )) from None
    with contextlib.suppress(Exception):  # tidying up after others must never stop this stage
        _end_orphaned_runs(experiment_id)
    tags = {
        "kip.stage": stage,
        "kip.host": socket.gethostname(),
        "kip.pid": str(os.getpid()),
        "kip.pipeline_key": key,
        "kip.git_commit": git["commit"],
        "kip.git_dirty": git["dirty"],
        **_versions(),
    }
    guard = Tracker("", uri, parent_id)._store  # store failures -> one line naming the URI
    with guard():
        run = mlflow.start_run(experiment_id=experiment_id, run_name=stage, parent_run_id=parent_id, tags=tags)
    try:
        yield Tracker(run.info.run_id, uri, parent_id)
    except BaseException as failure:
        status = "KILLED" if isinstance(failure, KeyboardInterrupt) else "FAILED"
        with contextlib.suppress(Exception):  # the stage's own error is the one to report
            mlflow.end_run(status)
            mlflow.MlflowClient().set_terminated(parent_id, status)  # the execution's latest stage failed
        raise
    with guard():
        mlflow.end_run("FINISHED")
        mlflow.MlflowClient().set_terminated(parent_id, "FINISHED")


# MLflow 3's UI opens an experiment on its GenAI "Overview" page. Which page it opens follows the
# experiment's kind tag, and in 3.17 a browser-wide "GenAI / Model training" switch that a URL can set
# (workflowType=machine_learning, remembered by the browser): our experiments carry the tag, and the
# links we print set the switch, so they open on the runs table.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


# The runs table opens with no metric columns. The view below is a "shared view" in MLflow's own
# format: the UI's Share button stores a view as the experiment tag mlflow.sharedViewState.<key>, and
# an address with ?viewStateShareKey=<key> opens it. Ours lists the executions (parent runs; their
# stages are one click away on each run's page) with their deciding numbers (validation accuracy:
# KRR, then networks) and the reported test numbers beside their baselines, best
# krr_val_accuracy first, in columns narrow enough that all six fit beside the names on a laptop.
RUNS_VIEW_KEY = "kip-runs"
RUNS_VIEW_METRICS = ("krr_val_accuracy", "nn_val_accuracy", "krr_test_accuracy", "baseline_test_accuracy",
                     "nn_test_accuracy", "nn_baseline_test_accuracy")


def runs_view() -> dict[str, Any]:
    """The shared view's state: MLflow 3.17's search facets and table settings (keys the UI reads)."""
    metrics = [f"metrics.`{name}`" for name in RUNS_VIEW_METRICS]
    name = "attributes.`Run Name`"
    return {"searchFilter": f"tags.`kip.role` = '{PIPELINE_ROLE}'", "orderByKey": metrics[0], "orderByAsc": False,
            "startTime": "ALL", "lifecycleFilter": "Active", "datasetsFilter": [],
            "selectedColumns": metrics, "columnOrder": [name, *metrics],
            "columnWidths": {name: 260, **{column: 130 for column in metrics}},
            "runListHidden": False, "viewMaximized": False}


def experiment_url(server: str, experiment_id: str) -> str:
    """The address of an experiment's runs table, in the view that shows the deciding metrics."""
    return (f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
            f"&viewStateShareKey={RUNS_VIEW_KEY}")


def ensure_runs_view(client: Any, experiment_id: str, tags: Mapping[str, str]) -> None:
    """Put the runs view on the experiment through `client` (an MlflowClient), unless it is there
    already: one write per experiment."""
    key, value = f"mlflow.sharedViewState.{RUNS_VIEW_KEY}", json.dumps(runs_view(), sort_keys=True)
    if tags.get(key) != value:
        client.set_experiment_tag(experiment_id, key, value)


def _experiment_id(name: str, artifact_location: str | None) -> str:
    import mlflow

    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        experiment_id = mlflow.create_experiment(name, artifact_location=artifact_location, tags=EXPERIMENT_KIND)
        ensure_runs_view(mlflow.MlflowClient(), experiment_id, {})
        return experiment_id
    if not set(EXPERIMENT_KIND) <= set(experiment.tags):  # made by an older version, or by hand: only add, never overwrite
        for key, value in EXPERIMENT_KIND.items():
            mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, key, value)
    with contextlib.suppress(Exception):  # a teammate without EDIT on the experiment still logs runs
        ensure_runs_view(mlflow.MlflowClient(), experiment.experiment_id, experiment.tags)
    return experiment.experiment_id


def run_name(params: Mapping[str, Any], committed: Mapping[str, Any] | None, experiment: str | None) -> str:
    """What a pipeline execution is, at a glance in the runs list: the experiment's name if DVC gave
    one, the dataset, kernel and support size, then every param that differs from the committed
    params.yaml (`tracking.*` aside: it says where runs go, not what they are)."""
    def get(section: str, key: str, default: Any) -> Any:
        value = params.get(section)
        return value.get(key, default) if isinstance(value, Mapping) else default

    what = (f"{get('data', 'name', 'mnist')} {get('kernel', 'architecture', 'fc')}-{get('kernel', 'kind', 'ntk')} "
            f"{get('distill', 'support_per_class', 10)}/class")
    parts = [experiment] if experiment else []
    parts.append(what)
    if committed is not None:
        now, before = flatten(params), flatten(committed)
        changed = [f"{k}={now.get(k, '(removed)')}" for k in sorted(set(now) | set(before))
                   if now.get(k) != before.get(k) and not k.startswith("tracking.")]
        parts += changed[:4] + ([f"+{len(changed) - 4} more"] if len(changed) > 4 else [])
    return redact(" · ".join(parts))[:250]


def _committed_params(workspace: Path, params_file: Path) -> dict | None:
    """params.yaml as the checked-out commit has it; None outside git or without one there."""
    try:
        relative = Path(os.path.relpath(Path(params_file).resolve(), Path(workspace).resolve())).as_posix()
        shown = subprocess.run(["git", "show", f"HEAD:./{relative}"], cwd=workspace, capture_output=True, text=True,
                               timeout=30)
        return load_yaml(shown.stdout, f"HEAD:{relative}") or {} if shown.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, UserError):
        return None


def _parent_run(experiment_id: str, key: str, git: dict[str, str], params: dict, name: str) -> str:
    import mlflow

    client = mlflow.MlflowClient()
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`kip.role` = '{PIPELINE_ROLE}' and tags.`kip.pipeline_key` = '{key}'",
        max_results=1,
    )
    if found:
        run_id = found[0].info.run_id
    else:
        run_id = client.create_run(
            experiment_id, run_name=name,
            tags={"kip.role": PIPELINE_ROLE, "kip.pipeline_key": key, "kip.git_commit": git["commit"],
                  "kip.git_dirty": git["dirty"], "mlflow.source.git.commit": git["commit"]},
        ).info.run_id
        flat = flatten(params)
        items = list(flat.items())
        for start in range(0, len(items), 100):
            client.log_batch(run_id, params=[_param(k, redact(v)) for k, v in items[start:start + 100]])
        client.set_terminated(run_id, "FINISHED")
    return run_id


def _end_orphaned_runs(experiment_id: str) -> list[str]:
    """Mark KILLED the stage runs of this host left RUNNING by a process that no longer exists.

    A stage whose store went away mid-run (a server restarted, a network cut), or that was killed
    with SIGKILL, cannot end its own run, and MLflow would show it RUNNING for good. Each stage run is
    tagged with its host and PID, so the next stage on the same host can tell a dead one from a
    concurrent one (queued experiments run side by side): the PID is gone, or now names a process
    younger than the run. Runs of other hosts are left alone: their processes cannot be seen from here.
    """
    import mlflow
    import psutil

    client = mlflow.MlflowClient()
    host = socket.gethostname().replace("'", "")
    orphans = client.search_runs([experiment_id], f"attributes.status = 'RUNNING' and tags.`kip.host` = '{host}'",
                                 max_results=1000)
    ended = []
    for run in orphans:
        try:
            pid = int(run.data.tags.get("kip.pid", ""))
            alive = psutil.Process(pid).create_time() * 1000 <= run.info.start_time + 1000
        except (ValueError, psutil.Error):
            alive = False
        if not alive:
            client.set_tag(run.info.run_id, "kip.ended_by", f"a later stage: process {run.data.tags.get('kip.pid')} "
                           "had gone without ending this run")
            client.set_terminated(run.info.run_id, "KILLED")
            ended.append(run.info.run_id)
    return ended


def _refused_login(err: BaseException) -> str | None:
    """The remedy when an MLflow server with logins refused this user (401) or this action (403)."""
    text = str(err)
    if "401" in text or "Unauthorized" in text or "UNAUTHENTICATED" in text:
        return ("the server refused the login: check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
                "(the address answered)")
    if "403" in text or "PERMISSION_DENIED" in text:
        return ("the server refused this user the experiment: ask its owner for EDIT permission, or set "
                "tracking.experiment to one of your own")
    return None


def _store_problem(uri: str) -> str | None:
    """What is wrong with a SQLite store whose schema is not MLflow's, with its remedy; else None."""
    from pipeline.run import store_doctor

    path = store_doctor.sqlite_path(uri)
    try:
        return store_doctor.problem(path) if path is not None else None
    except Exception:  # the diagnosis must never hide the store's own error
        return None


def _param(key: str, value: str):
    from mlflow.entities import Param

    return Param(key, value)


def _execution_key(commit: str, params_text: str) -> str:
    if os.environ.get("DVC_EXP_NAME"):
        return f"exp-{os.environ['DVC_EXP_NAME']}"
    return f"{commit[:12]}-{hashlib.sha256(params_text.encode()).hexdigest()[:12]}"


def _git_state(root: Path) -> dict[str, str]:
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD") or "none"
    # The pipeline's own outputs (DVC deletes and rewrites them around every stage) are not edits.
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".", *(f":(exclude){p}" for p in PIPELINE_OUTPUTS))
    return {"commit": commit, "dirty": "unknown" if status is None else str(bool(status)).lower()}


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("kip-pipeline", "jax", "neural-tangents", "optax", "flax", "numpy", "dvc", "mlflow"):
        try:
            out[f"kip.version.{name}"] = version(name)
        except PackageNotFoundError:
            pass
    return out


_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]*@")
_SECRET_QUERY = re.compile(r"(?i)(?P<name>[?&](?:token|access_token|api_key|key|password|passwd|secret|sig|signature)=)[^&#\s]*")


def redact(text: str) -> str:
    """`text` with the userinfo (user:password@) and secret query values of every URL in it replaced
    by ***: what reaches a message, a log or an MLflow param must never carry a credential (an
    error line ends up in DVC's and CI's logs)."""
    return _SECRET_QUERY.sub(r"\g<name>***", _USERINFO.sub(r"\g<scheme>***@", text))


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


def dataset_source(description: Mapping[str, Any]):
    """The MLflow dataset source of a source dataset (`Dataset.describe()`), by where its data is:
    registry downloads are `http` sources (PyPI's release page, the Debian archive's .deb), a data
    folder is a local `file` source, and data that a library supplies (scikit-learn's digits,
    TFDS) is a `code` source whose tags name the library call or TFDS build."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.http_dataset_source import HTTPDatasetSource

    if description["source"] == "registry":
        from pipeline.data.sources import registry

        return HTTPDatasetSource(registry.source_url(description["name"]))
    origin = str(description["origin"])
    if description["source"] == "files" and origin.startswith("files:"):
        return _file_source(Path(origin.removeprefix("files:")))
    return CodeDatasetSource(tags={"kip.dataset.source": description["source"], "kip.dataset.name": description["name"],
                                   "kip.dataset.origin": origin})


def _file_source(path: Path):
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    with warnings.catch_warnings():  # "can be interpreted in multiple ways": all local-file kinds
        warnings.simplefilter("ignore", UserWarning)
        return resolve_dataset_source(Path(path).resolve().as_uri())


def dataset_tags(description: Mapping[str, Any]) -> dict[str, Any]:
    """Lineage tags of the source dataset, from `Dataset.describe()`."""
    return {
        "kip.dataset.name": description["name"],
        "kip.dataset.source": description["source"],
        "kip.dataset.fingerprint": description["fingerprint"],
        "kip.dataset.origin": description["origin"],
    }
