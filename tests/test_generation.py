"""Generation: greedy parity with the reference, and the cache / batch / stream invariants."""
from __future__ import annotations

import pytest
import torch

from qwenvl.generation import generate, generate_stream, left_pad
from qwenvl.kv_cache import KVCache
from qwenvl.sampling import SamplingParams

GREEDY12 = SamplingParams(max_new_tokens=12, do_sample=False)


def _images(case, pixels):
    return torch.stack([pixels[n] for n in case["images"]]) if case["images"] else None


@pytest.mark.parametrize("name", ["text_only", "one_image", "two_images", "batch2"])
def test_greedy_tokens_match_reference(name, tiny_model, tiny_cases, tiny_pixels):
    case = tiny_cases[name]
    ids = torch.tensor(case["input_ids"])
    out = generate(tiny_model, ids, GREEDY12, images=_images(case, tiny_pixels))
    assert out.tolist() == case["generated_ids"]


def test_cached_decode_equals_full_forward(tiny_model, tiny_cases, tiny_pixels):
    case = tiny_cases["two_images"]
    ids = torch.tensor(case["input_ids"])
    images = _images(case, tiny_pixels)
    new = generate(tiny_model, ids, GREEDY12, images=images)
    full_ids = torch.cat([ids, new], dim=1)
    with torch.no_grad():
        full = tiny_model(full_ids, images=images)                        # [1, T+12, V], no cache
        cache = KVCache.empty(tiny_model.config, 1, full_ids.shape[1])
        prefix = tiny_model(ids, images=images, kv_cache=cache)
        steps = [tiny_model(full_ids[:, t:t + 1], kv_cache=cache) for t in range(ids.shape[1], full_ids.shape[1])]
    cached = torch.cat([prefix] + steps, dim=1)
    assert (cached - full).abs().max().item() < 1e-5


def test_multi_token_chunks_with_cache_equal_full_forward(tiny_model):
    ids = torch.randint(0, 990, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = tiny_model(ids)
        cache = KVCache.empty(tiny_model.config, 2, 20)
        chunks = [tiny_model(ids[:, a:b], kv_cache=cache) for a, b in ((0, 7), (7, 8), (8, 20))]
    assert (torch.cat(chunks, 1) - full).abs().max().item() < 1e-5


def test_left_padded_batch_equals_one_by_one(tiny_model, tiny_cases, tiny_pixels):
    cases = [tiny_cases[n] for n in ("text_only", "one_image", "two_images")]
    rows = [c["input_ids"][0] for c in cases]
    images = torch.cat([_images(c, tiny_pixels) for c in cases if c["images"]])
    ids, mask = left_pad(rows, pad_id=0)
    batched = generate(tiny_model, ids, GREEDY12, attention_mask=mask, images=images)
    for i, case in enumerate(cases):
        assert batched[i].tolist() == case["generated_ids"][0], case["name"]
    with torch.no_grad():
        logits = tiny_model(ids, images=images, attention_mask=mask)
        alone = tiny_model(torch.tensor(rows[0])[None])
    assert (logits[0, -len(rows[0]):] - alone[0]).abs().max().item() < 1e-4


def test_streaming_equals_non_streaming(tiny_model, tiny_cases, tiny_pixels):
    case = tiny_cases["one_image"]
    ids = torch.tensor(case["input_ids"])
    params = SamplingParams(max_new_tokens=10, temperature=0.8, top_p=0.9, top_k=50, repetition_penalty=1.2)
    kwargs = dict(images=_images(case, tiny_pixels))
    whole = generate(tiny_model, ids, params, generator=torch.Generator().manual_seed(3), **kwargs)
    steps = list(generate_stream(tiny_model, ids, params, generator=torch.Generator().manual_seed(3), **kwargs))
    assert torch.stack(steps, 1).tolist() == whole.tolist()


def test_sampling_is_reproducible_with_a_generator(tiny_model):
    ids = torch.tensor([[5, 6, 7, 8]])
    params = SamplingParams(max_new_tokens=16, temperature=1.0)
    a = generate(tiny_model, ids, params, generator=torch.Generator().manual_seed(1))
    b = generate(tiny_model, ids, params, generator=torch.Generator().manual_seed(1))
    c = generate(tiny_model, ids, params, generator=torch.Generator().manual_seed(2))
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()


def test_stops_at_eos_and_stop_words(tiny_model, tiny_cases):
    case = tiny_cases["text_only"]
    ids = torch.tensor(case["input_ids"])
    ref = case["generated_ids"][0]
    out = generate(tiny_model, ids, GREEDY12, eos_token_id=ref[3])
    assert out[0].tolist() == ref[:4]
    stop = SamplingParams(max_new_tokens=12, do_sample=False, stop_words_ids=((ref[4], ref[5]),))
    assert generate(tiny_model, ids, stop)[0].tolist() == ref[:6]


def test_batched_rows_stop_independently(tiny_model, tiny_cases):
    rows = [tiny_cases["text_only"]["input_ids"][0], [11, 12, 13]]
    ids, mask = left_pad(rows, pad_id=0)
    eos = tiny_cases["text_only"]["generated_ids"][0][2]
    out = generate(tiny_model, ids, GREEDY12, attention_mask=mask, eos_token_id=eos)
    assert out[0, :3].tolist() == tiny_cases["text_only"]["generated_ids"][0][:3]
    assert (out[0, 3:] == eos).all()


def test_cache_overflow_is_a_clear_error(tiny_model):
    cache = KVCache.empty(tiny_model.config, 1, 4)
    with pytest.raises(ValueError, match="KV cache full"):
        tiny_model(torch.tensor([[1, 2, 3, 4, 5]]), kv_cache=cache)


def test_image_count_mismatch_is_a_clear_error(tiny_model, tiny_cases, tiny_pixels):
    case = tiny_cases["two_images"]
    ids = torch.tensor(case["input_ids"])
    with pytest.raises(ValueError, match="2 image spans but 1 images"):
        tiny_model(ids, images=tiny_pixels["img_a.png"][None])
    with pytest.raises(ValueError, match="2 image spans but 0 images"):
        tiny_model(ids)
