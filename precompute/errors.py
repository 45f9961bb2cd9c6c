"""User-facing errors: each says what went wrong and what to do about it."""


class FeatureGeomError(Exception):
    """Base class for errors that the CLI prints without a traceback."""


class SAEFormatError(FeatureGeomError):
    """Unknown, corrupt or inconsistent SAE file."""


class ShapeMismatchError(FeatureGeomError):
    """SAE and model disagree on a dimension."""


class HookNotFoundError(FeatureGeomError):
    """The hook name does not match a module of the model."""


class CorpusError(FeatureGeomError):
    """Empty corpus, unreadable source, missing column, group without documents."""


class CacheError(FeatureGeomError):
    """Missing, foreign, half-written or tampered cache directory."""


class ModelLoadError(FeatureGeomError):
    """The model could not be found or loaded."""
