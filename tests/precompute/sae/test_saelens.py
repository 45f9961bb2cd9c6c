"""SAELens directories: v6 and pre-6 configs, the writer, and (when installed) SAELens itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from precompute.errors import SAEFormatError
from precompute.sae.formats import saelens
from precompute.sae.formats.saelens import save_saelens
from precompute.sae.registry import load_sae
from tests.precompute.sae.helpers import D_IN, D_SAE, assert_same_sae, inputs, make_sae


def write_dir(directory: Path, cfg: dict, tensors: dict[str, torch.Tensor]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "sae_weights.safetensors"))
    return directory


def weights(sae) -> dict[str, torch.Tensor]:
    out = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if sae.threshold is not None:
        out["threshold"] = sae.threshold
    return out


@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "topk"])
def test_save_load_round_trip_is_exact(tmp_path: Path, architecture: str) -> None:
    sae = make_sae(
        architecture,
        apply_b_dec_to_input=architecture != "jumprelu",
        model_name="gpt2",
        hook_name="blocks.3.hook_resid_post",
        metadata={"neuronpedia_id": "gpt2/3-res", "context_size": 128, "prepend_bos": True},
    )
    sparsity = torch.linspace(-6, -1, D_SAE)
    out = save_saelens(sae, tmp_path / "sae", extra_cfg={"training_tokens": 1000}, sparsity=sparsity)
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == architecture and cfg["d_in"] == D_IN and cfg["d_sae"] == D_SAE
    assert cfg["dtype"] == "float32" and cfg["training_tokens"] == 1000
    assert cfg["metadata"] == {
        "neuronpedia_id": "gpt2/3-res",
        "context_size": 128,
        "prepend_bos": True,
        "model_name": "gpt2",
        "hook_name": "blocks.3.hook_resid_post",
        "sae_lens_version": "6.0.0",
    }
    if architecture == "topk":
        assert cfg["k"] == sae.k and cfg["rescale_acts_by_decoder_norm"] is False

    loaded = load_sae(str(out))
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        a, b = getattr(sae, name), getattr(loaded, name)
        assert (a is None and b is None) or torch.equal(a, b), name
    assert (loaded.architecture, loaded.k, loaded.apply_b_dec_to_input) == (
        sae.architecture,
        sae.k,
        sae.apply_b_dec_to_input,
    )
    assert loaded.model_name == "gpt2" and loaded.hook_name == "blocks.3.hook_resid_post"
    assert torch.equal(loaded.metadata["sparsity"], sparsity)
    assert {k: v for k, v in loaded.metadata.items() if k != "sparsity"} == cfg["metadata"]
    assert loaded.format == "saelens"
    # Saving the loaded SAE again gives the same cfg (sparsity travels via metadata).
    again = save_saelens(loaded, tmp_path / "again", extra_cfg={"training_tokens": 1000})
    assert json.loads((again / "cfg.json").read_text()) == cfg
    assert (again / "sparsity.safetensors").exists()


def test_writer_is_atomic_and_replaces_existing(tmp_path: Path) -> None:
    target = tmp_path / "sae"
    save_saelens(make_sae(seed=1), target, sparsity=torch.zeros(D_SAE))
    assert (target / "sparsity.safetensors").exists()
    new = make_sae("topk", seed=2)
    save_saelens(new, target)
    assert not (target / "sparsity.safetensors").exists(), "a stale sparsity file must not survive"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]
    assert sorted(p.name for p in target.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    assert_same_sae(load_sae(str(target)), new)


def test_writer_rejects_bad_sparsity_and_clashing_extra_cfg(tmp_path: Path) -> None:
    with pytest.raises(SAEFormatError, match="sparsity must have shape"):
        save_saelens(make_sae(), tmp_path / "a", sparsity=torch.zeros(3))
    with pytest.raises(SAEFormatError, match="may not override d_in"):
        save_saelens(make_sae(), tmp_path / "b", extra_cfg={"d_in": 3})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_pre6_flat_topk_config(tmp_path: Path) -> None:
    sae = make_sae("topk", k=7)
    cfg = {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "architecture": "standard",
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 7},
        "hook_point": "blocks.5.hook_resid_pre",
        "hook_point_layer": 5,
        "model_name": "pythia-70m",
        "apply_b_dec_to_input": True,
        "sae_lens_version": "3.2.0",
    }  # no normalize_activations: pre-6 configs may omit it
    loaded = load_sae(str(write_dir(tmp_path / "old", cfg, weights(sae))))
    assert loaded.architecture == "topk" and loaded.k == 7
    assert loaded.hook_name == "blocks.5.hook_resid_pre" and loaded.model_name == "pythia-70m"
    assert loaded.normalize_activations == "none"
    assert_same_sae(loaded, sae)


def test_pre6_boolean_normalize_and_jumprelu_spelling(tmp_path: Path) -> None:
    sae = make_sae("jumprelu")
    cfg = {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "architecture": "jumprelu",
        "activation_fn_str": "relu",
        "hook_name": "blocks.1.hook_resid_post",
        "normalize_activations": True,
    }
    loaded = load_sae(str(write_dir(tmp_path / "old", cfg, weights(sae))))
    assert loaded.normalize_activations == "expected_average_only_in" and loaded.apply_b_dec_to_input is True


def test_norm_scaling_factor_in_cfg_is_honoured(tmp_path: Path) -> None:
    s = 3.0
    sae = make_sae("standard", normalize_activations="expected_average_only_in", norm_scaling_factor=s)
    loaded = load_sae(str(save_saelens(sae, tmp_path / "n")))
    assert loaded.norm_scaling_factor == s
    folded = make_sae("standard")
    folded.W_enc, folded.W_dec, folded.b_dec = folded.W_enc * s, folded.W_dec / s, folded.b_dec / s
    x = inputs()
    torch.testing.assert_close(loaded.encode(x), folded.encode(x), atol=1e-5, rtol=1e-5)


def test_log_threshold_and_unit_scaling_factor(tmp_path: Path) -> None:
    sae = make_sae("jumprelu")
    tensors = weights(sae)
    tensors["log_threshold"] = tensors.pop("threshold").log()
    tensors["scaling_factor"] = torch.ones(D_SAE)
    cfg = {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "architecture": "jumprelu",
        "metadata": {"sae_lens_version": "6.1.0"},
    }
    loaded = load_sae(str(write_dir(tmp_path / "j", cfg, tensors)))
    torch.testing.assert_close(loaded.threshold, sae.threshold)
    assert_same_sae(loaded, sae)


def test_non_trivial_scaling_factor_is_folded_or_rejected(tmp_path: Path) -> None:
    sae = make_sae()
    factor = torch.linspace(0.5, 2.0, D_SAE)
    tensors = {**weights(sae), "scaling_factor": factor}
    cfg = {"d_in": D_IN, "d_sae": D_SAE, "architecture": "standard"}
    with pytest.raises(SAEFormatError, match="finetuning_scaling_factor"):
        load_sae(str(write_dir(tmp_path / "a", cfg, tensors)))
    loaded = load_sae(str(write_dir(tmp_path / "b", {**cfg, "finetuning_scaling_factor": True}, tensors)))
    x = inputs()
    # Pre-6 SAELens decoded (acts * scaling_factor) @ W_dec + b_dec; encode is untouched.
    torch.testing.assert_close(loaded.encode(x), sae.encode(x))
    expected = (sae.encode(x) * factor) @ sae.W_dec + sae.b_dec
    torch.testing.assert_close(loaded.reconstruct(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("cfg_change", "tensor_change", "match"),
    [
        ({}, lambda t: t.update(W_dec=t["W_dec"].T), "looks transposed"),
        ({"architecture": "gated"}, None, "not supported"),
        ({"architecture": "topk"}, None, "needs k"),
        ({"normalize_activations": "covariance_whitening"}, None, "whitening"),
        ({}, lambda t: t.pop("b_dec"), "missing b_dec"),
        ({"d_sae": D_SAE + 1}, None, "shape"),
    ],
)
def test_bad_directories_raise(tmp_path: Path, cfg_change, tensor_change, match: str) -> None:
    sae = make_sae()
    tensors = weights(sae)
    if tensor_change:
        tensor_change(tensors)
    cfg = {"d_in": D_IN, "d_sae": D_SAE, "architecture": "standard", **cfg_change}
    with pytest.raises(SAEFormatError, match=match):
        load_sae(str(write_dir(tmp_path / "bad", cfg, tensors)))


def test_bad_cfg_json(tmp_path: Path) -> None:
    d = write_dir(tmp_path / "x", {}, weights(make_sae()))
    (d / "cfg.json").write_text("{not json")
    with pytest.raises(SAEFormatError, match="not valid JSON"):
        load_sae(str(d))


# ------------------------------------------------------------------------- against SAELens itself
@pytest.fixture(scope="module")
def sae_lens():
    return pytest.importorskip("sae_lens")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"architecture": "standard"},
        {"architecture": "standard", "apply_b_dec_to_input": False},
        {"architecture": "jumprelu", "apply_b_dec_to_input": False},
        {"architecture": "topk"},
        {"architecture": "topk", "rescale_acts_by_decoder_norm": True},
        {"architecture": "standard", "normalize_activations": "layer_norm"},
        {"architecture": "jumprelu", "normalize_activations": "constant_norm_rescale"},
    ],
)
def test_saelens_loads_our_directory_identically(tmp_path: Path, sae_lens, kwargs: dict) -> None:
    sae = make_sae(**kwargs, model_name="gpt2", hook_name="blocks.2.hook_resid_post")
    directory = save_saelens(sae, tmp_path / "sae", sparsity=torch.full((D_SAE,), -3.0))
    theirs = sae_lens.SAE.load_from_disk(str(directory), device="cpu")
    assert theirs.cfg.architecture() == sae.architecture
    assert theirs.cfg.metadata.hook_name == "blocks.2.hook_resid_post"
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), sae.encode(x), atol=1e-6, rtol=0)
        torch.testing.assert_close(theirs.decode(theirs.encode(x)), sae.reconstruct(x), atol=1e-5, rtol=1e-5)


def test_saelens_object_converts_to_ours(tmp_path: Path, sae_lens) -> None:
    from precompute.sae.formats.release import from_saelens_object

    sae = make_sae(
        "jumprelu", apply_b_dec_to_input=False, model_name="gemma-2-2b", hook_name="blocks.1.hook_mlp_out"
    )
    theirs = sae_lens.SAE.load_from_disk(str(save_saelens(sae, tmp_path / "s")), device="cpu")
    ours = from_saelens_object(theirs, source="test")
    assert ours.model_name == "gemma-2-2b" and ours.hook_name == "blocks.1.hook_mlp_out"
    assert ours.apply_b_dec_to_input is False
    assert_same_sae(ours, sae)


def test_parse_cfg_exposed_for_other_readers() -> None:
    fields = saelens.parse_cfg({"d_in": 4, "d_sae": 8, "architecture": "jump_relu"}, "x")
    assert fields["architecture"] == "jumprelu" and fields["apply_b_dec_to_input"] is True


def test_rescale_flag_on_jumprelu_needs_folding_first(tmp_path: Path) -> None:
    sae = make_sae("jumprelu", rescale_acts_by_decoder_norm=True)
    with pytest.raises(SAEFormatError, match="fold_decoder_norm"):
        save_saelens(sae, tmp_path / "a")
    x = inputs()
    before = sae.encode(x)
    sae.fold_decoder_norm()
    loaded = load_sae(str(save_saelens(sae, tmp_path / "b")))
    assert loaded.rescale_acts_by_decoder_norm is False
    torch.testing.assert_close(loaded.encode(x), before, atol=1e-5, rtol=1e-5)


def test_extra_cfg_metadata_is_merged(tmp_path: Path) -> None:
    out = save_saelens(
        make_sae(model_name="m"), tmp_path / "s", extra_cfg={"metadata": {"dataset_path": "pile"}}
    )
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["metadata"]["dataset_path"] == "pile" and cfg["metadata"]["model_name"] == "m"
    assert load_sae(str(out)).metadata["dataset_path"] == "pile"


@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "topk"])
def test_we_load_a_directory_saelens_wrote(tmp_path: Path, sae_lens, architecture: str) -> None:
    sae = make_sae(
        architecture,
        apply_b_dec_to_input=architecture != "jumprelu",
        model_name="gpt2",
        hook_name="blocks.0.hook_resid_post",
    )
    theirs = sae_lens.SAE.load_from_disk(str(save_saelens(sae, tmp_path / "ours")), device="cpu")
    theirs.save_model(tmp_path / "theirs")
    loaded = load_sae(str(tmp_path / "theirs"))
    assert loaded.architecture == architecture and loaded.hook_name == "blocks.0.hook_resid_post"
    assert_same_sae(loaded, sae)
