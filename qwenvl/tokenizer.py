"""The Qwen-VL tokenizer: tiktoken BPE ranks + Qwen's special tokens + the `<img>` byte-span rewrite.

Behaves like the official `tokenization_qwen.py` (golden vectors in tests/fixtures/qwen_tokenizer_golden.json)
without transformers. Two entry points for text:

* `encode(text)`: the TRUSTED path (= official `tokenize`). Special-token surface forms in the text become
  special ids and every `<img>PATH</img>` becomes `[<img>] + PATH bytes + [<imgpad>]*k + [</img>]`.
  Use it for prompts you write yourself.
* `encode_untrusted(text)`: for user text. No special token is ever produced, so typed `<|im_start|>`,
  `<img>/etc/passwd</img>` or `<box>` stay plain text and can neither forge a turn nor open a file.

Box/ref helpers (`from_list_format`, `draw_bbox_on_latest_picture`, ...) live in `grounding.py`; the methods
of the same names here only delegate, so code written for the official tokenizer keeps working.
"""
from __future__ import annotations

import base64
import binascii
import json
import re
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tiktoken

# Pre-tokenisation regex of the official tokenizer (qwen_vl.md §7.2). Digits are split one by one.
PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
ENDOFTEXT = "<|endoftext|>"
IMSTART = "<|im_start|>"
IMEND = "<|im_end|>"
EXTRAS = tuple(f"<|extra_{i}|>" for i in range(205))
REF_START, REF_END = "<ref>", "</ref>"
BOX_START, BOX_END = "<box>", "</box>"
QUAD_START, QUAD_END = "<quad>", "</quad>"
IMG_START, IMG_END, IMG_PAD = "<img>", "</img>", "<imgpad>"
IMAGE_ST = (REF_START, REF_END, BOX_START, BOX_END, QUAD_START, QUAD_END, IMG_START, IMG_END, IMG_PAD)
# Official order; ids are len(ranks) + index, e.g. 151643 + 0 = <|endoftext|> ... 151643 + 216 = <imgpad>.
SPECIAL_TOKENS = (ENDOFTEXT, IMSTART, IMEND) + EXTRAS + IMAGE_ST
IMAGE_SPAN = 256  # positions between <img> and </img> in Qwen-VL (= visual.n_queries); README: "258 tokens".
N_BYTE_IDS = 256  # ids 0..255 double as raw bytes inside an image span (id == byte value)


class SpecialTokenInImageSpan(ValueError, TypeError):
    """A special token between `<img>` and `</img>`.

    Also a TypeError because the official tokenizer fails with one there (`b''.join` meets a str token).
    """


def load_ranks(vocab_file: str | Path) -> dict[bytes, int]:
    """Read a `qwen.tiktoken` file: one `<base64 token bytes> <rank>` per line, LF or CRLF.

    Example: a file with lines `IQ== 0` and `Ig== 1` gives `{b"!": 0, b'"': 1}`.
    Ranks must be exactly 0..n-1 (special ids are appended after them).
    """
    path = Path(vocab_file)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer vocabulary not found: {path}")
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(path.read_bytes().splitlines(), start=1):
        if line.strip():
            token, rank = _parse_rank_line(line, path, lineno)
            if token in ranks:
                raise ValueError(f"{path}:{lineno}: token {token!r} appears twice (ranks {ranks[token]} and {rank})")
            ranks[token] = rank
    _check_contiguous(ranks, path)
    return ranks


def _parse_rank_line(line: bytes, path: Path, lineno: int) -> tuple[bytes, int]:
    """`b"IQ== 0"` -> `(b"!", 0)`; a clear ValueError naming the file and line otherwise."""
    parts = line.split()
    if len(parts) != 2 or not parts[1].isdigit():
        raise ValueError(f"{path}:{lineno}: expected '<base64 token> <rank>', got {line[:80]!r}")
    try:
        token = base64.b64decode(parts[0], validate=True)
    except binascii.Error as e:
        raise ValueError(f"{path}:{lineno}: token is not valid base64 ({e}): {parts[0][:80]!r}") from None
    return token, int(parts[1])


