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


class ConfigError(FeatureGeomError):
    """An option (flag or TOML value) of the wrong type or out of its range."""


# One exit-code convention for every entry point: 0 success, 2 the user's input or environment
# (a clear, actionable message), 1 a bug in featuregeom, 130 interrupted.
EXIT_OK, EXIT_BUG, EXIT_USER, EXIT_INTERRUPTED = 0, 1, 2, 130


def _os_error_message(exc: OSError) -> str:
    import errno

    where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
    hints = {
        errno.ENOSPC: "the disk is full; free space or choose another --out. The previous cache, if any, is intact",
        errno.EDQUOT: "the disk quota is exhausted; free space or choose another --out",
        errno.EACCES: "permission denied; choose a path you can write to",
        errno.EPERM: "operation not permitted; choose a path you can write to",
        errno.EROFS: "the file system is read-only; choose a writable --out",
        errno.ENOTDIR: "a parent of the path is a file, not a directory; choose another path",
        errno.ENOENT: "no such file or directory; check the path",
        errno.EISDIR: "expected a file but found a directory; check the path",
    }
    hint = hints.get(exc.errno or -1, exc.strerror or str(exc))
    return f"{hint}{where}"


def run_command(fn, *args, prog: str = "featuregeom") -> int:
    """Run a command's body and turn every failure into one line on stderr and an exit code.

    A FeatureGeomError or an OS error (disk full, read-only, permission) is the user's to fix: exit 2.
    Ctrl-C: exit 130 with a note that a rerun resumes. Anything else is a bug: one line naming it
    (FEATUREGEOM_DEBUG=1 shows the traceback), exit 1. Never a bare traceback."""
    import os
    import sys

    try:
        return int(fn(*args) or 0)
    except FeatureGeomError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USER
    except KeyboardInterrupt:
        print(
            f"{prog}: interrupted; nothing half-written was kept. Rerun the same command to resume "
            "(or start clean)",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except OSError as exc:
        if os.environ.get("FEATUREGEOM_DEBUG"):
            raise
        print(f"{prog}: error: {_os_error_message(exc)}", file=sys.stderr)
        return EXIT_USER
    except MemoryError:
        print(f"{prog}: error: out of memory; lower --batch-size or --max-tokens", file=sys.stderr)
        return EXIT_USER
    except Exception as exc:  # noqa: BLE001 - the last line of defence of a CLI
        if os.environ.get("FEATUREGEOM_DEBUG"):
            raise
        print(
            f"{prog}: internal error: {type(exc).__name__}: {exc}. This is a bug in featuregeom; rerun "
            "with FEATUREGEOM_DEBUG=1 to see the traceback and report it",
            file=sys.stderr,
        )
        return EXIT_BUG
