"""LoRA as a module swap: merged == unmerged, PEFT's on-disk format both ways, Q-LoRA over a frozen int4
base, adapters that resized the vocabulary, and the refusals."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qwenvl.finetune import merge_adapter
from qwenvl.lora import (OFFICIAL_TARGETS, LoRALinear, LoraSpec, apply_lora, lora_layers, matches, merge_lora,
                         unmerge_lora, unwrap_lora)
from qwenvl.peft_format import AdapterError, load_adapter, save_adapter
from qwenvl.quantize import GPTQLinear, Int4Linear, quantize_model
from qwenvl.weights import load_model

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "qwen_vl_tiny"
TINY_GPTQ = FIXTURES / "qwen_vl_tiny_gptq" / "int4"
IDS = torch.tensor([[5, 17, 300, 42, 999 - 3, 12, 7, 800], [1, 2, 3, 4, 5, 6, 7, 8]])


def lora_model(modules_to_save=("wte", "lm_head"), seed=0, r=4):
    """The tiny model with LoRA on the official targets, B random (a fresh B is zero: no update to see)."""
    model = load_model(TINY, "float32")
    spec = LoraSpec(r=r, alpha=8, dropout=0.0, modules_to_save=modules_to_save)
    apply_lora(model, spec, torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.normal_(0, 0.2, generator=g)
        for name in ("transformer.wte", "lm_head"):
            if name.split(".")[-1] in modules_to_save:
                w = model.get_submodule(name).weight
                w.add_(torch.randn(w.shape, generator=g) * 0.05)
    return model.eval(), spec


def test_official_targets_hit_only_the_llm():
    model, _ = lora_model()
    paths = [p for p, _ in lora_layers(model)]
    assert paths == [f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2")]
    assert matches("transformer.h.3.attn.c_proj", OFFICIAL_TARGETS)
    assert not matches("transformer.h.3.mlp.c_proj", OFFICIAL_TARGETS)
    assert not matches("transformer.visual.transformer.resblocks.0.mlp.c_proj", OFFICIAL_TARGETS)
    assert matches("transformer.h.0.mlp.w1", r"transformer\.h\.0\..*w1")        # a string is a full-match regex
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "transformer.h.0.attn.c_attn.lora_A.weight" in trainable and "transformer.wte.weight" in trainable
    assert "transformer.h.0.attn.c_attn.base_layer.weight" not in trainable
    assert not any(n.startswith("transformer.visual.") for n in trainable)


def test_a_fresh_adapter_changes_nothing():
    base = load_model(TINY, "float32").eval()
    model = load_model(TINY, "float32").eval()
    apply_lora(model, LoraSpec(r=4), torch.Generator().manual_seed(0))
    assert torch.equal(model(IDS), base(IDS))                                     # B starts at zero


def test_merged_equals_unmerged_and_unmerge_restores():
    model, _ = lora_model()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    unmerged = model(IDS)
    merge_lora(model)
    assert torch.allclose(model(IDS), unmerged, atol=1e-4)
    unmerge_lora(model)
    assert torch.allclose(model(IDS), unmerged, atol=1e-5)
    for n, p in model.state_dict().items():
        assert torch.allclose(p, before[n], atol=1e-6), n
    unwrap_lora(model)                                                            # plain linears again
    assert not list(lora_layers(model))
    assert set(model.state_dict()) == set(load_model(TINY, "float32").state_dict())
    assert torch.allclose(model(IDS), unmerged, atol=1e-4)


def test_merge_refuses_a_quantized_base():
    layer = LoRALinear(Int4Linear.from_linear(torch.nn.Linear(128, 16), group_size=32), r=2, scaling=1.0)
    with pytest.raises(ValueError, match="quantized Int4Linear"):
        layer.merge()


def test_save_writes_peft_key_names(tmp_path):
    model, spec = lora_model()
    save_adapter(model, spec, tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" in keys
    assert "base_model.model.transformer.h.1.mlp.w2.lora_B.weight" in keys
    assert {"base_model.model.transformer.wte.weight", "base_model.model.lm_head.weight"} <= keys
    assert len(keys) == 2 * 8 + 2
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["target_modules"] == list(OFFICIAL_TARGETS)
    assert cfg["modules_to_save"] == ["wte", "lm_head"] and cfg["r"] == 4 and cfg["lora_alpha"] == 8


def test_our_adapter_round_trips_through_our_loader(tmp_path):
    model, spec = lora_model()
    save_adapter(model, spec, tmp_path)
    again = load_model(TINY, "float32")
    assert load_adapter(again, tmp_path).r == 4
    assert torch.equal(again.eval()(IDS), model(IDS))


# ------------------------------------------------------------------------------------------- PEFT itself

def _peft_ready(model):
    # PeftModelForCausalLM (task_type CAUSAL_LM, as the official script saves) keeps a reference to the
    # base model's generation hook; our model generates elsewhere, so give it a no-op one.
    model.prepare_inputs_for_generation = lambda *a, **k: {}
    return model


def test_peft_loads_our_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    model, spec = lora_model()
    save_adapter(model, spec, tmp_path)
    wrapped = peft.PeftModel.from_pretrained(_peft_ready(load_model(TINY, "float32")), str(tmp_path)).eval()
    theirs = wrapped.base_model.model(IDS)              # our forward, PEFT's LoRA layers and module copies
    assert type(wrapped.base_model.model.transformer.h[0].attn.c_attn).__module__.startswith("peft.")
    assert torch.allclose(theirs, model(IDS), atol=1e-5)
    assert not torch.allclose(theirs, load_model(TINY, "float32")(IDS), atol=1e-2)


def test_we_load_an_adapter_saved_by_peft(tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.05, target_modules=list(OFFICIAL_TARGETS),
                             bias="none", task_type="CAUSAL_LM", modules_to_save=["wte", "lm_head"],
                             init_lora_weights=False)                              # random B: a visible update
    torch.manual_seed(0)
    wrapped = peft.get_peft_model(_peft_ready(load_model(TINY, "float32")), config).eval()
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.05)
    expected = wrapped.base_model.model(IDS)
    wrapped.save_pretrained(str(tmp_path))
    ours = load_model(TINY, "float32")
    spec = load_adapter(ours, tmp_path)
    assert spec.modules_to_save == ("wte", "lm_head") and spec.scaling == 4.0
    assert torch.allclose(ours.eval()(IDS), expected, atol=1e-5)


# ------------------------------------------------------------------------------------------- Q-LoRA

def _qlora_steps(model, steps=12):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(steps):
        logits = model(IDS)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), IDS[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("base", ["int4", "gptq"])
def test_qlora_trains_over_a_frozen_int4_base(base):
    if base == "int4":
        model = load_model(TINY, "float32")
        quantize_model(model, 4, group_size=16)
    else:
        model = load_model(TINY_GPTQ, "float32")
    frozen = {n: b.clone() for n, b in model.named_buffers()}
    apply_lora(model, LoraSpec(r=4, alpha=8, dropout=0.0), torch.Generator().manual_seed(0))
    kinds = {type(layer.base_layer) for _, layer in lora_layers(model)}
    assert kinds == {Int4Linear if base == "int4" else GPTQLinear}
    losses = _qlora_steps(model.train())
    assert losses[-1] < 0.7 * losses[0]
    for n, b in model.named_buffers():                                            # the int4 codes never move
        assert torch.equal(b, frozen[n.replace(".base_layer", "")]), n


# ------------------------------------------------------------------------------------------- resized vocabulary

def test_adapter_with_resized_vocabulary_loads_and_merges(tmp_path):
    model, spec = lora_model()
    save_adapter(model, spec, tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for key in ("base_model.model.transformer.wte.weight", "base_model.model.lm_head.weight"):
        tensors[key] = torch.cat([tensors[key], torch.randn(64, 128) * 0.1])      # 64 new token rows
    save_file(tensors, str(path))
    unmerged = load_model(TINY, "float32")
    load_adapter(unmerged, tmp_path / "adapter")
    assert unmerged.config.vocab_size == 1088 and unmerged.lm_head.weight.shape == (1088, 128)
    ids = torch.cat([IDS, torch.tensor([[1050, 1087]] * 2)], dim=1)                # uses the new rows
    expected = unmerged.eval()(ids)
    merge_adapter(TINY, tmp_path / "adapter", tmp_path / "merged")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["vocab_size"] == 1088
    merged = load_model(tmp_path / "merged", "float32")
    assert torch.allclose(merged(ids), expected, atol=1e-4)


# ------------------------------------------------------------------------------------------- refusals

def test_refusals(tmp_path):
    model, spec = lora_model()
    save_adapter(model, spec, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(AdapterError, match="use_dora"):
        load_adapter(load_model(TINY, "float32"), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["q_proj"]}))
    with pytest.raises(ValueError, match="no linear module matches"):
        load_adapter(load_model(TINY, "float32"), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "r": 8}))
    with pytest.raises(AdapterError, match="mis-shaped"):
        load_adapter(load_model(TINY, "float32"), tmp_path)
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        load_adapter(load_model(TINY, "float32"), tmp_path / "nowhere")


def test_a_target_or_alpha_that_would_train_nothing_is_refused():
    model = load_model(TINY, "float32")
    with pytest.raises(ValueError, match=r"LoRA targets \['w3'\] match no linear module"):
        apply_lora(model, LoraSpec(r=2, target_modules=("c_attn", "w3")))
    assert not list(lora_layers(model))                                   # refused before any swap
    with pytest.raises(ValueError, match="alpha=0"):
        LoraSpec(r=2, alpha=0)
