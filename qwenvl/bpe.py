"""A small byte-level BPE trainer and the `qwen.tiktoken` file format.

Training follows the usual recipe: split text with Qwen's pre-tokenisation regex, count the unique
pre-tokens, then repeatedly merge the most frequent adjacent pair. Pair counts are kept per pair
(weighted by how often each pre-token occurs) and updated only for the pre-tokens that contain the
merged pair, with a lazy max-heap, so each merge costs about the number of words it touches.

Ranks 0..255 are the single bytes (rank b is the byte b), then merged tokens in the order they were
learned. The result loads straight into tiktoken:

    ranks = train_bpe(texts, vocab_size=256 + 4000)
    enc = tiktoken.Encoding("world", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens={})
"""
from __future__ import annotations

import base64
import heapq
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable

import regex

from .tokenizer import PAT_STR  # qwen_vl.md §7.2; digits are split one by one

_PAT = regex.compile(PAT_STR)

# For training only: Qwen's regex with every Han character its own pre-token (letters elsewhere as before). Under
# PAT_STR a Chinese run is one pre-token, so a small world's BPE learns whole phrases ('图中的正方形是什么颜色' became
# one token and every Chinese question a lookup); with this no merge crosses a character, and the trained ranks
# still encode with PAT_STR, as the tokenizer class does.
PAT_STR_HAN_CHARS = PAT_STR.replace(r"[^\r\n\p{L}\p{N}]?\p{L}+", r"\p{Han}|[^\r\n\p{L}\p{N}]?[^\P{L}\p{Han}]+", 1)


def count_pretokens(texts: Iterable[str], special_tokens: Iterable[str] = (), pat_str: str = PAT_STR) -> Counter[bytes]:
    """UTF-8 pre-tokens and how often they occur; special-token strings are cut out first.

    >>> count_pretokens(["ab ab<s>", "12"], special_tokens=["<s>"])
    Counter({b'ab': 1, b' ab': 1, b'1': 1, b'2': 1})
    >>> sorted(p.decode() for p in count_pretokens(["红色 square？"], pat_str=PAT_STR_HAN_CHARS))
    [' square', '红', '色', '？']
    """
    specials = sorted(special_tokens, key=len, reverse=True)
    splitter = regex.compile("|".join(regex.escape(s) for s in specials)) if specials else None
    pat = _PAT if pat_str == PAT_STR else regex.compile(pat_str)
    counts: Counter[bytes] = Counter()
    for text in texts:
        for chunk in (splitter.split(text) if splitter else (text,)):
            counts.update(piece.encode("utf-8") for piece in pat.findall(chunk))
    return counts


def train_bpe(texts: Iterable[str], vocab_size: int, pat_str: str = PAT_STR,
              special_tokens: Iterable[str] = ()) -> dict[bytes, int]:
    """Learn merges until there are `vocab_size` ranks (256 bytes + vocab_size - 256 merges).

    Returns mergeable ranks {token bytes: rank}, dense 0..len-1. Ties in frequency go to the pair
    with the smaller (left id, right id), so training is deterministic. It stops early (fewer
    ranks) only when no pair occurs twice. `special_tokens` are cut out of the text first.

    >>> ranks = train_bpe(["aaab aab"] * 10, vocab_size=258)
    >>> len(ranks), ranks[b"aa"]
    (258, 256)
    """
    if vocab_size < 256:
        raise ValueError(f"{vocab_size=} must be >= 256 (the single bytes)")
    counts = count_pretokens(texts, special_tokens, pat_str)
    vocab = [bytes([b]) for b in range(256)]
    words = [list(w) for w in counts]   # each word as a list of token ids (bytes are ids 0..255)
    freqs = list(counts.values())
    pairs: defaultdict[tuple[int, int], int] = defaultdict(int)
    where: defaultdict[tuple[int, int], set[int]] = defaultdict(set)
    for wi, w in enumerate(words):
        for p in zip(w, w[1:]):
            pairs[p] += freqs[wi]
            where[p].add(wi)
    heap = [(-c, p) for p, c in pairs.items()]
    heapq.heapify(heap)
    ranks = {v: i for i, v in enumerate(vocab)}
    while len(vocab) < vocab_size and heap:
        neg, pair = heapq.heappop(heap)
        if pairs.get(pair, 0) != -neg:
            continue                    # stale heap entry
        if -neg < 2:
            break
        merged = vocab[pair[0]] + vocab[pair[1]]
        if merged not in ranks:         # two merge paths can spell the same bytes: keep one rank
            ranks[merged] = len(vocab)
            vocab.append(merged)
        _apply_merge(pair, ranks[merged], words, freqs, pairs, where, heap)
    return ranks


def _apply_merge(pair, new_id, words, freqs, pairs, where, heap) -> None:
    """Replace `pair` by `new_id` in every word containing it, updating pair counts and the heap."""
    touched: set[tuple[int, int]] = set()
    for wi in where.pop(pair, ()):
        w, f = words[wi], freqs[wi]
        for p in zip(w, w[1:]):          # remove this word's old pairs ...
            pairs[p] -= f
            touched.add(p)
        out, i = [], 0
        while i < len(w):
            if i + 1 < len(w) and w[i] == pair[0] and w[i + 1] == pair[1]:
                out.append(new_id)
                i += 2
            else:
                out.append(w[i])
                i += 1
        words[wi] = out
        for p in zip(out, out[1:]):      # ... and add its new ones
            pairs[p] += f
            where[p].add(wi)
            touched.add(p)
    pairs.pop(pair, None)
    for p in touched:
        c = pairs.get(p, 0)
        if c > 0:
            heapq.heappush(heap, (-c, p))
        else:
            pairs.pop(p, None)
            where.pop(p, None)


def save_tiktoken(ranks: dict[bytes, int], path: str | Path) -> None:
    """Write `base64(token) rank` lines sorted by rank, LF endings (the qwen.tiktoken format)."""
    lines = [f"{base64.b64encode(tok).decode('ascii')} {rank}\n" for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])]
    Path(path).write_text("".join(lines), encoding="ascii", newline="\n")


def load_tiktoken(path: str | Path) -> dict[bytes, int]:
    """Read a `base64(token) rank` file, e.g. the official qwen.tiktoken (151643 lines)."""
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(Path(path).read_text(encoding="ascii").splitlines(), start=1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as e:
            raise ValueError(f"{path}:{n}: expected 'base64 rank', got {line[:80]!r}") from e
    return ranks
