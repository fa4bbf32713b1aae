"""A continuous-batching inference engine: prompt ids (+ image pixels) in, generated ids out.

It knows nothing of HTTP, chat templates or text: the server renders messages to ids and decodes ids
to text. The model itself is reached through its family adapter (families.py: the cache shape, the
prefill / decode calls with their positions, the image encoder), so Qwen-VL and Qwen2-VL share this loop;
a Qwen2-VL request keeps its M-RoPE `rope_delta` from prefill to every decode step.

Life of a request:

    add_request()   -> waiting (FIFO; a request that can never fit is refused here, with numbers)
    admitted        when a row of the shared KV cache is free (the KV budget fixes the number of rows)
    prefill         prompt + image features (from the feature cache, else the vision tower) in a private
                    cache; the first token is sampled from its logits; its K/V are copied into the row.
                    If the prompt starts with a prefix seen before that ends right after an image (the
                    same image re-asked, or the next turn of a conversation about it), that prefix's K/V
                    come from the prefix cache and only the rest is prefilled
    decode          one token per `step()` for every running row at once, each with its own sampling
    finish          eos / a stop sequence / max_new_tokens / cancel(): the row is freed at once

Layout of the shared cache (`KVCache`: one fill level `length` for all rows). Each running row holds a
contiguous run of its tokens ending at `length`, so it looks like a left-padded batch:

    slot    0 1 2 3 4 5 6 7 8 9        length = 10
    row 0   . . a a a a a a a a        joined first (prompt of 4, 4 tokens decoded since)
    row 1   . . . . . . b b b b        joined later: its prefill block was placed right-aligned

`valid` marks the letters and `next_position` counts them, so every row gets the RoPE positions it
would have alone (kv_cache.py): batched tokens equal single-request tokens. When `length` reaches
max_len, `_compact` shifts all rows left by the smallest leading gap. A request is accepted only if
prompt + max_new_tokens <= max_len, and a running row then holds at most max_len - 1 tokens, so a
compaction always frees a slot. Running rows are always rows 0..n-1 (a finished row is refilled with
the last one), so each decode step runs on a view of the first n rows: no copy, no wasted rows.

    engine = Engine(model, max_batch=8, max_len=2048, eos_token_id=tokenizer.eod_id)
    rid = engine.add_request(Request(prompt_ids, SamplingParams(max_new_tokens=32, do_sample=False)))
    while engine.has_work():
        for out in engine.step():          # Output(request_id, token_id, finish_reason)
            ...

`EngineThread` runs `step()` in a background thread and hands each request's outputs to its callback.
A step that prefills does not also decode, so new requests get their first token as soon as possible.
"""
from __future__ import annotations

import hashlib
import logging
import threading
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .families import family_of
from .generation import left_pad
from .kv_cache import KVCache
from .sampling import SamplingParams, ends_with_stop, sample

log = logging.getLogger(__name__)

FINISH_REASONS = ("stop", "length", "cancelled", "error")


@dataclass(frozen=True)
class ImageInput:
    """One image of a prompt, in span order: a content key (`images.image_digest`) and pixels [3, S, S],
    or a function making them (called only when the features are not cached). Qwen2-VL: pixels are the
    image's patches [N, C*Tp*P*P] and `grid_thw` its grid (the key must then include the pixel limits)."""

    key: str
    pixels: Tensor | Callable[[], Tensor]
    grid_thw: tuple[int, int, int] | None = None

    def tensor(self) -> Tensor:
        return self.pixels() if callable(self.pixels) else self.pixels


@dataclass
class Request:
    """What to generate: prompt ids with one `<img>` span per image, and how to sample."""

    prompt_ids: list[int]
    params: SamplingParams
    images: list[ImageInput] = field(default_factory=list)
    seed: int | None = None             # None: a fresh random seed


@dataclass(frozen=True)
class Output:
    """One event of a request: a new token, and/or the end of the request (`finish_reason`).

    Tokens are reported as generated, stop tokens included (as `generate` does); cancelled and failed
    requests end with `token_id=None`.
    """

    request_id: int
    token_id: int | None
    finish_reason: str | None = None    # None while running; else one of FINISH_REASONS


class EngineFull(RuntimeError):
    """The waiting queue is full: try again later."""


