"""`kip ui`: open the project's MLflow runs in the view that says which run is better.

The stages log to the store params.yaml's `tracking` section names (the project's SQLite file by
default, or a team server). For a server, the address is all a user needs; for the SQLite file
something must serve the UI, so this starts `mlflow ui` on 127.0.0.1 for as long as it runs. Either
way the address opens the experiment's runs table in the shared view `tracking.runs_view` defines.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pipeline.errors import UserError

LOCAL_HOST = "127.0.0.1"


def runs_address(root: Path, port: int) -> tuple[str, str]:
    """(store URI, runs-view address). Puts the view on the experiment if it lacks it."""
    import mlflow

    from pipeline.run import tracking

    config = tracking.project_config(root)
    if not config.enabled:
        raise UserError("tracking.enabled is false in params.yaml: no runs were logged; set it to true and run dvc repro")
    uri = tracking.resolve_uri(config, root)
    served = uri.startswith(("http://", "https://"))
    if not served and not _sqlite_file(uri, root).is_file():
        raise UserError(f"tracking.uri={uri}: no MLflow store there yet; run dvc repro first")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    client = mlflow.MlflowClient(tracking_uri=uri)
    try:
        experiment = client.get_experiment_by_name(config.experiment)
    except Exception as err:
        raise UserError(tracking.redact(f"tracking.uri={uri}: cannot use the MLflow store ({str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__})")) from None
    if experiment is None:
        raise UserError(f"tracking.experiment={config.experiment!r}: no such experiment in {tracking.redact(uri)} yet; run dvc repro first")
    try:
        tracking.ensure_runs_view(client, experiment.experiment_id, experiment.tags)
    except Exception:
        if f"mlflow.sharedViewState.{tracking.RUNS_VIEW_KEY}" not in experiment.tags:
            raise UserError(f"tracking.experiment={config.experiment!r}: cannot add the runs view (no EDIT permission?); "
                            "ask who created the experiment to run kip ui once") from None
    server = uri if served else f"http://{LOCAL_HOST}:{port}"
    return uri, tracking.experiment_url(server, experiment.experiment_id)


def serve(uri: str, port: int, root: Path) -> int:
    """`mlflow ui` for a SQLite store on 127.0.0.1, in the foreground, one worker (Ctrl-C stops it).
    It runs in the project, where a relative sqlite:/// path is resolved, as in the stages."""
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    argv = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
            "--host", LOCAL_HOST, "--port", str(port), "--workers", "1"]
    return subprocess.run(argv, env=env, cwd=root, stdin=subprocess.DEVNULL, stdout=sys.stderr).returncode  # stdout: the address only


def _sqlite_file(uri: str, root: Path) -> Path:
    from pipeline.run import store_doctor

    path = store_doctor.sqlite_path(uri)
    if path is None:
        raise UserError(f"tracking.uri={uri} is not allowed for kip ui; expected sqlite:///FILE or an http(s) server")
    return path if path.is_absolute() else root / path
