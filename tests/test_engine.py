"""Engine: continuous batching gives the naive loop's tokens; stops, limits, cancellation, feature cache."""
from __future__ import annotations

import threading

import pytest
import torch

from qwenvl.engine import Engine, EngineFull, EngineThread, FeatureCache, ImageInput, Output, Request, kv_bytes_per_token
from qwenvl.generation import generate
from qwenvl.sampling import SamplingParams


def greedy(n: int, stops=()) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, do_sample=False, stop_words_ids=tuple(tuple(s) for s in stops))


def alone(model, prompt: list[int], params: SamplingParams, images=None, seed=None) -> list[int]:
    """The reference path: the static `generate` loop on one prompt."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    pixels = torch.stack([i.pixels for i in images]) if images else None
    return generate(model, torch.tensor([prompt]), params, images=pixels, generator=gen)[0].tolist()


def random_prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 20) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(0, 990, (t,), generator=g).tolist() for t in lengths]


def image_inputs(case, tiny_pixels) -> list[ImageInput]:
    return [ImageInput(key=name, pixels=tiny_pixels[name]) for name in case["images"]]


# ------------------------------------------------------------------ parity with the naive loop


@pytest.mark.parametrize("name", ["text_only", "one_image", "two_images"])
def test_engine_alone_matches_reference_tokens(name, tiny_model, tiny_cases, tiny_pixels):
    case = tiny_cases[name]
    engine = Engine(tiny_model, max_batch=2, max_len=256)
    req = Request(case["input_ids"][0], greedy(12), images=image_inputs(case, tiny_pixels))
    assert engine.generate([req]) == [case["generated_ids"][0]]


def test_requests_joining_and_leaving_get_the_tokens_they_get_alone(tiny_model):
    """Rows join mid-decode, leave at different times, wait for a free row, and the fill level is
    compacted several times (max_len 40): every request still gets exactly its solo greedy tokens."""
    prompts = random_prompts(10, seed=1)
    budgets = [4, 15, 7, 20, 3, 11, 9, 18, 5, 12]
    params = [greedy(min(b, 40 - len(p))) for p, b in zip(prompts, budgets)]
    engine = Engine(tiny_model, max_batch=3, max_len=40, max_prefill_tokens=32)
    got: dict[int, list[int]] = {}
    ids: list[int] = []
    compactions = 0
    for step in range(200):
        if step % 3 == 0 and len(ids) < len(prompts):          # a new request every 3 steps
            ids.append(engine.add_request(Request(prompts[len(ids)], params[len(ids)])))
        before = engine.cache.length
        for out in engine.step():
            got.setdefault(out.request_id, []).append(out.token_id)
        compactions += engine.cache.length < before and bool(engine.running)
        if len(ids) == len(prompts) and not engine.has_work():
            break
    assert compactions > 0, "the test should exercise compaction"
    for rid, prompt, p in zip(ids, prompts, params):
        assert got[rid] == alone(tiny_model, prompt, p), f"request {rid}"
    assert engine.finished["length"] + engine.finished["stop"] == len(prompts)


def test_images_and_text_mixed_in_one_prefill(tiny_model, tiny_cases, tiny_pixels):
    cases = [tiny_cases[n] for n in ("two_images", "text_only", "one_image")]
    reqs = [Request(c["input_ids"][0], greedy(12), images=image_inputs(c, tiny_pixels)) for c in cases]
    engine = Engine(tiny_model, max_batch=4, max_len=256)
    assert engine.generate(reqs) == [c["generated_ids"][0] for c in cases]


def test_seeded_sampling_is_per_request(tiny_model):
    """A sampled request draws from its own generator: same tokens alone (generate) and among others."""
    prompts = random_prompts(3, seed=2)
    sampled = SamplingParams(max_new_tokens=10, temperature=0.8, top_p=0.9, top_k=50)
    reqs = [Request(p, sampled, seed=100 + i) for i, p in enumerate(prompts)]
    engine = Engine(tiny_model, max_batch=4, max_len=64)
    out = engine.generate(reqs)
    for req, tokens in zip(reqs, out):
        assert tokens == alone(tiny_model, req.prompt_ids, sampled, seed=req.seed)


def test_repetition_penalty_matches_reference(tiny_model):
    prompt = random_prompts(1, seed=3)[0]
    params = SamplingParams(max_new_tokens=10, do_sample=False, repetition_penalty=1.3)
    engine = Engine(tiny_model, max_batch=2, max_len=64)
    assert engine.generate([Request(prompt, params)]) == [alone(tiny_model, prompt, params)]


# ------------------------------------------------------------------ stops and limits


def test_stop_sequence_and_eos_and_max_tokens(tiny_model):
    prompt = random_prompts(1, seed=4)[0]
    free = alone(tiny_model, prompt, greedy(10))
    engine = Engine(tiny_model, max_batch=2, max_len=64, eos_token_id=free[5])
    outs: list[Output] = []
    engine.add_request(Request(prompt, greedy(10, stops=[free[2:4]])))
    engine.add_request(Request(prompt, greedy(10)))             # ends on the eos id
    engine.add_request(Request(prompt, greedy(3)))
    while engine.has_work():
        outs += engine.step()
    ends = {o.request_id: (o.finish_reason, i) for i, o in enumerate(outs) if o.finish_reason}
    tokens = {rid: [o.token_id for o in outs if o.request_id == rid] for rid in ends}
    first_eos = free.index(free[5])
    assert tokens[0] == free[:4] and ends[0][0] == "stop"
    assert tokens[1] == free[:first_eos + 1] and ends[1][0] == "stop"
    assert tokens[2] == free[:3] and ends[2][0] == "length"


def test_requests_that_can_never_fit_are_refused_with_numbers(tiny_model):
    engine = Engine(tiny_model, max_batch=2, max_len=32)
    with pytest.raises(ValueError, match="max_len=32"):
        engine.add_request(Request(list(range(20)), greedy(13)))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request(Request([], greedy(1)))
    with pytest.raises(ValueError, match="image spans"):
        engine.add_request(Request([1, 2, 997], greedy(1)))
    with pytest.raises(ValueError, match=r"\[0, 1024\)"):
        engine.add_request(Request([5000], greedy(1)))


def test_kv_budget_fixes_the_rows(tiny_model):
    per_row = kv_bytes_per_token(tiny_model.config, torch.float32) * 64
    assert Engine(tiny_model, max_batch=8, max_len=64, kv_budget_bytes=3 * per_row + 1).cache.batch == 3
    with pytest.raises(ValueError, match="holds no cache row"):
        Engine(tiny_model, max_batch=8, max_len=64, kv_budget_bytes=per_row - 1)


def test_admission_waits_for_a_free_row(tiny_model):
    engine = Engine(tiny_model, max_batch=1, max_len=64)
    a = engine.add_request(Request([1, 2, 3], greedy(3)))
    b = engine.add_request(Request([4, 5, 6], greedy(3)))
    engine.step()                                           # a: prefill (first token); b waits
    assert [s.id for s in engine.running] == [a] and len(engine.waiting) == 1
    assert [(o.request_id, o.finish_reason) for o in engine.step()] == [(a, None)]
    assert [(o.request_id, o.finish_reason) for o in engine.step()] == [(a, "length")]
    assert not engine.running and len(engine.waiting) == 1  # a finished; b is admitted at the next step
    engine.step()
    assert [s.id for s in engine.running] == [b] and not engine.waiting


def test_waiting_queue_has_a_limit(tiny_model):
    engine = Engine(tiny_model, max_batch=1, max_len=64, max_waiting=2)
    engine.add_request(Request([1], greedy(1)))
    engine.add_request(Request([1], greedy(1)))
    with pytest.raises(EngineFull):
        engine.add_request(Request([1], greedy(1)))


# ------------------------------------------------------------------ cancellation


def test_cancel_frees_the_row_for_a_waiting_request(tiny_model):
    engine = Engine(tiny_model, max_batch=1, max_len=64)
    long = engine.add_request(Request([1, 2, 3], greedy(50)))
    short = engine.add_request(Request([4, 5], greedy(5)))
    engine.step()
    engine.step()
    engine.cancel(long)
    outs = engine.step()
    assert Output(long, None, "cancelled") in outs
    assert [s.id for s in engine.running] == [short]        # admitted in the same step
    while engine.has_work():
        engine.step()
    assert engine.finished["cancelled"] == 1 and engine.finished["length"] == 1
    assert engine.cache.length == 0


def test_cancel_a_waiting_request_and_a_finished_one(tiny_model):
    engine = Engine(tiny_model, max_batch=1, max_len=64)
    a = engine.add_request(Request([1, 2], greedy(2)))
    b = engine.add_request(Request([3, 4], greedy(2)))
    engine.cancel(b)
    outs = engine.step()
    assert Output(b, None, "cancelled") in outs
    while engine.has_work():
        engine.step()
    engine.cancel(a)                                      # already finished: a no-op
    assert engine.step() == [] and not engine.has_work()


def test_cancelled_row_in_the_middle_keeps_the_others_exact(tiny_model):
    prompts = random_prompts(3, seed=5)
    engine = Engine(tiny_model, max_batch=3, max_len=64)
    ids = [engine.add_request(Request(p, greedy(12))) for p in prompts]
    got = {i: [] for i in ids}
    for step in range(30):
        if step == 3:
            engine.cancel(ids[0])                          # row 0 is refilled with the last row
        for out in engine.step():
            if out.token_id is not None:
                got[out.request_id].append(out.token_id)
    for rid, p in zip(ids[1:], prompts[1:]):
        assert got[rid] == alone(tiny_model, p, greedy(12))


# ------------------------------------------------------------------ image feature cache


class CountingModel(torch.nn.Module):
    """The tiny model, counting how many images go through the vision tower."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config, self.encoded = model, model.config, 0

    def encode_images(self, pixels):
        self.encoded += pixels.shape[0]
        return self.inner.encode_images(pixels)

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


