"""End-to-end precompute on a tiny random model: cache contents against brute force, resume after
SIGKILL, and every bad input the issue lists."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from precompute import schema
from precompute.cache import SCHEMA_VERSION, read_manifest, verify_cache
from precompute.cli import main as cli_main
from precompute.data.corpus import CorpusSource
from precompute.errors import CacheError, CorpusError, HookNotFoundError, SAEFormatError, ShapeMismatchError
from precompute.pipeline.config import RunConfig
from precompute.pipeline.run import run_precompute
from precompute.pipeline.steps import STEPS
from tests.ranking import assert_ranking_equivalent

HOOK = "blocks.1.hook_resid_post"


def corpus_specs(files: dict[str, Path]) -> list[str]:
    return [
        f"{files['task']}:task",
        f"{files['control']}:control",
        f"{files['harmful']}:harmful:@category",
        f"{files['benign']}:benign",
    ]


def make_cfg(model: Path, sae: Path, files: dict[str, Path], out: Path, **kw) -> RunConfig:
    overrides = dict(
        model=str(model),
        sae=str(sae),
        hook=HOOK,
        out=str(out),
        corpus=corpus_specs(files),
        context_size=24,
        batch_size=4,
        progress=False,
        device="cpu",
        neighbors=8,
        top_k_examples=5,
        umap_neighbors=5,
        outlier_norm_factor=0,
    )
    overrides.update(kw)
    return RunConfig.load(None, overrides)


@pytest.fixture(scope="module")
def built_cache(tiny_model_dir, tiny_sae_dir, tiny_corpus, tmp_path_factory) -> tuple[Path, RunConfig]:
    out = tmp_path_factory.mktemp("caches") / "tiny"
    cfg = make_cfg(tiny_model_dir, tiny_sae_dir, tiny_corpus, out)
    run_precompute(cfg)
    return out, cfg


def brute_force_activations(model_dir: Path, sae_dir: Path, cache: Path) -> dict[int, np.ndarray]:
    """Each context alone through model + SAE: dense [T, d_sae] activations, uncounted positions zeroed."""
    from precompute.model.hooks import HookReader, resolve_hook
    from precompute.model.load import load_model
    from precompute.sae.registry import load_sae

    lm = load_model(str(model_dir), device="cpu")
    sae = load_sae(str(sae_dir))
    reader = HookReader(lm.model, resolve_hook(lm.model, HOOK))
    with np.load(cache / "harvest" / "contexts.npz") as z:
        offsets, token_ids = z["offsets"], z["token_ids"]
    special = set(lm.tokenizer.all_special_ids)
    out = {}
    for c in range(len(offsets) - 1):
        ids = torch.tensor(token_ids[offsets[c] : offsets[c + 1]], dtype=torch.long)[None]
        acts = sae.encode(reader(ids, torch.ones_like(ids))[0]).detach().numpy()
        acts[0] = 0
        for p, t in enumerate(ids[0].tolist()):
            if t in special:
                acts[p] = 0
        out[c] = acts
    return out


def test_cache_is_complete_and_verified(built_cache):
    out, _ = built_cache
    manifest = verify_cache(out)
    assert manifest["schema_version"] == SCHEMA_VERSION
    assert manifest["n_features"] == 64 and manifest["d_in"] == 32
    assert manifest["versions"]["torch"] and manifest["versions"]["transformers"]
    assert all(len(c["sha256"]) == 64 for c in manifest["corpus"]) and manifest["sae"]["sha256"]
    assert manifest["steps"] == list(STEPS)  # every step ran (test_steps.py spells out the order)
    assert not (out / "stability.json").exists()  # no --sae-replicate: nothing to compare with
    for step in manifest["steps"]:
        sidecar = json.loads((out / "params" / f"{step}.json").read_text())
        assert sidecar["step"] == step and "params" in sidecar
    groups = {c["group"] for c in manifest["corpus"]}
    assert groups == {"task", "control", "harmful", "benign"}
    features = pd.read_parquet(out / "features.parquet")
    assert list(features["feature"]) == list(range(64))
    for col in (
        "umap_x",
        "umap_y",
        "frequency",
        "max_activation",
        "harm_score",
        "harm_category",
        "task_score",
        "label",
        "freq_task",
        "freq_harmful",
    ):
        assert col in features.columns, col
    assert not (out.parent / (out.name + ".work")).exists(), "work dir is removed after success"


def test_examples_equal_brute_force_scan(built_cache, tiny_model_dir, tiny_sae_dir):
    out, cfg = built_cache
    dense = brute_force_activations(tiny_model_dir, tiny_sae_dir, out)
    examples = pd.read_parquet(out / "examples.parquet")
    features = pd.read_parquet(out / "features.parquet").set_index("feature")
    n_ctx = len(dense)
    ctx_max = np.stack([dense[c].max(axis=0) for c in range(n_ctx)])  # [contexts, features]
    counted = sum((dense[c].shape[0]) for c in range(n_ctx))
    for f in range(64):
        col = ctx_max[:, f]
        got = examples[(examples.feature == f) & (examples.kind == "top")].sort_values("rank")
        # batched harvest vs this unbatched scan: near-tied contexts may swap, nothing else may
        assert_ranking_equivalent(
            got.context_id.tolist(), col, cfg.top_k_examples, eligible=col > 0, what=f"feature {f}"
        )
        for _, row in got.iterrows():
            np.testing.assert_allclose(row.activations, dense[row.context_id][:, f], rtol=1e-5, atol=1e-5)
        assert features.loc[f, "max_activation"] == pytest.approx(float(col.max()), rel=1e-5)
        fires = sum(int((dense[c][:, f] > 0).sum()) for c in range(n_ctx))
        assert fires == features.loc[f, "fires"]
    # counted tokens exclude position 0 and special tokens, so frequencies are over fewer tokens
    assert features["frequency"].max() <= 1.0 and counted > 0


def test_neighbors_match_brute_force(built_cache, tiny_sae_dir):
    from precompute.sae.registry import load_sae

    out, _ = built_cache
    d = load_sae(str(tiny_sae_dir)).unit_directions().numpy()
    cos = d @ d.T
    np.fill_diagonal(cos, -np.inf)
    with np.load(out / "neighbors.npz") as z:
        indices, cosine = z["indices"], z["cosine"]
    for i in range(len(d)):
        eligible = np.arange(len(d)) != i
        assert_ranking_equivalent(
            indices[i].tolist(), cos[i], indices.shape[1], eligible=eligible, tol=1e-6, what=f"feature {i}"
        )
        np.testing.assert_allclose(cosine[i], cos[i, indices[i]], atol=1e-6)


def test_examples_carry_group_and_category(built_cache):
    out, _ = built_cache
    examples = pd.read_parquet(out / "examples.parquet")
    assert set(examples["group"]) <= {"task", "control", "harmful", "benign"}
    harmful = examples[examples.group == "harmful"]
    assert set(harmful["category"].dropna()) <= {"illegal_other", "violence_weapons"}  # unified
    docs = pd.read_parquet(out / "documents.parquet")
    assert set(docs["group"]) == {"task", "control", "harmful", "benign"}
    labels = docs.loc[docs.group == "harmful", ["category_source", "category"]].drop_duplicates()
    assert sorted(map(tuple, labels.to_numpy())) == [
        ("Non-violent crimes", "illegal_other"),
        ("Violence", "violence_weapons"),
    ]
    assert not docs["validation"].any()


def test_geometry_step_alone_needs_only_sae_and_out(tiny_sae_dir, tmp_path):
    out = tmp_path / "geo"
    assert (
        cli_main(
            [
                "geometry",
                "--sae",
                str(tiny_sae_dir),
                "--out",
                str(out),
                "--neighbors",
                "8",
                "--umap-neighbors",
                "5",
                "--no-progress",
            ]
        )
        == 0
    )
    manifest = verify_cache(out)
    assert manifest["steps"] == ["geometry"]
    assert len(pd.read_parquet(out / "features.parquet")) == 64


def test_scores_and_overlaps_rerun_on_existing_cache(built_cache, tmp_path):
    import shutil

    out, _ = built_cache
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    before = pd.read_parquet(copy / "overlaps.parquet")
    assert cli_main(["scores", "--out", str(copy), "--harm-threshold", "0.6", "--no-progress"]) == 0
    assert cli_main(["overlaps", "--out", str(copy), "--n-task", "5", "--no-progress"]) == 0
    manifest = verify_cache(copy)
    assert manifest["params"]["scores"]["harm_threshold"] == 0.6
    assert manifest["params"]["overlaps"]["n_task"] == 5
    assert list(pd.read_parquet(copy / "overlaps.parquet").columns) == list(before.columns)


def test_no_task_feature_is_a_result_and_overlaps_are_empty(built_cache, tmp_path):
    """When no feature qualifies as a task feature the sidecar says so and overlaps writes an empty
    table with the contract's columns, not an error."""
    import shutil

    out, _ = built_cache
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    args = ["--out", str(copy), "--no-progress"]
    assert cli_main(["scores", *args, "--min-docs", "1000", "--task-window", "4"]) == 0
    sidecar = json.loads((copy / "params" / "scores.json").read_text())
    assert sidecar["n_task"] == sidecar["n_control"] == sidecar["n_harmful"] == 0
    assert sidecar["task_contrast"] == "task vs control"
    assert sidecar["params"]["min_docs"] == 1000 and sidecar["params"]["task_window"] == 4
    features = pd.read_parquet(copy / "features.parquet")
    assert not features["is_task"].any() and features["task_score"].notna().all()
    assert "task_control_score" not in features.columns
    assert cli_main(["overlaps", *args]) == 0
    overlaps = pd.read_parquet(copy / "overlaps.parquet")
    assert overlaps.empty and list(overlaps.columns) == [
        c.name for c in schema.TABLES[schema.OVERLAPS].columns
    ]
    assert json.loads((copy / "params" / "overlaps.json").read_text())["pairs"] == 0
    verify_cache(copy)


