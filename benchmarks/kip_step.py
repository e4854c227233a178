"""How fast is one KIP step, how close to the machine's matmul roofline, and is memory bounded?

Step: the jitted value-and-gradient of the KIP loss for support x target sizes {100, 1000} x
{1000, 5000}, FC NTK kernel (depth 1, the pipeline default), MNIST-sized inputs (28x28x1,
Gaussian pixels: timing does not depend on their values), float32. In the same process:

  ours       pipeline.kip.kip_loss with pipeline.kernels.make (closed-form kernel, Cholesky solve)
  reference  the paper's notebook: neural-tangents kernel_fn(x, y, 'ntk') for K_ss and K_ts, then
             jax.scipy.linalg.solve(K_ss + reg, y_s, assume_a='pos')
  floor      the same two kernel matmuls, their backward pass and the solve with a linear kernel
             (K = X Y^T / d): what no FC kernel can beat, since every entry needs its dot product
  peak       the best jax.jit float32 matmul rate measured here (the roofline)

All three run after `runtime.tune_process()` (glibc keeps freed memory; SciPy's OpenBLAS, which
jaxlib's LAPACK calls, single-threaded). The reference is also timed in a child process left at
the defaults, as the paper's code runs. FLOPs count the matmul work any implementation must do:
forward and backward Gram products 4 n_s (n_s + n_t) d, Cholesky n_s^3 / 3, prediction and its
backward 4 n_t n_s C. GFLOP/s = that count / median step time.

Memory: peak RSS (VmHWM) of a child process that evaluates KRR (1000-image support) on 10k..60k
images, and of one that takes one KIP step (1000-image support) with 10k..60k targets, in blocks
of 10000 (distill.target_block) and, for contrast, in one block; beside the resident size before
the work (runtime, TensorFlow, the images themselves).

    python benchmarks/kip_step.py [--repeats 10] [--out benchmarks/results/kip_step.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _report import emit

SIZES = [(100, 1000), (100, 5000), (1000, 1000), (1000, 5000)]
MEMORY_SIZES = [10_000, 20_000, 40_000, 60_000]
MEMORY_KINDS = {  # what runs, and its target_block
    "evaluate": None,
    "kip": 10_000,
    "kip_unblocked": None,  # the contrast: one block however many targets
}
MEMORY_SUPPORT = 1000
SHAPE = (28, 28, 1)
CLASSES = 10
REG = 1e-6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", choices=["reference", *MEMORY_KINDS], help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "reference":
        print(json.dumps(reference_only(args.repeats)))
        return 0
    if args.child in MEMORY_KINDS:
        print(json.dumps(memory_child(args.child, args.size)))
        return 0

    from pipeline import runtime

    tuned = runtime.tune_process()
    started = time.perf_counter()
    steps = step_table(args.repeats)
    untuned = json.loads(_child(["--child", "reference", "--repeats", str(args.repeats)]))
    for row in steps:
        row["reference_default_process_ms"] = untuned[f"{row['support']}x{row['targets']}"]
        row["speedup_vs_reference_default_process"] = round(row["reference_default_process_ms"] / row["ours_ms"], 2)
    memory = {kind: [json.loads(_child(["--child", kind, "--size", str(n)])) for n in MEMORY_SIZES]
              for kind in MEMORY_KINDS}
    emit({
        "benchmark": "kip_step",
        "kernel": "fc ntk, depth 1, relu, ntk parameterisation; float32",
        "process_tuning": tuned,
        "steps": steps,
        "memory": memory,
        "seconds": round(time.perf_counter() - started, 1),
    }, args.out)
    return 0


def step_table(repeats: int) -> list[dict]:
    import jax
    import numpy as np

    from pipeline import kip

    peak = matmul_peak(repeats)
    rows = []
    for n_s, n_t in SIZES:
        x_s, y_s, x_t, y_t = _inputs(n_s, n_t)
        ours = jax.jit(jax.value_and_grad(_our_loss))
        reference = jax.jit(jax.value_and_grad(_reference_loss))
        floor = jax.jit(jax.value_and_grad(_linear_loss))
        compile_s = _first_call(ours, x_s, y_s, x_t, y_t)
        timings = {name: _median_ms(fn, (x_s, y_s, x_t, y_t), repeats)
                   for name, fn in (("ours", ours), ("reference", reference), ("floor", floor))}
        flops = matmul_flops(n_s, n_t)
        peak = max(peak, _matmul_rate(n_t, int(np.prod(SHAPE)), n_s, repeats))
        train_step_ms, compilations = _training_step(n_s, n_t, repeats)
        rows.append({
            "support": n_s, "targets": n_t,
            "ours_ms": round(timings["ours"], 2),
            "reference_ms": round(timings["reference"], 2),
            "floor_ms": round(timings["floor"], 2),
            "speedup_vs_reference": round(timings["reference"] / timings["ours"], 2),
            "gflop": round(flops / 1e9, 3),
            "ours_gflops": round(flops / timings["ours"] / 1e6, 1),
            "reference_gflops": round(flops / timings["reference"] / 1e6, 1),
            "floor_gflops": round(flops / timings["floor"] / 1e6, 1),
            "first_call_s": round(compile_s, 2),
            "training_step_ms": round(train_step_ms, 2),
            "compilations_over_steps": compilations,
        })
    for row in rows:
        row["matmul_peak_gflops"] = round(peak, 1)
        row["ours_roofline_fraction"] = round(row["ours_gflops"] / peak, 3)
        row["reference_roofline_fraction"] = round(row["reference_gflops"] / peak, 3)
    return rows


def reference_only(repeats: int) -> dict[str, float]:
    import jax

    out = {}
    for n_s, n_t in SIZES:
        reference = jax.jit(jax.value_and_grad(_reference_loss))
        out[f"{n_s}x{n_t}"] = round(_median_ms(reference, _inputs(n_s, n_t), repeats), 2)
    return out


def matmul_flops(n_s: int, n_t: int) -> float:
    d = 1
    for size in SHAPE:
        d *= size
    return 4.0 * n_s * (n_s + n_t) * d + n_s ** 3 / 3 + 4.0 * n_t * n_s * CLASSES


def matmul_peak(repeats: int) -> float:
    return max(_matmul_rate(n, n, n, repeats) for n in (1024, 2048))


def _matmul_rate(m: int, k: int, n: int, repeats: int) -> float:
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
    ms = _median_ms(jax.jit(jnp.matmul), (a, b), max(repeats, 10))
    return 2.0 * m * k * n / ms / 1e6


def _inputs(n_s: int, n_t: int):
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng([n_s, n_t])
    x_s = jnp.asarray(rng.standard_normal((n_s,) + SHAPE), jnp.float32)
    x_t = jnp.asarray(rng.standard_normal((n_t,) + SHAPE), jnp.float32)
    y_s = jnp.asarray(np.eye(CLASSES)[np.arange(n_s) % CLASSES] - 0.1, jnp.float32)
    y_t = jnp.asarray(np.eye(CLASSES)[np.arange(n_t) % CLASSES] - 0.1, jnp.float32)
    return x_s, y_s, x_t, y_t


def _our_loss(x_s, y_s, x_t, y_t):
    from pipeline import kernels, kip
    from pipeline.config import KernelConfig

    return kip.kip_loss(kernels.make(KernelConfig()), REG, kip.Support(x_s, y_s), x_t, y_t)


def _reference_loss(x_s, y_s, x_t, y_t):
    """The KIP notebook's loss_fn, verbatim in structure."""
    import jax.numpy as jnp
    import jax.scipy as sp

    from pipeline.config import KernelConfig
    from pipeline.kernels import stax_network

    _, _, kernel_fn = stax_network(KernelConfig())
    k_ss = kernel_fn(x_s, x_s, "ntk")
    k_ts = kernel_fn(x_t, x_s, "ntk")
    k_ss_reg = k_ss + jnp.abs(REG) * jnp.trace(k_ss) * jnp.eye(k_ss.shape[0]) / k_ss.shape[0]
    pred = jnp.dot(k_ts, sp.linalg.solve(k_ss_reg, y_s, assume_a="pos"))
    return 0.5 * jnp.mean((pred - y_t) ** 2)