def test_a_re_asked_image_skips_the_vision_tower(tiny_model, tiny_cases, tiny_pixels):
    model = CountingModel(tiny_model)
    case = tiny_cases["one_image"]
    engine = Engine(model, max_batch=2, max_len=256, prefix_cache_bytes=0)       # the feature cache alone
    req = Request(case["input_ids"][0], greedy(12), images=image_inputs(case, tiny_pixels))
    assert engine.generate([req]) == [case["generated_ids"][0]]
    assert engine.generate([req, req]) == [case["generated_ids"][0]] * 2
    assert model.encoded == 1 and engine.features.hits == 1       # one lookup per distinct image per prefill


def test_prefix_cache_skips_the_image_and_the_prefill_up_to_it(tiny_model, tiny_cases, tiny_pixels):
    """Same image re-asked, and a longer prompt continuing it (the next turn of a conversation): the K/V
    up to the image come from the prefix cache, and the tokens are still exactly the solo ones."""
    model = CountingModel(tiny_model)
    case = tiny_cases["two_images"]
    prompt, images = case["input_ids"][0], image_inputs(case, tiny_pixels)
    engine = Engine(model, max_batch=2, max_len=256)
    first = engine.generate([Request(prompt, greedy(12), images=images)])[0]
    assert first == case["generated_ids"][0] and model.encoded == 2
    calls = []
    model.forward = lambda *a, **k: calls.append(a[0].shape[1]) or CountingModel.forward(model, *a, **k)
    again = engine.generate([Request(prompt, greedy(12), images=images)])[0]
    end = max(i for i, t in enumerate(prompt) if t == 998) + 1                     # after the last </img>
    assert again == first and model.encoded == 2 and calls[0] == len(prompt) - end
    longer = prompt + first[:5] + [7, 8, 9]
    assert engine.generate([Request(longer, greedy(6), images=images)])[0] == alone(tiny_model, longer, greedy(6), images)
    other = [ImageInput("img_d.png", tiny_pixels["img_d.png"]), images[1]]        # new first image: no reuse
    assert engine.generate([Request(prompt, greedy(6), images=other)])[0] == alone(tiny_model, prompt, greedy(6), other)
    assert engine.prefixes.hits == 2 and model.encoded == 3


