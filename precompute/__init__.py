"""Offline half of the Feature Geometry Explorer: (model, SAE, corpus) -> explorer cache."""

__version__ = "0.1.0"
from precompute.schema import SCHEMA_VERSION  # noqa: E402  (re-exported)

__all__ = ["SCHEMA_VERSION", "__version__"]
