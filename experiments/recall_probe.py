"""Issue #3 diagnostic: does the demo LM's architecture learn in-context retrieval at all?

Every task that asks about one of several shapes needs the LM to bind a value to a key in its context and fetch it
for a later query (experiments/oracle_lm.py: with ideal image tokens, and even with the scene written as text, the
demo LM answers 2-shape questions at chance). This probe strips that to associative recall on random tokens:

    <s> k1 v1 k2 v2 <sep> kq [gap] vq ...     (keys from 40 ids, values from 40 ids; --pairs pairs, --queries
                                               queries each answered, --gap filler tokens between kq and vq)

and trains, in the same loop (AdamW lr 1e-3, batch 32, loss on the answers), either the demo LM's architecture
(QWenLMHeadModel with the shipped config, fresh, `init_weights(std)`) or a stock PyTorch pre-norm encoder of the
same width, depth and heads (learned positions, PyTorch's default init, or every matrix at N(0, --ref-std)).
`--optim recipe` uses the recipe's optimiser instead (train.adamw, cosine schedule, clipping).

    .venv/bin/python experiments/recall_probe.py --model qwen              # the demo LM
    .venv/bin/python experiments/recall_probe.py --model torch             # the stock encoder
    .venv/bin/python experiments/recall_probe.py --model torch --ref-std 0.02
    .venv/bin/python experiments/recall_probe.py --model qwen --std 0.05 --emb-std 1 --no-final-norm
    # the query one token before the answer (as "the square?"): learned only with gap-0 queries mixed in,
    # ln_f put back once the retrieval works
    .venv/bin/python experiments/recall_probe.py --model qwen --std 0.05 --emb-std 1 --no-final-norm \
        --gap 0 1 --steps 1400 --norm-from 1000
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
from qwenvl.text import RMSNorm
from qwenvl.train import adamw, cosine_lr

ASSETS = Path(__file__).resolve().parents[1] / "qwenvl" / "assets" / "demo_model"
KEYS, VALUES, BOS, SEP, GAP = range(100, 140), range(200, 240), 1, 2, 3

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", choices=("qwen", "torch"), default="qwen")
parser.add_argument("--pairs", type=int, default=2)
parser.add_argument("--steps", type=int, default=600)
parser.add_argument("--std", type=float, default=0.02, help="init_weights std of the demo LM")
parser.add_argument("--emb-std", type=float, help="the demo LM's token embeddings at N(0, emb_std) instead")
parser.add_argument("--no-final-norm", action="store_true", help="the demo LM without ln_f (an identity instead)")
parser.add_argument("--norm-from", type=int,
                    help="with --no-final-norm: put ln_f back at this step (weight = the residual's mean RMS there)")
parser.add_argument("--ref-std", type=float, help="the stock encoder with every matrix at N(0, ref_std)")
parser.add_argument("--queries", type=int, default=1, help="queries per sequence, each one supervised")
parser.add_argument("--gap", type=int, nargs="+", default=[0],
                    help="filler tokens after the query key (the question's '?'); several: one drawn per query in "
                         "training, the last one held out")
parser.add_argument("--lr", type=float, default=1e-3)
parser.add_argument("--optim", choices=("plain", "recipe"), default="plain",
                    help="plain AdamW at a constant rate, or the recipe's (train.adamw, cosine schedule, clip 1)")
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


def batch(rng: random.Random, n: int, gaps: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [n, 2 * pairs + 1 + queries * (2 + gap)] and the values to answer [n, queries], -100 elsewhere.

    Each query is `kq [GAP] * gap` followed by its value (teacher-forced for the next query)."""
    ids, labels = [], []
    for _ in range(n):
        keys = rng.sample(KEYS, args.pairs)
        values = [rng.choice(VALUES) for _ in keys]
        row = [BOS] + [t for kv in zip(keys, values) for t in kv] + [SEP]
        target = [-100] * len(row)
        for _ in range(args.queries):
            q = rng.randrange(args.pairs)
            gap = rng.choice(gaps)
            row += [keys[q]] + [GAP] * gap + [values[q]]
            target += [-100] * gap + [values[q], -100]
        ids.append(row[:-1])
        labels.append(target[:-1])
    width = max(map(len, ids))                                    # right padding: harmless under causal attention
    return (torch.tensor([r + [GAP] * (width - len(r)) for r in ids]),
            torch.tensor([r + [-100] * (width - len(r)) for r in labels]))


model = build()
params = [p for p in model.parameters() if p.requires_grad]
opt = adamw(params, args.lr) if args.optim == "recipe" else torch.optim.AdamW(params, lr=args.lr)
rng, t0 = random.Random(args.seed), time.time()
def restore_final_norm(ids: torch.Tensor) -> None:
    """Swap the identity back for an RMSNorm that scales by the residual's current mean RMS (same logits on average)."""
    seen = []
    hook = model.transformer.ln_f.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    with torch.no_grad():
        model(ids)
    hook.remove()
    norm = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
    norm.weight.data.fill_(seen[0].pow(2).mean(-1).sqrt().mean().item())
    model.transformer.ln_f = norm
    opt.add_param_group({"params": [norm.weight], "weight_decay": 0.0})
    print(f"ln_f back at step {step}, weight {norm.weight[0].item():.2f}", flush=True)


for step in range(1, args.steps + 1):
    ids, labels = batch(rng, 32, args.gap)
    if step == args.norm_from:
        restore_final_norm(ids)
    loss = nn.functional.cross_entropy(model(ids).flatten(0, 1).float(), labels.flatten())
    loss.backward()
    if args.optim == "recipe":
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step - 1, args.steps, args.lr, min(100, args.steps // 10))
        nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if step % 100 == 0:
        with torch.no_grad():
            ids, labels = batch(random.Random(f"heldout-{args.seed}"), 200, args.gap[-1:])
            first = (labels != -100).int().argmax(1)                                     # the first query's answer
            rows = torch.arange(len(ids))
            accuracy = (model(ids)[rows, first].argmax(-1) == labels[rows, first]).float().mean().item()
        print(f"step {step} loss {loss.item():.3f} held-out accuracy {accuracy:.2f} {time.time() - t0:.0f}s",
              flush=True)
