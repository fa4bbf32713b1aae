"""Issue #3 diagnostic: can the demo model's LM learn grounding when the visual features are ideal?

The shipped demo model grounds at 1% (Acc@0.5). Earlier sessions located the loss in the visual side (a probe finds
the referred box in the ViT's patch tokens) and then in "turning features into coordinate digits". This script
separates the two: it replaces the vision tower by an *oracle* that builds the 64 image tokens (an 8x8 grid of cells,
as the demo model's 64 resampler queries) from the scene's ground truth, and trains only the LM (demo config: 4
layers, width 256) on English grounding (the synthetic world's prompts and answers, raw format, per-sample loss).

Oracle features per cell: a learned vector for the colour and for the shape of the object that covers the cell (the
topmost whose box covers most of it; else a learned background vector) plus a fixed sin-cos code of the cell, plus,
with --features box, a learned code of that object's box (one-hot hundreds and tens digits of x1, y1, x2, y2 in the
[0, 1000) space: what a ViT taught per-patch boxes would ideally carry). With --features cell the LM must infer the
box from which cells the object covers (what a ViT without box targets gives at best).

    .venv/bin/python experiments/oracle_grounding.py --features box --objects 1 3 --steps 1500
Prints Acc@0.5 (greedy, held-out scenes) every --eval-every steps. Results are in the README (issue #3 section).
"""
from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
from torch import nn

from qwenvl.config import QWenConfig
from qwenvl.data import IGNORE_INDEX, Rendered, collate, per_sample_loss
from qwenvl.generation import generate, left_pad
from qwenvl.evaluation.refcoco import precision_at_1
from qwenvl.model import QWenLMHeadModel
from qwenvl.sampling import SamplingParams
from qwenvl.synthetic import SceneSpec, build_task, to_conversations
from qwenvl.synthetic_scenes import box_1000
from qwenvl.synthetic_world import COLOURS, SHAPES
from qwenvl.tokenizer import QWenTokenizer
from qwenvl.train import adamw, autocast, cosine_lr, resolve_train_dtype
from qwenvl.vision import sincos_pos_table

ASSETS = Path(__file__).resolve().parents[1] / "qwenvl" / "assets" / "demo_model"
GRID = 8

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--features", choices=("box", "cell"), default="box")
parser.add_argument("--objects", type=int, nargs=2, default=(1, 3))
parser.add_argument("--steps", type=int, default=1500)
parser.add_argument("--batch", type=int, default=32)
parser.add_argument("--lr", type=float, default=1e-3)
parser.add_argument("--init", choices=("fresh", "shipped"), default="shipped", help="LM weights to start from")
parser.add_argument("--eval-every", type=int, default=250)
parser.add_argument("--eval-n", type=int, default=100)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
torch.manual_seed(args.seed)

config = QWenConfig.from_json(ASSETS / "config.json")
tok = QWenTokenizer(ASSETS / "qwen.tiktoken", image_span=config.visual.n_queries)
assert config.visual.n_queries == GRID * GRID
model = QWenLMHeadModel(config)
if args.init == "shipped":
    from qwenvl.weights import load_model
    model.load_state_dict(load_model(ASSETS, dtype=torch.float32).state_dict())
else:
    model.init_weights(torch.Generator().manual_seed(args.seed))
model.transformer.visual.requires_grad_(False)
SPEC = SceneSpec(n_objects=tuple(args.objects), n_texts=(0, 0))


class Oracle(nn.Module):
    """Ground-truth scenes -> image tokens."""

    def __init__(self, dim: int, with_box: bool):
        super().__init__()
        self.colour, self.shape = nn.Embedding(len(COLOURS), dim), nn.Embedding(len(SHAPES), dim)
        self.background = nn.Parameter(torch.zeros(dim))
        self.box = nn.Linear(4 * 20, dim, bias=False) if with_box else None
        self.register_buffer("cells", sincos_pos_table(dim, GRID))
        for p in (self.colour.weight, self.shape.weight):
            nn.init.normal_(p, std=0.5)
        if self.box is not None:
            nn.init.normal_(self.box.weight, std=0.5)

    def forward(self, scenes) -> torch.Tensor:
        """scenes -> image tokens [N, 64, C]."""
        colour, shape, codes, has = [], [], [], []
        for scene in scenes:
            owners = cell_owners(scene)                                       # [64] object index or -1
            for k in owners:
                ob = scene.objects[k] if k >= 0 else None
                has.append(ob is not None)
                colour.append(list(COLOURS).index(ob.colour) if ob else 0)
                shape.append(list(SHAPES).index(ob.kind) if ob else 0)
                codes.append(box_code(box_1000(ob.bbox, scene.width, scene.height)) if ob else torch.zeros(80))
        feat = self.colour(torch.tensor(colour)) + self.shape(torch.tensor(shape))    # [N*64, C]
        if self.box is not None:
            feat = feat + self.box(torch.stack(codes))
        feat = torch.where(torch.tensor(has)[:, None], feat, self.background)
        return feat.view(len(scenes), GRID * GRID, -1) + self.cells                   # [N, 64, C]