class LRUCache:
    """Values (tensors or tuples of them) by key, least recently used first out, at most `max_bytes` in all.

    The engine keeps two: image features [Q, C] by image content key, and prompt-prefix K/V (`_Prefix`).
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.hits = self.misses = 0
        self._items: OrderedDict[str, object] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def get(self, key: str):
        value = self._items.get(key)
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return value

    def put(self, key: str, value) -> None:
        """Store `value` (not copied: pass tensors nobody else writes); one bigger than the cap is not kept."""
        size = _nbytes(value)
        if size > self.max_bytes:
            return
        if key in self._items:
            self.nbytes -= _nbytes(self._items.pop(key))
        self._items[key] = value
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            self.nbytes -= _nbytes(self._items.popitem(last=False)[1])

    def stats(self) -> dict:
        return {"entries": len(self), "bytes": self.nbytes, "max_bytes": self.max_bytes, "hits": self.hits,
                "misses": self.misses}


FeatureCache = LRUCache


@dataclass(frozen=True)
class _Prefix:
    """The K/V of a prompt's first P tokens: keys, values [L, H, P, D]; ntk_alpha of the prompt it came from."""

    keys: Tensor
    values: Tensor
    ntk_alpha: float


def _nbytes(value) -> int:
    if isinstance(value, Tensor):
        return value.nelement() * value.element_size()
    return sum(_nbytes(v) for v in (value.keys, value.values))     # a _Prefix


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Keys + values of one token over all layers. Qwen-VL-Chat, bf16: 2 * 32 * 32 * 128 * 2 = 512 KiB."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * itemsize


@dataclass
class _Sequence:
    """A running request. Its K/V live in one row of the shared cache; this is the rest of its state."""

    id: int
    request: Request
    generator: torch.Generator
    seen: Tensor | None                 # [1, V] bool, tokens seen (repetition penalty); None when off
    generated: list[int] = field(default_factory=list)
    start: int = 0                      # first cache slot of its run (see the layout above)
    rope_delta: int = 0                 # Qwen2-VL: M-RoPE id - token count, fixed at prefill (0 for v1)


