"""Process tuning: it must really take effect (in a fresh process, as the entry points use it)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp
    from threadpoolctl import threadpool_info
    from pipeline import runtime
    applied = runtime.tune_process()
    again = runtime.tune_process()
    jnp.linalg.cholesky(jnp.eye(4) * 2.0).block_until_ready()  # the LAPACK XLA uses still works
    scipy_blas = [i["num_threads"] for i in threadpool_info() if "scipy.libs" in i["filepath"].replace("\\\\", "/")]
    print(json.dumps({"applied": applied, "again": again, "scipy_blas_threads": scipy_blas}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the allocator part is glibc's")
def test_tuning_applies_once_and_limits_scipys_openblas():
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("OPENBLAS_NUM_THREADS", None)
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["applied"] == {"allocator": True, "lapack_threads": True}
    assert result["again"] == result["applied"]
    assert result["scipy_blas_threads"] and set(result["scipy_blas_threads"]) == {1}
