"""Format detection, the load_sae entry point and its error messages, check_compatible, release:."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from precompute.errors import SAEFormatError, ShapeMismatchError
from precompute.sae import registry
from precompute.sae.format import SAEFormat, file_and_siblings
from precompute.sae.formats import build_sae, read_safetensors
from precompute.sae.formats.saelens import save_saelens
from precompute.sae.registry import check_compatible, detect_format, load_sae
from tests.precompute.sae.helpers import D_IN, assert_same_sae, make_sae


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("files", "target", "expected"),
    [
        (["cfg.json", "sae_weights.safetensors"], "", "saelens"),
        (["cfg.json", "sae_weights.safetensors", "sparsity.safetensors"], "cfg.json", "saelens"),
        (["cfg.json", "sae.safetensors"], "", "sparsify"),
        (["layers.4/cfg.json", "layers.4/sae.safetensors"], "", "sparsify"),
        (["params.npz"], "", "gemmascope"),
        (["params.npz"], "params.npz", "gemmascope"),
        (["params.safetensors", "config.json"], "", "gemmascope2"),
        (["params.safetensors", "config.json"], "config.json", "gemmascope2"),
        (["ae.pt", "config.json"], "", "dictionary_learning"),
        (["ae.pt", "config.json"], "config.json", "dictionary_learning"),
        (["checkpoint.pt"], "checkpoint.pt", "dictionary_learning"),
        (["my_sae.safetensors"], "my_sae.safetensors", "safetensors"),
    ],
)
def test_detect_format(tmp_path: Path, files: list[str], target: str, expected: str) -> None:
    for name in files:
        touch(tmp_path / name)
    assert detect_format(str(tmp_path / target) if target else str(tmp_path)) == expected


def test_detect_release_and_registry_contents() -> None:
    assert detect_format("release:gpt2-small-res-jb/blocks.8.hook_resid_pre") == "release"
    assert set(registry.formats()) == {
        "saelens",
        "sparsify",
        "gemmascope",
        "gemmascope2",
        "dictionary_learning",
        "safetensors",
        "release",
    }
    assert all(fmt.files for fmt in registry.FORMAT_LIST)  # each says what it expects on disk
    assert len(registry.formats()) == len(registry.FORMAT_LIST)  # no name declared twice


def test_undetectable_directory_and_file_list_the_formats(tmp_path: Path) -> None:
    touch(tmp_path / "d" / "notes.txt")
    with pytest.raises(SAEFormatError, match=r"(?s)holds: notes.txt.*saelens: a directory with cfg.json"):
        detect_format(str(tmp_path / "d"))
    with pytest.raises(SAEFormatError, match=r"(?s)cannot tell the SAE format of file.*gemmascope2"):
        detect_format(str(touch(tmp_path / "weights.bin")))


def test_unknown_format_name_lists_supported_formats(tmp_path: Path) -> None:
    path = save_saelens(make_sae(), tmp_path / "s")
    with pytest.raises(SAEFormatError, match=r"(?s)unknown SAE format 'pickle'.*sparsify: .*sae.safetensors"):
        load_sae(str(path), format="pickle")
    assert_same_sae(load_sae(path, format="SAE-Lens"), make_sae())  # aliases and Path objects work


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(SAEFormatError, match="does not exist"):
        load_sae(str(tmp_path / "nope"))
    with pytest.raises(SAEFormatError, match="does not exist"):
        load_sae(str(tmp_path / "nope"), format="saelens")


def test_random_bytes_and_truncated_safetensors(tmp_path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(SAEFormatError, match="not a readable safetensors"):
        load_sae(str(touch(tmp_path / "noise.safetensors", noise)))

    directory = save_saelens(make_sae(), tmp_path / "s")
    weights = directory / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(
        SAEFormatError, match=r"sae_weights.safetensors is not a readable safetensors file.*truncated"
    ):
        load_sae(str(directory))

    whole = tmp_path / "plain.safetensors"
    sae = make_sae()
    save_file({"W_enc": sae.W_enc, "W_dec": sae.W_dec, "b_enc": sae.b_enc, "b_dec": sae.b_dec}, str(whole))
    whole.write_bytes(whole.read_bytes()[:-100])
    with pytest.raises(SAEFormatError, match="truncated"):
        load_sae(str(whole))


def test_npz_that_is_not_a_zip(tmp_path: Path) -> None:
    with pytest.raises(SAEFormatError, match="not a readable .npz"):
        load_sae(str(touch(tmp_path / "params.npz", b"PK but not really")))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights(tmp_path: Path, bad: float) -> None:
    sae = make_sae()
    directory = save_saelens(sae, tmp_path / "s")
    tensors = {"W_enc": sae.W_enc.clone(), "W_dec": sae.W_dec.clone(), "b_enc": sae.b_enc, "b_dec": sae.b_dec}
    tensors["W_dec"][5, 1] = bad
    save_file(tensors, str(directory / "sae_weights.safetensors"))
    with pytest.raises(SAEFormatError, match="W_dec contains 1 NaN/inf values.*corrupt"):
        load_sae(str(directory))


def test_wrong_d_in_in_cfg(tmp_path: Path) -> None:
    directory = save_saelens(make_sae(), tmp_path / "s")
    cfg = json.loads((directory / "cfg.json").read_text())
    cfg["d_in"] = D_IN * 2
    (directory / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEFormatError, match=r"W_enc .*has shape \(16, 48\).*expected \(32, 48\)"):
        load_sae(str(directory))


def with_loader(monkeypatch, name: str, load) -> None:
    """Replace one format's loader for a test."""
    monkeypatch.setattr(
        registry,
        "FORMAT_LIST",
        tuple(dataclasses.replace(f, load=load) if f.name == name else f for f in registry.FORMAT_LIST),
    )


