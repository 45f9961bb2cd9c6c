"""`featuregeom`: the command line of the precompute engine.

featuregeom precompute --config configs/demo.toml          # the whole job
featuregeom geometry --sae PATH --out DIR                   # one step on a cache
featuregeom train-sae --config configs/train-sae.toml       # train a TopK SAE
"""

from __future__ import annotations

import argparse
import os
import sys

from precompute import __version__
from precompute.errors import EXIT_USER, FeatureGeomError, run_command

STEPS = ("harvest", "geometry", "scores", "overlaps")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", metavar="FILE.toml", help="TOML file with the same options (flags override it)"
    )
    p.add_argument("--out", metavar="DIR", help="cache directory to write")
    p.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default=None, help="where to run (default auto)"
    )
    p.add_argument("--seed", type=int, default=None, help="seed for sampling and UMAP (default 0)")
    p.add_argument(
        "--no-progress", dest="progress", action="store_false", default=None, help="hide progress bars"
    )


def _add_model(p: argparse.ArgumentParser, required_note: str = "") -> None:
    p.add_argument(
        "--model",
        metavar="M",
        help="'smollm2' (the packaged SmolLM2-135M-Instruct GGUF), a .gguf file, a local "
        "transformers directory, or a hub id (online only)" + required_note,
    )
    p.add_argument(
        "--adapter",
        metavar="DIR",
        help="peft adapter (a `featuregeom finetune` output) merged into "
        "the model: builds the 'after' cache of a fine-tune",
    )
    p.add_argument(
        "--hook",
        metavar="H",
        help="module path (model.layers.15) or SAELens hook name (blocks.15.hook_resid_post)",
    )
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)


def _add_sae(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sae",
        metavar="S",
        help="SAE path: SAELens dir, Gemma Scope params.npz / params.safetensors, "
        "sparsify dir, dictionary_learning ae.pt, plain .safetensors, "
        "or release:RELEASE/SAE_ID (needs sae-lens, online)",
    )
    p.add_argument(
        "--sae-format",
        default=None,
        help="force a format instead of detecting it from the path "
        "(saelens, gemmascope, gemmascope2, sparsify, dictionary_learning, safetensors, release)",
    )


def _add_corpus(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--corpus",
        action="append",
        metavar="PATH[:GROUP[:CATEGORY]]",
        help="corpus file (.jsonl/.csv/.txt/.json/.yaml, optionally .gz, or .parquet); repeatable. "
        "GROUP is task, control, harmful, benign or general; CATEGORY a label or @column",
    )
    p.add_argument("--context-size", type=int, default=None, help="tokens per context (default 128)")
    p.add_argument(
        "--packing",
        choices=["split", "truncate", "pack"],
        default=None,
        help="split long documents into windows (default), keep only the first window, or pack "
        "documents of a source together",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="token budget, shared equally by sources without their own max_tokens",
    )
    p.add_argument("--batch-size", type=int, default=None, help="contexts per forward pass (default 16)")


def _add_harvest(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--top-k-examples", type=int, default=None, help="top-activating contexts per feature (20)"
    )
    p.add_argument("--quantile-bins", type=int, default=None, help="activation intervals to sample from (5)")


def _add_geometry(p: argparse.ArgumentParser) -> None:
    p.add_argument("--neighbors", type=int, default=None, help="cosine neighbours per feature (32)")
    p.add_argument(
        "--null-fpr",
        type=float,
        default=None,
        help="false-positive rate of the null threshold: the chance that a random direction's "
        "best match exceeds it (0.01)",
    )
    p.add_argument("--knn-backend", choices=["auto", "torch", "faiss"], default=None)
    p.add_argument("--umap-neighbors", type=int, default=None)


