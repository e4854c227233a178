"""How fast is one KIP step, against what, and how much of the machine does it use?

Step: the jitted value-and-gradient of the KIP loss for support x target sizes below, FC NTK kernel
(depth 1, the pipeline default), MNIST-sized inputs (28x28x1, Gaussian pixels: timing does not
depend on their values), float32.

  ours       pipeline.distill.kip.kip_loss with pipeline.kernels.functions.make, at the default distill.kernel_block
  reference  the paper's notebook: neural-tangents kernel_fn(x, y, 'ntk') for K_ss and K_ts, then
             jax.scipy.linalg.solve(K_ss + reg, y_s, assume_a='pos')
  floor      the same matmuls, backward pass and solve with a linear kernel (K = X Y^T / d): what
             no FC kernel can beat, since every entry needs its dot product

Honesty rules (benchmarks/_timing.py): every sample records the cores other processes used while it
ran and is retried when that exceeds 0.1 core; ours, reference and floor run in turn within each
round; medians come with their 25-75 % spread. If a published timing could not get enough quiet
samples, the script refuses: it prints the JSON with `loaded: true` and exits 3 without writing
--out (pass --allow-load to write it anyway, flagged).

Ratios are like for like:
  same_process     ours and the reference in this process, after runtime.tune_process() (glibc
                   keeps freed memory; SciPy's OpenBLAS single-threaded): the kernels compared.
  default_process  each in its own fresh process, untuned, as a user's script runs it: the
                   reference as the notebook runs; ours as the library runs without tune_process()
                   (it limits SciPy's OpenBLAS itself, pipeline/run/runtime.py). Its gain over
                   same_process comes from those threads, not from the kernel, and is labelled so.

Share of peak: the step's matmul FLOPs (4 n_s (n_s + n_t) d for the Gram products and their
backward pass, n_s^3 / 3 for the Cholesky, 4 n_t n_s C for predictions) per second, over the rate
at which this machine runs the step's own matmul shapes: the K_ts product (n_t x d) (d x n_s), its
backward (n_s x n_t) (n_t x d), the K_ss product and its backward, each timed alone; "peak" is their
total FLOPs over their total time. It is defined per row, from that row's shapes, because the rate
depends on the shapes (137 to 214 GFLOP/s here).

Also measured: LAPACK threads for the solve alone; 2 forced host devices against 1; `kip distill
--kernel fc` on digits up to its first step (time, memory, whether TensorFlow was imported); the
privacy report at 1000 support images; peak memory of evaluation and of one KIP step at 10k-60k
targets (child processes).

    python benchmarks/kip_step.py --out benchmarks/results/kip_step.json   # about 3 minutes, quiet machine
    python benchmarks/kip_step.py --table benchmarks/results/kip_step.json # docs/scaling.md's table from it
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _report import OtherLoad, emit
from _timing import interleaved

SIZES = [(100, 1000), (100, 5000), (100, 20000), (1000, 1000), (1000, 5000), (3000, 1000), (3000, 5000)]
DEFAULT_PROCESS_SIZES = [(100, 5000), (1000, 5000), (3000, 1000)]
MEMORY_SIZES = [10_000, 20_000, 40_000, 60_000]
MEMORY_SUPPORT = 1000
SHAPE = (28, 28, 1)
CLASSES = 10
REG = 1e-6
LOADED_EXIT = 3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--allow-load", action="store_true", help="write --out even if a timing was taken under load (flagged)")
    parser.add_argument("--table", type=Path, help="print the README table from this JSON and exit")
    parser.add_argument("--child", choices=["reference", "ours", "devices", "startup", "evaluate", "kip", "kip_unblocked"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return 0
    if args.child:
        print(json.dumps(CHILDREN[args.child](args)))
        return 0

    from pipeline.run import runtime

    tuned = runtime.tune_process()
    started = time.perf_counter()
    report = {
        "benchmark": "kip_step",
        "kernel": "fc ntk, depth 1, relu, ntk parameterisation; float32",
        "process_tuning": tuned,
        "loaded_threshold_cores": OtherLoad.LOADED_CORES,
        "steps": step_table(args.repeats),
    }
    default = {
        "reference": json.loads(_child(["--child", "reference", "--repeats", str(args.repeats)])),
        "ours": json.loads(_child(["--child", "ours", "--repeats", str(args.repeats)])),
    }
    report["default_process"] = [
        {"support": n_s, "targets": n_t, "ours": default["ours"][f"{n_s}x{n_t}"], "reference": default["reference"][f"{n_s}x{n_t}"],
         "speedup": round(default["reference"][f"{n_s}x{n_t}"]["median_ms"] / default["ours"][f"{n_s}x{n_t}"]["median_ms"], 2)}
        for n_s, n_t in DEFAULT_PROCESS_SIZES
    ]
    report["lapack_threads"] = lapack_threads(args.repeats)
    report["devices"] = json.loads(_child(["--child", "devices", "--repeats", str(args.repeats)], xla_devices=2))
    report["devices"]["one_device_ms"] = next(r["ours"]["median_ms"] for r in report["steps"] if (r["support"], r["targets"]) == (1000, 5000))
    report["startup"] = json.loads(_child(["--child", "startup"]))
    report["privacy_report"] = privacy_timing()
    report["memory"] = {kind: [json.loads(_child(["--child", kind, "--size", str(n)])) for n in MEMORY_SIZES]
                        for kind in ("evaluate", "kip", "kip_unblocked")}
    report["seconds"] = round(time.perf_counter() - started, 1)
    loaded = sorted(set(_loaded_paths(report)))
    report["loaded"] = loaded
    if loaded and not args.allow_load:
        emit(report, None)
        print(f"kip_step: {len(loaded)} timing(s) taken while other processes used > {OtherLoad.LOADED_CORES} cores "
              f"({', '.join(loaded[:4])}...); not writing {args.out} (run on a quiet machine, or --allow-load)", file=sys.stderr)
        return LOADED_EXIT
    emit(report, args.out)
    return 0


# --- the steps ---------------------------------------------------------------------------------

def step_table(repeats: int) -> list[dict]:
    import jax

    from pipeline.distill import kip
    from pipeline.run.config import DistillConfig

    block = DistillConfig().kernel_block
    rows = []
    for n_s, n_t in SIZES:
        inputs = _inputs(n_s, n_t)
        fns = {
            "ours": jax.jit(jax.value_and_grad(lambda *a: _our_loss(*a, kernel_block=block))),
            "reference": jax.jit(jax.value_and_grad(_reference_loss)),
            "floor": jax.jit(jax.value_and_grad(_linear_loss)),
        }
        start = time.perf_counter()
        jax.block_until_ready(fns["ours"](*inputs))
        first_call_s = time.perf_counter() - start
        for fn in fns.values():
            jax.block_until_ready(fn(*inputs))
        timings = interleaved({name: (lambda fn=fn: jax.block_until_ready(fn(*inputs))) for name, fn in fns.items()}, repeats)
        peak = matmul_peak(n_s, n_t, repeats)
        flops = matmul_flops(n_s, n_t)
        ours_ms = timings["ours"]["median_ms"]
        row = {
            "support": n_s, "targets": n_t,
            "kernel_block": block, "blocked": n_s * n_t > block,
            **timings,
            "speedup_same_process": round(timings["reference"]["median_ms"] / ours_ms, 2),
            "gflop": round(flops / 1e9, 3),
            "ours_gflops": round(flops / ours_ms / 1e6, 1),
            "reference_gflops": round(flops / timings["reference"]["median_ms"] / 1e6, 1),
            "step_matmul_peak": peak,
            "ours_share_of_peak": round(flops / ours_ms / 1e6 / peak["gflops"], 3),
            "first_call_s": round(first_call_s, 2),
        }
        if (n_s, n_t) == (1000, 5000):
            row["training_step"] = training_step(n_s, n_t, repeats)
        rows.append(row)
        print(f"kip_step: {n_s} x {n_t}: ours {ours_ms} ms, reference {timings['reference']['median_ms']} ms", file=sys.stderr, flush=True)
    return rows


def matmul_flops(n_s: int, n_t: int) -> float:
    d = _pixels()
    return 4.0 * n_s * (n_s + n_t) * d + n_s ** 3 / 3 + 4.0 * n_t * n_s * CLASSES


def matmul_peak(n_s: int, n_t: int, repeats: int) -> dict:
    """The rate of the step's own matmul shapes, each timed alone: total FLOPs over total time."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    d = _pixels()
    shapes = {"K_ts": (n_t, d, n_s), "K_ts backward": (n_s, n_t, d), "K_ss": (n_s, d, n_s), "K_ss backward": (n_s, n_s, d)}
    rng = np.random.default_rng(0)
    jobs, flops = {}, {}
    matmul = jax.jit(jnp.matmul)
    for name, (m, k, n) in shapes.items():
        a = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
        b = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
        jax.block_until_ready(matmul(a, b))
        jobs[name] = lambda a=a, b=b: jax.block_until_ready(matmul(a, b))
        flops[name] = 2.0 * m * k * n
    timings = interleaved(jobs, repeats)
    total_ms = sum(t["median_ms"] for t in timings.values())
    return {
        "gflops": round(sum(flops.values()) / total_ms / 1e6, 1),
        "shapes": {name: {"m_k_n": list(shapes[name]), "median_ms": timings[name]["median_ms"],
                          "gflops": round(flops[name] / timings[name]["median_ms"] / 1e6, 1), "loaded": timings[name]["loaded"]}
                   for name in shapes},
    }


