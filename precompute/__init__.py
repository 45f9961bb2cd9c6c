"""Offline half of the Feature Geometry Explorer: (model, SAE, corpus) -> explorer cache."""

__version__ = "0.1.0"
SCHEMA_VERSION = 1
