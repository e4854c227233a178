"""A stage stopped by SIGINT (Ctrl-C) or SIGTERM (a scheduler, `kill`) ends the same way: its MLflow
run is marked KILLED (not left RUNNING), it exits with the signal's conventional code, and the next
run resumes from the checkpoint."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from test_faults import _checkpoint_step

REPO = Path(__file__).resolve().parents[1]
PARAMS = {
    "seed": 0,
    "data": {"source": "embedded", "name": "digits"},
    # Far more steps than run before the signal: 3000 took 2.2 s on an idle machine, and a run that
    # finished between the poll and the signal was a flaky failure; 100,000 take over a minute.
    "distill": {"support_per_class": 2, "steps": 100_000, "target_batch": 300, "checkpoint_every": 20, "eval_every": 0},
}
DISTILL_OUTS = ["--npz", "d.npz", "--parquet", "d.parquet", "--metrics", "m.json", "--loss-curve", "l.csv",
                "--accuracy-curve", "a.csv", "--images", "s.png", "--curves", "c.png", "--checkpoint", "run.ckpt.npz"]


def _env() -> dict[str, str]:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "JAX_PLATFORMS": "cpu"}
    for name in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME"):
        env.pop(name, None)
    return env


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("signals")
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    subprocess.run([sys.executable, str(REPO / "stages" / "prepare.py"), "prepared.npz"], cwd=root, env=_env(),
                   check=True, capture_output=True, timeout=300)
    return root


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signalled_stage_is_marked_killed(project, signum, code):
    checkpoint = project / "run.ckpt.npz"
    checkpoint.unlink(missing_ok=True)
    # SIGINT at its default in the stage, as in a terminal: a shell starts background jobs with SIGINT
    # ignored, and Python then never raises KeyboardInterrupt, so `pytest &` would hang this case.
    stage = subprocess.Popen([sys.executable, str(REPO / "stages" / "distill.py"), "prepared.npz", *DISTILL_OUTS],
                             cwd=project, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 240
        while _checkpoint_step(checkpoint) < 20:
            assert stage.poll() is None, stage.communicate()[1][-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        stage.send_signal(signum)
        _, err = stage.communicate(timeout=60)
    finally:  # never leave a stage running to write the next case's checkpoint
        if stage.poll() is None:
            stage.kill()
            stage.wait()
    assert stage.returncode == code, err[-2000:]
    assert "resumes from the last checkpoint" in err.splitlines()[-1] and "Traceback" not in err

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("kip-pipeline")
    runs = client.search_runs([experiment.experiment_id], "tags.`kip.stage` = 'distill'",
                              order_by=["attributes.start_time DESC"])
    assert runs[0].info.status == "KILLED"
    assert not (project / "d.npz").exists()