# ------------------------------------------------------------------------------ resume
def _cli(args: list[str], **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "precompute.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def _comparable_files(cache: Path) -> dict[str, str]:
    files = read_manifest(cache)["files"]
    return {k: v for k, v in files.items() if not k.startswith("params/")}


def test_resume_after_sigkill_equals_uninterrupted_run(tiny_model_dir, tiny_sae_dir, tiny_corpus, tmp_path):
    common = [
        "precompute",
        "--model",
        str(tiny_model_dir),
        "--sae",
        str(tiny_sae_dir),
        "--hook",
        HOOK,
        "--context-size",
        "16",
        "--batch-size",
        "1",
        "--device",
        "cpu",
        "--neighbors",
        "8",
        "--umap-neighbors",
        "5",
        "--top-k-examples",
        "5",
        "--no-progress",
    ]
    for spec in corpus_specs(tiny_corpus):
        common += ["--corpus", spec]
    common += ["--config", str(tmp_path / "shards.toml")]
    (tmp_path / "shards.toml").write_text("batches_per_shard = 1\n")
    straight = tmp_path / "straight"
    proc = _cli(common + ["--out", str(straight)])
    assert proc.wait(timeout=600) == 0, proc.stdout.read()

    resumed = tmp_path / "resumed"
    work = tmp_path / "resumed.work"
    proc = _cli(common + ["--out", str(resumed)])
    deadline = time.time() + 300
    while time.time() < deadline and len(list(work.glob("shard-*.npz"))) < 3:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    n_before = len(list(work.glob("shard-*.npz")))
    assert n_before >= 3 and not resumed.exists(), "killed mid-harvest: shards exist, no cache yet"
    proc = _cli(common + ["--out", str(resumed)])
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output
    assert "resuming from" in output
    assert _comparable_files(resumed) == _comparable_files(straight)


# ------------------------------------------------------------------------------ bad input
def test_sae_width_mismatch_names_both_numbers(tiny_model_dir, tiny_corpus, tmp_path):
    from tests.tiny import make_sae, save_sae

    wide = save_sae(make_sae(48, 64), tmp_path / "wide")
    with pytest.raises(ShapeMismatchError, match=r"48.*32|32.*48"):
        run_precompute(make_cfg(tiny_model_dir, wide, tiny_corpus, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_unknown_hook_lists_nearest(tiny_model_dir, tiny_sae_dir, tiny_corpus, tmp_path):
    with pytest.raises(HookNotFoundError, match="blocks.1.hook_resid_post"):
        run_precompute(
            make_cfg(
                tiny_model_dir, tiny_sae_dir, tiny_corpus, tmp_path / "o", hook="blocks.1.hook_resid_pst"
            )
        )


def test_nan_and_corrupt_sae_are_refused(tiny_model_dir, tiny_corpus, tmp_path):
    from tests.tiny import make_sae, save_sae

    good = save_sae(make_sae(32, 64), tmp_path / "nan")
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(good / "sae_weights.safetensors"))
    tensors["W_dec"][3, 1] = float("nan")
    save_file(tensors, str(good / "sae_weights.safetensors"))
    with pytest.raises(SAEFormatError, match="NaN"):
        run_precompute(make_cfg(tiny_model_dir, good, tiny_corpus, tmp_path / "o"))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(os.urandom(300))
    with pytest.raises(SAEFormatError):
        run_precompute(make_cfg(tiny_model_dir, corrupt, tiny_corpus, tmp_path / "o"))
    assert (
        cli_main(
            [
                "precompute",
                "--model",
                str(tiny_model_dir),
                "--sae",
                str(tmp_path / "nope.xyz"),
                "--hook",
                HOOK,
                "--out",
                str(tmp_path / "o"),
                "--corpus",
                str(tiny_corpus["task"]),
            ]
        )
        == 2
    )


def test_empty_corpus_and_empty_group(tiny_model_dir, tiny_sae_dir, tiny_corpus, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cfg = make_cfg(tiny_model_dir, tiny_sae_dir, tiny_corpus, tmp_path / "o")
    cfg.corpus.append(CorpusSource(str(empty), "benign"))
    with pytest.raises(CorpusError, match="no documents"):
        run_precompute(cfg)
    cfg.corpus = []
    with pytest.raises(Exception, match="corpus"):
        run_precompute(cfg)
    no_benign = make_cfg(tiny_model_dir, tiny_sae_dir, tiny_corpus, tmp_path / "o2")
    no_benign.corpus = [c for c in no_benign.corpus if c.group != "benign"]
    with pytest.raises(CorpusError, match="benign"):
        run_precompute(no_benign)
    assert not (tmp_path / "o2").exists()


def test_non_utf8_text_is_skipped_and_counted(tiny_model_dir, tiny_sae_dir, tiny_corpus, tmp_path):
    bad = tmp_path / "mixed.jsonl"
    good_lines = [json.dumps({"text": f"How do I bake bread number {i}?"}).encode() for i in range(6)]
    bad.write_bytes(
        b"\n".join(good_lines[:3] + [b'{"text": "caf\xe9 \xff broken"}'] + good_lines[3:]) + b"\n"
    )
    cfg = make_cfg(tiny_model_dir, tiny_sae_dir, tiny_corpus, tmp_path / "out")
    cfg.corpus.append(CorpusSource(str(bad), "general"))
    run_precompute(cfg)
    entry = [c for c in read_manifest(tmp_path / "out")["corpus"] if c["path"] == str(bad)][0]
    assert entry["skipped_non_utf8"] == 1 and entry["documents"] == 6


def test_refuses_to_overwrite_a_different_cache(built_cache, tiny_model_dir, tiny_corpus, tmp_path):
    import shutil

    from tests.tiny import make_sae, save_sae

    out, _ = built_cache
    copy = tmp_path / "existing"
    shutil.copytree(out, copy)
    other = save_sae(make_sae(32, 64, seed=7), tmp_path / "other-sae")
    cfg = make_cfg(tiny_model_dir, other, tiny_corpus, copy)
    with pytest.raises(CacheError, match="--overwrite"):
        run_precompute(cfg)
    assert verify_cache(copy)["identity"] == read_manifest(out)["identity"], "old cache untouched"
    cfg.overwrite = True
    run_precompute(cfg)
    assert verify_cache(copy)["identity"] != read_manifest(out)["identity"]


def test_reader_refuses_tampered_or_foreign_cache(built_cache, tmp_path):
    import shutil

    out, _ = built_cache
    copy = tmp_path / "tampered"
    shutil.copytree(out, copy)
    with open(copy / "examples.parquet", "ab") as f:
        f.write(b"junk")
    with pytest.raises(CacheError, match="checksum"):
        verify_cache(copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="schema_version"):
        read_manifest(copy)


def test_scores_count_only_harvested_documents(tiny_model_dir, tiny_sae_dir, tiny_corpus, tmp_path):
    """A token budget leaves documents unread; they must not count as 'never fires' in the AUROCs."""
    cfg = make_cfg(tiny_model_dir, tiny_sae_dir, tiny_corpus, tmp_path / "budget", max_tokens=240)
    run_precompute(cfg)
    docs = pd.read_parquet(tmp_path / "budget" / "documents.parquet")
    read = docs[docs.n_tokens > 0]
    assert len(read) < len(docs), "the budget must leave some documents unread for this test"
    scored = read_manifest(tmp_path / "budget")["params"]["scores"]["documents_scored"]
    sidecar = json.loads((tmp_path / "budget" / "params" / "scores.json").read_text())
    left_out = sidecar["documents_left_out"]  # harvested, but shorter than the score window
    assert scored.keys() == left_out.keys()
    assert {g: scored[g] + left_out[g] for g in scored} == read["group"].value_counts().to_dict()


def test_outlier_norm_positions_are_dropped(tiny_model_dir, tiny_corpus):
    from precompute.data.plan import plan_corpus
    from precompute.model.activations import iter_activations
    from precompute.model.hooks import HookReader, resolve_hook
    from precompute.model.load import load_model

    lm = load_model(str(tiny_model_dir), device="cpu")
    plan = plan_corpus([CorpusSource.parse(f"{tiny_corpus['task']}:task")], lm.tokenizer, 24)
    reader = HookReader(lm.model, resolve_hook(lm.model, HOOK))
    args = (reader, plan.batches(4), lm.tokenizer.pad_token_id, set(lm.tokenizer.all_special_ids), lm.device)
    dropped = 0
    for full, cut in zip(
        iter_activations(*args), iter_activations(*args, outlier_norm_factor=1.0), strict=True
    ):
        norms = full.acts.norm(dim=1)
        keep = norms <= norms.median()
        assert len(cut.acts) == int(keep.sum())
        dropped += len(full.acts) - len(cut.acts)
        torch.testing.assert_close(cut.acts, full.acts[keep])
        assert (cut.position == full.position[keep.numpy()]).all()
    assert dropped > 0


def test_manifest_counts_scored_documents_the_sae_was_trained_on(
    tiny_model_dir, tiny_sae_dir, tiny_corpus, tmp_path
):
    """documents.parquet names every document by its content hash, and the manifest counts exactly
    the harvested ones that the SAE's training report lists (none listed: unknown, not zero)."""
    import shutil

    from precompute.data.split import DOCUMENT_HASH_HEX, documents_digest

    sae_dir = tmp_path / "sae"
    shutil.copytree(tiny_sae_dir, sae_dir)
    cfg = make_cfg(tiny_model_dir, sae_dir, tiny_corpus, tmp_path / "unknown", max_tokens=240)
    run_precompute(cfg)
    split = read_manifest(tmp_path / "unknown")["document_split"]
    assert split["split"] == "all" and split["scored_in_sae_training"] is None

    docs = pd.read_parquet(tmp_path / "unknown" / "documents.parquet")
    harvested = docs[docs.n_tokens > 0]
    assert split["scored_documents"] == len(harvested)
    assert split["scored_digest"] == documents_digest(h[:DOCUMENT_HASH_HEX] for h in harvested.doc_sha256)
    trained = [h[:DOCUMENT_HASH_HEX] for h in harvested.doc_sha256.iloc[:3]]
    trained += [h[:DOCUMENT_HASH_HEX] for h in docs[docs.n_tokens == 0].doc_sha256.iloc[:2]]
    (sae_dir / "training_report.json").write_text(json.dumps({"documents": {"train_sha256": trained}}))

    cfg = make_cfg(tiny_model_dir, sae_dir, tiny_corpus, tmp_path / "known", max_tokens=240)
    run_precompute(cfg)  # the report does not change the SAE's identity, so nothing else differs
    split = read_manifest(tmp_path / "known")["document_split"]
    assert split["scored_in_sae_training"] == 3  # unread documents do not count
    assert split["sae_training_documents"] == 5


def test_stability_step_writes_a_checked_file_and_skips_without_replicate(
    built_cache, tiny_sae_dir, tmp_path
):
    import shutil

    from precompute.pipeline.run import run_step
    from precompute.schema import STABILITY, check_json

    cache, cfg = built_cache
    out = tmp_path / "cache"
    shutil.copytree(cache, out)
    run_step("stability", type(cfg).load(None, {"out": str(out), "sae_replicate": str(tiny_sae_dir)}))
    data = json.loads((out / STABILITY).read_text())
    check_json(STABILITY, data, out / STABILITY)
    assert data["match"]["share_matched"] == 1.0  # the same SAE: every feature is its own match
    assert data["replicate"]["sha256"] is not None
    run_step("stability", type(cfg).load(None, {"out": str(out)}))
    assert not (out / STABILITY).exists()  # an earlier result would describe another replicate


def test_demo_rebuilds_a_valid_cache_built_from_other_inputs(built_cache, tiny_sae_dir, tmp_path):
    """`featuregeom demo` serves an existing cache only when the config would build that same cache:
    other settings, or other SAE weights under the same path, make it stale (an upgrade changed
    configs/demo.toml or the default SAE)."""
    import shutil

    from precompute.demo import stale_reason

    cache, cfg = built_cache
    same = RunConfig.load(None, {**cfg.to_dict(), "progress": True, "device": "auto"})
    assert stale_reason(cache, same) is None  # how it runs is not what it computes
    other = RunConfig.load(None, {**cfg.to_dict(), "document_split": "scoring"})
    assert stale_reason(cache, other) == "it was built with other settings (document_split)"
    # keeping no shards changes no file the explorer reads
    assert stale_reason(cache, RunConfig.load(None, {**cfg.to_dict(), "shard_storage": "recompute"})) is None
    older = tmp_path / "older"  # built before an option existed: it had the option's default
    shutil.copytree(cache, older)
    manifest = json.loads((older / "manifest.json").read_text())
    for added in ("umap_backend", "shard_storage", "top_k_per_category"):
        del manifest["config"][added]
    (older / "manifest.json").write_text(json.dumps(manifest))
    assert stale_reason(older, same) is None
    assert stale_reason(older, RunConfig.load(None, {**cfg.to_dict(), "top_k_per_category": 1})) == (
        "it was built with other settings (top_k_per_category)"
    )

    sae = tmp_path / "sae"
    shutil.copytree(tiny_sae_dir, sae)
    moved = tmp_path / "cache"
    shutil.copytree(cache, moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["config"]["sae"] = str(sae)
    (moved / "manifest.json").write_text(json.dumps(manifest))
    here = RunConfig.load(None, {**cfg.to_dict(), "sae": str(sae)})
    assert stale_reason(moved, here) is None
    (sae / "README.md").write_text("notes")  # describing the SAE does not change it
    assert stale_reason(moved, here) is None
    weights = sae / "sae_weights.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # one weight's last byte flipped
    assert stale_reason(moved, here) == f"the SAE at {sae} has changed since it was built"


def test_demo_rebuilds_a_cache_an_earlier_version_built_without_todays_steps(built_cache, tmp_path):
    import shutil

    from precompute.demo import stale_reason

    cache, cfg = built_cache
    older = tmp_path / "older"
    shutil.copytree(cache, older)
    manifest = json.loads((older / "manifest.json").read_text())
    manifest["steps"] = [s for s in manifest["steps"] if s != "labels"]
    (older / "manifest.json").write_text(json.dumps(manifest))
    assert stale_reason(older, cfg) == "it lacks the step(s) labels (built by an earlier version)"
