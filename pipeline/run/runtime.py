"""Process settings that make XLA:CPU run KIP at matmul speed.

Two things cost a KIP step more than its arithmetic on CPU (benchmarks/kip_step.py measures both):

* Two thread pools. XLA calls LAPACK (Cholesky, triangular solves) from SciPy's OpenBLAS. After a
  call, OpenBLAS's worker threads spin for a while waiting for more work, on the cores XLA's own
  threads need for the matmuls running beside the solve: a 1000 x 5000 FC step took 263 ms instead
  of 131. One OpenBLAS thread removes that, and costs the solve itself little (a 3000 x 3000
  Cholesky: 139 ms on one thread, 129 ms on two, measured alone). The library therefore limits
  *SciPy's* OpenBLAS (not NumPy's, a separate copy) to one thread the first time KRR solves
  anything (`limit_lapack_threads`, called from `krr`): whoever calls `kip_loss` from their own
  script gets the fast step without calling anything. Set KIP_KEEP_LAPACK_THREADS=1 to opt out.
* Fresh pages. XLA allocates each execution's scratch (~160 MB at 1000 x 5000) with malloc; glibc
  serves blocks above 32 MB with mmap and unmaps them on free, so every step page-faults its
  scratch in again: ~50 ms of a 180 ms step. `tune_process()` tells glibc to keep freed memory
  (no mmap, no trimming, one arena). The price: the process's RSS never shrinks below its
  high-water mark, which for a pipeline stage is the peak it needed anyway, but is a change to the
  whole process a library must not make behind its caller's back; so only the `kip` commands, the
  DVC stages and the benchmarks call it.

On platforms without glibc the allocator part is skipped (there is nothing to tune there). Neither
runs where JAX computes on a GPU or TPU (`computes_on_cpu`): XLA's device memory and solvers are
not the host's, and the host process is better left as it was.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_allocator_tuned: bool | None = None
_lapack_limit = None
_lapack_checked = False


def computes_on_cpu() -> bool:
    """Whether JAX will compute on the CPU, decided without starting its backends: the first of
    JAX_PLATFORMS when it is set, else whether no accelerator plugin is installed (JAX prefers one
    when present; with a plugin but no device it falls back to the CPU, untuned)."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip().lower() == "cpu"
    import importlib.util

    plugins = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin", "libtpu")
    return not any(importlib.util.find_spec(name) for name in plugins)


def tune_process() -> dict[str, bool]:
    """Both settings, once per process, on the CPU only; say which took effect."""
    global _allocator_tuned
    if _allocator_tuned is None:
        _allocator_tuned = computes_on_cpu() and _keep_freed_memory()
    return {"allocator": _allocator_tuned, "lapack_threads": limit_lapack_threads()}


def limit_lapack_threads() -> bool:
    """Limit SciPy's OpenBLAS, the LAPACK that jaxlib calls, to one thread; once per process.

    True if the limit is in place. Cheap after the first call (which imports scipy.linalg and
    threadpoolctl, ~0.1 s). Not done when KIP_KEEP_LAPACK_THREADS=1.
    """
    global _lapack_limit, _lapack_checked
    if not _lapack_checked:
        _lapack_checked = True
        if os.environ.get("KIP_KEEP_LAPACK_THREADS") != "1" and computes_on_cpu():
            try:
                _lapack_limit = _single_threaded_lapack()
            except Exception:  # threadpoolctl cannot see or set it: slower, not wrong
                _lapack_limit = None
    return _lapack_limit is not None


def _keep_freed_memory() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt"):
        return False
    settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_ARENA_MAX, 1))
    return all(libc.mallopt(option, value) == 1 for option, value in settings)


def _single_threaded_lapack():
    """Limit the OpenBLAS that jaxlib's LAPACK calls go to (SciPy's) to one thread."""
    import scipy.linalg  # noqa: F401  (loads SciPy's OpenBLAS so threadpoolctl can see it)
    from threadpoolctl import ThreadpoolController

    controller = ThreadpoolController()
    scipy_blas = [
        info for info in controller.info()
        if info.get("user_api") == "blas" and "scipy.libs" in info.get("filepath", "").replace("\\", "/")
    ]
    if not scipy_blas:
        return None
    return controller.select(filepath=scipy_blas[0]["filepath"]).limit(limits=1)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, `kill`, `dvc exp` stopping a run), raised where Python next runs."""


def stop_on_sigterm() -> None:
    """Make SIGTERM unwind like Ctrl-C instead of killing the process on the spot, so the same
    clean-up runs for both: the MLflow run is marked KILLED, temporary files are removed, the
    progress bar is closed. Only the main thread may install signal handlers; elsewhere a no-op."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def raise_terminated(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, raise_terminated)
