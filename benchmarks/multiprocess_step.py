"""KIP across processes: the step's time and what it sends, for 1 and 2 processes on this machine,
and a projection (clearly one) to N hosts.

Each configuration runs as real processes joined by jax.distributed (gloo over 127.0.0.1), one CPU
device each, timing the pipeline's jitted KIP update (`kip.make_step`: gather, value-and-grad,
Adam) at 1000 support x 5000 targets, FC NTK, float32, with the target batch split across the
processes. Per step:

  bytes all-reduced   read from the compiled step: every all-reduce in its HLO, operand bytes
                      summed (the support gradient, n_s x (d + C) floats, and the loss)
  all-reduce time     the same byte volume all-reduced alone between the processes (gloo), timed

Here both processes share the same 2 cores, so 2 processes cannot be faster than 1: this measures
the runtime's overhead, not a speed-up. The projection assumes N hosts each as fast as this whole
machine, a ring all-reduce (each host sends and receives 2 (N-1)/N of the bytes) over a network of
the stated bandwidth plus the measured local all-reduce latency:

  step(N) = compute(1) / N  +  2 (N - 1) / N * bytes / bandwidth  +  latency

Every sample records the cores used by processes other than the benchmark's own (its cooperating
processes count as its own); the script refuses to save a result with too few quiet samples.

    python benchmarks/multiprocess_step.py --out benchmarks/results/multiprocess_step.json   # about 2 minutes
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

from _report import emit
from _timing import summarize, timed_ms

SUPPORT, TARGETS = 1000, 5000
SHAPE = (28, 28, 1)
CLASSES = 10
NETWORK_GBIT = (1, 10, 100)
HOSTS = (1, 2, 4, 8, 16)
LOADED_EXIT = 3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--allow-load", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = child(args.repeats)
        if result is not None:
            print(json.dumps(result))
        return 0
    runs = {count: run_processes(count, args.repeats) for count in (1, 2)}
    one, two = runs[1], runs[2]
    report = {
        "benchmark": "multiprocess_step",
        "step": f"kip.make_step, FC NTK depth 1, float32, {SUPPORT} support x {TARGETS} targets, 1 CPU device per process",
        "processes": {str(count): run for count, run in runs.items()},
        "projection": projection(one["step"]["median_ms"], two["bytes_all_reduced"], two["all_reduce"]["median_ms"]),
    }
    loaded = [f"processes.{count}.{part}" for count, run in runs.items() for part in ("step", "all_reduce")
              if run.get(part, {}).get("loaded")]
    report["loaded"] = loaded
    if loaded and not args.allow_load:
        emit(report, None)
        print(f"multiprocess_step: timings taken under load ({', '.join(loaded)}); not writing {args.out}", file=sys.stderr)
        return LOADED_EXIT
    emit(report, args.out)
    return 0


def run_processes(count: int, repeats: int) -> dict:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    children = []
    for index in range(count):
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
        if count > 1:
            env.update(KIP_COORDINATOR=f"127.0.0.1:{port}", KIP_NUM_PROCESSES=str(count), KIP_PROCESS_ID=str(index))
        children.append(subprocess.Popen([sys.executable, __file__, "--child", "--repeats", str(repeats)], env=env,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [child.communicate(timeout=1200) for child in children]
    for child, (_, err) in zip(children, outputs):
        if child.returncode != 0:
            raise SystemExit(f"multiprocess_step: a {count}-process child failed:\n{err[-3000:]}")
    return json.loads(outputs[0][0].strip().splitlines()[-1])


def child(repeats: int) -> dict | None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from pipeline.distill import kip
    from pipeline.kernels import functions as kernels
    from pipeline.run import devices, distributed, runtime
    from pipeline.run.config import DistillConfig, KernelConfig

    runtime.tune_process()
    distributed.initialize_from_env()
    if distributed.process_count() > 1:  # the peers' CPU time is this benchmark's own, not other load
        from _report import OtherLoad

        OtherLoad.GROUP_PARENT = os.getppid()
    rng = np.random.default_rng(0)
    x_train = rng.standard_normal((20_000,) + SHAPE, dtype=np.float32)
    y_train = (np.eye(CLASSES, dtype=np.float32)[rng.integers(0, CLASSES, 20_000)] - 0.1).astype(np.float32)
    optimizer = optax.adam(0.01)
    support = kip.Support(jnp.asarray(x_train[:SUPPORT]), jnp.asarray(y_train[:SUPPORT]))
    opt_state = optimizer.init(support)
    support, opt_state = devices.replicate_tree((support, opt_state))
    x_dev, y_dev = devices.put_replicated(x_train), devices.put_replicated(y_train)
    step = kip.make_step(kernels.make(KernelConfig()), optimizer, DistillConfig(reg=1e-6, learn_labels=False))
    batches = [rng.choice(20_000, TARGETS, replace=False).astype(np.int32) for _ in range(4)]
    hlo = step.lower(support, opt_state, x_dev, y_dev, batches[0]).compile().as_text()
    state = {"support": support, "opt": opt_state, "i": 0}

    def one_step():
        state["i"] += 1
        state["support"], state["opt"], loss = step(state["support"], state["opt"], x_dev, y_dev, batches[state["i"] % 4])
        devices.to_host(loss)

    one_step()
    result = {"processes": distributed.process_count(), "devices": jax.device_count(),
              "step": fixed_samples(one_step, repeats), "bytes_all_reduced": all_reduce_bytes(hlo),
              "all_reduces_in_step": hlo.count(" all-reduce(") + hlo.count(" all-reduce-start(")}
    if distributed.process_count() > 1:
        result["all_reduce"] = all_reduce_alone(result["bytes_all_reduced"], repeats)
    return result if distributed.is_main() else None


def all_reduce_bytes(hlo: str) -> int:
    """Operand bytes of every all-reduce in a compiled module's text (its result shapes)."""
    total = 0
    sizes = {"f32": 4, "f64": 8, "s32": 4, "bf16": 2, "f16": 2}
    for line in hlo.splitlines():
        if " all-reduce(" not in line and " all-reduce-start(" not in line:
            continue
        result = line.split("=", 1)[1].split("all-reduce", 1)[0]
        for dtype, dims in re.findall(r"(f32|f64|s32|bf16|f16)\[([0-9,]*)\]", result):
            count = 1
            for dim in filter(None, dims.split(",")):
                count *= int(dim)
            total += count * sizes[dtype]
    return total