class Engine:
    """Continuous batching over one preallocated KV cache; drive it with `step()` (or `EngineThread`)."""

    def __init__(self, model, *, max_batch: int = 8, max_len: int = 2048, kv_budget_bytes: int | None = None,
                 feature_cache_bytes: int = 256 * 2**20, prefix_cache_bytes: int = 256 * 2**20,
                 eos_token_id: int | None = None,
                 max_prefill_tokens: int = 4096, max_waiting: int = 256, family=None):
        """Args:
            max_batch: most requests decoded together.
            max_len: most tokens of one request, prompt + completion (the length of a cache row).
            kv_budget_bytes: memory for the shared KV cache; it caps the rows at
                budget // (max_len * kv_bytes_per_token), so admission waits for a free row.
            feature_cache_bytes: memory for cached image features.
            prefix_cache_bytes: memory for cached K/V of prompt prefixes that end with an image (0: off).
            max_prefill_tokens: most (padded) prompt tokens prefilled in one step (one request always is).
            family: the model family's adapter (families.py); default: picked from the model's class.
        """
        if max_batch < 1 or max_len < 2:
            raise ValueError(f"need max_batch >= 1 and max_len >= 2, got {max_batch=} {max_len=}")
        self.model = model
        self.family = family or family_of(model)
        self.max_len, self.max_prefill_tokens, self.max_waiting = max_len, max_prefill_tokens, max_waiting
        self.eos_token_id = eos_token_id
        self.dtype = next(model.parameters()).dtype
        self.cache = self.family.new_cache(self._rows(max_batch, kv_budget_bytes), max_len, self.dtype)
        self.features = LRUCache(feature_cache_bytes)
        self.prefixes = LRUCache(prefix_cache_bytes)
        self.running: list[_Sequence] = []          # running[i] owns cache row i
        self.waiting: deque[tuple[int, Request]] = deque()
        self.finished = dict.fromkeys(FINISH_REASONS, 0)
        self._cancelled: set[int] = set()
        self._prefilling: list[int] = []            # ids admitted but not yet running
        self._lock = threading.Lock()               # guards waiting, _cancelled, _next_id (other threads)
        self._next_id = 0

    def _rows(self, max_batch: int, kv_budget_bytes: int | None) -> int:
        per_row = self.family.kv_bytes_per_token(self.dtype) * self.max_len
        if kv_budget_bytes is None:
            return max_batch
        if kv_budget_bytes < per_row:
            raise ValueError(f"{kv_budget_bytes=:,} holds no cache row: one row of {self.max_len} tokens takes "
                             f"{per_row:,} bytes; raise the budget or lower max_len")
        return min(max_batch, kv_budget_bytes // per_row)

    # ------------------------------------------------------------------ requests (any thread)

    def add_request(self, request: Request) -> int:
        """Queue a request and return its id. ValueError if it can never run, EngineFull if the queue is full."""
        self._check(request)
        with self._lock:
            if len(self.waiting) >= self.max_waiting:
                raise EngineFull(f"{len(self.waiting)} requests are already waiting (max_waiting={self.max_waiting})")
            rid, self._next_id = self._next_id, self._next_id + 1
            self.waiting.append((rid, request))
        return rid

    def cancel(self, request_id: int) -> None:
        """Stop a request at the next step (a no-op if it already finished); it ends with 'cancelled'."""
        with self._lock:
            self._cancelled.add(request_id)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self.running or self.waiting or self._cancelled)

    def _check(self, request: Request) -> None:
        n, m = len(request.prompt_ids), request.params.max_new_tokens
        if n == 0:
            raise ValueError("the prompt is empty")
        if n + m > self.max_len:
            raise ValueError(f"prompt ({n} tokens) + max_new_tokens ({m}) = {n + m} is over max_len={self.max_len}")
        vocab = self.family.vocab_size
        if min(request.prompt_ids) < 0 or max(request.prompt_ids) >= vocab:
            raise ValueError(f"prompt ids must be in [0, {vocab})")
        self.family.check_images(request.prompt_ids, request.images)

    # ------------------------------------------------------------------ the loop (engine thread)

    @torch.no_grad()
    def step(self) -> list[Output]:
        """One iteration: drop cancelled requests; then prefill the waiting ones that fit, or else decode
        one token for every running row."""
        outputs = self._drop_cancelled()
        admitted = self._admit()
        if admitted:
            outputs += self._prefill(admitted)
        elif self.running:
            outputs += self._decode()
        for out in outputs:
            if out.finish_reason is not None:
                self.finished[out.finish_reason] += 1
        return outputs

    def generate(self, requests: Iterable[Request]) -> list[list[int]]:
        """Run requests to completion in this thread; their generated ids (stop tokens included), in order."""
        ids = [self.add_request(r) for r in requests]
        tokens: dict[int, list[int]] = {i: [] for i in ids}
        while self.has_work():
            for out in self.step():
                if out.token_id is not None and out.request_id in tokens:
                    tokens[out.request_id].append(out.token_id)
        return [tokens[i] for i in ids]

    def abort_all(self) -> list[Output]:
        """End every request with 'error' and empty the cache (after an unexpected exception in step)."""
        with self._lock:
            ids = list(dict.fromkeys(self._prefilling + [s.id for s in self.running] + [rid for rid, _ in self.waiting]))
            self.waiting.clear()
            self._cancelled.clear()
        self.running.clear()
        self._prefilling = []
        self.cache.reset()
        self.finished["error"] += len(ids)
        return [Output(rid, None, "error") for rid in ids]

    def stats(self) -> dict:
        """Counters for /health and benchmarks (read without locking: approximate while running)."""
        return {"running": len(self.running), "waiting": len(self.waiting), "rows": self.cache.batch,
                "max_len": self.max_len, "kv_cache_bytes": self.cache.nbytes(), "finished": dict(self.finished),
                "feature_cache": self.features.stats(), "prefix_cache": self.prefixes.stats()}

    def _drop_cancelled(self) -> list[Output]:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            dropped = [rid for rid, _ in self.waiting if rid in cancelled]
            self.waiting = deque(item for item in self.waiting if item[0] not in cancelled)
        outputs = [Output(rid, None, "cancelled") for rid in dropped]
        for i in reversed(range(len(self.running))):
            if self.running[i].id in cancelled:
                outputs.append(Output(self.running[i].id, None, "cancelled"))
                self._free_row(i)
        return outputs

    def _admit(self) -> list[tuple[int, Request]]:
        """FIFO: as many waiting requests as there are free rows and prefill budget (always at least one)."""
        admitted: list[tuple[int, Request]] = []
        with self._lock:
            while self.waiting and len(self.running) + len(admitted) < self.cache.batch:
                width = max(len(r.prompt_ids) for _, r in admitted + [self.waiting[0]])
                if admitted and width * (len(admitted) + 1) > self.max_prefill_tokens:
                    break
                admitted.append(self.waiting.popleft())
        return admitted

    def _prefill(self, admitted: list[tuple[int, Request]]) -> list[Output]:
        """Prefill the admitted prompts, sample their first tokens and place the rows that go on.

        Prompts with a cached prefix are prefilled one by one from it; the others together, left-padded."""
        self._prefilling = [rid for rid, _ in admitted]          # for abort_all, should the model raise
        cached = [(rid, r, hit) for rid, r in admitted if (hit := self._cached_prefix(r)) is not None]
        fresh = [(rid, r) for rid, r in admitted if rid not in {c[0] for c in cached}]
        outputs: list[Output] = []
        if fresh:
            ids, mask = left_pad([r.prompt_ids for _, r in fresh], pad_id=0)           # [k, T]
            block = self.family.new_cache(ids.shape[0], ids.shape[1], self.dtype)
            images = [r.images for _, r in fresh]
            grids = [img.grid_thw for imgs in images for img in imgs]
            logits, deltas = self.family.prefill(ids, mask, self._image_features(images), grids, block)  # [k, V]
            outputs += self._start(fresh, block, logits, deltas)
        for rid, request, (n_cached, prefix) in cached:
            block = self._block_from_prefix(prefix, len(request.prompt_ids))
            images = request.images[request.prompt_ids[:n_cached].count(self._image_start):]
            logits = self.model(torch.tensor([request.prompt_ids[n_cached:]]), kv_cache=block, last_only=True,
                                image_features=self._image_features([images]))[:, -1]       # [1, V]
            outputs += self._start([(rid, request)], block, logits)
        self._prefilling = []
        return outputs

    def _start(self, admitted: list[tuple[int, Request]], block: KVCache, logits: Tensor,
               rope_deltas: list[int] | None = None) -> list[Output]:
        """After a prefill into `block`: remember image prefixes, sample first tokens, place the rows."""
        for j, (_, request) in enumerate(admitted):
            self._remember_prefix(request, block, j)
        seqs = [self._new_sequence(rid, r) for rid, r in admitted]
        for seq, delta in zip(seqs, rope_deltas or []):
            seq.rope_delta = int(delta)
        outputs = self._sample_and_record(logits, seqs)
        keep = [j for j, out in enumerate(outputs) if out.finish_reason is None]
        if keep:
            self._make_room(block.length)
        for j in keep:
            self._place(block, j, seqs[j])
        return outputs

    def _decode(self) -> list[Output]:
        """Feed every running row its last token; sample the next; free the rows that finished."""
        if self.cache.length >= self.max_len:
            self._compact()
        n = len(self.running)
        view = self._view(n)
        last = torch.tensor([[s.generated[-1]] for s in self.running])                 # [n, 1]
        logits = self.family.decode(last, view, [s.rope_delta for s in self.running])  # [n, V]
        self.cache.length = view.length
        outputs = self._sample_and_record(logits, self.running)
        for i in reversed(range(n)):
            if outputs[i].finish_reason is not None:
                self._free_row(i)
        return outputs

    # ------------------------------------------------------------------ sampling

    def _new_sequence(self, rid: int, request: Request) -> _Sequence:
        generator = torch.Generator()
        if request.seed is None:
            generator.seed()
        else:
            generator.manual_seed(request.seed)
        seen = None
        if request.params.repetition_penalty != 1.0:       # as generate: the prompt counts as seen
            seen = torch.zeros(1, self.family.vocab_size, dtype=torch.bool)
            seen[0, request.prompt_ids] = True
        return _Sequence(rid, request, generator, seen)

    def _sample_and_record(self, logits: Tensor, seqs: list[_Sequence]) -> list[Output]:
        """logits [n, V] -> one Output per sequence; greedy rows share one argmax, the others sample alone."""
        tokens = logits.argmax(-1).tolist()                                              # [n]
        for i, seq in enumerate(seqs):
            if not seq.request.params.greedy or seq.seen is not None:
                tokens[i] = int(sample(logits[i:i + 1], seq.request.params, seq.seen, seq.generator)[0])
        return [Output(seq.id, tok, self._record(seq, tok)) for seq, tok in zip(seqs, tokens)]

    def _record(self, seq: _Sequence, token: int) -> str | None:
        seq.generated.append(token)
        if seq.seen is not None:
            seq.seen[0, token] = True
        params = seq.request.params
        if token == self.eos_token_id or ends_with_stop(seq.generated, params.stop_words_ids):
            return "stop"
        if len(seq.generated) >= params.max_new_tokens:
            return "length"
        return None

    # ------------------------------------------------------------------ image features

    def _image_features(self, per_request: list[list[ImageInput]]) -> Tensor | None:
        """Features of all the images in order ([N, Q, C] for v1, [M, C] for Qwen2-VL); only unseen images
        go through the vision tower."""
        images = [img for imgs in per_request for img in imgs]
        if not images:
            return None
        found: dict[str, Tensor] = {}
        for img in images:
            if img.key not in found and (cached := self.features.get(img.key)) is not None:
                found[img.key] = cached
        missing = {img.key: img for img in images if img.key not in found}
        if missing:
            encoded = self.family.encode([img.tensor() for img in missing.values()],
                                         [img.grid_thw for img in missing.values()])
            for key, features in zip(missing, encoded):
                found[key] = features.clone()                # own storage, so the LRU frees it alone
                self.features.put(key, found[key])
        return self.family.join([found[img.key] for img in images], [img.grid_thw for img in images])

    # ------------------------------------------------------------------ prompt-prefix cache

    @property
    def _image_start(self) -> int:
        return self.family.image_start_id

    def _prefix_key(self, request: Request, n: int) -> str:
        """Identity of the first n prompt tokens: their ids and the content of the images among them."""
        digest = hashlib.sha256(array("q", request.prompt_ids[:n]).tobytes())
        for img in request.images[:request.prompt_ids[:n].count(self._image_start)]:
            digest.update(img.key.encode())
        return digest.hexdigest()

    def _image_ends(self, request: Request) -> list[int]:
        """Token counts that end right after an image span (`</img>` = image_start_id + 1)."""
        return [i + 1 for i, tok in enumerate(request.prompt_ids) if tok == self._image_start + 1]

    def _prefix_ok(self, request: Request) -> bool:
        # Dynamic NTK is chosen from the whole prompt's length; it is 1 for every prompt up to seq_length,
        # so a prefix is shared exactly only between such prompts.
        return (self.family.prefix_cache and self.prefixes.max_bytes > 0
                and len(request.prompt_ids) <= self.model.config.seq_length)

    def _cached_prefix(self, request: Request) -> tuple[int, _Prefix] | None:
        """The longest cached prefix ending after an image, leaving at least one token to prefill."""
        if not self._prefix_ok(request):
            return None
        for n in reversed(self._image_ends(request)):
            if n < len(request.prompt_ids) and (hit := self.prefixes.get(self._prefix_key(request, n))) is not None:
                return n, hit
        return None

    def _remember_prefix(self, request: Request, block: KVCache, j: int) -> None:
        """Keep the K/V of row j of a prefill block up to the end of its last image span."""
        ends = self._image_ends(request)
        if not ends or not self._prefix_ok(request):
            return
        key = self._prefix_key(request, ends[-1])
        if key in self.prefixes:
            return
        start = block.length - len(request.prompt_ids)                                  # left padding
        span = slice(start, start + ends[-1])
        self.prefixes.put(key, _Prefix(block.keys[:, j, :, span].clone(), block.values[:, j, :, span].clone(),
                                       float(block.ntk_alpha[j])))                      # [L, H, P, D] each

    def _block_from_prefix(self, prefix: _Prefix, n_prompt: int) -> KVCache:
        """A one-row prefill cache for a prompt of n_prompt tokens, already holding the prefix's K/V."""
        n = prefix.keys.shape[2]
        block = self.family.new_cache(1, n_prompt, self.dtype)
        block.keys[:, 0, :, :n] = prefix.keys
        block.values[:, 0, :, :n] = prefix.values
        block.valid[0, :n] = True
        block.next_position[0] = n
        block.ntk_alpha[0] = prefix.ntk_alpha
        block.length = n
        return block

    # ------------------------------------------------------------------ cache rows

    def _view(self, n: int) -> KVCache:
        """The first n rows of the shared cache, sharing its storage (the model writes through it)."""
        c = self.cache
        return KVCache(c.keys[:, :n], c.values[:, :n], c.valid[:n], c.next_position[:n], c.ntk_alpha[:n], c.length)

    def _make_room(self, width: int) -> None:
        """Make `length` >= width, so a prefill block `width` slots wide fits right-aligned at `length`."""
        if not self.running:
            self.cache.length = 0
        if width > self.cache.length:
            self._shift(width - self.cache.length)

    def _place(self, block: KVCache, j: int, seq: _Sequence) -> None:
        """Copy row j of a prefill block (left-padded, width T) into the next free row, ending at `length`."""
        c, i, t = self.cache, len(self.running), block.length
        n_real = int(block.valid[j].sum())
        start = c.length - n_real
        c.keys[:, i, :, start:c.length] = block.keys[:, j, :, t - n_real:t]             # [L, H, n_real, D]
        c.values[:, i, :, start:c.length] = block.values[:, j, :, t - n_real:t]
        c.valid[i] = False
        c.valid[i, start:c.length] = True
        c.next_position[i] = block.next_position[j]
        c.ntk_alpha[i] = block.ntk_alpha[j]
        seq.start = start
        self.running.append(seq)

    def _free_row(self, i: int) -> None:
        """Remove running row i; the last running row moves into it so rows 0..n-1 stay the running ones."""
        c, last = self.cache, len(self.running) - 1
        if i != last:
            c.keys[:, i, :, :c.length] = c.keys[:, last, :, :c.length]                   # [L, H, S_used, D]
            c.values[:, i, :, :c.length] = c.values[:, last, :, :c.length]
            for t in (c.valid, c.next_position, c.ntk_alpha):
                t[i] = t[last]
            self.running[i] = self.running[last]
        self.running.pop()
        if not self.running:
            c.length = 0

    def _shift(self, d: int) -> None:
        """Move every running row d slots right (d > 0) or -d slots left (d < 0); `length` moves with them."""
        c, n, old = self.cache, len(self.running), self.cache.length
        new = old + d
        assert 0 <= new <= c.max_len, f"shift {d} of fill level {old} leaves the cache (max_len={c.max_len})"
        src, dst = slice(max(0, -d), old), slice(max(0, d), new)
        for t in (c.keys, c.values):
            t[:, :n, :, dst] = t[:, :n, :, src].clone()                                  # [L, n, H, S, D]
        c.valid[:n, dst] = c.valid[:n, src].clone()
        c.valid[:n, :d] = False if d > 0 else c.valid[:n, :d]
        c.valid[:n, new:old] = False                                                     # empty when d > 0
        for seq in self.running:
            seq.start += d
        c.length = new

    def _compact(self) -> None:
        """Drop the slots no running row uses any more (the smallest leading gap)."""
        gap = min(seq.start for seq in self.running)
        assert gap > 0, "a running row fills the whole cache: admission should have refused it"
        self._shift(-gap)


