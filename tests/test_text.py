"""The LM's pure pieces (RMSNorm, RoPE, dynamic NTK, log-n, masks) and long-context invariants."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from qwenvl.generation import generate, left_pad
from qwenvl.kv_cache import KVCache
from qwenvl.sampling import SamplingParams
from qwenvl.text import RMSNorm, apply_rope, attention_mask_4d, logn_scale, ntk_alpha_for_length, rope_cos_sin
from qwenvl.weights import load_model

TINY = Path(__file__).parent / "fixtures" / "qwen_vl_tiny"


@pytest.mark.parametrize("n, alpha", [(1, 1), (2048, 1), (2049, 3), (4096, 3), (4097, 7), (8192, 7), (8193, 15)])
def test_ntk_alpha_steps(n, alpha):
    assert ntk_alpha_for_length(torch.tensor([n]), 2048).item() == alpha


def test_logn_scale_only_beyond_training_length():
    scale = logn_scale(torch.tensor([[0, 2046, 2047, 2048, 4095]]), 2048).flatten().tolist()
    assert scale[:3] == [1.0, 1.0, 1.0]
    assert scale[3] == pytest.approx(math.log(2049) / math.log(2048))
    assert scale[4] == pytest.approx(math.log(4096) / math.log(2048))


def test_rope_is_a_rotation_and_relative():
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    one = torch.ones(1)

    def dot(pq, pk):
        cq, sq = rope_cos_sin(torch.tensor([[pq]]), one, 8, 10000.0)
        ck, sk = rope_cos_sin(torch.tensor([[pk]]), one, 8, 10000.0)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum().item()

    assert dot(5, 3) == pytest.approx(dot(12, 10), rel=1e-5)        # depends on the offset only
    cos, sin = rope_cos_sin(torch.tensor([[7]]), one, 8, 10000.0)
    assert apply_rope(q, cos, sin).norm().item() == pytest.approx(q.norm().item(), rel=1e-6)


def test_partial_rotary_leaves_the_rest():
    x = torch.randn(1, 1, 2, 8)
    cos, sin = rope_cos_sin(torch.tensor([[3, 4]]), torch.ones(1), 4, 10000.0)
    assert torch.equal(apply_rope(x, cos, sin)[..., 4:], x[..., 4:])


def test_rmsnorm_scales_after_casting_back():
    norm = RMSNorm(4, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    x = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    assert norm(x)[0].tolist() == pytest.approx([1.0, -2.0, 3.0, -4.0], rel=1e-5)


def test_mask_never_leaves_a_row_empty():
    mask = attention_mask_4d(torch.tensor([[False, True, True]]), 3)[0, 0]
    assert mask.tolist() == [[True, False, False], [False, True, False], [False, True, True]]


@pytest.fixture(scope="module")
def short_context_model():
    model = load_model(TINY, "float32")
    model.config.seq_length = 8           # NTK and log-n engage after 8 tokens
    return model


def test_long_prompt_decode_reuses_the_prefill_alpha(short_context_model):
    model = short_context_model
    ids = torch.randint(0, 990, (1, 11), generator=torch.Generator().manual_seed(0))   # alpha(10) = alpha(11) = 3
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.empty(model.config, 1, 11)
        model(ids[:, :10], kv_cache=cache)
        step = model(ids[:, 10:], kv_cache=cache)
    assert cache.ntk_alpha.tolist() == [3.0]
    assert (step[0, 0] - full[0, 10]).abs().max() < 1e-4
    model.config.use_dynamic_ntk = False
    with torch.no_grad():
        plain = model(ids)
    model.config.use_dynamic_ntk = True
    assert (plain - full).abs().max() > 1e-3                       # NTK really changed something


def test_rows_of_different_lengths_get_their_own_alpha(short_context_model):
    model = short_context_model
    rows = [[5, 6, 7, 8, 9], list(range(100, 113))]                  # alpha 1 and alpha 3
    ids, mask = left_pad(rows, 0)
    params = SamplingParams(max_new_tokens=6, do_sample=False)
    batched = generate(model, ids, params, attention_mask=mask)
    for i, row in enumerate(rows):
        assert batched[i].tolist() == generate(model, torch.tensor([row]), params)[0].tolist()
