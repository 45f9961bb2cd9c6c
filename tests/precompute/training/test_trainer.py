"""The TopK SAE trainer (`precompute.training.trainer`) on synthetic data with a known dictionary."""

from __future__ import annotations

import json

import pytest
import torch

from precompute.errors import FeatureGeomError
from precompute.training.store import ShuffledBatches
from precompute.training.trainer import TopKSAETrainer, fit, geometric_median, lr_lambda, norm_scaling_factor
from tests.precompute.training.helpers import (
    D_IN,
    D_SAE,
    K,
    explained_variance,
    make_trainer,
    synthetic,
    trained,
)


@pytest.fixture(scope="module")
def data() -> torch.Tensor:
    return synthetic(8192, seed=1)


@pytest.fixture(scope="module")
def trained_sae(data):
    return trained(data)


def test_loss_falls_and_explained_variance_is_high(trained_sae):
    trainer, result = trained_sae
    first, last = result.curve[0]["fvu"], result.curve[-1]["fvu"]
    assert last < 0.5 * first
    held = synthetic(2048, seed=99)
    assert explained_variance(held, trainer.reconstruct_raw(held)) > 0.85
    assert result.curve[-1]["l0"] <= K


def test_decoder_rows_stay_unit_norm(trained_sae, data):
    trainer, _ = trained_sae
    assert torch.allclose(trainer.W_dec.norm(dim=1), torch.ones(D_SAE), atol=1e-5)
    # The gradient step itself never moves a row off the sphere to first order.
    fresh = make_trainer(data)
    loss, _ = fresh(data[:256] * fresh.norm_factor)
    loss.backward()
    fresh.remove_parallel_grad()
    parallel = (fresh.W_dec.grad * fresh.W_dec.data).sum(dim=1)
    assert parallel.abs().max() < 1e-5


def test_auxk_revives_dead_latents(data):
    dead = torch.arange(48, 64)

    def with_dead_latents(aux_coef: float) -> TopKSAETrainer:
        trainer = make_trainer(data, aux_coef=aux_coef, dead_after=1024)
        with torch.no_grad():  # tiny encoder rows: never in the top k, but positive now and then
            trainer.W_enc[dead] *= 0.01
        return trainer

    def fired(trainer: TopKSAETrainer) -> set[int]:
        idx, vals = trainer.encode_normalized(synthetic(4096, seed=5) * trainer.norm_factor)
        return set(idx[vals > 0].tolist())

    before = with_dead_latents(1 / 32)
    assert not fired(before) & set(dead.tolist())
    with_aux, result = trained(data, steps=300, trainer=with_dead_latents(1 / 32))
    without_aux, _ = trained(data, steps=300, trainer=with_dead_latents(0.0))
    assert max(p["aux_loss"] for p in result.curve) > 0
    revived = fired(with_aux) & set(dead.tolist())
    still_dead_without = set(dead.tolist()) - fired(without_aux)
    assert len(revived) >= len(dead) // 2, revived
    assert len(revived) > len(dead) - len(still_dead_without)


def test_normalisation_is_folded_into_the_saved_weights(data):
    raw = data * 40.0  # activations with a large norm, like a real residual stream
    trainer, _ = trained(raw, steps=60)
    s = float(trainer.norm_factor)
    assert s == pytest.approx(norm_scaling_factor(raw[:2048]))
    assert abs(s - 1.0) > 0.5
    sae = trainer.to_sae(hook_name="blocks.0.hook_resid_post", model_name="synthetic")
    assert sae.normalize_activations == "none"
    assert sae.metadata["norm_scaling_factor_folded"] == pytest.approx(s)
    x = synthetic(512, seed=3) * 40.0
    assert torch.allclose(sae.reconstruct(x), trainer.reconstruct_raw(x), rtol=1e-4, atol=1e-3)
    idx_sae, val_sae = sae.encode_sparse(x)
    idx_tr, val_tr = trainer.encode_normalized(x * s)
    assert torch.equal(idx_sae, idx_tr)
    assert torch.allclose(val_sae, val_tr / s, rtol=1e-4, atol=1e-5)