def training_step(n_s: int, n_t: int, repeats: int) -> dict:
    """The pipeline's whole update (gather targets from a 60k set, value-and-grad, Adam), and how
    many times it compiled over steps with different target batches."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from pipeline.distill import kip
    from pipeline.kernels import functions as kernels
    from pipeline.run.config import DistillConfig, KernelConfig

    rng = np.random.default_rng(1)
    x_train = jnp.asarray(rng.standard_normal((60_000,) + SHAPE), jnp.float32)
    y_train = jnp.asarray(np.eye(CLASSES)[rng.integers(0, CLASSES, 60_000)] - 0.1, jnp.float32)
    optimizer = optax.adam(0.01)
    state = {"support": kip.Support(x_train[:n_s], y_train[:n_s])}
    state["opt"] = optimizer.init(state["support"])
    step = kip.make_step(kernels.make(KernelConfig()), optimizer, DistillConfig(reg=REG, learn_labels=False))

    def one_step():
        idx = jnp.asarray(rng.choice(60_000, n_t, replace=False).astype(np.int32))
        state["support"], state["opt"], loss = step(state["support"], state["opt"], x_train, y_train, idx)
        loss.block_until_ready()

    one_step()
    timing = interleaved({"training_step": one_step}, repeats)["training_step"]
    return {**timing, "compilations_over_steps": step._cache_size()}


def lapack_threads(repeats: int) -> list[dict]:
    """The solve alone (Cholesky + triangular solves, what krr.fit runs) with SciPy's OpenBLAS on 1
    and on 2 threads, interleaved: what the one-thread limit costs where nothing runs beside it."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from threadpoolctl import ThreadpoolController

    from pipeline.distill import krr

    controller = ThreadpoolController()
    scipy_blas = controller.select(filepath=[i["filepath"] for i in controller.info() if "scipy.libs" in i["filepath"]])
    solve = jax.jit(lambda k, y: krr.fit(k, y, REG))
    rows = []
    for n in (1000, 3000):
        x = np.random.default_rng(n).standard_normal((n, _pixels())).astype(np.float32)
        k = jnp.asarray(x @ x.T / x.shape[1])
        y = jnp.ones((n, CLASSES), jnp.float32)
        jax.block_until_ready(solve(k, y))

        def with_threads(threads):
            def run():
                with scipy_blas.limit(limits=threads):
                    jax.block_until_ready(solve(k, y))
            return run

        timings = interleaved({"one_thread": with_threads(1), "two_threads": with_threads(2)}, repeats)
        rows.append({"support": n, **timings})
    return rows


