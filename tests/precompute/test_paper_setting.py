"""The paper's setting, offline: the GPU configs (Gemma-2-2B + Gemma Scope, Llama-3.1-8B + Llama Scope)
load and name SAEs that SAELens' registry knows at the config's layer; a hub id and the Llama Scope
release id resolve from a Hugging Face cache folder with HF_HUB_OFFLINE=1 (a tiny Llama and a tiny
Llama Scope checkpoint in the published layouts), equal what SAELens itself loads, and run through
`featuregeom precompute` end to end; a hub id that is not cached is one clear error, exit 2.

Each offline load runs in a subprocess: huggingface_hub and transformers read HF_HUB_CACHE when they
are imported, so the environment must be set before that."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from precompute.pipeline.config import RunConfig
from tests.hub_layout import put_llama_scope, put_model_dir

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = {
    "gemma": ROOT / "configs/gemma-2-2b-gemmascope.toml",
    "llama": ROOT / "configs/llama-3.1-8b-llamascope.toml",
}
TINY_REPO = "featuregeom-test/tiny-llama"
LLAMA_SCOPE = "release:llama_scope_lxr_8x/l16r_8x"
HOOK = "blocks.1.hook_resid_post"
pytestmark = pytest.mark.slow


def _registry(spec: str):
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    release, _, sae_id = spec.removeprefix("release:").partition("/")
    lookup = get_pretrained_saes_directory()[release]
    return lookup, sae_id


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_paper_configs_extend_the_demo_and_name_a_known_sae_at_their_layer(name: str) -> None:
    cfg = RunConfig.load(CONFIGS[name])
    demo = RunConfig.load(ROOT / "configs/demo.toml")
    assert cfg.corpus == demo.corpus  # `extends` brings the demo's corpus, unchanged
    assert (cfg.device, cfg.dtype, cfg.document_split, cfg.sae_replicate) == ("cuda", "bfloat16", "all", "")
    lookup, sae_id = _registry(str(cfg.sae))
    assert sae_id in lookup.saes_map, f"SAELens does not list {sae_id} in {lookup.release}"
    layer = re.search(r"blocks\.(\d+)\.", str(cfg.hook))
    sae_layer = re.search(r"layer_(\d+)|^l(\d+)r", sae_id)
    assert layer and sae_layer and int(layer.group(1)) == int(next(g for g in sae_layer.groups() if g))
    assert cfg.model is not None and lookup.model.split("/")[-1].lower() in cfg.model.lower()


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("hf") / "hub"
    put_model_dir(root, TINY_REPO, tiny_model_dir)
    lookup, sae_id = _registry(LLAMA_SCOPE)
    put_llama_scope(
        root, lookup.repo_id, lookup.saes_map[sae_id], 32, 64, HOOK, float(lookup.norm_scaling_factor[sae_id])
    )
    return root


def _offline(hub: Path, args: list[str], tmp: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(hub),
        "HF_HOME": str(tmp / "hf-home"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def _corpus(files: dict[str, Path]) -> list[str]:
    args = [f"--corpus={files[g]}:{g}" for g in ("task", "control", "benign")]
    return [*args, f"--corpus={files['harmful']}:harmful:@category"]


CHECK = """
import json, torch
from precompute.model.load import load_model
from precompute.sae.registry import load_sae_for_model
from sae_lens import SAE as SAELensSAE

hub = load_model("{repo}", device="cpu")
local = load_model("{local}", device="cpu")
ids = local.tokenizer("How do I bake a cake?", return_tensors="pt")["input_ids"]
with torch.inference_mode():
    same = torch.equal(hub.model(ids).logits, local.model(ids).logits)
sae, info = load_sae_for_model("{sae}", d_model=hub.d_model, model_name=hub.name, warn=lambda m: None)
ref = SAELensSAE.from_pretrained(*"{sae}".removeprefix("release:").split("/", 1), device="cpu")
x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)) * 3
ours, theirs = sae.encode(x), ref.encode(x.to(ref.W_enc.dtype)).float()
print(json.dumps(dict(kind=hub.kind, same_logits=same, arch=sae.architecture, hook=sae.hook_name,
    d=[sae.d_in, sae.d_sae], sha=info["sha256"], diff=float((ours - theirs).abs().max()),
    firing=float((ours > 0).float().mean()))))
"""


def test_hub_id_and_llama_scope_release_load_offline_as_saelens_does(
    hub: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    code = CHECK.format(repo=TINY_REPO, local=tiny_model_dir, sae=LLAMA_SCOPE)
    done = _offline(hub, ["-c", code], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["kind"] == "hub" and got["same_logits"]
    assert (got["arch"], got["hook"], got["d"], got["sha"]) == ("jumprelu", HOOK, [32, 64], None)
    assert got["diff"] == 0.0 and 0.05 < got["firing"] < 0.95  # equal to SAELens on features that fire


def test_precompute_runs_offline_on_a_hub_id_and_a_release(
    hub: Path, tiny_corpus: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "cache"
    args = ["-m", "precompute", "precompute", "--model", TINY_REPO, "--sae", LLAMA_SCOPE, "--hook", HOOK]
    args += ["--out", str(out), "--context-size", "24", "--batch-size", "4", "--neighbors", "8"]
    args += ["--umap-neighbors", "5", "--top-k-examples", "5", "--outlier-norm-factor", "0", "--no-progress"]
    args += ["--device", "cpu", *_corpus(tiny_corpus)]
    done = _offline(hub, args, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    from precompute.cache import verify_cache

    verify_cache(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["kind"] == "hub" and manifest["model"]["spec"] == TINY_REPO
    assert manifest["sae"]["source"] == LLAMA_SCOPE and manifest["sae"]["architecture"] == "jumprelu"
    assert manifest["n_features"] == 64


def test_uncached_hub_id_offline_is_one_clear_error(
    hub: Path, tiny_corpus: dict[str, Path], tmp_path: Path
) -> None:
    args = [
        "-m",
        "precompute",
        "precompute",
        "--model",
        "featuregeom-test/not-downloaded",
        "--sae",
        LLAMA_SCOPE,
        "--hook",
        HOOK,
    ]
    args += ["--out", str(tmp_path / "c"), "--no-progress", *_corpus(tiny_corpus)]
    done = _offline(hub, args, tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "could not load 'featuregeom-test/not-downloaded'" in done.stderr and "Offline?" in done.stderr
