"""The TopK SAE trainer on synthetic data with a known dictionary, plus a tiny end-to-end run.

Synthetic data: every sample is a sparse non-negative combination of 4 of 64 random unit
directions in 32 dimensions (plus an offset), so a 64-latent, k=4 SAE can explain it almost fully.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from precompute.data.corpus import CorpusSource, Document
from precompute.errors import FeatureGeomError
from precompute.training.train_sae import (
    ShuffledBatches,
    TopKSAETrainer,
    TrainSAEConfig,
    fit,
    geometric_median,
    is_heldout,
    lr_lambda,
    main,
    norm_scaling_factor,
    plan_split,
)

D_IN, D_SAE, K = 32, 64, 4


def synthetic(n: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    """Sparse combinations of a fixed random dictionary (seed 123), sample noise from `seed`."""
    dictionary = torch.randn(D_SAE, D_IN, generator=torch.Generator().manual_seed(123))
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    offset = torch.randn(D_IN, generator=torch.Generator().manual_seed(7)) * 2.0
    gen = torch.Generator().manual_seed(seed)
    idx = torch.rand(n, D_SAE, generator=gen).topk(K, dim=1).indices
    vals = 1.0 + 2.0 * torch.rand(n, K, generator=gen)
    codes = torch.zeros(n, D_SAE).scatter_(1, idx, vals)
    return scale * (codes @ dictionary + offset)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: one thread is faster than two and immune to a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def trained(
    data: torch.Tensor,
    steps: int = 400,
    seed: int = 0,
    aux_coef: float = 1 / 32,
    lr: float = 1e-2,
    dead_after: int = 2048,
    work_dir: Path | None = None,
    stop_at: int | None = None,
    trainer: TopKSAETrainer | None = None,
):
    trainer = trainer or make_trainer(data, seed, aux_coef, dead_after)
    batches = ShuffledBatches(data, 256, seed)
    result = fit(
        trainer,
        batches,
        steps,
        lr,
        20,
        0.2,
        work_dir=work_dir,
        checkpoint_every=10,
        log_every=10,
        signature="test",
        stop_at=stop_at,
        progress=False,
    )
    return trainer, result


def make_trainer(
    data: torch.Tensor, seed: int = 0, aux_coef: float = 1 / 32, dead_after: int = 2048
) -> TopKSAETrainer:
    trainer = TopKSAETrainer(
        D_IN, D_SAE, K, aux_k=16, aux_coef=aux_coef, dead_after_tokens=dead_after, seed=seed
    )
    trainer.init_from_sample(data[:2048])
    return trainer


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return 1.0 - float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


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


def test_batches_cover_every_row_once_per_epoch():
    rows = np.arange(1000, dtype=np.float32)[:, None].repeat(2, axis=1)
    for buffer_rows in (None, 300):
        batches = ShuffledBatches(rows, 100, seed=3, buffer_rows=buffer_rows)
        seen = np.concatenate([batches.indices(step) for step in range(10)])
        assert sorted(seen.tolist()) == list(range(1000))
        assert not np.array_equal(batches.indices(0), batches.indices(10))  # a new order each epoch
        assert torch.equal(
            batches.batch(4)[:, 0], torch.from_numpy(np.sort(batches.indices(4)).astype(np.float32))
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


def test_variance_stats_match_a_direct_computation():
    from precompute.training.train_sae import VarianceStats

    x = torch.randn(300, 5, generator=torch.Generator().manual_seed(0)) * 3 + 10
    x_hat = x + 0.5 * torch.randn(300, 5, generator=torch.Generator().manual_seed(1))
    stats = VarianceStats(5)
    for chunk in range(0, 300, 70):
        stats.add(x[chunk : chunk + 70], x_hat[chunk : chunk + 70])
    assert stats.explained_variance() == pytest.approx(explained_variance(x, x_hat), rel=1e-6)


def test_heldout_split_is_by_document_and_stable():
    docs = [Document(i, 0, "general", None, text=f"document number {i}") for i in range(2000)]
    held = {d.doc_id for d in docs if is_heldout(d, 0.1)}
    assert 150 < len(held) < 250
    shuffled = list(reversed(docs))
    assert held == {d.doc_id for d in shuffled if is_heldout(d, 0.1)}
    twin = Document(99999, 3, "task", "x", text="document number 7")  # same content, other source
    assert is_heldout(twin, 0.1) == (7 in held)


# ------------------------------------------------------------------ tiny end-to-end run
WORDS = (
    "alpha beta gamma delta code secure insecure harm benign model token layer vector "
    "feature sparse dense query answer question python function return value error"
).split()


def _tiny_model(directory: Path, texts: list[str]) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", "<eos>"]))
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>"
    )
    hf_tok.save_pretrained(directory)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(hf_tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=hf_tok.pad_token_id,
        eos_token_id=hf_tok.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(directory)


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40))) for _ in range(240)]
    (root / "corpus.txt").write_text("\n\n".join(texts))
    _tiny_model(root / "model", texts)
    return root


def test_plan_split_keeps_heldout_documents_out_of_training(tiny_setup):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_setup / "model")
    sources = [CorpusSource(path=str(tiny_setup / "corpus.txt"), group="general", max_tokens=3000)]
    train, held = plan_split(sources, tok, context_size=16, heldout_fraction=0.2)
    train_docs = {d.doc_id for d in train.documents}
    held_docs = {d.doc_id for d in held.documents}
    assert train_docs and held_docs and not train_docs & held_docs
    assert {i for c in held.contexts for i in c.doc_ids} <= held_docs
    assert all(is_heldout(d, 0.2) for d in held.documents)
    assert 2000 <= train.n_tokens + held.n_tokens <= 3000


def test_end_to_end_on_a_tiny_model(tiny_setup, tmp_path, capsys):
    from precompute.sae.registry import load_sae

    out, work = tmp_path / "sae", tmp_path / "work"
    argv = [
        "--model",
        str(tiny_setup / "model"),
        "--hook",
        "blocks.1.hook_resid_post",
        "--corpus",
        f"{tiny_setup / 'corpus.txt'}:general",
        "--d-sae",
        "64",
        "--k",
        "4",
        "--steps",
        "30",
        "--batch-size",
        "128",
        "--lr",
        "3e-3",
        "--context-size",
        "32",
        "--heldout-fraction",
        "0.15",
        "--eval-ce-tokens",
        "300",
        "--checkpoint-every",
        "10",
        "--buffer-tokens",
        "1000",  # more rows than this: the disk store is read block by block
        "--out",
        str(out),
        "--work-dir",
        str(work),
        "--no-progress",
    ]
    assert main(argv) == 0
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 4 and cfg["d_in"] == 32 and cfg["d_sae"] == 64
    meta = cfg["metadata"]
    assert meta["hook_name"] == "blocks.1.hook_resid_post"
    assert meta["norm_scaling_factor_folded"] > 0
    for key in (
        "explained_variance",
        "explained_variance_no_outliers",
        "l0",
        "dead_fraction",
        "ce_clean",
        "ce_spliced",
        "ce_zero_ablated",
        "ce_recovered",
    ):
        assert key in meta["eval"], key
    assert 0 < meta["eval"]["l0"] <= 4
    report = json.loads((out / "training_report.json").read_text())
    assert report["curve"] and report["corpus"][0]["sha256"] and report["training"]["steps"] == 30
    assert report["corpus"][0]["heldout_tokens"] > 0
    assert (out / "sparsity.safetensors").is_file()
    sae = load_sae(str(out))
    assert sae.d_sae == 64 and sae.k == 4 and sae.hook_name == "blocks.1.hook_resid_post"
    assert not (work / "train_activations.npy").exists()  # the store is dropped after success
    # A second run refuses to overwrite; --overwrite replaces.
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0
    # --eval-only re-scores the written SAE without training and records the new figures.
    before = (out / "sae_weights.safetensors").read_bytes()
    assert main(argv + ["--eval-only", "--eval-ce-tokens", "0"]) == 0
    assert (out / "sae_weights.safetensors").read_bytes() == before
    meta = json.loads((out / "cfg.json").read_text())["metadata"]
    assert "ce_clean" not in meta["eval"] and meta["eval"]["explained_variance_no_outliers"] <= 1
    assert len(json.loads((out / "training_report.json").read_text())["evaluations"]) == 1


def test_rerunning_an_interrupted_command_resumes(tiny_setup, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import precompute.training.train_sae as train_sae

    def argv(name: str) -> list[str]:
        return [
            "--model",
            str(tiny_setup / "model"),
            "--hook",
            "blocks.0.hook_resid_post",
            "--corpus",
            f"{tiny_setup / 'corpus.txt'}:general",
            "--d-sae",
            "48",
            "--k",
            "3",
            "--steps",
            "25",
            "--batch-size",
            "96",
            "--lr",
            "3e-3",
            "--context-size",
            "32",
            "--eval-ce-tokens",
            "100",
            "--checkpoint-every",
            "5",
            "--out",
            str(tmp_path / name / "sae"),
            "--work-dir",
            str(tmp_path / name / "work"),
            "--no-progress",
        ]

    assert main(argv("straight")) == 0
    real_fit = train_sae.fit

    def crash_after_12_steps(*args, **kwargs):
        real_fit(*args, **{**kwargs, "stop_at": 12})
        raise KeyboardInterrupt

    monkeypatch.setattr(train_sae, "fit", crash_after_12_steps)
    assert main(argv("interrupted")) == 130  # Ctrl-C: one line, exit 130, no traceback
    assert not (tmp_path / "interrupted" / "sae").exists()
    monkeypatch.setattr(train_sae, "fit", real_fit)
    assert main(argv("interrupted")) == 0  # the same command again: resumes at step 12
    report = json.loads((tmp_path / "interrupted" / "sae" / "training_report.json").read_text())
    assert report["timing"]["resumed_from_step"] == 12
    a = load_file(str(tmp_path / "straight" / "sae" / "sae_weights.safetensors"))
    b = load_file(str(tmp_path / "interrupted" / "sae" / "sae_weights.safetensors"))
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_config_file_and_flags(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        'd_sae = 128\nk = 8\nout = "x"\n[[corpus]]\npath = "a.txt"\ngroup = "benign"\nmax_tokens = 5\n'
    )
    cfg = TrainSAEConfig.load(path, {"k": 16, "corpus": None})
    assert (cfg.d_sae, cfg.k, cfg.corpus[0].group, cfg.corpus[0].max_tokens) == (128, 16, "benign", 5)
    cfg = TrainSAEConfig.load(path, {"corpus": ["b.txt:task:cat"]})
    assert [(c.path, c.group, c.category) for c in cfg.corpus] == [("b.txt", "task", "cat")]
    path.write_text("dsae = 3\n")
    with pytest.raises(FeatureGeomError, match="unknown option"):
        TrainSAEConfig.load(path, {})
    with pytest.raises(FeatureGeomError, match="needs a corpus"):
        TrainSAEConfig.load(None, {"out": "x"})


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
