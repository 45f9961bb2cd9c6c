"""Offline half of the Feature Geometry Explorer: (model, SAE, corpus) -> explorer cache."""

import os

__version__ = "0.1.0"
# Intel MKL picks its kernels by the memory alignment of each buffer, so the same matmul can differ in
# the last bit from one call to the next; near-ties in top examples then flip between two runs of the
# same harvest. STRICT makes results independent of alignment (and of the run); it must be set before
# torch loads MKL, i.e. before any `import torch`. Measured: no slower on this CPU (bench/README.md).
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
from precompute.schema import SCHEMA_VERSION  # noqa: E402  (re-exported)

__all__ = ["SCHEMA_VERSION", "__version__"]
