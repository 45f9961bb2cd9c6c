"""Exports of a cache to other tools' formats (`featuregeom export`)."""
