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
    from pipeline.run import runtime
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


LIBRARY_ONLY = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp
    from threadpoolctl import threadpool_info
    from pipeline.kernels import functions as kernels
    from pipeline.distill import kip
    from pipeline.run.config import KernelConfig

    def scipy_threads():
        return [i["num_threads"] for i in threadpool_info() if "scipy.libs" in i["filepath"].replace("\\\\", "/")]

    import scipy.linalg  # loaded, as any script using SciPy would have it
    before = scipy_threads()
    x = jnp.ones((4, 3, 3, 1)) * jnp.arange(4.0)[:, None, None, None]
    if sys.argv[1] == "kip_loss":  # no tune_process() in either
        float(kip.kip_loss(kernels.make(KernelConfig()), 1e-3, kip.Support(x, jnp.eye(4)), x, jnp.eye(4)))
    else:
        from pipeline.evaluate import finite
        from pipeline.kernels import finite_ntk
        from pipeline.run.config import TrainConfig
        network = TrainConfig(width=8, depth=1)
        params = finite.make_model(network, x.shape[1:], 4).init(jax.random.PRNGKey(0), x[:1])
        float(finite_ntk.predict(network, params, x, jnp.eye(4), x, 1e-3).sum())
    print(json.dumps({"before": before, "after": scipy_threads()}))
""")


@pytest.mark.parametrize("entry,opt_out", [("kip_loss", False), ("kip_loss", True), ("finite_ntk", False)])
def test_the_library_limits_lapack_threads_by_itself_unless_told_not_to(entry, opt_out):
    """Someone calling kip_loss (or finite_ntk's solve) from their own script gets the one-thread LAPACK that makes the
    step fast (pipeline/run/runtime.py), without calling tune_process; KIP_KEEP_LAPACK_THREADS=1 keeps
    SciPy's OpenBLAS as it was."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "OPENBLAS_NUM_THREADS": "2"}
    env.pop("KIP_KEEP_LAPACK_THREADS", None)
    if opt_out:
        env["KIP_KEEP_LAPACK_THREADS"] = "1"
    done = subprocess.run([sys.executable, "-c", LIBRARY_ONLY, entry], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["before"] == [2]
    assert result["after"] == ([2] if opt_out else [1])


ON_AN_ACCELERATOR = textwrap.dedent("""
    import json
    import scipy.linalg
    from threadpoolctl import threadpool_info
    from pipeline.run import runtime
    applied = runtime.tune_process()  # jax never imported: the decision must not start a backend
    scipy_blas = [i["num_threads"] for i in threadpool_info() if "scipy.libs" in i["filepath"].replace("\\\\", "/")]
    print(json.dumps({"applied": applied, "scipy_blas_threads": scipy_blas, "on_cpu": runtime.computes_on_cpu()}))
""")


@pytest.mark.parametrize("platforms,on_cpu", [("cuda,cpu", False), ("tpu", False), ("cpu", True)])
def test_the_cpu_tuning_stays_off_where_jax_computes_on_an_accelerator(platforms, on_cpu):
    """JAX_PLATFORMS naming a GPU or TPU first: neither the allocator nor SciPy's OpenBLAS is touched."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "OPENBLAS_NUM_THREADS": "2", "JAX_PLATFORMS": platforms}
    env.pop("KIP_KEEP_LAPACK_THREADS", None)
    done = subprocess.run([sys.executable, "-c", ON_AN_ACCELERATOR], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["on_cpu"] is on_cpu
    assert result["scipy_blas_threads"] == ([1] if on_cpu else [2])
    if not on_cpu:
        assert result["applied"] == {"allocator": False, "lapack_threads": False}
