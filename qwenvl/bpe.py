"""A small byte-level BPE trainer and the `qwen.tiktoken` file format, for the demo model's vocabulary.

Texts are split with the Qwen pre-tokenisation regex, so the learned merges never cross its pieces
(digits stay single, as in Qwen). Ranks 0..255 are the single bytes (rank = byte value), then one rank
per merge in the order learned. The result loads with `QWenTokenizer`, which appends the Qwen special
tokens after the ranks.
"""
from __future__ import annotations

import base64
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

import regex


def train_bpe(texts: Iterable[str], vocab_size: int, pat_str: str) -> dict[bytes, int]:
    """Learn `vocab_size - 256` merges over the pre-tokenised texts; returns token bytes -> rank.

    Ties between equally frequent pairs go to the smallest pair of ids, so training is deterministic.
    Example: texts ["aaab"] * 10 with vocab_size 257 merge (a, a) first: rank 256 = b"aa".
    """
    if vocab_size < 256:
        raise ValueError(f"{vocab_size=} must be >= 256 (the single bytes)")
    pattern = regex.compile(pat_str)
    words = Counter(piece.encode("utf-8") for text in texts for piece in pattern.findall(text))
    seqs = [list(w) for w in words]
    freqs = list(words.values())
    vocab: dict[int, bytes] = {i: bytes([i]) for i in range(256)}
    pairs, where = _count_pairs(seqs, freqs)
    for new_id in range(256, vocab_size):
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], -kv[0][0], -kv[0][1]))[0]
        vocab[new_id] = vocab[best[0]] + vocab[best[1]]
        for i in list(where.pop(best, ())):
            _merge_word(seqs, freqs, i, best, new_id, pairs, where)
        pairs.pop(best, None)
    return {token: rank for rank, token in vocab.items()}


def _count_pairs(seqs: list[list[int]], freqs: list[int]):
    pairs: Counter = Counter()
    where: defaultdict = defaultdict(set)
    for i, (seq, f) in enumerate(zip(seqs, freqs)):
        for pair in zip(seq, seq[1:]):
            pairs[pair] += f
            where[pair].add(i)
    return pairs, where


def _merge_word(seqs, freqs, i: int, best: tuple[int, int], new_id: int, pairs: Counter, where) -> None:
    """Replace every `best` pair in word i by new_id, keeping the pair counts and indexes current."""
    seq, f = seqs[i], freqs[i]
    for pair in zip(seq, seq[1:]):
        pairs[pair] -= f
        if pairs[pair] <= 0:
            del pairs[pair]
    out, k = [], 0
    while k < len(seq):
        if k + 1 < len(seq) and (seq[k], seq[k + 1]) == best:
            out.append(new_id)
            k += 2
        else:
            out.append(seq[k])
            k += 1
    seqs[i] = out
    for pair in zip(out, out[1:]):
        pairs[pair] += f
        where[pair].add(i)


def save_tiktoken(ranks: dict[bytes, int], path: str | Path) -> None:
    """Write `<base64 token> <rank>` lines (LF), ordered by rank."""
    lines = [f"{base64.b64encode(tok).decode()} {rank}" for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])]
    Path(path).write_text("\n".join(lines) + "\n", encoding="ascii")
