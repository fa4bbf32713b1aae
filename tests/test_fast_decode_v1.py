"""Qwen-VL's whole decode step (qwen_vl_fast.FastDecoderV1) against the reference forward, and where it declines."""
from __future__ import annotations

import copy

import pytest
import torch

from test_generation import GREEDY12, _images
from tiny_checkpoint import tiny_config
from qwenvl import quant_kernels
from qwenvl.fast_paths import fast_step, use_fast_paths
from qwenvl.generation import generate, left_pad, next_logits
from qwenvl.kv_cache import KVCache
from qwenvl.lora import LoraSpec, apply_lora
from qwenvl.model import QWenLMHeadModel
from qwenvl.quantize import quantize_model
from qwenvl.qwen_vl_fast import FastDecoderV1

pytestmark = pytest.mark.skipif(quant_kernels.library() is None, reason="no compiled kernels")


@pytest.fixture
def step_calls(monkeypatch) -> list[int]:
    """Counts whole-step kernel calls."""
    calls, real = [], quant_kernels.decode_step
    monkeypatch.setattr(quant_kernels, "decode_step", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    return calls


@pytest.mark.parametrize("name", ["text_only", "one_image", "two_images", "batch2"])
def test_fixture_greedy_tokens_with_the_whole_step(name, tiny_model, tiny_cases, tiny_pixels, step_calls):
    model = use_fast_paths(copy.deepcopy(tiny_model))
    case = tiny_cases[name]
    out = generate(model, torch.tensor(case["input_ids"]), GREEDY12, images=_images(case, tiny_pixels))
    assert out.tolist() == case["generated_ids"]                  # the reference code's greedy tokens
    assert len(step_calls) >= 1


def tiny(dtype: torch.dtype, layers: int = 2) -> QWenLMHeadModel:
    model = QWenLMHeadModel(tiny_config(layers=layers))
    model.init_weights(torch.Generator().manual_seed(0))
    return model.to(dtype).eval()


def prefilled(model: QWenLMHeadModel, rows: list[list[int]], n_steps: int) -> KVCache:
    ids, mask = left_pad(rows, 0)
    cache = KVCache.empty(model.config, len(rows), ids.shape[1] + n_steps, next(model.parameters()).dtype)
    with torch.no_grad():
        model(ids, attention_mask=mask, kv_cache=cache, last_only=True)
    return cache


def run_steps(model: QWenLMHeadModel, fast: bool, n_steps: int = 4) -> tuple[torch.Tensor, KVCache]:
    rows = [[5, 9, 300, 41, 7, 7, 2000], [8, 1000, 3]]                       # a left-padded batch
    cache = prefilled(model, rows, n_steps)
    decoder, out = FastDecoderV1(model) if fast else None, []
    for t in range(n_steps):
        ids = torch.tensor([11 + t, 500 + t])
        with torch.no_grad():
            logits = decoder.step(ids, cache) if fast else model(ids[:, None], attention_mask=torch.ones(2, 1),
                                                                 kv_cache=cache, last_only=True)[:, -1]
        assert logits is not None
        out.append(logits.float())
    return torch.stack(out, 1), cache


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])   # bf16: 5e-3 measured, 2e-2 with w1 / w2 swapped
@pytest.mark.parametrize("quant", [None, 8, 4])
def test_whole_step_logits_and_cache_match_the_forward(dtype, tol, quant, step_calls):
    ref = tiny(dtype)
    if quant:
        quantize_model(ref, bits=quant, group_size=32)
    fast = use_fast_paths(copy.deepcopy(ref))
    want, ref_cache = run_steps(ref, fast=False)
    got, fast_cache = run_steps(fast, fast=True)
    assert len(step_calls) == 4
    scale = want.abs().max()
    assert (got - want).abs().max() <= tol * scale, f"{(got - want).abs().max()} vs {scale}"
    for a, b in ((ref_cache.keys, fast_cache.keys), (ref_cache.values, fast_cache.values)):
        assert (a.float() - b.float()).abs().max() <= tol * a.float().abs().max()
    assert torch.equal(ref_cache.next_position, fast_cache.next_position)


def test_the_step_declines_past_seq_length_and_in_training(step_calls):
    model = use_fast_paths(tiny(torch.float32))
    model.config.seq_length = 8                                               # log-n scaling from position 8 on
    cache = prefilled(model, [[1, 2, 3, 4, 5, 6, 7]], 3)
    decoder = FastDecoderV1(model)
    assert decoder.step(torch.tensor([9]), cache) is not None               # position 7: no log-n yet
    assert decoder.declines(cache) == "log-n attention scaling (past seq_length)"
    assert decoder.step(torch.tensor([9]), cache) is None and cache.length == 8   # nothing written
    logits = next_logits(model, torch.tensor([9]), cache)                    # the forward takes over
    assert logits.shape == (1, model.config.vocab_size) and cache.length == 9
    model.train()
    assert FastDecoderV1(model).declines(cache) == "a model in training mode"


def test_lora_on_the_mlp_turns_the_attached_step_off():
    model = use_fast_paths(tiny(torch.float32))
    assert fast_step(model) is not None
    apply_lora(model, LoraSpec(r=2, alpha=4, target_modules=("w1",)))
    assert fast_step(model) is None


def test_a_lora_wrapped_attention_makes_the_plan_decline(step_calls):
    model = use_fast_paths(tiny(torch.float32))
    apply_lora(model, LoraSpec(r=2, alpha=4, target_modules=("c_attn",)))
    cache = prefilled(model.eval(), [[1, 2, 3]], 2)
    assert FastDecoderV1(model).step(torch.tensor([4]), cache) is None and not step_calls