def test_saved_directory_loads_through_load_sae(trained_sae, tmp_path):
    from precompute.sae.formats.saelens import save_saelens
    from precompute.sae.registry import load_sae

    trainer, _ = trained_sae
    sae = trainer.to_sae(hook_name="blocks.3.hook_resid_post", model_name="synthetic")
    counts = torch.arange(D_SAE, dtype=torch.float32)
    save_saelens(
        sae,
        tmp_path / "sae",
        extra_cfg={"metadata": {"eval": {"explained_variance": 0.9}}},
        sparsity=torch.log10(counts / 100 + 1e-10),
    )
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == K and cfg["d_in"] == D_IN and cfg["d_sae"] == D_SAE
    assert cfg["normalize_activations"] == "none"
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    assert cfg["metadata"]["norm_scaling_factor_folded"] == pytest.approx(float(trainer.norm_factor))
    assert cfg["metadata"]["eval"]["explained_variance"] == 0.9
    loaded = load_sae(str(tmp_path / "sae"))
    x = synthetic(256, seed=4)
    idx, vals = loaded.encode_sparse(x)
    idx_tr, vals_tr = trainer.encode_normalized(x * trainer.norm_factor)
    assert torch.equal(idx, idx_tr)
    assert torch.allclose(vals, vals_tr / trainer.norm_factor, rtol=1e-5, atol=1e-6)
    assert torch.allclose(loaded.reconstruct(x), trainer.reconstruct_raw(x), rtol=1e-4, atol=1e-4)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(data, tmp_path):
    full, full_result = trained(data, steps=45, work_dir=tmp_path / "a")
    _, part = trained(data, steps=45, work_dir=tmp_path / "b", stop_at=17)
    assert part.steps == 17 and (tmp_path / "b" / "checkpoint.pt").is_file()
    resumed, resumed_result = trained(data, steps=45, work_dir=tmp_path / "b")
    assert resumed_result.resumed_from == 17
    for name, tensor in full.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    assert [p["fvu"] for p in full_result.curve] == [p["fvu"] for p in resumed_result.curve]
    with pytest.raises(FeatureGeomError, match="different settings"):
        fit(
            make_trainer(data),
            ShuffledBatches(data, 256, 0),
            45,
            1e-2,
            20,
            0.2,
            work_dir=tmp_path / "b",
            signature="other",
            progress=False,
        )


def test_lr_schedule_warms_up_and_decays():
    f = lr_lambda(100, 10, 0.2)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(50) == 1.0 and f(79) == 1.0
    assert f(90) == pytest.approx(0.5) and f(99) == pytest.approx(0.05)


def test_geometric_median_ignores_outliers():
    points = torch.cat(
        [torch.randn(200, 3, generator=torch.Generator().manual_seed(0)) * 0.1, torch.full((20, 3), 1000.0)]
    )
    assert geometric_median(points).norm() < 0.2
    assert points.mean(0).norm() > 50


@pytest.mark.slow
def test_saelens_itself_loads_the_output(trained_sae, tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    from precompute.sae.formats.saelens import save_saelens

    trainer, _ = trained_sae
    save_saelens(
        trainer.to_sae(hook_name="blocks.3.hook_resid_post", model_name="synthetic"), tmp_path / "sae"
    )
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "sae"), device="cpu")
    x = synthetic(256, seed=4)
    with torch.no_grad():
        assert torch.allclose(theirs(x), trainer.reconstruct_raw(x), rtol=1e-4, atol=1e-4)


def test_sparse_backward_matches_dense_autograd(data):
    """The custom sparse encoder/decoder backward gives the same gradients as plain dense autograd."""
    trainer = make_trainer(data, dead_after=1)
    trainer.tokens_since_fired[40:] = 10  # latents 40.. count as dead, so the AuxK path runs too
    x = data[:128] * trainer.norm_factor
    loss, _ = trainer(x)
    loss.backward()
    sparse_grads = {n: p.grad.clone() for n, p in trainer.named_parameters()}

    params = {n: p.detach().clone().requires_grad_(True) for n, p in trainer.named_parameters()}
    x_c = x - params["b_dec"]
    pre = x_c @ params["W_enc"].T + params["b_enc"]
    top = pre.detach().topk(K, dim=1).indices
    acts = torch.zeros_like(pre).scatter(1, top, pre.gather(1, top)).relu()
    recon = acts @ params["W_dec"] + params["b_dec"]
    err = x - recon
    dense_loss = err.pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    dead = trainer.dead_mask()
    aux_top = pre.detach().masked_fill(~dead, float("-inf")).topk(16, dim=1).indices
    aux_acts = torch.zeros_like(pre).scatter(1, aux_top, pre.gather(1, aux_top)).relu()
    target = err.detach()
    aux = (aux_acts @ params["W_dec"] - target).pow(2).sum() / (target - target.mean(0)).pow(2).sum()
    (dense_loss + aux / 32).backward()
    assert float(loss.detach()) == pytest.approx(float(dense_loss.detach() + aux.detach() / 32), rel=1e-5)
    for name, grad in sparse_grads.items():
        assert torch.allclose(grad, params[name].grad, rtol=1e-4, atol=1e-6), name