def privacy_timing() -> dict:
    """privacy.report for 1000 support images against 54,000 MNIST-sized training images (the
    training split less its validation part) and a held-out sample of as many."""
    import numpy as np

    from pipeline.evaluate import privacy

    rng = np.random.default_rng(0)
    x_train = rng.standard_normal((54_000,) + SHAPE, dtype=np.float32)
    support = rng.standard_normal((1000,) + SHAPE, dtype=np.float32)
    heldout = rng.standard_normal((6000,) + SHAPE, dtype=np.float32)
    privacy.report(support[:10], x_train[:1000], heldout[:10], seed=0)  # warm the code paths
    timing = interleaved({"report": lambda: privacy.report(support, x_train, heldout, seed=0)}, 3)["report"]
    return {"support": 1000, "train_images": 54_000, **timing}


# --- child processes ---------------------------------------------------------------------------

def _default_process(loss_name: str):
    """Timings in an untuned process (no runtime.tune_process): the reference as the notebook runs,
    or ours as the library runs from a user's script."""
    def run(args) -> dict:
        import jax

        loss = {"reference": _reference_loss, "ours": _our_loss}[loss_name]
        out = {}
        for n_s, n_t in DEFAULT_PROCESS_SIZES:
            inputs = _inputs(n_s, n_t)
            fn = jax.jit(jax.value_and_grad(loss))
            jax.block_until_ready(fn(*inputs))
            out[f"{n_s}x{n_t}"] = interleaved({"step": lambda: jax.block_until_ready(fn(*inputs))}, args.repeats)["step"]
        return out
    return run


