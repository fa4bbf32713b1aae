"""Chat with Qwen-VL(-Chat): ChatML rendering token-exact to the official `make_context`, stop words,
response decoding, and `chat` / `chat_stream` with the official signatures.

The text handled here is *trusted* (the Python API and the CLI, like the official `model.chat`): image
and box tags in it are honoured and `<img>path</img>` names a file or URL to load. User text from a
network client goes through `tokenizer.encode_untrusted` instead (see the server).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace

import torch
from torch import Tensor

from .config import GenerationConfig
from .generation import generate_stream
from .grounding import check_history, check_text
from .model import QWenLMHeadModel
from .sampling import SamplingParams
from .tokenizer import image_paths_in_ids

DEFAULT_SYSTEM = "You are a helpful assistant."   # what model.chat sends; make_context's own default is ""
History = list[tuple[str, str | None]]


def make_context(tokenizer, query: str, history: Sequence[tuple[str, str | None]] | None = None,
                 system: str = "", max_window_size: int = 6144, chat_format: str = "chatml") -> tuple[str, list[int]]:
    """(raw_text, context_tokens) exactly as the official `qwen_generation_utils.make_context`.

    ChatML: system block, then as many history turns as fit (newest first, while the total stays
    < max_window_size; the current query is always kept), then the query and `<|im_start|>assistant\\n`.
    Example: query "你好", no history, system "You are a helpful assistant." ->
    [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198, 108386,
     151645, 198, 151644, 77091, 198].
    """
    check_text("query", query)
    if chat_format == "raw":
        return query, tokenizer.encode(query)
    check_text("system", system)
    check_history(history)
    if chat_format != "chatml":
        raise ValueError(f"unknown {chat_format=}; expected 'chatml' or 'raw'")
    nl, start, end = tokenizer.encode("\n"), [tokenizer.im_start_id], [tokenizer.im_end_id]

    def block(role: str, content: str) -> tuple[str, list[int]]:
        tags = set(tokenizer.IMAGE_ST)
        ids = tokenizer.encode(role, allowed_special=tags) + nl + tokenizer.encode(content, allowed_special=tags)
        return f"<|im_start|>{role}\n{content}<|im_end|>", start + ids + end

    system_text, system_ids = block("system", system)
    turns_text, turns_ids = "", []
    for turn_query, turn_response in reversed(list(history or [])):
        text, ids = _history_turn(block, nl, turn_query, turn_response)
        if len(system_ids) + len(ids) + len(turns_ids) >= max_window_size:
            break
        turns_text, turns_ids = text + turns_text, ids + turns_ids
    query_text, query_ids = block("user", query)
    tail_ids = nl + query_ids + nl + start + tokenizer.encode("assistant") + nl
    raw_text = system_text + turns_text + "\n" + query_text + "\n<|im_start|>assistant\n"
    return raw_text, system_ids + turns_ids + tail_ids


def _history_turn(block, nl: list[int], query: str, response: str | None) -> tuple[str, list[int]]:
    q_text, q_ids = block("user", query)
    if response is None:                      # a turn without an answer: rendered as the official does
        return "\n" + q_text + "\n", nl + q_ids + nl
    r_text, r_ids = block("assistant", response)
    return "\n" + q_text + "\n" + r_text, nl + q_ids + nl + r_ids


def get_stop_words_ids(chat_format: str, tokenizer) -> list[list[int]]:
    """ChatML stops on <|im_end|> or <|im_start|>; raw on "Human:" or <|endoftext|>."""
    if chat_format == "chatml":
        return [[tokenizer.im_end_id], [tokenizer.im_start_id]]
    if chat_format == "raw":
        return [tokenizer.encode("Human:"), [tokenizer.eod_id]]
    raise ValueError(f"unknown {chat_format=}")


def decode_tokens(tokens: Sequence[int] | Tensor, tokenizer, raw_text_len: int, context_length: int,
                  chat_format: str = "chatml", errors: str = "replace") -> str:
    """The official `decode_tokens`: decode everything, drop the prompt text, cut at the first stop.

    Reference quirk kept for parity: in ChatML, when no <|im_start|>/<|im_end|> follows the prompt (the
    token budget ran out), the last generated token is dropped. `chat()` does not use this function.
    """
    tokens = tokens.tolist() if isinstance(tokens, Tensor) else list(tokens)
    if chat_format == "chatml":
        stops = (tokenizer.im_start_id, tokenizer.im_end_id)
        cut = context_length
        for cut in range(context_length, len(tokens)):
            if tokens[cut] in stops:
                break
        return tokenizer.decode(tokens[:cut], errors=errors)[raw_text_len:].strip()
    if chat_format == "raw":
        text = tokenizer.decode(tokens, errors=errors)[raw_text_len:]
        text = text.replace("<|endoftext|>", "").strip()
        return text.split("<|endoftext|>")[0].strip()
    raise ValueError(f"unknown {chat_format=}")


def response_tokens(new_ids: Sequence[int], tokenizer) -> list[int]:
    """The generated ids before the first <|im_start|>, <|im_end|> or <|endoftext|>."""
    stops = {tokenizer.im_start_id, tokenizer.im_end_id, tokenizer.eod_id}
    for i, tok in enumerate(new_ids):
        if tok in stops:
            return list(new_ids[:i])
    return list(new_ids)


def sampling_params(gen: GenerationConfig, stop_words_ids: Sequence[Sequence[int]] | None = None,
                    **overrides) -> SamplingParams:
    """SamplingParams from a generation config, with per-call overrides (official kwarg names)."""
    stops = stop_words_ids if stop_words_ids is not None else (gen.stop_words_ids or [])
    params = SamplingParams(max_new_tokens=gen.max_new_tokens, do_sample=gen.do_sample, temperature=gen.temperature,
                            top_k=gen.top_k, top_p=gen.top_p, repetition_penalty=gen.repetition_penalty,
                            stop_words_ids=tuple(tuple(s) for s in stops))
    known = {k: v for k, v in overrides.items() if v is not None and k in SamplingParams.__dataclass_fields__}
    unknown = set(overrides) - set(known) - {k for k, v in overrides.items() if v is None}
    if unknown:
        raise TypeError(f"unknown generation arguments: {sorted(unknown)}")
    if "stop_words_ids" in known:
        known["stop_words_ids"] = tuple(tuple(s) for s in known["stop_words_ids"])
    return replace(params, **known)


def load_span_images(ids: Sequence[int], model: QWenLMHeadModel, policy=None) -> Tensor | None:
    """Pixels [N, 3, S, S] for the paths named in the ids' image spans (trusted input), or None."""
    from .images import TRUSTED, load_image, preprocess_v1

    paths = image_paths_in_ids(ids, model.config.visual.image_start_id)
    if not paths:
        return None
    size = model.config.visual.image_size
    return torch.stack([preprocess_v1(load_image(p, policy or TRUSTED), size) for p in paths])


