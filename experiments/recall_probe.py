"""Issue #3 diagnostic: does the demo LM's architecture learn in-context retrieval at all?

Every task that asks about one of several shapes needs the LM to bind a value to a key in its context and fetch it
for a later query (experiments/oracle_lm.py: with ideal image tokens, and even with the scene written as text, the
demo LM answers 2-shape questions at chance). This probe strips that to associative recall on random tokens:

    <s> k1 v1 k2 v2 <sep> kq  ->  vq          (keys from 40 ids, values from 40 ids; --pairs pairs)

and trains, in the same loop (AdamW lr 1e-3, batch 32, loss on vq only), either the demo LM's architecture
(QWenLMHeadModel with the shipped config, fresh, `init_weights(std)`) or a stock PyTorch pre-norm encoder of the
same width, depth and heads (learned positions, PyTorch's default init, or every matrix at N(0, --ref-std)).

    .venv/bin/python experiments/recall_probe.py --model qwen              # the demo LM
    .venv/bin/python experiments/recall_probe.py --model torch             # the stock encoder
    .venv/bin/python experiments/recall_probe.py --model torch --ref-std 0.02
    .venv/bin/python experiments/recall_probe.py --model qwen --std 0.05 --emb-std 1 --no-final-norm
Prints held-out accuracy every 100 steps (chance with 2 pairs: 0.5, or 1/40 for a model that ignores the context).
"""
from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
from torch import nn

from qwenvl.config import QWenConfig
from qwenvl.model import QWenLMHeadModel

ASSETS = Path(__file__).resolve().parents[1] / "qwenvl" / "assets" / "demo_model"
KEYS, VALUES, BOS, SEP = range(100, 140), range(200, 240), 1, 2

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", choices=("qwen", "torch"), default="qwen")
parser.add_argument("--pairs", type=int, default=2)
parser.add_argument("--steps", type=int, default=600)
parser.add_argument("--std", type=float, default=0.02, help="init_weights std of the demo LM")
parser.add_argument("--emb-std", type=float, help="the demo LM's token embeddings at N(0, emb_std) instead")
parser.add_argument("--no-final-norm", action="store_true", help="the demo LM without ln_f (an identity instead)")
parser.add_argument("--ref-std", type=float, help="the stock encoder with every matrix at N(0, ref_std)")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
torch.manual_seed(args.seed)
config = QWenConfig.from_json(ASSETS / "config.json")


class StockEncoder(nn.Module):
    """PyTorch's pre-norm TransformerEncoder at the demo LM's width, depth and heads, with learned positions."""

    def __init__(self, width: int, layers: int, heads: int, vocab: int):
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, width), nn.Embedding(64, width)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        h = self.embed(ids) + self.pos(torch.arange(t))                                  # [B, T, C]
        causal = nn.Transformer.generate_square_subsequent_mask(t)
        return self.out(self.encoder(h, mask=causal, is_causal=True))                    # [B, T, V]


def build() -> nn.Module:
    if args.model == "qwen":
        model = QWenLMHeadModel(config)
        model.init_weights(torch.Generator().manual_seed(args.seed), std=args.std)
        model.transformer.visual.requires_grad_(False)
        if args.emb_std is not None:
            nn.init.normal_(model.transformer.wte.weight, std=args.emb_std)
        if args.no_final_norm:
            model.transformer.ln_f = nn.Identity()
        return model
    model = StockEncoder(config.hidden_size, config.num_hidden_layers, config.num_attention_heads, 256)
    if args.ref_std is not None:
        for p in model.parameters():
            if p.ndim == 2:
                nn.init.normal_(p, std=args.ref_std)
    return model


def batch(rng: random.Random, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [n, 2 * pairs + 3] ending with the query key, and the value to answer [n]."""
    ids, answers = [], []
    for _ in range(n):
        keys = rng.sample(KEYS, args.pairs)
        values = [rng.choice(VALUES) for _ in keys]
        q = rng.randrange(args.pairs)
        ids.append([BOS] + [t for kv in zip(keys, values) for t in kv] + [SEP, keys[q]])
        answers.append(values[q])
    return torch.tensor(ids), torch.tensor(answers)


model = build()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
rng, t0 = random.Random(args.seed), time.time()
for step in range(1, args.steps + 1):
    ids, answers = batch(rng, 32)
    loss = nn.functional.cross_entropy(model(ids)[:, -1].float(), answers)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if step % 100 == 0:
        with torch.no_grad():
            ids, answers = batch(random.Random(f"heldout-{args.seed}"), 200)
            accuracy = (model(ids)[:, -1].argmax(-1) == answers).float().mean().item()
        print(f"step {step} loss {loss.item():.3f} held-out accuracy {accuracy:.2f} {time.time() - t0:.0f}s",
              flush=True)