def _linear_loss(x_s, y_s, x_t, y_t):
    import jax.numpy as jnp
    import jax.scipy as sp

    a = x_s.reshape(x_s.shape[0], -1)
    b = x_t.reshape(x_t.shape[0], -1)
    k_ss = a @ a.T / a.shape[1] + jnp.eye(a.shape[0])
    k_ts = b @ a.T / a.shape[1]
    return 0.5 * jnp.mean((k_ts @ sp.linalg.solve(k_ss, y_s, assume_a="pos") - y_t) ** 2)


def _training_step(n_s: int, n_t: int, repeats: int) -> tuple[float, int]:
    """The pipeline's whole update (gather targets from a 60k set, value-and-grad, Adam), and how
    many times it compiled over `repeats` steps with different target batches."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from pipeline import kernels, kip
    from pipeline.config import KernelConfig

    rng = np.random.default_rng(1)
    x_train = jnp.asarray(rng.standard_normal((60_000,) + SHAPE), jnp.float32)
    y_train = jnp.asarray(np.eye(CLASSES)[rng.integers(0, CLASSES, 60_000)] - 0.1, jnp.float32)
    optimizer = optax.adam(0.01)
    support = kip.Support(x_train[:n_s], y_train[:n_s])
    opt_state = optimizer.init(support)
    step = kip.make_step(kernels.make(KernelConfig()), optimizer, REG, learn_labels=False)
    batches = [jnp.asarray(rng.choice(60_000, n_t, replace=False).astype(np.int32)) for _ in range(repeats + 1)]
    support, opt_state, loss = step(support, opt_state, x_train, y_train, batches[0])
    loss.block_until_ready()
    times = []
    for idx in batches[1:]:
        start = time.perf_counter()
        support, opt_state, loss = step(support, opt_state, x_train, y_train, idx)
        loss.block_until_ready()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3), step._cache_size()


def memory_child(kind: str, n: int) -> dict:
    """One measurement per process, so ru_maxrss is this size's peak alone."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pipeline import kernels, kip, krr, runtime
    from pipeline.config import KernelConfig
    from pipeline.evaluate import krr_scores

    runtime.tune_process()
    jnp.zeros(1).block_until_ready()  # the runtime's own memory belongs to the baseline
    rng = np.random.default_rng(n)
    images = rng.standard_normal((n,) + SHAPE, dtype=np.float32)
    labels = (np.arange(n) % CLASSES).astype(np.int64)
    before = _rss_mb()
    started = time.perf_counter()
    if kind == "evaluate":
        support = rng.standard_normal((MEMORY_SUPPORT,) + SHAPE, dtype=np.float32)
        targets = krr.centered_one_hot(np.arange(MEMORY_SUPPORT) % CLASSES, CLASSES)
        krr_scores(kernels.make(KernelConfig()), support, targets, images, labels, CLASSES, REG, block_size=1000)
    else:
        block = MEMORY_KINDS[kind]
        support = kip.Support(jnp.asarray(images[:MEMORY_SUPPORT]),
                              jnp.asarray(krr.centered_one_hot(labels[:MEMORY_SUPPORT], CLASSES)))
        y_t = jnp.asarray(krr.centered_one_hot(labels, CLASSES))
        loss = jax.jit(jax.value_and_grad(
            lambda s, x, y: kip.kip_loss(kernels.make(KernelConfig()), REG, s, x, y, target_block=block)))
        value, _ = loss(support, jnp.asarray(images), y_t)
        float(value)
    return {
        "images": n, "support": MEMORY_SUPPORT, "block": MEMORY_KINDS[kind] if kind != "evaluate" else 1000,
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "rss_before_work_mb": round(before, 1),  # interpreter, jax, TensorFlow (via neural-tangents), the images
        "images_mb": round(images.nbytes / 2**20, 1),
        "peak_above_baseline_mb": round(_peak_rss_mb() - before, 1),
        "seconds": round(time.perf_counter() - started, 2),
    }


def _peak_rss_mb() -> float:
    """VmHWM, the process's peak resident set. Not getrusage's ru_maxrss: Linux carries that over
    from the parent through fork and exec, so a child would report the benchmark's own peak."""
    return _status_kib("VmHWM") / 1024


def _rss_mb() -> float:
    return _status_kib("VmRSS") / 1024


def _status_kib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return float(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _child(arguments: list[str]) -> str:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, __file__, *arguments], capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"kip_step child {arguments} failed:\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1]


def _first_call(fn, *args) -> float:
    import jax

    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def _median_ms(fn, args, repeats: int) -> float:
    import jax
    import numpy as np

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


if __name__ == "__main__":
    sys.exit(main())