def _check_contiguous(ranks: dict[bytes, int], path: Path) -> None:
    """Special ids start at len(ranks), so the ranks must be exactly 0..n-1 and cover the 256 byte ids."""
    n = len(ranks)
    if n < N_BYTE_IDS:
        raise ValueError(f"{path}: {n} ranks; need at least {N_BYTE_IDS} (ids 0..255 carry image-path bytes)")
    if set(ranks.values()) != set(range(n)):
        missing = sorted(set(range(n)) - set(ranks.values()))[:5]
        raise ValueError(f"{path}: ranks are not exactly 0..{n - 1} (first missing: {missing})")


def _as_id_list(token_ids: Any) -> list[int]:
    """Accept an int, a list/tuple of ints, or a 1-D tensor/array: `5 -> [5]`, `tensor([1, 2]) -> [1, 2]`."""
    if hasattr(token_ids, "tolist"):  # torch.Tensor / numpy array, without importing either
        token_ids = token_ids.tolist()
    ids = [token_ids] if not hasattr(token_ids, "__iter__") or isinstance(token_ids, (str, bytes)) else list(token_ids)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):  # True would decode as id 1
        raise TypeError(f"token ids must be ints (a flat sequence), got {token_ids!r:.80}")
    return ids


class BatchEncoding(dict):
    """The dict `__call__` returns; attribute access and `.to(device)` like transformers' BatchEncoding."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: Any) -> "BatchEncoding":
        """Move tensor values to `device` (lists are left alone)."""
        return BatchEncoding({k: v.to(device) if hasattr(v, "to") else v for k, v in self.items()})


class QWenTokenizer:
    """Qwen(-VL) tokenizer on `tiktoken.Encoding`; ids identical to the official one on the same vocabulary."""

    IMAGE_ST = IMAGE_ST

    def __init__(self, vocab_file: str | Path, image_span: int = IMAGE_SPAN, errors: str = "replace") -> None:
        if image_span < 1:
            raise ValueError(f"{image_span=} must be >= 1 (positions between <img> and </img>)")
        self.vocab_file = str(vocab_file)
        self.image_span = image_span
        self.errors = errors
        self.padding_side = "right"
        self.mergeable_ranks = load_ranks(vocab_file)
        n_ranks = len(self.mergeable_ranks)
        self.special_tokens = {tok: n_ranks + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self._enc = tiktoken.Encoding(
            "qwen", pat_str=PAT_STR, mergeable_ranks=self.mergeable_ranks, special_tokens=self.special_tokens
        )
        self._set_ids()

    def _set_ids(self) -> None:
        """Named ids from `special_tokens` (with the real vocabulary: eod 151643 ... img_pad 151859)."""
        s = self.special_tokens
        self.eod_id, self.im_start_id, self.im_end_id = s[ENDOFTEXT], s[IMSTART], s[IMEND]
        self.ref_start_id, self.ref_end_id = s[REF_START], s[REF_END]
        self.box_start_id, self.box_end_id = s[BOX_START], s[BOX_END]
        self.quad_start_id, self.quad_end_id = s[QUAD_START], s[QUAD_END]
        self.img_start_id, self.img_end_id, self.img_pad_id = s[IMG_START], s[IMG_END], s[IMG_PAD]
        self.pad_token_id = self.eos_token_id = self.eod_id  # as finetune.py / the eval scripts set them
        # Kept by decode(skip_special_tokens=True, keep_image_special=True) (later official revision).
        self.image_special_ids = frozenset(s[t] for t in IMAGE_ST[:6])

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, **kwargs: Any) -> "QWenTokenizer":
        """Load `model_dir/qwen.tiktoken`; image_span from `config.json` `visual.n_queries` (default 256).

        Accepts (and ignores) `trust_remote_code`, `use_fast`, `revision`, so official call sites work;
        `padding_side` and `model_max_length` are stored as attributes.
        """
        model_dir = Path(model_dir)
        for ignored in ("trust_remote_code", "use_fast", "revision"):
            kwargs.pop(ignored, None)
        padding_side = kwargs.pop("padding_side", "right")
        model_max_length = kwargs.pop("model_max_length", None)
        kwargs.setdefault("image_span", _n_queries_from_config(model_dir / "config.json"))
        tok = cls(model_dir / "qwen.tiktoken", **kwargs)
        tok.padding_side, tok.model_max_length = padding_side, model_max_length
        return tok

    # ----------------------------------------------------------------------------------- sizes

    @property
    def n_vocab(self) -> int:
        """Ranks + 217 special tokens (151860 with the real vocabulary)."""
        return self._enc.n_vocab

    def __len__(self) -> int:
        return self.n_vocab

    # ---------------------------------------------------------------------------------- encode

    def encode(self, text: str, allowed_special: str | Iterable[str] = "all") -> list[int]:
        """TRUSTED text -> ids (official `tokenize`): NFC, specials parsed, `<img>` spans rewritten.

        Example: `encode("<img>a.jpg</img>")` -> `[151857, 97, 46, 106, 112, 103] + [151859]*251 + [151858]`.
        Never pass user text here: `<|im_start|>` or `<img>/etc/passwd</img>` in it would be obeyed.
        """
        text = unicodedata.normalize("NFC", text)
        allowed = self._allowed_set(allowed_special)
        ids = _tiktoken(lambda: self._enc.encode(text, allowed_special=allowed, disallowed_special=()), text)
        return self._expand_image_spans(ids)

    def encode_untrusted(self, text: str) -> list[int]:
        """User text -> ids with NO special token: every id is < eod_id, whatever the text.

        Example: `encode_untrusted("<|im_start|>")` -> `[27, 91, 318, 4906, 91, 29]` (plain text).
        Lone surrogates are replaced by tiktoken (U+FFFD), as in the official tokenizer.
        """
        text = unicodedata.normalize("NFC", text)
        return _tiktoken(lambda: self._enc.encode_ordinary(text), text)

    def _allowed_set(self, allowed_special: str | Iterable[str]) -> str | set[str]:
        if allowed_special == "all":
            return "all"
        if isinstance(allowed_special, str):
            raise ValueError(f"allowed_special must be 'all' or a collection of tokens, got {allowed_special!r}")
        allowed = set(allowed_special)
        unknown = allowed - set(self.special_tokens)
        if unknown:
            raise ValueError(f"allowed_special has unknown special tokens: {sorted(unknown)}")
        return allowed

    def _expand_image_spans(self, ids: list[int]) -> list[int]:
        """Rewrite each closed `<img> BPE… </img>` as `<img> bytes… <imgpad>… </img>` (image_span inside).

        Example (image_span=4): `[S, 64, E]` (path "a") -> `[S, 97, P, P, P, E]`; id 97 is the byte of "a".
        """
        out: list[int] = []
        pos = 0
        for start, end in self._closed_spans(ids):
            out += ids[pos:start]
            out += self._image_span_ids(ids[start + 1 : end])
            pos = end + 1
        return out + ids[pos:]

    def _closed_spans(self, ids: Sequence[int]) -> list[tuple[int, int]]:
        """(start, end) of each `<img>`…first following `</img>` pair, like the official `_replace_closed_tag`.

        Example: `[S, 1, E, E, S, E]` -> `[(0, 2), (4, 5)]` (a stray `</img>` outside a span is left alone).
        """
        spans, pos = [], 0
        while True:
            start = _index(ids, self.img_start_id, pos)
            if start == -1:
                return spans
            end = _index(ids, self.img_end_id, start)
            if end == -1:
                raise ValueError(f"Unclosed image token: <img> at token {start} has no </img> after it")
            spans.append((start, end))
            pos = end + 1

    def _image_span_ids(self, inner: list[int]) -> list[int]:
        """BPE ids of a path -> `[<img>] + raw UTF-8 byte values + pads up to image_span + [</img>]`."""
        specials = [i for i in inner if i >= self.eod_id]
        if specials:
            names = [self._enc.decode_single_token_bytes(i).decode() for i in specials]
            raise SpecialTokenInImageSpan(f"special tokens {names} inside <img>..</img>; a path must be plain text")
        path = self._enc.decode_bytes(inner)
        if len(path) > self.image_span:  # the official check; the model's own limit is 2 bytes lower
            raise ValueError(
                f"The content in <img>..</img> is too long: {len(path)} bytes > image_span {self.image_span} "
                f"(path {path[:60].decode('utf-8', 'replace')!r}...; the model reads a path of at most "
                f"image_span - 2 = {self.image_span - 2} bytes)"
            )
        pads = [self.img_pad_id] * (self.image_span - len(path))
        return [self.img_start_id, *path, *pads, self.img_end_id]

    def image_placeholder(self) -> list[int]:
        """`[<img>] + [<imgpad>]*image_span + [</img>]`: the span for an image given as pixels, not a path."""
        return [self.img_start_id] + [self.img_pad_id] * self.image_span + [self.img_end_id]

    def image_paths(self, token_ids: Any) -> list[str]:
        """The paths carried by the image spans, in order (see `image_paths_in_ids`).

        Example: `image_paths(encode("<img>a.jpg</img>"))` -> `["a.jpg"]`.
        """
        return image_paths_in_ids(token_ids, self.img_start_id)

    # ---------------------------------------------------------------------------------- __call__

    def __call__(
        self,
        text: str | list[str],
        padding: bool | str = False,
        padding_side: str | None = None,
        allowed_special: str | Iterable[str] = "all",
        return_tensors: str | None = None,
    ) -> BatchEncoding:
        """Like the official `tokenizer(text)`: `input_ids`, `token_type_ids` (zeros), `attention_mask`.

        Example: `tok("Hello world")` -> `{"input_ids": [9707, 1879], "token_type_ids": [0, 0],
        "attention_mask": [1, 1]}`. A list of texts with `padding="longest"` pads with `pad_token_id`
        on `padding_side` (default `self.padding_side`; the eval scripts use "left").
        """
        texts = [text] if isinstance(text, str) else list(text)
        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        rows = [self.encode(t, allowed_special) for t in texts]
        width = _pad_width(rows, padding)
        cols = [_row(r, width, self.pad_token_id, side) for r in rows]
        out = BatchEncoding({k: [c[k] for c in cols] for k in ("input_ids", "token_type_ids", "attention_mask")})
        if return_tensors is not None:
            return _as_tensors(out, return_tensors)  # [B, T] even for one text, as official
        return BatchEncoding({k: v[0] for k, v in out.items()}) if isinstance(text, str) else out

    # ---------------------------------------------------------------------------------- decode

    def decode(
        self,
        token_ids: Any,
        skip_special_tokens: bool = False,
        errors: str | None = None,
        keep_image_special: bool = False,
    ) -> str:
        """Ids -> text (official `_decode`): image spans become `<img>path</img>`, then UTF-8 with `errors`.

        Example: `decode([151851, 100737, 151852], skip_special_tokens=True)` -> `"狗"`;
        with `keep_image_special=True` -> `"<ref>狗</ref>"` (ref/box/quad tags survive, nothing else).
        """
        ids = _as_id_list(token_ids)
        bad = [i for i in ids if not 0 <= i < self.n_vocab]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.n_vocab}): {bad[:5]}")
        chunks, pos = [], 0
        for start, end in self._closed_spans(ids):
            chunks.append(self._decode_plain(ids[pos:start], skip_special_tokens, keep_image_special))
            chunks.append(self._decode_image_span(ids[start + 1 : end], start, skip_special_tokens))
            pos = end + 1
        chunks.append(self._decode_plain(ids[pos:], skip_special_tokens, keep_image_special))
        return b"".join(chunks).decode("utf-8", errors=errors or self.errors)

    def _decode_plain(self, ids: list[int], skip: bool, keep_image_special: bool) -> bytes:
        if skip:
            keep = self.image_special_ids if keep_image_special else frozenset()
            ids = [i for i in ids if i < self.eod_id or i in keep]
        return self._enc.decode_bytes(ids)

    def _decode_image_span(self, inner: list[int], start: int, skip: bool) -> bytes:
        """Bytes before the first `<imgpad>` are the path; a span with no pad cannot be decoded (as official)."""
        if self.img_pad_id not in inner:
            raise ValueError(f"image span at token {start} has no <imgpad>: cannot find where the path ends")
        path = inner[: inner.index(self.img_pad_id)]
        if any(not 0 <= t < N_BYTE_IDS for t in path):
            raise ValueError(f"image span at token {start} holds non-byte ids before <imgpad>: {path[:8]}")
        raw = bytes(path)
        raw.decode("utf-8")  # strict, as official: a path that is not UTF-8 raises UnicodeDecodeError
        return raw if skip else IMG_START.encode() + raw + IMG_END.encode()

    # ------------------------------------------------------------------ grounding (delegates)
    # Imported inside the methods: grounding.py imports this module's constants at its top.

    def from_list_format(self, list_format: list[dict]) -> str:
        """See `grounding.from_list_format`."""
        from qwenvl import grounding

        return grounding.from_list_format(list_format)

    def to_list_format(self, text: str) -> list[dict[str, str]]:
        """See `grounding.to_list_format`."""
        from qwenvl import grounding

        return grounding.to_list_format(text)

    def _fetch_latest_picture(self, response: str, history: list | None) -> str | None:
        """See `grounding._fetch_latest_picture`."""
        from qwenvl import grounding

        return grounding._fetch_latest_picture(response, history)

    def _fetch_all_box_with_ref(self, text: str) -> list[dict]:
        """See `grounding._fetch_all_box_with_ref`."""
        from qwenvl import grounding

        return grounding._fetch_all_box_with_ref(text)

    def draw_bbox_on_latest_picture(self, response: str, history: list | None = None, load_image: Any = None):
        """See `grounding.draw_bbox_on_latest_picture` (returns a PIL image, or None)."""
        from qwenvl import grounding

        return grounding.draw_bbox_on_latest_picture(response, history, load_image=load_image)


def _tiktoken(call: Any, text: str) -> list[int]:
    """Run a tiktoken encode; its regex overflows the stack on very long whitespace runs (about 1e5+ spaces)
    and panics with a BaseException that `except Exception` misses: turn that into a ValueError."""
    try:
        return call()
    except BaseException as e:
        if type(e).__name__ != "PanicException":
            raise
        longest = max((len(m) for m in re.findall(r"\s+", text)), default=0)
        raise ValueError(f"the tokenizer failed on this {len(text):,}-character text (its longest whitespace "
                         f"run is {longest:,} characters; tiktoken: {e}); shorten it") from None


def image_paths_in_ids(token_ids: Any, img_start_id: int) -> list[str]:
    """The paths in byte-carrying image spans, read exactly as the official model reads them.

    `</img>` is img_start_id + 1 and `<imgpad>` img_start_id + 2 (the model only knows the config's
    `image_start_id`). The model takes `ids[a+1 : b-1]` (the slot just before `</img>` is dropped) and cuts
    at the first `<imgpad>`, so a path must leave at least 2 pads: at most image_span - 2 = 254 bytes.
    Example (start 997): [5, 997, 97, 46, 112, 999, 999, 998] -> ["a.p"].
    """
    ids = _as_id_list(token_ids)
    starts = [i for i, t in enumerate(ids) if t == img_start_id]
    ends = [i for i, t in enumerate(ids) if t == img_start_id + 1]
    _check_pairs(starts, ends)
    return [_read_path(ids[a + 1 : b - 1], a, b, img_start_id + 2) for a, b in zip(starts, ends)]


def _read_path(window: list[int], a: int, b: int, pad_id: int) -> str:
    if pad_id not in window:
        raise ValueError(
            f"image span at tokens {a}..{b} has no <imgpad> in the {len(window)} slots the model reads: the path "
            f"is too long; a path may use at most image_span - 2 = {len(window) - 1} bytes"
        )
    path = window[: window.index(pad_id)]
    if any(not 0 <= t < N_BYTE_IDS for t in path):
        raise ValueError(f"image span at tokens {a}..{b} holds non-byte ids before <imgpad>: {path[:8]}")
    return bytes(path).decode("utf-8")


def _index(seq: Sequence[int], value: int, start: int) -> int:
    """Index of `value` in `seq[start:]` (absolute), or -1. Example: `_index([5, 6, 5], 5, 1)` -> 2."""
    for i in range(start, len(seq)):
        if seq[i] == value:
            return i
    return -1


def _check_pairs(starts: list[int], ends: list[int]) -> None:
    """The k-th `<img>` must close at the k-th `</img>`, before the next `<img>` (the model pairs them so)."""
    if len(starts) != len(ends):
        raise ValueError(f"{len(starts)} <img> tokens but {len(ends)} </img> tokens")
    nxt = starts[1:] + [float("inf")]
    for a, b, n in zip(starts, ends, nxt):
        if not a < b < n:
            raise ValueError(f"<img> at token {a} is not closed by the </img> at token {b} before the next <img>")


def _pad_width(rows: list[list[int]], padding: bool | str) -> int | None:
    """Target length: the longest row for `padding=True/"longest"`, None (no padding) for False."""
    if padding in (False, None, "do_not_pad"):
        return None
    if padding in (True, "longest"):
        return max((len(r) for r in rows), default=0)
    raise ValueError(f"padding must be False, True or 'longest', got {padding!r}")


def _row(ids: list[int], width: int | None, pad_id: int, side: str) -> dict[str, list[int]]:
    """One row padded to `width`. Example: `_row([7], 3, 0, "left")` -> ids `[0, 0, 7]`, mask `[0, 0, 1]`."""
    n_pad = 0 if width is None else width - len(ids)
    pad, real = [pad_id] * n_pad, ids
    input_ids = pad + real if side == "left" else real + pad
    mask = [0] * n_pad + [1] * len(ids) if side == "left" else [1] * len(ids) + [0] * n_pad
    return {"input_ids": input_ids, "token_type_ids": [0] * len(input_ids), "attention_mask": mask}


def _n_queries_from_config(config_path: Path) -> int:
    """`visual.n_queries` from a checkpoint's config.json, or 256 if there is no such file or key."""
    if not config_path.is_file():
        return IMAGE_SPAN
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path} is not valid JSON: {e}") from None
    return int((config.get("visual") or {}).get("n_queries", IMAGE_SPAN))


def _as_tensors(enc: BatchEncoding, return_tensors: str) -> BatchEncoding:
    """Lists of equal-length rows -> [B, T] long tensors (a single text becomes B = 1, as official)."""
    if return_tensors != "pt":
        raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
    lengths = sorted({len(r) for r in enc["input_ids"]})
    if len(lengths) > 1:
        raise ValueError(f"rows have different lengths {lengths}: pass padding='longest'")
    import torch  # only when asked for: the tokenizer itself does not need torch

    return BatchEncoding({k: torch.tensor(v, dtype=torch.long) for k, v in enc.items()})
