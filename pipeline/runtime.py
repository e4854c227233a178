"""Process settings that make XLA:CPU run KIP at matmul speed; entry points call `tune_process()`.

Two things cost a KIP step more than its arithmetic on CPU (benchmarks/kip_step.py measures both):

* Fresh pages. XLA allocates each execution's scratch (~160 MB at 1000 x 5000) with malloc; glibc
  serves blocks above 32 MB with mmap and unmaps them on free, so every step page-faults its
  scratch in again: 39,000 minor faults, ~45 ms of a 180 ms step. We tell glibc to keep freed
  memory (no mmap, no trimming, one arena). The price: the process's RSS never shrinks below its
  high-water mark, which for a pipeline stage is the peak it needed anyway.
* Two thread pools. XLA calls LAPACK (Cholesky) from SciPy's OpenBLAS, whose 2 threads spin
  against XLA's own 2 while independent work runs concurrently: the 1000 x 1000 Cholesky took
  103 ms instead of 5. We limit that OpenBLAS to one thread (threadpoolctl).

A library must not change its host process behind its back, so importing `pipeline` does
nothing; `kip` commands, the DVC stages and the benchmarks call `tune_process()` first.
On platforms without glibc the allocator part is skipped (there is nothing to tune there).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import signal
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_tuned = False
_blas_limit = None


def tune_process() -> dict[str, bool]:
    """Apply both settings once per process; say which took effect."""
    global _tuned, _blas_limit
    if _tuned:
        return {"allocator": True, "lapack_threads": _blas_limit is not None}
    allocator = _keep_freed_memory()
    _blas_limit = _single_threaded_lapack()
    _tuned = True
    return {"allocator": allocator, "lapack_threads": _blas_limit is not None}


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
