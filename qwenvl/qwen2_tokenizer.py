"""The Qwen2 tokenizer (Qwen2-VL, Qwen2.5-VL): byte-level BPE over `vocab.json` + `merges.txt` (or
`tokenizer.json`), plus the added special tokens. No dependency beyond `regex`.

Encoding, as transformers' `Qwen2Tokenizer` does it: (trusted text only) split out the special tokens'
surface forms; NFC-normalise each text piece; split it with the Qwen2 pre-tokenizer regex; map each
piece's UTF-8 bytes to the GPT-2 byte alphabet; apply BPE merges by rank. `encode_untrusted` never splits
out special tokens, so text from a user can never produce a special id.
"""
from __future__ import annotations

import json
import operator
import unicodedata
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

import regex

# transformers' qwen2 PRETOKENIZE_REGEX (contractions, letters with one leading non-letter, single digits,
# punctuation runs with trailing newlines, newline runs, trailing spaces).
PRETOKENIZE = regex.compile(
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# The Qwen2(-VL) added tokens and their ids in the official files (qwen2_vl.md §2).
QWEN2_VL_SPECIAL_TOKENS = {
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646, "<|object_ref_end|>": 151647, "<|box_start|>": 151648, "<|box_end|>": 151649,
    "<|quad_start|>": 151650, "<|quad_end|>": 151651, "<|vision_start|>": 151652, "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654, "<|image_pad|>": 151655, "<|video_pad|>": 151656,
}


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map: printable Latin-1 bytes map to themselves, the other 68
    bytes to chr(256 + k) in order. Examples: 0x41 -> 'A', 0x20 (space) -> 'Ġ', 0x0A -> 'Ċ'."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class Qwen2Tokenizer:
    """Byte-level BPE with special tokens. `encode` honours special-token text; `encode_untrusted` does not."""

    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], special_tokens: dict[str, int]):
        self.vocab = dict(vocab)
        self.merges = [tuple(m) for m in merges]
        self.ranks = {pair: i for i, pair in enumerate(self.merges)}
        self.special_tokens = dict(special_tokens)
        self.id_to_token = {i: t for t, i in self.vocab.items()}
        self.id_to_special = {i: t for t, i in self.special_tokens.items()}
        clash = set(self.id_to_token) & set(self.id_to_special)
        if clash:
            raise ValueError(f"special token ids {sorted(clash)[:5]} are also regular vocabulary ids")
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        # Longest surface form first, so a special that is a prefix of another never wins.
        forms = sorted(self.special_tokens, key=len, reverse=True)
        self._special_re = regex.compile("|".join(regex.escape(t) for t in forms)) if forms else None
        self._bpe = lru_cache(maxsize=65536)(self._bpe_uncached)

    # ------------------------------------------------------------------------------ loading

    @classmethod
    def from_files(cls, vocab_file: str | Path, merges_file: str | Path,
                   special_tokens: dict[str, int] | None = None) -> "Qwen2Tokenizer":
        """vocab.json + merges.txt; special tokens default to Qwen2-VL's ids."""
        vocab = json.loads(Path(vocab_file).read_text(encoding="utf-8"))
        lines = Path(merges_file).read_text(encoding="utf-8").splitlines()
        merges = [_pair(line) for line in lines if line and not line.startswith("#version")]
        return cls(vocab, merges, QWEN2_VL_SPECIAL_TOKENS if special_tokens is None else special_tokens)

    @classmethod
    def from_tokenizer_json(cls, path: str | Path) -> "Qwen2Tokenizer":
        """A `tokenizer.json` (model.vocab, model.merges as "a b" strings or [a, b] pairs, added_tokens)."""
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        model = raw.get("model") or {}
        if model.get("type") != "BPE":
            raise ValueError(f"{path}: expected a BPE model, got {model.get('type')!r}")
        merges = [_pair(m) if isinstance(m, str) else (m[0], m[1]) for m in model["merges"]]
        specials = {t["content"]: t["id"] for t in raw.get("added_tokens", [])}
        vocab = {t: i for t, i in model["vocab"].items() if t not in specials}
        return cls(vocab, merges, specials)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "Qwen2Tokenizer":
        """tokenizer.json if present, else vocab.json + merges.txt (+ tokenizer_config.json's added tokens)."""
        d = Path(model_dir)
        if (d / "tokenizer.json").is_file():
            return cls.from_tokenizer_json(d / "tokenizer.json")
        if not (d / "vocab.json").is_file() or not (d / "merges.txt").is_file():
            raise FileNotFoundError(f"{d} has neither tokenizer.json nor vocab.json + merges.txt")
        specials = None
        if (d / "tokenizer_config.json").is_file():
            added = json.loads((d / "tokenizer_config.json").read_text()).get("added_tokens_decoder") or {}
            specials = {v["content"]: int(k) for k, v in added.items()} or None
        return cls.from_files(d / "vocab.json", d / "merges.txt", specials)

    # ----------------------------------------------------------------------------- encoding

    def encode(self, text: str) -> list[int]:
        """Trusted text: special-token surface forms become their ids. Example: '<|im_start|>hi' -> [151644, ...]."""
        if self._special_re is None:
            return self.encode_untrusted(text)
        _check_text(text)
        ids, pos = [], 0
        for m in self._special_re.finditer(text):
            ids += self.encode_untrusted(text[pos:m.start()])
            ids.append(self.special_tokens[m.group()])
            pos = m.end()
        return ids + self.encode_untrusted(text[pos:])

    def encode_untrusted(self, text: str) -> list[int]:
        """Ordinary text only: '<|im_end|>' is encoded as the characters '<', '|', 'im', ... never as a special id."""
        _check_text(text)
        ids: list[int] = []
        for piece in PRETOKENIZE.findall(unicodedata.normalize("NFC", text)):
            ids += self._bpe("".join(self.byte_encoder[b] for b in piece.encode("utf-8")))
        return ids

    def _bpe_uncached(self, word: str) -> tuple[int, ...]:
        """Merge the lowest-ranked adjacent pair until none is in the merges; then look the parts up."""
        parts = list(word)
        while len(parts) > 1:
            ranked = [(self.ranks.get(pair, len(self.ranks)), i) for i, pair in enumerate(zip(parts, parts[1:]))]
            rank, _ = min(ranked)
            if rank == len(self.ranks):
                break
            (first, second), merged, i = self.merges[rank], [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        try:
            return tuple(self.vocab[p] for p in parts)
        except KeyError as e:
            raise ValueError(f"BPE produced {e.args[0]!r}, which is not in the vocabulary") from None

    # ----------------------------------------------------------------------------- decoding

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ids; bytes of adjacent regular tokens are joined before UTF-8 decoding (bad bytes -> U+FFFD)."""
        out, buf = [], bytearray()
        for i in ids:
            try:
                i = operator.index(i)      # an int, numpy int or 0-d int tensor; 3.7 or "5" is an error
            except TypeError:
                raise ValueError(f"token ids must be ints, got {i!r:.40}") from None
            if i in self.id_to_special:
                out.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
                if not skip_special_tokens:
                    out.append(self.id_to_special[i])
            elif i in self.id_to_token:
                buf += bytes(self.byte_decoder[c] for c in self.id_to_token[i])
            else:
                raise ValueError(f"token id {i} is not in the vocabulary (size {self.vocab_size})")
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    # ------------------------------------------------------------------------------- lookup

    def token_id(self, token: str) -> int:
        """Id of a special token or a regular vocabulary entry; KeyError naming it otherwise."""
        if token in self.special_tokens:
            return self.special_tokens[token]
        if token in self.vocab:
            return self.vocab[token]
        raise KeyError(f"{token!r} is neither a special token nor in the vocabulary")

    @property
    def vocab_size(self) -> int:
        return max([*self.id_to_token, *self.id_to_special]) + 1

    @property
    def eos_token_id(self) -> int:
        return self.special_tokens["<|im_end|>"]

    @property
    def pad_token_id(self) -> int:
        return self.special_tokens["<|endoftext|>"]


_SURROGATE = regex.compile(r"[\ud800-\udfff]")


def _check_text(text: str) -> None:
    """Text must be a str of valid Unicode: a lone surrogate (e.g. JSON "\\ud800") has no UTF-8 bytes."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    if m := _SURROGATE.search(text):
        raise ValueError(f"text has a lone surrogate U+{ord(m.group()):04X} at character {m.start()}, which "
                         "is not valid Unicode (a broken emoji escape?); remove it or pair it")


def _pair(line: str) -> tuple[str, str]:
    a, sep, b = line.partition(" ")
    if not sep or not a or not b:
        raise ValueError(f"a merge must be two tokens separated by one space, got {line!r}")
    return a, b