def chat_stream(model: QWenLMHeadModel, tokenizer, query: str, history: History | None = None,
                system: str = DEFAULT_SYSTEM, generation_config: GenerationConfig | None = None,
                stop_words_ids: Sequence[Sequence[int]] | None = None, generator: torch.Generator | None = None,
                **gen_kwargs) -> Iterator[str]:
    """Yield the whole response decoded so far after each new token (the official chat_stream contract).

    Tags such as <ref>/<box> stay in the text; the final value is exactly what `chat` returns.
    """
    gen = generation_config or GenerationConfig()
    if gen.chat_format != "chatml":
        raise ValueError(f"chat needs chat_format 'chatml'; this model's is {gen.chat_format!r} (use generate)")
    _, context = make_context(tokenizer, query, history, system, gen.max_window_size, "chatml")
    if len(context) > gen.max_window_size:
        raise ValueError(f"the prompt is {len(context)} tokens, over max_window_size={gen.max_window_size}; shorten it")
    stops = list(stop_words_ids or []) + get_stop_words_ids("chatml", tokenizer)
    params = sampling_params(gen, stop_words_ids=stops, **gen_kwargs)
    pixels = load_span_images(context, model)
    new: list[int] = []
    for step in generate_stream(model, torch.tensor([context]), params, images=pixels,
                                eos_token_id=gen.eos_token_id, generator=generator):
        new.append(int(step[0]))
        kept = response_tokens(new, tokenizer)
        if len(kept) < len(new):
            break
        yield tokenizer.decode(kept, errors="ignore")
    # The last value is the official `chat` response: decoded with errors="replace", stripped.
    yield tokenizer.decode(response_tokens(new, tokenizer), errors="replace").strip()


def chat(model: QWenLMHeadModel, tokenizer, query: str, history: History | None = None,
         system: str = DEFAULT_SYSTEM, append_history: bool = True, **kwargs) -> tuple[str, History]:
    """(response, history) like the official `model.chat`; history gets (query, response) appended."""
    response = ""
    for response in chat_stream(model, tokenizer, query, history, system, **kwargs):
        pass
    history = list(history or [])
    if append_history:
        history.append((query, response))
    return response, history