def cell_owners(scene) -> list[int]:
    """Per cell of the 8x8 grid, the topmost object whose box covers most of the cell (>= 30% of it, or the cell
    holding its centre), else -1."""
    cw, ch = scene.width / GRID, scene.height / GRID
    owners = [-1] * (GRID * GRID)
    for k, ob in enumerate(scene.objects):                   # drawing order: later ones win
        x1, y1, x2, y2 = ob.bbox
        centre = (int((x1 + x2) / 2 // cw), int((y1 + y2) / 2 // ch))
        for r in range(GRID):
            for c in range(GRID):
                ox = max(0.0, min(x2, (c + 1) * cw) - max(x1, c * cw))
                oy = max(0.0, min(y2, (r + 1) * ch) - max(y1, r * ch))
                if ox * oy >= 0.3 * cw * ch or (c, r) == centre:
                    owners[r * GRID + c] = k
    return owners


def box_code(box) -> torch.Tensor:
    """One-hot hundreds and tens digits of each coordinate: [80]."""
    code = torch.zeros(4 * 20)
    for i, v in enumerate(box):
        v = min(max(int(v), 0), 999)
        code[i * 20 + v // 100] = 1.0
        code[i * 20 + 10 + (v // 10) % 10] = 1.0
    return code


oracle = Oracle(config.hidden_size, args.features == "box")


def sample(rng: random.Random):
    result = build_task(rng, "grounding", "en", SPEC)
    conv = to_conversations(result, ["0"])
    return conv, result


def batch(rng: random.Random, n: int) -> dict:
    rows, scenes = [], []
    for _ in range(n):
        conv, result = sample(rng)
        prompt, answer = tok.encode(conv[0]["value"]), tok.encode(conv[1]["value"]) + [tok.eod_id]
        rows.append(Rendered(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer))
        scenes.append(result.scenes[0])
    ids, labels, mask = collate(rows, tok.pad_token_id)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "image_features": oracle(scenes)}


@torch.no_grad()
def evaluate(n: int) -> float:
    model.eval()
    rng, answers, truths, sizes = random.Random(f"heldout-{args.seed}"), [], [], []
    for start in range(0, n, 25):
        items = [sample(rng) for _ in range(min(25, n - start))]
        ids, mask = left_pad([tok.encode(conv[0]["value"]) for conv, _ in items], tok.pad_token_id)
        feats = oracle([r.scenes[0] for _, r in items])
        out = generate(model, ids, SamplingParams(max_new_tokens=40, do_sample=False), attention_mask=mask,
                       image_features=feats, eos_token_id=tok.eod_id)
        for row, (_, r) in zip(out.tolist(), items):
            answers.append(tok.decode([t for t in row if t != tok.eod_id]))
            truths.append(r.fields["bbox"])
            sizes.append((r.fields["width"], r.fields["height"]))
    print(f"  e.g. {answers[-1]!r} (truth {truths[-1]} px)", flush=True)
    # the world writes boxes with to_1000 (x * 1000 / width): scale 1000, not the official 999
    model.train()
    return precision_at_1(answers, truths, sizes, scale=1000)["precision@1"]


params = [p for p in model.parameters() if p.requires_grad] + list(oracle.parameters())
opt = adamw(params, args.lr)
rng, t0 = random.Random(args.seed), time.time()
print(f"features={args.features} objects={args.objects} init={args.init} lr={args.lr} batch={args.batch}", flush=True)
model.train()
for step in range(1, args.steps + 1):
    for group in opt.param_groups:
        group["lr"] = cosine_lr(step, args.steps, args.lr, min(100, args.steps // 10))
    b = batch(rng, args.batch)
    with autocast(resolve_train_dtype("auto")):
        logits = model(b["input_ids"], image_features=b["image_features"], attention_mask=b["attention_mask"])
    loss = per_sample_loss(logits, b["labels"]).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if step % 50 == 0:
        print(f"step {step} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
    if step % args.eval_every == 0 or step == args.steps:
        print(f"step {step} samples {step * args.batch} Acc@0.5 {evaluate(args.eval_n):.2f} "
              f"{time.time() - t0:.0f}s", flush=True)