def _devices_child(args) -> dict:
    """Ours at 1000 x 5000 with the target batch split over the process's forced host devices."""
    import jax

    from pipeline.run import devices, runtime

    runtime.tune_process()
    x_s, y_s, x_t, y_t = _inputs(1000, 5000)
    fn = jax.jit(jax.value_and_grad(lambda xs, ys, xt, yt: _our_loss(xs, ys, devices.shard_rows(xt), devices.shard_rows(yt))))
    jax.block_until_ready(fn(x_s, y_s, x_t, y_t))
    timing = interleaved({"step": lambda: jax.block_until_ready(fn(x_s, y_s, x_t, y_t))}, args.repeats)["step"]
    return {"devices": jax.device_count(), "support": 1000, "targets": 5000, **timing}


def _startup_child(args) -> dict:
    """`kip distill --kernel fc` on the embedded digits, as the CLI runs it, up to the moment the
    first step is built: wall time since this interpreter started, resident memory, and which of
    the heavy libraries it imported."""
    start = _process_start_seconds()
    from pipeline.distill import kip
    from pipeline.run import cli

    seen = {}
    original = kip.make_step

    def first_step(*a, **kw):
        if not seen:
            seen.update(seconds=round(time.time() - start, 3), rss_mb=round(_status_kib("VmRSS") / 1024, 1),
                        peak_rss_mb=round(_status_kib("VmHWM") / 1024, 1),
                        imported={m: m in sys.modules for m in ("tensorflow", "neural_tangents", "sklearn", "mlflow", "flax")})
        return original(*a, **kw)

    kip.make_step = first_step
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"kip_step_startup_{os.getpid()}.npz"
    try:
        code = cli.main(["distill", "--source", "embedded", "--dataset", "digits", "--kernel", "fc", "--steps", "2", "-q", "-o", str(out)])
    finally:
        out.unlink(missing_ok=True)
    return {"command": "kip distill --source embedded --dataset digits --kernel fc --steps 2", "exit": code,
            "until_first_step": seen}