class EngineThread:
    """Runs `engine.step()` in a daemon thread while there is work; each request's outputs go to its callback.

    Callbacks run in the engine thread and must be quick and never raise, e.g.
    `lambda out: loop.call_soon_threadsafe(queue.put_nowait, out)`. If `step()` raises (a bug), every
    request ends with 'error' and the engine goes on serving new requests.
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self._callbacks: dict[int, Callable[[Output], None]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> "EngineThread":
        self._thread = threading.Thread(target=self._run, name="qwenvl-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, request: Request, callback: Callable[[Output], None]) -> int:
        """Queue a request (errors as Engine.add_request); its outputs will be passed to `callback`."""
        with self._lock:               # the callback is known before step() can report on the request
            rid = self.engine.add_request(request)
            self._callbacks[rid] = callback
        self._wake.set()
        return rid

    def cancel(self, request_id: int) -> None:
        self.engine.cancel(request_id)
        self._wake.set()

    def _run(self) -> None:
        while not self._stopping:
            if not self.engine.has_work():
                self._wake.wait(0.1)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception:
                log.exception("engine step failed; ending every request with 'error'")
                outputs = self.engine.abort_all()
            self._dispatch(outputs)

    def _dispatch(self, outputs: list[Output]) -> None:
        with self._lock:
            calls = [(self._callbacks.get(out.request_id), out) for out in outputs]
            for out in outputs:
                if out.finish_reason is not None:
                    self._callbacks.pop(out.request_id, None)
        for callback, out in calls:
            if callback is not None:
                callback(out)
