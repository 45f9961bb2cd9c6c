"""dictionary_learning ``ae.pt`` checkpoints: every dictionary class, and pickles that must not run."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from torch.nn.functional import linear, relu

from precompute.errors import SAEFormatError
from precompute.sae.registry import detect_format, load_sae
from tests.precompute.sae.helpers import D_IN, D_SAE, assert_same_sae, inputs, make_sae, saelens_copy


def write(directory: Path, state: dict, trainer: dict | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / "ae.pt")
    if trainer is not None:
        cfg = {
            "trainer": {
                "activation_dim": D_IN,
                "dict_size": D_SAE,
                "layer": 4,
                "lm_name": "google/gemma-2-2b",
                **trainer,
            },
            "buffer": {"ctx_len": 128},
        }
        (directory / "config.json").write_text(json.dumps(cfg))
    return directory / "ae.pt"


# Each reference below is the class's encode() from dictionary_learning, written out on the raw state dict.
def autoencoder_encode(sd: dict, x: torch.Tensor) -> torch.Tensor:
    return relu(linear(x - sd["bias"], sd["encoder.weight"], sd["encoder.bias"]))


def autoencoder_topk_encode(sd: dict, x: torch.Tensor) -> torch.Tensor:
    post = relu(linear(x - sd["b_dec"], sd["encoder.weight"], sd["encoder.bias"]))
    top = post.topk(int(sd["k"]), sorted=False, dim=-1)
    return torch.zeros_like(post).scatter_(-1, top.indices, top.values)


def batch_topk_encode(sd: dict, x: torch.Tensor) -> torch.Tensor:  # use_threshold=True, the default
    post = relu(linear(x - sd["b_dec"], sd["encoder.weight"], sd["encoder.bias"]))
    return post * (post > sd["threshold"])


def jumprelu_encode(sd: dict, x: torch.Tensor) -> torch.Tensor:  # apply_b_dec_to_input=False
    pre = x @ sd["W_enc"] + sd["b_enc"]
    return relu(pre * (pre > sd["threshold"]))


def test_autoencoder(tmp_path: Path) -> None:
    sae = make_sae("standard", apply_b_dec_to_input=True, seed=5)
    sd = {
        "encoder.weight": sae.W_enc.T.contiguous(),
        "encoder.bias": sae.b_enc,
        "decoder.weight": sae.W_dec.T.contiguous(),
        "bias": sae.b_dec,
    }
    path = write(tmp_path / "ae", sd, {"dict_class": "AutoEncoder", "submodule_name": "resid_post_layer_4"})
    assert detect_format(str(path.parent)) == "dictionary_learning"
    loaded = load_sae(str(path))
    assert loaded.architecture == "standard" and loaded.apply_b_dec_to_input is True
    assert loaded.hook_name == "blocks.4.hook_resid_post" and loaded.model_name == "google/gemma-2-2b"
    assert_same_sae(loaded, saelens_copy(sae, tmp_path / "ref"))
    x = inputs()
    torch.testing.assert_close(loaded.encode(x), autoencoder_encode(sd, x), atol=1e-6, rtol=0)
    # Same result without config.json: the class is read from the keys.
    assert_same_sae(load_sae(str(write(tmp_path / "nocfg", sd))), loaded)


def test_autoencoder_topk_ignores_its_scalar_threshold(tmp_path: Path) -> None:
    sae = make_sae("topk", k=4, seed=6)
    sd = {
        "encoder.weight": sae.W_enc.T.contiguous(),
        "encoder.bias": sae.b_enc,
        "decoder.weight": sae.W_dec.T.contiguous(),
        "b_dec": sae.b_dec,
        "k": torch.tensor(4, dtype=torch.int),
        "threshold": torch.tensor(0.3),
    }
    loaded = load_sae(str(write(tmp_path / "ae", sd, {"dict_class": "AutoEncoderTopK", "k": 4})))
    assert loaded.architecture == "topk" and loaded.k == 4
    assert_same_sae(loaded, saelens_copy(sae, tmp_path / "ref"))
    x = inputs()
    torch.testing.assert_close(loaded.encode(x), autoencoder_topk_encode(sd, x), atol=1e-6, rtol=0)
    assert load_sae(str(write(tmp_path / "nocfg", sd))).architecture == "topk"


def test_batch_topk_uses_its_inference_threshold(tmp_path: Path) -> None:
    base = make_sae("standard", seed=7)
    sd = {
        "encoder.weight": base.W_enc.T.contiguous(),
        "encoder.bias": base.b_enc,
        "decoder.weight": base.W_dec.T.contiguous(),
        "b_dec": base.b_dec,
        "k": torch.tensor(8, dtype=torch.int),
        "threshold": torch.tensor(0.25),
    }
    loaded = load_sae(str(write(tmp_path / "ae", sd, {"dict_class": "BatchTopKSAE", "k": 8})))
    assert loaded.architecture == "jumprelu" and loaded.metadata["k"] == 8
    x = inputs()
    torch.testing.assert_close(loaded.encode(x), batch_topk_encode(sd, x), atol=1e-6, rtol=0)
    assert_same_sae(loaded, saelens_copy(loaded, tmp_path / "ref"))
    # A threshold that was never set (-1) makes encode a plain ReLU.
    sd["threshold"] = torch.tensor(-1.0)
    unset = load_sae(str(write(tmp_path / "unset", sd, {"dict_class": "BatchTopKSAE", "k": 8})))
    assert unset.architecture == "standard"
    torch.testing.assert_close(unset.encode(x), batch_topk_encode(sd, x), atol=1e-6, rtol=0)


def test_matryoshka_batch_topk(tmp_path: Path) -> None:
    base = make_sae("standard", seed=8)
    sd = {
        "W_enc": base.W_enc,
        "b_enc": base.b_enc,
        "W_dec": base.W_dec,
        "b_dec": base.b_dec,
        "k": torch.tensor(8, dtype=torch.int),
        "threshold": torch.tensor(0.2),
        "group_sizes": torch.tensor([16, 32]),
    }
    loaded = load_sae(str(write(tmp_path / "ae", sd, {"dict_class": "MatryoshkaBatchTopKSAE", "k": 8})))
    x = inputs()
    post = relu((x - sd["b_dec"]) @ sd["W_enc"] + sd["b_enc"])
    torch.testing.assert_close(loaded.encode(x), post * (post > sd["threshold"]), atol=1e-6, rtol=0)
    assert loaded.metadata["group_sizes"] == [16, 32]
    assert_same_sae(loaded, saelens_copy(loaded, tmp_path / "ref"))


def test_jumprelu_autoencoder(tmp_path: Path) -> None:
    sae = make_sae("jumprelu", apply_b_dec_to_input=False, seed=9)
    sd = {
        "W_enc": sae.W_enc,
        "b_enc": sae.b_enc,
        "W_dec": sae.W_dec,
        "b_dec": sae.b_dec,
        "threshold": sae.threshold,
    }
    loaded = load_sae(str(write(tmp_path / "ae", sd)))  # no config: the keys say JumpReluAutoEncoder
    assert loaded.architecture == "jumprelu" and loaded.apply_b_dec_to_input is False
    assert_same_sae(loaded, saelens_copy(sae, tmp_path / "ref"))
    x = inputs()
    torch.testing.assert_close(loaded.encode(x), jumprelu_encode(sd, x), atol=1e-6, rtol=0)


def test_autoencoder_new(tmp_path: Path) -> None:
    sae = make_sae("standard", apply_b_dec_to_input=False, seed=10)
    sd = {
        "encoder.weight": sae.W_enc.T.contiguous(),
        "encoder.bias": sae.b_enc,
        "decoder.weight": sae.W_dec.T.contiguous(),
        "decoder.bias": sae.b_dec,
    }
    loaded = load_sae(str(write(tmp_path / "ae", sd)))
    assert loaded.apply_b_dec_to_input is False and loaded.metadata["dict_class"] == "AutoEncoderNew"
    assert_same_sae(loaded, saelens_copy(sae, tmp_path / "ref"))
    x = inputs()
    torch.testing.assert_close(
        loaded.reconstruct(x), linear(loaded.encode(x), sd["decoder.weight"], sd["decoder.bias"])
    )


def test_gated_and_unknown_classes_are_rejected(tmp_path: Path) -> None:
    sae = make_sae()
    gated = {
        "encoder.weight": sae.W_enc.T.contiguous(),
        "decoder.weight": sae.W_dec.T.contiguous(),
        "decoder_bias": sae.b_dec,
        "r_mag": sae.b_enc,
        "gate_bias": sae.b_enc,
        "mag_bias": sae.b_enc,
    }
    with pytest.raises(SAEFormatError, match="GatedAutoEncoder"):
        load_sae(str(write(tmp_path / "g", gated)))
    plain = {
        "encoder.weight": sae.W_enc.T.contiguous(),
        "encoder.bias": sae.b_enc,
        "decoder.weight": sae.W_dec.T.contiguous(),
        "bias": sae.b_dec,
    }
    with pytest.raises(SAEFormatError, match="'CrossCoder' is not supported"):
        load_sae(str(write(tmp_path / "c", plain, {"dict_class": "CrossCoder"})))


def test_config_from_another_run_is_rejected(tmp_path: Path) -> None:
    sae = make_sae()
    sd = {
        "encoder.weight": sae.W_enc.T.contiguous(),
        "encoder.bias": sae.b_enc,
        "decoder.weight": sae.W_dec.T.contiguous(),
        "bias": sae.b_dec,
    }
    path = write(tmp_path / "ae", sd, {"dict_class": "AutoEncoder", "dict_size": 4 * D_SAE})
    with pytest.raises(SAEFormatError, match="dict_size=192 but ae.pt has 48"):
        load_sae(str(path))


def test_decoder_not_transposed_is_rejected(tmp_path: Path) -> None:
    sae = make_sae()
    sd = {
        "encoder.weight": sae.W_enc.T.contiguous(),
        "encoder.bias": sae.b_enc,
        "decoder.weight": sae.W_dec.contiguous(),
        "bias": sae.b_dec,
    }  # forgot the nn.Linear layout
    with pytest.raises(SAEFormatError, match="W_dec .*looks transposed.*decoder.weight \\[d_in, d_sae\\]"):
        load_sae(str(write(tmp_path / "ae", sd)))


class Payload:
    """Unpickling this opens (creates) a file: proof that a pickle ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path) -> None:
    sae = make_sae()
    state = {
        "encoder.weight": sae.W_enc.T.contiguous(),
        "encoder.bias": sae.b_enc,
        "decoder.weight": sae.W_dec.T.contiguous(),
        "bias": sae.b_dec,
    }
    marker = tmp_path / "pwned"
    ae = tmp_path / "evil" / "ae.pt"
    ae.parent.mkdir()
    torch.save({**state, "payload": Payload(marker)}, ae)

    # The payload is real: an unsafe load runs it (on a copy with its own marker).
    proof = tmp_path / "proof" / "ae.pt"
    proof.parent.mkdir()
    torch.save({**state, "payload": Payload(tmp_path / "proof_marker")}, proof)
    torch.load(proof, weights_only=False)
    assert (tmp_path / "proof_marker").exists()

    with pytest.raises(SAEFormatError, match="not a weights-only checkpoint"):
        load_sae(str(ae))
    assert not marker.exists(), "the pickle's code ran"

    # A bare (non-zip, legacy) pickle is refused the same way.
    raw = tmp_path / "raw" / "ae.pt"
    raw.parent.mkdir()
    raw.write_bytes(pickle.dumps(Payload(marker), protocol=2))
    with pytest.raises(SAEFormatError, match="not a weights-only checkpoint"):
        load_sae(str(raw))
    assert not marker.exists(), "the pickle's code ran"


def test_corrupt_and_truncated_checkpoints(tmp_path: Path) -> None:
    sae = make_sae()
    good = write(
        tmp_path / "good",
        {
            "encoder.weight": sae.W_enc.T.contiguous(),
            "encoder.bias": sae.b_enc,
            "decoder.weight": sae.W_dec.T.contiguous(),
            "bias": sae.b_dec,
        },
    )
    cut = tmp_path / "cut" / "ae.pt"
    cut.parent.mkdir()
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(SAEFormatError, match="truncated or corrupt"):
        load_sae(str(cut))
    noise = tmp_path / "noise" / "ae.pt"
    noise.parent.mkdir()
    noise.write_bytes(
        torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        .numpy()
        .tobytes()
    )
    with pytest.raises(SAEFormatError, match="ae.pt"):
        load_sae(str(noise))
    not_dict = tmp_path / "list" / "ae.pt"
    not_dict.parent.mkdir()
    torch.save([sae.W_enc], not_dict)
    with pytest.raises(SAEFormatError, match="expected a state dict"):
        load_sae(str(not_dict))