def _memory_child(kind: str):
    def run(args) -> dict:
        """One measurement per process, so the peak is this size's alone."""
        import jax
        import jax.numpy as jnp
        import numpy as np

        from pipeline.distill import kip, krr
        from pipeline.evaluate.scoring import krr_scores
        from pipeline.kernels import functions as kernels
        from pipeline.run import runtime
        from pipeline.run.config import DistillConfig, KernelConfig

        runtime.tune_process()
        n = args.size
        jnp.zeros(1).block_until_ready()  # the runtime's own memory belongs to the baseline
        rng = np.random.default_rng(n)
        images = rng.standard_normal((n,) + SHAPE, dtype=np.float32)
        labels = (np.arange(n) % CLASSES).astype(np.int64)
        before = _status_kib("VmRSS") / 1024
        started = time.perf_counter()
        block = {"evaluate": None, "kip": DistillConfig().kernel_block, "kip_unblocked": None}[kind]
        if kind == "evaluate":
            support = rng.standard_normal((MEMORY_SUPPORT,) + SHAPE, dtype=np.float32)
            targets = krr.centered_one_hot(np.arange(MEMORY_SUPPORT) % CLASSES, CLASSES)
            krr_scores(kernels.make(KernelConfig()), support, targets, images, labels, CLASSES, REG, block_size=1000)
        else:
            support = kip.Support(jnp.asarray(images[:MEMORY_SUPPORT]), jnp.asarray(krr.centered_one_hot(labels[:MEMORY_SUPPORT], CLASSES)))
            y_t = jnp.asarray(krr.centered_one_hot(labels, CLASSES))
            loss = jax.jit(jax.value_and_grad(lambda s, x, y: kip.kip_loss(kernels.make(KernelConfig()), REG, s, x, y, kernel_block=block)))
            value, _ = loss(support, jnp.asarray(images), y_t)
            float(value)
        peak = _status_kib("VmHWM") / 1024
        return {"images": n, "support": MEMORY_SUPPORT, "kernel_block": block, "evaluation_block_rows": 1000 if kind == "evaluate" else None,
                "peak_rss_mb": round(peak, 1), "rss_before_work_mb": round(before, 1), "images_mb": round(images.nbytes / 2**20, 1),
                "peak_above_baseline_mb": round(peak - before, 1), "seconds": round(time.perf_counter() - started, 2)}
    return run


CHILDREN = {
    "reference": _default_process("reference"),
    "ours": _default_process("ours"),
    "devices": _devices_child,
    "startup": _startup_child,
    "evaluate": _memory_child("evaluate"),
    "kip": _memory_child("kip"),
    "kip_unblocked": _memory_child("kip_unblocked"),
}


# --- losses and inputs -------------------------------------------------------------------------

def _inputs(n_s: int, n_t: int):
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng([n_s, n_t])
    x_s = jnp.asarray(rng.standard_normal((n_s,) + SHAPE), jnp.float32)
    x_t = jnp.asarray(rng.standard_normal((n_t,) + SHAPE), jnp.float32)
    y_s = jnp.asarray(np.eye(CLASSES)[np.arange(n_s) % CLASSES] - 0.1, jnp.float32)
    y_t = jnp.asarray(np.eye(CLASSES)[np.arange(n_t) % CLASSES] - 0.1, jnp.float32)
    return x_s, y_s, x_t, y_t


def _our_loss(x_s, y_s, x_t, y_t, kernel_block=None):
    from pipeline.distill import kip
    from pipeline.kernels import functions as kernels
    from pipeline.run.config import DistillConfig, KernelConfig

    block = DistillConfig().kernel_block if kernel_block is None else kernel_block
    return kip.kip_loss(kernels.make(KernelConfig()), REG, kip.Support(x_s, y_s), x_t, y_t, kernel_block=block)


def _reference_loss(x_s, y_s, x_t, y_t):
    """The KIP notebook's loss_fn, verbatim in structure."""
    import jax.numpy as jnp
    import jax.scipy as sp

    from pipeline.kernels.functions import stax_network
    from pipeline.run.config import KernelConfig

    _, _, kernel_fn = stax_network(KernelConfig())
    k_ss = kernel_fn(x_s, x_s, "ntk")
    k_ts = kernel_fn(x_t, x_s, "ntk")
    k_ss_reg = k_ss + jnp.abs(REG) * jnp.trace(k_ss) * jnp.eye(k_ss.shape[0]) / k_ss.shape[0]
    pred = jnp.dot(k_ts, sp.linalg.solve(k_ss_reg, y_s, assume_a="pos"))
    return 0.5 * jnp.mean((pred - y_t) ** 2)


