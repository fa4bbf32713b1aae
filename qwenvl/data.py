"""Supervised chat data: the official fine-tune rendering (ChatML ids + labels) and batch collation.

`render_sft` reproduces `preprocess` of the official `finetune.py` token for token (golden cases in
tests/fixtures/finetune_golden.json): every piece is tokenized on its own with the trusted encoder and
the labels supervise every `<|im_start|>`, every block-closing `<|im_end|>` + `\\n` and the assistant
text — more than the replies alone; `assistant_only=True` supervises just the replies and their
`<|im_end|>`. Labels are not shifted (the loss shifts them).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

IGNORE_INDEX = -100
ROLES = ("user", "assistant")


class DataError(ValueError):
    """A training sample that cannot be rendered; the message names the sample and the problem."""


@dataclass
class Rendered:
    input_ids: list[int]
    labels: list[int]


def _check_roles(conversation: Sequence[dict], sample_id: str) -> list[dict]:
    if not conversation:
        raise DataError(f"sample {sample_id!r}: empty conversation")
    for i, turn in enumerate(conversation):
        if turn.get("from") not in ROLES:
            raise DataError(f"sample {sample_id!r}: turn {i} has role {turn.get('from')!r}; expected 'user' or 'assistant'")
        if not isinstance(turn.get("value"), str):
            raise DataError(f"sample {sample_id!r}: turn {i} has no text 'value'")
    # The official script drops the first message when it is not from the user (that one message only).
    return list(conversation[1:] if conversation[0]["from"] != "user" else conversation)


def render_sft(conversation: Sequence[dict], tokenizer, system_message: str = "You are a helpful assistant.",
               sample_id: str = "?", assistant_only: bool = False) -> Rendered:
    """ids and labels (unpadded) of one conversation `[{"from": "user"|"assistant", "value": str}, ...]`.

    Example (system "", one user turn "Hi", reply "Yo"): ids = <|im_start|> system \\n <|im_end|> \\n
    <|im_start|> user \\n Hi <|im_end|> \\n <|im_start|> assistant \\n Yo <|im_end|> \\n; the labels keep
    the three <|im_start|>, the three "<|im_end|> \\n" and "Yo" (official rule).
    """
    turns = _check_roles(conversation, sample_id)
    enc = tokenizer.encode
    nl, start, end = enc("\n"), [tokenizer.im_start_id], [tokenizer.im_end_id]
    system = start + enc("system") + nl + enc(system_message) + end + nl
    ign = [IGNORE_INDEX]
    ids = list(system)
    labels = ign * len(system) if assistant_only else start + ign * (len(system) - 3) + end + nl
    for turn in turns:
        role_ids = enc(f"<|im_start|>{turn['from']}")
        value = enc(turn["value"])
        ids += role_ids + nl + value + end + nl
        head = ign * (len(role_ids) + len(nl)) if assistant_only else start + ign * (len(role_ids) - 1 + len(nl))
        if turn["from"] == "user":
            labels += ign * len(role_ids + nl + value + end + nl) if assistant_only else head + ign * len(value) + end + nl
        else:
            labels += head + value + end + (ign * len(nl) if assistant_only else nl)
    return Rendered(ids, labels)


def pad_and_truncate(rendered: Rendered, max_len: int, pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """The official padding: right-pad ids with pad_id and labels with IGNORE to max_len, then cut to max_len.

    Returns int32 ids, int32 labels and the bool mask `ids != pad_id` (also False on a literal
    <|endoftext|> in the text, as in the official script).
    """
    n_pad = max(max_len - len(rendered.input_ids), 0)
    ids = (rendered.input_ids + [pad_id] * n_pad)[:max_len]
    labels = (rendered.labels + [IGNORE_INDEX] * n_pad)[:max_len]
    ids_t = torch.tensor(ids, dtype=torch.int32)
    return ids_t, torch.tensor(labels, dtype=torch.int32), ids_t != pad_id


def preprocess(sources: Sequence[Sequence[dict]], tokenizer, max_len: int,
               system_message: str = "You are a helpful assistant.") -> dict[str, Tensor]:
    """The official `preprocess(sources, tokenizer, max_len, system_message)`: a padded batch."""
    rows = [pad_and_truncate(render_sft(s, tokenizer, system_message, str(i)), max_len, tokenizer.pad_token_id)
            for i, s in enumerate(sources)]
    ids, labels, mask = zip(*rows)
    return {"input_ids": torch.stack(ids), "labels": torch.stack(labels), "attention_mask": torch.stack(mask)}


def collate(rows: Sequence[Rendered], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Right-pad to the longest row: input_ids [B, T] long, labels [B, T] long, attention_mask [B, T] long."""
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r.input_ids), torch.tensor(r.labels), 1
    return ids, labels, mask


def per_sample_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy of each row [B] over its supervised positions (labels shifted here).

    Weighing samples rather than tokens keeps a 24-token box answer from drowning a 1-token VQA answer.
    Rows without any supervised token get 0.
    """
    logits, targets = logits[:, :-1].float(), labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX,
                                             reduction="none")                      # [B, T-1]
    counts = (targets != IGNORE_INDEX).sum(1)
    return loss.sum(1) / counts.clamp(min=1)