def all_reduce_alone(nbytes: int, repeats: int) -> dict:
    """The step's all-reduce volume, summed across the processes' devices by itself."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pipeline.run import devices

    floats = max(1, nbytes // 4)
    count = jax.device_count()
    local = np.ones((count, floats), np.float32)
    x = jax.make_array_from_callback(local.shape, devices.rows_sharding(2), lambda index: local[index])
    reduce = jax.jit(lambda a: jnp.sum(a, axis=0), out_shardings=devices.replicated_sharding())
    devices.to_host(reduce(x)[:1])
    return fixed_samples(lambda: devices.to_host(reduce(x)[:1]), repeats)


def fixed_samples(fn, repeats: int) -> dict:
    """2 x repeats samples, the same number in every process: each call is a collective, so a
    process retrying a loaded sample alone (as `_timing.interleaved` does) would wait forever for
    its peers. The summary keeps the quiet samples (this process's view of the load) and is flagged
    `loaded` when fewer than `repeats` were quiet."""
    return summarize([timed_ms(fn) for _ in range(2 * repeats)], repeats)


def projection(compute_ms: float, nbytes: int, local_all_reduce_ms: float) -> dict:
    """step(N) = compute / N + ring all-reduce at the stated bandwidth + measured local latency."""
    rows = []
    for gbit in NETWORK_GBIT:
        for hosts in HOSTS:
            transfer_ms = 0.0 if hosts == 1 else 2 * (hosts - 1) / hosts * nbytes * 8 / (gbit * 1e9) * 1e3
            step_ms = compute_ms / hosts + transfer_ms + (local_all_reduce_ms if hosts > 1 else 0.0)
            rows.append({"network_gbit_s": gbit, "hosts": hosts, "projected_step_ms": round(step_ms, 2),
                         "projected_speedup": round(compute_ms / step_ms, 2),
                         "communication_share": round(1 - compute_ms / hosts / step_ms, 3)})
    return {"what": "a projection from measured parts, not a measurement on several hosts",
            "model": "compute(1)/N + 2(N-1)/N * bytes / bandwidth + the measured local all-reduce time",
            "compute_ms_one_process": compute_ms, "bytes_per_step": nbytes, "local_all_reduce_ms": local_all_reduce_ms,
            "rows": rows}


if __name__ == "__main__":
    sys.exit(main())