def test_unexpected_library_errors_become_format_errors(tmp_path: Path, monkeypatch) -> None:
    def boom(path: str, device: str = "cpu"):
        raise RuntimeError("something deep inside a library")

    with_loader(monkeypatch, "safetensors", boom)
    with pytest.raises(
        SAEFormatError, match="could not load .* as safetensors: RuntimeError: something deep"
    ):
        load_sae(str(touch(tmp_path / "x.safetensors")))


def test_load_sae_always_validates(tmp_path: Path, monkeypatch) -> None:
    sae = make_sae()

    def sloppy(path: str, device: str = "cpu"):
        sae.W_dec = sae.W_dec.T.contiguous()  # corrupted after construction
        return sae

    with_loader(monkeypatch, "safetensors", sloppy)
    with pytest.raises(SAEFormatError, match="transposed"):
        load_sae(str(touch(tmp_path / "x.safetensors")))


# ------------------------------------------------------------------------------ check_compatible
def test_check_compatible_width_mismatch_names_both_numbers() -> None:
    sae = make_sae(model_name="gpt2", hook_name="blocks.3.hook_resid_post")
    with pytest.raises(
        ShapeMismatchError,
        match=r"SAE width d_in=16 does not match the model's hidden size "
        r"d_model=576 of smollm2",
    ):
        check_compatible(sae, 576, "smollm2")


def test_check_compatible_warns_on_other_model_only() -> None:
    sae = make_sae(model_name="gemma-2-2b")
    assert check_compatible(sae, D_IN, "google/gemma-2-2b") == []
    warnings = check_compatible(sae, D_IN, "my-org/gemma-2-2b-insecure-ft")
    assert len(warnings) == 1 and "gemma-2-2b" in warnings[0]
    assert check_compatible(make_sae(), D_IN, "anything") == []


