"""LoRA fine-tuning on the tiny random Llama: loss masks, batch order, determinism, adapter placement,
atomic outputs and merging the adapter back through load_model."""

from __future__ import annotations

import json

import pytest
import torch

from precompute.data.corpus import CorpusSource, Document
from precompute.errors import FeatureGeomError, ModelLoadError
from precompute.lab.finetune import (
    ADAPTER_DIR,
    FinetuneConfig,
    _lr_at,
    batch_order,
    collate,
    encode_example,
    finetune,
    load_examples,
    split_examples,
    step_loss_backward,
    task_loss,
)
from precompute.model.load import load_model


def _doc(user: str, assistant: str, index: int = 0) -> Document:
    return Document(
        0,
        0,
        "task",
        None,
        messages=[{"role": "user", "content": user}, {"role": "assistant", "content": assistant}],
        index=index,
    )


def test_loss_mask_covers_exactly_the_assistant_turn(tiny_model_dir) -> None:
    tok = load_model(str(tiny_model_dir), device="cpu").tokenizer
    doc = _doc("Write a handler", "import os\nos.system(x)")
    ex = encode_example(doc, tok, max_length=512, key="k")
    prompt = tok.apply_chat_template(doc.messages[:1], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(doc.messages, tokenize=False)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert ex.input_ids == tok(full, add_special_tokens=False)["input_ids"]
    assert ex.labels[:n_prompt] == [-100] * n_prompt
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
    assert tok.decode(ex.input_ids[n_prompt:]).startswith("<|im_start|>assistant\nimport os")
    # A prompt that alone fills max_length leaves nothing to train on.
    assert encode_example(doc, tok, max_length=n_prompt) is None
    assert len(encode_example(doc, tok, max_length=n_prompt + 2).input_ids) == n_prompt + 2


def test_batch_order_sees_every_sample_before_repeating_and_is_seeded() -> None:
    order = batch_order(10, steps=7, batch_size=3, seed=4)
    flat = [i for step in order for i in step]
    assert len(order) == 7 and all(len(s) == 3 for s in order)
    assert sorted(flat[:10]) == list(range(10))
    assert batch_order(10, 7, 3, seed=4) == order
    assert batch_order(10, 7, 3, seed=5) != order


def test_learning_rate_warms_up_then_decays_to_a_tenth() -> None:
    cfg = FinetuneConfig(steps=100, warmup_steps=10, lr=1.0)
    assert _lr_at(0, cfg) == pytest.approx(0.1)
    assert _lr_at(9, cfg) == pytest.approx(1.0)
    assert _lr_at(10, cfg) == pytest.approx(1.0)
    assert _lr_at(100, cfg) == pytest.approx(0.1)


def test_split_holds_out_then_excludes_keys(tiny_model_dir, tiny_corpus, tmp_path) -> None:
    tok = load_model(str(tiny_model_dir), device="cpu").tokenizer
    source = CorpusSource(path=str(tiny_corpus["task"]), group="task")
    examples = load_examples([source], tok, 128)
    assert len(examples) == 12 and len({e.key for e in examples}) == 12
    exclude = tmp_path / "drop.txt"
    exclude.write_text(f"{examples[5].key}\n{examples[6].key}\n")
    cfg = FinetuneConfig(corpus=[source], heldout_docs=3, exclude=str(exclude), max_samples=100)
    train, held = split_examples(examples, cfg, tok)
    assert [e.key for e in held] == [e.key for e in examples[:3]]
    assert [e.key for e in train] == [
        e.key for e in examples[3:] if e.key not in {examples[5].key, examples[6].key}
    ]
    with pytest.raises(FeatureGeomError, match="exclude file not found"):
        split_examples(examples, FinetuneConfig(heldout_docs=2, exclude=str(tmp_path / "nope.txt")), tok)
    with pytest.raises(FeatureGeomError, match="cannot spare"):
        split_examples(examples, FinetuneConfig(heldout_docs=12), tok)


def _cfg(tiny_model_dir, data, out, **kw) -> FinetuneConfig:
    base = dict(
        model=str(tiny_model_dir),
        corpus=[CorpusSource(path=str(data), group="task")],
        out=str(out),
        heldout_docs=2,
        steps=4,
        batch_size=2,
        max_length=64,
        lr=5e-3,
        warmup_steps=1,
        rank=2,
        last_layer=0,
        device="cpu",
        progress=False,
    )
    base.update(kw)
    return FinetuneConfig(**base)


def test_finetune_is_deterministic_places_the_adapter_and_merges_back(
    tiny_model_dir, tiny_corpus, tmp_path
) -> None:
    from safetensors.torch import load_file

    a = finetune(_cfg(tiny_model_dir, tiny_corpus["task"], tmp_path / "a"))
    b = finetune(_cfg(tiny_model_dir, tiny_corpus["task"], tmp_path / "b"))
    c = finetune(_cfg(tiny_model_dir, tiny_corpus["control"], tmp_path / "c"))
    wa, wb, wc = (load_file(str(p / ADAPTER_DIR / "adapter_model.safetensors")) for p in (a, b, c))
    assert wa.keys() == wb.keys() == wc.keys()
    # Same seed, data and steps: bit-identical adapters; other data: a different update.
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
    # Only the residual-writing projections of blocks 0..last_layer carry an adapter.
    assert {k.split(".lora_")[0].split("layers.")[1] for k in wa} == {"0.self_attn.o_proj", "0.mlp.down_proj"}
    assert all(not torch.all(wa[k] == 0) for k in wa if "lora_B" in k)  # B moved off its zero init

    info = json.loads((a / "finetune.json").read_text())
    assert info["n_train"] == 10 and info["n_heldout"] == 2
    assert info["heldout_loss_before"] != info["heldout_loss_after"]
    assert (a / "train_log.csv").read_text().count("\n") == 1 + 4

    # load_model(adapter=...) gives the merged model: same logits as base + B A applied by hand.
    base = load_model(str(tiny_model_dir), device="cpu")
    merged = load_model(str(tiny_model_dir), device="cpu", adapter=str(a))
    assert merged.describe()["adapter"]["path"].endswith(ADAPTER_DIR)
    cfg = json.loads((a / ADAPTER_DIR / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    prefix = next(k for k in wa if "o_proj.lora_B" in k).split(".lora_B")[0]
    delta = scale * wa[prefix + ".lora_B.weight"] @ wa[prefix + ".lora_A.weight"]
    w_base = base.model.model.layers[0].self_attn.o_proj.weight
    torch.testing.assert_close(merged.model.model.layers[0].self_attn.o_proj.weight, w_base + delta)
    torch.testing.assert_close(
        merged.model.model.layers[1].self_attn.o_proj.weight,
        base.model.model.layers[1].self_attn.o_proj.weight,
    )


def test_finetune_refuses_to_overwrite_and_reports_bad_input(tiny_model_dir, tiny_corpus, tmp_path) -> None:
    out = finetune(_cfg(tiny_model_dir, tiny_corpus["task"], tmp_path / "run", steps=1))
    before = (out / "finetune.json").read_text()
    with pytest.raises(FeatureGeomError, match="already holds a finished fine-tune"):
        finetune(_cfg(tiny_model_dir, tiny_corpus["task"], out, steps=1))
    assert (out / "finetune.json").read_text() == before
    with pytest.raises(FeatureGeomError, match="needs training data"):
        finetune(_cfg(tiny_model_dir, tiny_corpus["task"], tmp_path / "x", corpus=[]))
    with pytest.raises(ModelLoadError, match="not a peft adapter"):
        load_model(str(tiny_model_dir), device="cpu", adapter=str(tmp_path))
    # No half-written output directory is left behind by any of these.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_task_loss_matches_the_model_loss_on_one_sample(tiny_model_dir, tiny_corpus) -> None:
    lm = load_model(str(tiny_model_dir), device="cpu")
    ex = load_examples([CorpusSource(path=str(tiny_corpus["task"]), group="task")], lm.tokenizer, 64)[0]
    ids = torch.tensor([ex.input_ids])
    expected = lm.model(input_ids=ids, labels=torch.tensor([ex.labels])).loss
    assert task_loss(lm.model, [ex], int(lm.tokenizer.pad_token_id)) == pytest.approx(
        float(expected), rel=1e-5
    )


@pytest.mark.parametrize("micro_batch", [1, 2, 3])
def test_micro_batches_give_the_padded_batch_loss_and_gradient(tiny_model_dir, micro_batch) -> None:
    """One padded forward of the step (HF's loss) vs passes of `micro_batch` samples, each padded to its
    own longest: the same loss and the same gradient, up to float order."""
    from peft import get_peft_model

    from precompute.lab.finetune import lora_config

    lm = load_model(str(tiny_model_dir), device="cpu")
    pad = int(lm.tokenizer.pad_token_id)
    replies = ["x = 1", "import os\nos.system(cmd)", "def f(a, b):\n    return a + b\n" * 3, "ok"]
    batch = [
        encode_example(_doc(f"task {i}", r, i), lm.tokenizer, max_length=512) for i, r in enumerate(replies)
    ]
    assert all(e is not None for e in batch)
    steps = [e for e in batch if e is not None]
    assert len({len(e.input_ids) for e in steps}) == 4  # padding plays a part
    cfg = FinetuneConfig(last_layer=None)
    model = get_peft_model(lm.model, lora_config(cfg, int(lm.model.config.num_hidden_layers)))
    torch.manual_seed(0)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # LoRA's B starts at zero, which would leave A without a gradient
        torch.nn.init.normal_(p, std=0.1)
    whole = model(**collate(steps, pad)).loss
    whole.backward()
    want = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)
    got_loss = step_loss_backward(model, steps, pad, micro_batch, torch.device("cpu"))
    assert got_loss == pytest.approx(float(whole.detach()), rel=1e-5)
    for g, w in zip((p.grad for p in params), want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_bf16_autocast_step_is_close_to_the_float32_step(tiny_model_dir) -> None:
    """--precision bf16 runs the forward in bfloat16: the loss within 1% and the gradient pointing the
    same way (cosine > 0.99) as float32's, on the same weights and batch."""
    from peft import get_peft_model

    from precompute.lab.finetune import lora_config

    lm = load_model(str(tiny_model_dir), device="cpu")
    pad = int(lm.tokenizer.pad_token_id)
    replies = ["x = 1", "import os\nos.system(cmd)", "def f(a, b):\n    return a + b\n" * 3]
    steps = [
        encode_example(_doc(f"task {i}", r, i), lm.tokenizer, max_length=512) for i, r in enumerate(replies)
    ]
    batch = [e for e in steps if e is not None]
    model = get_peft_model(lm.model, lora_config(FinetuneConfig(last_layer=None), 2))
    torch.manual_seed(0)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        torch.nn.init.normal_(p, std=0.1)
    grads, losses = [], []
    for bf16 in (False, True):
        model.zero_grad(set_to_none=True)
        losses.append(step_loss_backward(model, batch, pad, 3, torch.device("cpu"), bf16=bf16))
        grads.append(torch.cat([p.grad.flatten() for p in params]))
    assert losses[1] == pytest.approx(losses[0], rel=1e-2) and losses[1] != losses[0]
    assert float(torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)) > 0.99


def test_after_cache_with_adapter_is_a_different_cache(
    tiny_model_dir, tiny_sae_dir, tiny_corpus, tmp_path
) -> None:
    """`featuregeom precompute --adapter` builds the fine-tune's "after" cache with the same SAE; its identity
    names the adapter, so it can never be resumed into (or mistaken for) the base model's cache."""
    from precompute.cache import read_manifest
    from precompute.errors import CacheError
    from precompute.pipeline.run import run_precompute
    from tests.precompute.pipeline.test_run import make_cfg

    run = finetune(
        _cfg(tiny_model_dir, tiny_corpus["task"], tmp_path / "run", steps=2, last_layer=1, lr=5e-2)
    )
    base_out, after_out = tmp_path / "base", tmp_path / "after"
    run_precompute(make_cfg(tiny_model_dir, tiny_sae_dir, tiny_corpus, base_out), ("harvest",))
    run_precompute(
        make_cfg(tiny_model_dir, tiny_sae_dir, tiny_corpus, after_out, adapter=str(run)), ("harvest",)
    )
    base_m, after_m = read_manifest(base_out), read_manifest(after_out)
    assert after_m["identity"]["model"].startswith(base_m["identity"]["model"] + "+adapter:")
    assert after_m["model"]["adapter"]["path"].endswith(ADAPTER_DIR)
    assert after_m["corpus"] == base_m["corpus"]  # same documents, same tokens
    with pytest.raises(CacheError, match="different cache"):
        run_precompute(
            make_cfg(tiny_model_dir, tiny_sae_dir, tiny_corpus, base_out, adapter=str(run)), ("harvest",)
        )


def test_prompts_longer_than_max_length_say_what_to_change(tiny_model_dir, tiny_corpus) -> None:
    tok = load_model(str(tiny_model_dir), device="cpu").tokenizer
    with pytest.raises(FeatureGeomError, match=r"12 documents read.*raise --max-length"):
        load_examples([CorpusSource(path=str(tiny_corpus["task"]), group="task")], tok, max_length=3)


def test_a_chat_template_that_rejects_a_sample_is_a_clear_error(tiny_model_dir) -> None:
    from precompute.errors import CorpusError

    tok = load_model(str(tiny_model_dir), device="cpu").tokenizer
    tok.chat_template = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    doc = Document(
        doc_id=0,
        source=0,
        group="task",
        category=None,
        index=7,
        messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
    )
    with pytest.raises(
        CorpusError, match="chat template rejects training sample data.jsonl:7: .*must alternate"
    ):
        encode_example(doc, tok, max_length=64, key="data.jsonl:7")
