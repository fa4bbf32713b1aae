"""Byte-level BPE: lossless with tiktoken, compresses the world text, the qwen.tiktoken file format."""
from __future__ import annotations

import random

import pytest
import tiktoken
from hypothesis import given, settings, strategies as st

from qwenvl.bpe import PAT_STR, PAT_STR_HAN_CHARS, count_pretokens, load_tiktoken, save_tiktoken, train_bpe
from qwenvl.synthetic import SceneSpec, world_text

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<ref>", "</ref>", "<box>", "</box>"]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return list(world_text(random.Random(0), 1200, SceneSpec(width=96, height=96)))


@pytest.fixture(scope="module")
def ranks(corpus) -> dict[bytes, int]:
    return train_bpe(corpus, 256 + 800, special_tokens=SPECIALS)


@pytest.fixture(scope="module")
def enc(ranks) -> tiktoken.Encoding:
    return tiktoken.Encoding("world", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens={})


def test_ranks_are_bytes_then_merges(ranks):
    assert len(ranks) == 256 + 800
    assert sorted(ranks.values()) == list(range(len(ranks)))
    assert all(ranks[bytes([b])] == b for b in range(256))
    assert all(len(tok) >= 2 for tok, r in ranks.items() if r >= 256)


def test_han_characters_are_never_merged_together(corpus):
    """The demo tokenizer's training regex: Chinese phrases stay per character, so '红色' shares '色' with '蓝色'."""
    han = lambda tok: sum("\u4e00" <= ch <= "\u9fff" for ch in tok.decode("utf-8", errors="ignore"))
    phrase_ranks = train_bpe(corpus, 256 + 800, special_tokens=SPECIALS)
    assert any(han(tok) >= 2 for tok in phrase_ranks)                      # Qwen's own regex: whole phrases
    ranks = train_bpe(corpus, 256 + 800, PAT_STR_HAN_CHARS, special_tokens=SPECIALS)
    assert not any(han(tok) >= 2 for tok in ranks)
    enc = tiktoken.Encoding("world", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens={})
    text = "图中的正方形是什么颜色？ What colour is the square?"
    pieces = [enc.decode([i]) for i in enc.encode(text)]
    assert pieces[:12] == list("图中的正方形是什么颜色？") and " colour" in pieces
    assert enc.decode(enc.encode(text)) == text


def test_specials_are_cut_out_before_training(ranks):
    assert not any(b"im_start" in tok or b"<box" in tok or b"ref>" in tok for tok in ranks)


def test_training_is_deterministic(corpus):
    assert train_bpe(corpus[:300], 400) == train_bpe(corpus[:300], 400)


def test_pretokens_split_digits_one_by_one():
    assert count_pretokens(["(123,45)"]) == {b"(": 1, b"1": 1, b"2": 1, b"3": 1, b",": 1, b"4": 1, b"5": 1, b")": 1}


def test_world_text_compresses(enc, corpus):
    en = "\n".join(t for t in corpus if t.isascii() and "<" not in t)
    zh = "".join(t for t in corpus if not t.isascii() and "<" not in t)
    assert len(enc.encode(en)) / len(en) < 0.5
    assert len(enc.encode(zh)) / len(zh) < 1.0
    assert len(enc.encode(" circle")) == 1 and len(enc.encode("圆形")) == 1


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=80)
       | st.text(alphabet="红色的圆形三角形 🐱🎉 abc123\n\t(),.<>'", max_size=80))
def test_tiktoken_round_trip_is_lossless(enc, text):
    assert enc.decode(enc.encode(text, disallowed_special=())) == text


def test_save_and_load_tiktoken(tmp_path, ranks):
    path = tmp_path / "qwen.tiktoken"
    save_tiktoken(ranks, path)
    raw = path.read_bytes()
    assert b"\r" not in raw and raw.endswith(b"\n") and raw.count(b"\n") == len(ranks)
    assert raw.splitlines()[65] == b"QQ== 65"                       # base64(b"A") rank 65
    assert load_tiktoken(path) == ranks
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("QQ== 65\nnot-a-line\n")
    with pytest.raises(ValueError, match=r"bad.tiktoken:2"):
        load_tiktoken(bad)


def test_vocab_size_below_bytes_is_rejected():
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(["abc"], 100)