def _linear_loss(x_s, y_s, x_t, y_t):
    """The floor: ours with the kernel map removed. The same solve (krr.fit, whose gradient comes
    out symmetric) and K_ss's one-matmul Gram backward pass (closed_form.self_gram), so the floor
    does no matmul or transposed add that our step does not."""
    import jax.numpy as jnp

    from pipeline.distill import krr
    from pipeline.kernels import closed_form

    a = x_s.reshape(x_s.shape[0], -1)
    b = x_t.reshape(x_t.shape[0], -1)
    gram, _ = closed_form.self_gram(x_s)
    k_ss = gram / a.shape[1] + jnp.eye(a.shape[0])  # X X^T alone has rank <= d: singular at 3000 support
    k_ts = b @ a.T / a.shape[1]
    return 0.5 * jnp.mean((k_ts @ krr.fit(k_ss, y_s, REG) - y_t) ** 2)


# --- the README table ----------------------------------------------------------------------------

def table(report: dict) -> str:
    """The README / docs/scaling.md table, from a saved report (so the prose cannot drift from it)."""
    lines = ["| support × targets | ours | paper's code, same process | linear-kernel floor | ours, share of the step's matmul rate |",
             "|---|---|---|---|---|"]
    for row in report["steps"]:
        ours, ref, floor = row["ours"], row["reference"], row["floor"]
        per_block = max(1, row["kernel_block"] // row["support"])  # as kip.kip_loss splits the targets
        blocked = f" ({-(-row['targets'] // per_block)} blocks)" if row["blocked"] else ""
        lines.append(f"| {row['support']} × {row['targets']}{blocked} | {_ms(ours)} | {_ms(ref)} (**{row['speedup_same_process']:.2f}×**) | "
                     f"{_ms(floor)} | {row['ours_share_of_peak']:.0%} of {row['step_matmul_peak']['gflops']:.0f} GFLOP/s |")
    lines += ["", "| support × targets | ours, untuned process (library defaults) | paper's code, untuned process | ratio |", "|---|---|---|---|"]
    for row in report["default_process"]:
        lines.append(f"| {row['support']} × {row['targets']} | {_ms(row['ours'])} | {_ms(row['reference'])} | {row['speedup']:.2f}× |")
    if report.get("loaded"):
        lines += ["", f"**Taken under load** (not a measurement of the code alone): {', '.join(report['loaded'])}"]
    return "\n".join(lines)


def _ms(timing: dict) -> str:
    digits = 1 if timing["median_ms"] >= 10 else 2
    return f"{timing['median_ms']:.{digits}f} ms [{timing['p25_ms']:.{digits}f}–{timing['p75_ms']:.{digits}f}]"


# --- helpers ---------------------------------------------------------------------------------

def _loaded_paths(node, path="") -> list[str]:
    if isinstance(node, dict):
        found = [path] if node.get("loaded") is True else []
        return found + [p for key, value in node.items() for p in _loaded_paths(value, f"{path}.{key}".strip("."))]
    if isinstance(node, list):
        return [p for i, value in enumerate(node) for p in _loaded_paths(value, f"{path}[{i}]")]
    return []


def _pixels() -> int:
    d = 1
    for size in SHAPE:
        d *= size
    return d


def _process_start_seconds() -> float:
    """This process's start, as time.time(): from /proc/self/stat's start time since boot."""
    ticks = os.sysconf("SC_CLK_TCK")
    start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return time.time() - uptime + start_ticks / ticks


def _status_kib(field: str) -> float:
    """From /proc/self/status. VmHWM, not getrusage's ru_maxrss: Linux carries that over from the
    parent through fork and exec, so a child would report the benchmark's own peak."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return float(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _child(arguments: list[str], xla_devices: int = 1) -> str:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    if xla_devices > 1:
        flags.append(f"--xla_force_host_platform_device_count={xla_devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    env.pop("KIP_KEEP_LAPACK_THREADS", None)
    done = subprocess.run([sys.executable, __file__, *arguments], capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"kip_step child {arguments} failed:\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1]


if __name__ == "__main__":
    sys.exit(main())