def test_feature_cache_is_lru_with_a_byte_cap():
    item = torch.zeros(4, 8)                                  # 128 bytes
    cache = FeatureCache(max_bytes=300)
    cache.put("a", item.clone())
    cache.put("b", item.clone())
    assert cache.get("a") is not None                         # a is now the most recent
    cache.put("c", item.clone())                              # evicts b
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    assert cache.nbytes == 256 and len(cache) == 2
    cache.put("huge", torch.zeros(100, 8))                     # bigger than the cap: not kept
    assert cache.get("huge") is None and len(cache) == 2


# ------------------------------------------------------------------ background thread


def test_engine_thread_streams_to_callbacks(tiny_model):
    prompts = random_prompts(4, seed=6)
    runner = EngineThread(Engine(tiny_model, max_batch=2, max_len=64)).start()
    try:
        done, got = threading.Event(), {}
        finished = []

        def callback(out: Output):
            got.setdefault(out.request_id, []).append(out.token_id)
            if out.finish_reason:
                finished.append(out.request_id)
                if len(finished) == len(prompts):
                    done.set()

        ids = [runner.submit(Request(p, greedy(6)), callback) for p in prompts]
        assert done.wait(30)
        for rid, p in zip(ids, prompts):
            assert got[rid] == alone(tiny_model, p, greedy(6))
    finally:
        runner.stop()


class FailingOnce(CountingModel):
    def __init__(self, model):
        super().__init__(model)
        self.failed = False

    def forward(self, *args, **kwargs):
        if not self.failed:
            self.failed = True
            raise RuntimeError("boom")
        return self.inner(*args, **kwargs)


def test_engine_thread_survives_a_failing_step(tiny_model, caplog):
    runner = EngineThread(Engine(FailingOnce(tiny_model), max_batch=2, max_len=64)).start()
    try:
        ends: dict[int, str] = {}
        finished = threading.Event()

        def callback(out):
            if out.finish_reason:
                ends[out.request_id] = out.finish_reason
                finished.set()

        first = runner.submit(Request([1, 2, 3], greedy(3)), callback)
        assert finished.wait(30) and ends == {first: "error"}
        finished.clear()
        second = runner.submit(Request([1, 2, 3], greedy(3)), callback)
        assert finished.wait(30) and ends[second] == "length"
    finally:
        runner.stop()