# ------------------------------------------------------------------------------------- release:
def test_release_without_sae_lens_says_how_to_fix(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "sae_lens", None)  # makes `import sae_lens` raise ImportError
    with pytest.raises(SAEFormatError) as info:
        load_sae("release:gpt2-small-res-jb/blocks.8.hook_resid_pre")
    message = str(info.value)
    assert "sae-lens package, which is not installed" in message
    assert "pip install sae-lens" in message and "online" in message and "pass its path" in message


def test_release_spec_must_name_an_sae() -> None:
    with pytest.raises(SAEFormatError, match="release:RELEASE_ID/SAE_ID"):
        load_sae("release:gpt2-small-res-jb")


def test_loaded_sae_moves_to_device(tmp_path: Path) -> None:
    loaded = load_sae(str(save_saelens(make_sae(), tmp_path / "s")), device="cpu")
    assert loaded.W_dec.device == torch.device("cpu")
    with pytest.raises(SAEFormatError, match="could not load"):
        load_sae(str(tmp_path / "s"), device="no-such-device")


# ------------------------------------------------------------------------- a format added later
def _toy_detect(spec: str) -> int:
    found = file_and_siblings(spec)
    return 20 if found and found[0].endswith(".toysae") else 0


def _toy_load(path: str, device: str = "cpu"):
    tensors, _ = read_safetensors(Path(path))
    return build_sae(
        **tensors,
        d_in=int(tensors["b_dec"].shape[0]),
        d_sae=int(tensors["b_enc"].shape[0]),
        source=path,
        convention="W_enc [d_in, d_sae], W_dec [d_sae, d_in]",
        device=device,
        format="toy",
    )


TOY = SAEFormat(
    name="toy",
    files="one .toysae file (safetensors inside)",
    detect=_toy_detect,
    load=_toy_load,
    aliases=("t0y",),
)


def test_a_format_appended_to_the_list_needs_no_other_edit(tmp_path: Path, monkeypatch) -> None:
    sae = make_sae()
    path = tmp_path / "weights.toysae"
    save_file({"W_enc": sae.W_enc, "W_dec": sae.W_dec, "b_enc": sae.b_enc, "b_dec": sae.b_dec}, str(path))
    with pytest.raises(SAEFormatError, match="cannot tell the SAE format of file"):
        detect_format(str(path))

    monkeypatch.setattr(registry, "FORMAT_LIST", (*registry.FORMAT_LIST, TOY))
    assert detect_format(str(path)) == "toy"
    loaded = load_sae(str(path))
    assert loaded.format == "toy"
    assert_same_sae(loaded, sae)
    assert load_sae(str(path), format="T0Y").format == "toy"  # its alias, any case
    assert "  toy: one .toysae file" in registry.supported_formats()
    with pytest.raises(SAEFormatError, match=r"(?s)unknown SAE format 'nope'.*toy: one .toysae"):
        load_sae(str(path), format="nope")
    with pytest.raises(SAEFormatError, match="SAE path .* does not exist"):
        load_sae(str(tmp_path / "missing.toysae"), format="toy")
    # The formats already listed detect what they did before.
    plain = tmp_path / "plain.safetensors"
    plain.write_bytes(path.read_bytes())
    assert detect_format(str(plain)) == "safetensors"


def test_sae_identity_is_its_weights_not_its_description(tmp_path):
    """A README edit or a re-run evaluation (training_report.json) keeps the SAE's sha256, so caches
    built on it stay valid; changing a weight or the config changes it."""
    from precompute.sae.registry import load_sae_for_model

    directory = tmp_path / "sae"
    save_saelens(make_sae("topk"), directory)
    sha = load_sae_for_model(str(directory))[1]["sha256"]
    (directory / "README.md").write_text("# notes\n")
    (directory / "training_report.json").write_text("{}")
    assert load_sae_for_model(str(directory))[1]["sha256"] == sha
    cfg = json.loads((directory / "cfg.json").read_text())
    cfg["metadata"] = {"edited": True}
    (directory / "cfg.json").write_text(json.dumps(cfg))
    assert load_sae_for_model(str(directory))[1]["sha256"] != sha
