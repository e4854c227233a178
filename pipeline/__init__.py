"""kip-pipeline: dataset distillation with Kernel Inducing Points, as a library and a DVC pipeline.

Public entry points: `pipeline.run.workflow.distill` / `pipeline.run.workflow.evaluate` for whole runs,
and the small pure pieces they are made of (`kernels`, `krr`, `kip`, `preprocess`, `data`).
"""
import os as _os

# TensorFlow (imported by neural-tangents and TFDS) logs start-up chatter at INFO; keep warnings.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