def _add_scores(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--harm-threshold", type=float, default=None, help="AUROC a harmful feature must reach (0.7)"
    )
    p.add_argument("--task-threshold", type=float, default=None, help="AUROC a task feature must reach (0.7)")
    p.add_argument(
        "--neuronpedia", metavar="PATH", help="Neuronpedia export (dir or JSON) to import labels from"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="featuregeom",
        description="Feature Geometry Explorer: cache SAE feature geometry, harm/task scores and examples for "
        "the explorer (streamlit run explorer/app.py -- --cache DIR).",
    )
    parser.add_argument("--version", action="version", version=f"featuregeom {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "precompute",
        help="run the whole job: harvest, geometry, scores, overlaps",
        description="Load a model and SAE, stream the corpus, and write an explorer cache. "
        "Rerunning the same command after an interruption resumes the harvest.",
    )
    (
        _add_common(p),
        _add_model(p),
        _add_sae(p),
        _add_corpus(p),
        _add_harvest(p),
        _add_geometry(p),
        _add_scores(p),
    )
    p.add_argument(
        "--n-task", type=int, default=None, help="task features checked for harmful neighbours (50)"
    )
    p.add_argument("--steps", default=None, help="comma-separated subset of " + ",".join(STEPS))
    p.add_argument(
        "--overwrite",
        action="store_true",
        default=None,
        help="replace an --out directory that holds a different cache",
    )

    p = sub.add_parser(
        "harvest",
        help="only the harvest step (needs model, SAE, hook, corpus)",
        description="Stream the corpus through model and SAE; write firing rates, histograms, "
        "examples and the sparse activation shards into the cache.",
    )
    _add_common(p), _add_model(p), _add_sae(p), _add_corpus(p), _add_harvest(p)
    p.add_argument("--overwrite", action="store_true", default=None)

    p = sub.add_parser(
        "geometry",
        help="exact cosine neighbours, null threshold and UMAP (needs --sae, --out)",
        description="Unit-normalise the decoder rows, find exact top-k cosine neighbours in blocks, "
        "compute the null threshold and a UMAP layout from the exact kNN graph.",
    )
    _add_common(p), _add_sae(p), _add_geometry(p)

    p = sub.add_parser(
        "scores",
        help="harm/task scores, logit lens, imported labels on an existing cache",
        description="Harm score (AUROC harmful vs benign documents, with a 95%% bound), harm "
        "category, task scores; logit-lens tokens when --model/--sae are known.",
    )
    _add_common(p), _add_model(p), _add_sae(p), _add_scores(p)

    p = sub.add_parser(
        "overlaps",
        help="flag task features' harmful neighbours above the null",
        description="For the top task features, list harmful neighbours above the null cosine "
        "with z, co-activation and a risk score (overlaps.parquet).",
    )
    _add_common(p)
    p.add_argument("--n-task", type=int, default=None, help="task features to check (50)")

    p = sub.add_parser("info", help="summarise a cache and verify its checksums")
    p.add_argument("cache", metavar="DIR")

    from precompute.training import train_sae

    p = sub.add_parser(
        "train-sae",
        help="train a TopK SAE on a model's activations (SAELens format out)",
        description="Train a TopK sparse autoencoder (Gao et al. 2024) on activations streamed "
        "from any model/hook/corpus and write a SAELens-format directory.",
    )
    train_sae.add_arguments(p)

    from precompute.lab import steer as steering
    from precompute.lab import synth

    p = sub.add_parser(
        "synth",
        help="planted ground truth: known dictionary -> SAE -> geometry, scored",
        description="Generate activations from a dictionary with harmful features planted at known "
        "cosines to task features, train the project's SAE on them and check that the "
        "geometry recovers the plant (MCC, neighbour order, false positives vs the null).",
    )
    synth.add_arguments(p)

    p = sub.add_parser(
        "steer",
        help="steering check: observed vs first-order predicted feature changes",
        description="Add alpha * (unit task direction) at the hook and compare every feature's change "
        "in activation with the first-order prediction alpha * (encoder row . direction).",
    )
    steering.add_arguments(p)

    from precompute.lab import diff, finetune, triage

    p = sub.add_parser("finetune", help="LoRA fine-tune on a task dataset (and its control, same seed)")
    finetune.add_arguments(p)
    p = sub.add_parser(
        "eval-acts", help="SAE activations of a (fine-tuned) model on EM questions and neutral prompts"
    )
    diff.add_eval_arguments(p)
    p = sub.add_parser("diff", help="per-feature before/after change with bootstrap CIs vs predicted risk")
    diff.add_diff_arguments(p)
    p = sub.add_parser("patch", help="project a LoRA adapter's output-space update off harmful directions")
    diff.add_patch_arguments(p)
    p = sub.add_parser(
        "triage", help="rank a dataset's samples by how much they drive harmful-neighbour features"
    )
    triage.add_arguments(p)
    return parser


def _config_from(args: argparse.Namespace):
    from precompute.options import RunConfig

    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "command", "steps")}
    return RunConfig.load(args.config, overrides)


def _info(path: str) -> int:
    import json

    from precompute.cache import verify_cache

    manifest = verify_cache(path)
    summary = {
        k: manifest.get(k)
        for k in (
            "schema_version",
            "hook",
            "d_in",
            "n_features",
            "steps",
            "timings",
            "tool_version",
            "created",
            "updated",
        )
    }
    summary["model"] = (manifest.get("model") or {}).get("spec")
    summary["sae"] = (manifest.get("sae") or {}).get("source")
    summary["corpus"] = [
        {k: c.get(k) for k in ("path", "group", "documents", "tokens")} for c in manifest.get("corpus", [])
    ]
    print(json.dumps(summary, indent=2))
    print(f"all {len(manifest.get('files', {}))} files match their checksums")
    return 0


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "info":
        return _info(args.cache)
    if args.command in ("train-sae", "synth", "steer", "finetune", "triage"):
        from precompute.lab import finetune, synth, triage
        from precompute.lab import steer as steering
        from precompute.training import train_sae

        module = {
            "train-sae": train_sae,
            "synth": synth,
            "steer": steering,
            "finetune": finetune,
            "triage": triage,
        }[args.command]
        return int(module.run(args) or 0)
    if args.command in ("eval-acts", "diff", "patch"):
        from precompute.lab import diff

        return int(
            {"eval-acts": diff.run_eval, "diff": diff.run_diff, "patch": diff.run_patch}[args.command](args)
        )
    from precompute.pipeline import run as pipeline

    cfg = _config_from(args)
    if args.command == "precompute":
        steps = tuple(s.strip() for s in args.steps.split(",")) if args.steps else STEPS
        unknown = set(steps) - set(STEPS)
        if unknown:
            raise FeatureGeomError(f"unknown step(s) {sorted(unknown)}; steps are {', '.join(STEPS)}")
        pipeline.run_precompute(cfg, steps)
    elif args.command == "harvest":
        pipeline.run_precompute(cfg, ("harvest",))
    else:
        pipeline.run_step(args.command, cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    # tokenizers forks worker threads; a fork later (DataLoader, subprocess) would warn or deadlock
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_USER
    return run_command(_dispatch, args)


if __name__ == "__main__":
    sys.exit(main())
