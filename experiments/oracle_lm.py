"""Issue #3 diagnostic: can the demo model's LM learn the tasks when the visual features are ideal?

The shipped demo model grounds at 1% (Acc@0.5) and answers VQA near its language prior. This script separates the
LM from the vision side: it replaces the vision tower by an *oracle* that builds the 64 image tokens (an 8x8 grid of
cells, as the demo model's 64 resampler queries) from the scene's ground truth, and trains only the LM (demo config:
4 layers, width 256) on synthetic tasks (the world's prompts and answers, raw format, per-sample loss).

Oracle features per cell: a learned vector for the colour and for the shape of the object that covers the cell (the
topmost whose box covers most of it; else a learned background vector) plus a fixed sin-cos code of the cell, plus,
with --features box, a learned code of that object's box (one-hot hundreds and tens digits of x1, y1, x2, y2 in the
[0, 1000) space: what a ViT taught per-patch boxes would ideally carry). With --features cell the LM must infer the
box from which cells the object covers (what a ViT without box targets gives at best).

Options that probe how the LM learns to pick the asked object (the results are in the README, issue #3 section):
  --warm-steps N   the first N steps on one-object scenes (a curriculum)
  --guide W        an attention loss (weight W) pulling --guide-heads heads of --guide-layer, at every position that
                   predicts an answer token, onto the cells of the shapes the answer depends on (`fields["objects"]`)
  --text-steps N   first train the LM on the same questions about scenes *written as text* ("Scene: a small red
                   circle; a large blue square.\nWhat colour is the square?"): retrieval from context, no image
  --init fresh [--heads H]   a randomly initialised LM instead of the shipped one (optionally H heads)

    .venv/bin/python experiments/oracle_lm.py --tasks grounding --features box --objects 1 3 --steps 1500
    .venv/bin/python experiments/oracle_lm.py --tasks vqa_colour --objects 1 5 --steps 300 --guide 1 --warm-steps 60
Prints held-out accuracy per task (greedy; grounding: IoU >= 0.5), split by the number of shapes in the scene.
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
from qwenvl.model import QWenLMHeadModel, image_span_mask
from qwenvl.sampling import SamplingParams
from qwenvl.synthetic import SceneSpec, answer_is_right, build_task, describe_scene, to_conversations
from qwenvl.synthetic_tasks import TASKS
from qwenvl.synthetic_scenes import box_1000
from qwenvl.synthetic_world import COLOURS, SHAPES
from qwenvl.tokenizer import QWenTokenizer
from qwenvl.train import adamw, autocast, bypass_final_norm, cosine_lr, resolve_train_dtype, restore_final_norm
from qwenvl.vision import sincos_pos_table

ASSETS = Path(__file__).resolve().parents[1] / "qwenvl" / "assets" / "demo_model"
GRID = 8

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--features", choices=("box", "cell"), default="box")
parser.add_argument("--tasks", nargs="+", default=["grounding"], help="synthetic tasks to train and score")
parser.add_argument("--objects", type=int, nargs=2, default=(1, 3))
parser.add_argument("--steps", type=int, default=1500)
parser.add_argument("--warm-steps", type=int, default=0, help="first steps on one-object scenes (a curriculum)")
parser.add_argument("--batch", type=int, default=32)
parser.add_argument("--lr", type=float, default=1e-3)
parser.add_argument("--init", choices=("fresh", "shipped", "stage"), default="shipped",
                    help="LM weights to start from: fresh, the shipped model's, or a train_demo.py stage's (--stage)")
parser.add_argument("--stage", type=Path, help="a train_demo.py stage's model.pt (e.g. runs/demo/lm_pretrain/model.pt; "
                                               "stages before 3 have no ln_f, which is then bypassed)")
parser.add_argument("--heads", type=int, help="attention heads of a fresh LM (same width; kv_channels = width / heads)")
parser.add_argument("--restore-norm", action="store_true",
                    help="with a bypassed ln_f (--recall-init, a stage before 3): put it back before training, "
                         "its weight at the residual's mean RMS on a text batch (as train_demo.py does)")
parser.add_argument("--recall-init", action="store_true",
                    help="a fresh LM as recall_probe.py learns retrieval: ln_f an identity, embeddings N(0, 1), std 0.05")
parser.add_argument("--eval-every", type=int, default=250)
parser.add_argument("--eval-n", type=int, default=100)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--text-steps", type=int, default=0,
                    help="first train the LM on the same questions about scenes written as text (no image)")
parser.add_argument("--short", type=float, default=0.0,
                    help="share of training questions (text and image) without their final '?' (the asked word then "
                         "sits where the answer is predicted: retrieval without the extra hop)")
parser.add_argument("--guide", type=float, default=0.0,
                    help="weight of an attention loss pointing heads of --guide-layer at the asked objects' cells")
parser.add_argument("--guide-layer", type=int, default=1)
parser.add_argument("--guide-heads", type=int, default=1)
args = parser.parse_args()
torch.manual_seed(args.seed)

config = QWenConfig.from_json(ASSETS / "config.json")
if args.heads:
    assert args.init == "fresh", "--heads changes the architecture: only with --init fresh"
    config = QWenConfig.from_dict({**config.to_dict(), "num_attention_heads": args.heads,
                                   "kv_channels": config.hidden_size // args.heads})
tok = QWenTokenizer(ASSETS / "qwen.tiktoken", image_span=config.visual.n_queries)
assert config.visual.n_queries == GRID * GRID
model = QWenLMHeadModel(config)
if args.init == "shipped":
    from qwenvl.weights import load_model
    model.load_state_dict(load_model(ASSETS, dtype=torch.float32).state_dict())
elif args.init == "stage":
    state = torch.load(args.stage, map_location="cpu", weights_only=True)
    if "transformer.ln_f.weight" not in state:
        bypass_final_norm(model)
    model.load_state_dict(state)
elif args.recall_init:
    model.init_weights(torch.Generator().manual_seed(args.seed), std=0.05)
    nn.init.normal_(model.transformer.wte.weight, std=1.0)
    model.transformer.ln_f = nn.Identity()
else:
    model.init_weights(torch.Generator().manual_seed(args.seed))
model.transformer.visual.requires_grad_(False)
SPEC = SceneSpec(n_objects=tuple(args.objects), n_texts=(0, 0))
WARM_SPEC = SceneSpec(n_objects=(1, 1), n_texts=(0, 0))


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


def sample(rng: random.Random, task: str | None = None, lang: str | None = None, spec: SceneSpec = SPEC):
    task = task or rng.choice(args.tasks)
    result = build_task(rng, task, lang or rng.choice(TASKS[task].langs), spec)
    conv = to_conversations(result, [str(k) for k in range(len(result.scenes))])
    return conv, result


def batch(rng: random.Random, n: int, spec: SceneSpec = SPEC) -> dict:
    rows, scenes, targets = [], [], []
    for _ in range(n):
        conv, result = sample(rng, spec=spec)
        question = conv[0]["value"].rstrip("?？") if args.short and rng.random() < args.short else conv[0]["value"]
        prompt, answer = tok.encode(question), tok.encode(conv[1]["value"]) + [tok.eod_id]
        rows.append(Rendered(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer))
        scenes.extend(result.scenes)
        if args.guide:                                       # only the attention guide needs the asked cells
            asked = set(result.fields.get("objects", [])) if len(result.scenes) == 1 else set()
            targets.append([k in asked for k in cell_owners(result.scenes[0])] if result.scenes else [False] * GRID ** 2)
    ids, labels, mask = collate(rows, tok.pad_token_id)
    b = {"input_ids": ids, "labels": labels, "attention_mask": mask, "image_features": oracle(scenes)}
    if args.guide:
        b["targets"] = torch.tensor(targets)                                           # [B, 64] cells asked about
    return b


def text_batch(rng: random.Random, n: int) -> dict:
    """The tasks' questions and answers about scenes described in words: retrieval from context, no image."""
    rows = []
    for _ in range(n):
        task = rng.choice(args.tasks)
        lang = rng.choice(TASKS[task].langs)
        r = build_task(rng, task, lang, SPEC)
        question = r.turns[0][0].rstrip("?？") if args.short and rng.random() < args.short else r.turns[0][0]
        prompt = tok.encode(describe_scene(r.scenes[0], lang, boxes=False) + "\n" + question)
        answer = tok.encode(r.turns[0][1]) + [tok.eod_id]
        rows.append(Rendered(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer))
    ids, labels, mask = collate(rows, tok.pad_token_id)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def tally(by_n: dict[int, list[bool]]) -> str:
    """e.g. {1: [True, True], 2: [True, False]} -> "1: 2/2 2: 1/2"."""
    return " ".join(f"{k}: {sum(v)}/{len(v)}" for k, v in sorted(by_n.items()))


@torch.no_grad()
def text_accuracy(n: int = 100) -> float:
    """Share of right answers on n held-out English questions per task about scenes written as text (mean over
    tasks); prints each task's, split by the number of shapes."""
    model.eval()
    shares = []
    for k, task in enumerate(args.tasks):
        seed = "text-heldout" if k == 0 else f"text-heldout-{task}"           # the first task's set as in session 13
        rng, right, by_n = random.Random(seed), 0, {}
        for _ in range(n):
            r = build_task(rng, task, "en", SPEC)
            ids = torch.tensor([tok.encode(describe_scene(r.scenes[0], "en", boxes=False) + "\n" + r.turns[0][0])])
            out = generate(model, ids, SamplingParams(max_new_tokens=10, do_sample=False), eos_token_id=tok.eod_id)
            ok = answer_is_right(r.task, r.fields, tok.decode([t for t in out[0].tolist() if t != tok.eod_id]))
            right += ok
            by_n.setdefault(len(r.scenes[0].objects), []).append(ok)
        print(f"  text {task} by number of shapes: " + tally(by_n))
        shares.append(right / n)
    model.train()
    return sum(shares) / len(shares)


class Recorder:
    """Swapped in as one attention module's `attend`: plain softmax attention that keeps its probabilities."""

    def __init__(self):
        self.probs = None

    def __call__(self, q, k, v, mask):
        scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5                         # [B, H, T, S]
        scores = scores.masked_fill(~mask, float("-inf")) if mask is not None else scores
        self.probs = scores.softmax(-1)
        return self.probs @ v


def guide_loss(probs, b) -> torch.Tensor:
    """-log(attention mass on the asked cells) of the first --guide-heads heads, at every position that predicts an
    answer token, averaged over the rows that ask about some shape."""
    inside = image_span_mask(b["input_ids"], config.visual.image_start_id, config.visual.n_queries)   # [B, T]
    rows = b["targets"].any(1) & (inside.sum(1) == config.visual.n_queries)
    if not rows.any():
        return probs.new_zeros(())
    predicting = torch.zeros_like(b["labels"], dtype=torch.bool)
    predicting[:, :-1] = b["labels"][:, 1:] != IGNORE_INDEX                           # [B, T]
    cell_of = inside.long().cumsum(1) - 1                                              # [B, T] slot index in the span
    keys = torch.zeros(probs.shape[0], probs.shape[-1], dtype=torch.bool)
    keys[inside] = b["targets"].gather(1, cell_of.clamp(min=0))[inside]                # [B, S] asked cells
    mass = (probs[:, :args.guide_heads] * keys[:, None, None, :]).sum(-1)              # [B, h, T]
    nll = -(mass + 1e-6).log().mean(1)                                                 # [B, T]
    use = predicting & rows[:, None]
    return (nll * use).sum() / use.sum().clamp(min=1)


@torch.no_grad()
def evaluate(n: int) -> dict[str, float]:
    """Per task (English), the share of right answers (grounding: IoU >= 0.5) on n held-out items."""
    model.eval()
    scores = {}
    for task in args.tasks:
        rng, right, by_n = random.Random(f"heldout-{args.seed}-{task}"), 0, {}
        for start in range(0, n, 25):
            items = [sample(rng, task, "en") for _ in range(min(25, n - start))]
            ids, mask = left_pad([tok.encode(conv[0]["value"]) for conv, _ in items], tok.pad_token_id)
            feats = oracle([scene for _, r in items for scene in r.scenes])
            out = generate(model, ids, SamplingParams(max_new_tokens=40, do_sample=False), attention_mask=mask,
                           image_features=feats, eos_token_id=tok.eod_id)
            for row, (_, r) in zip(out.tolist(), items):
                answer = tok.decode([t for t in row if t != tok.eod_id])
                ok = answer_is_right(r.task, r.fields, answer)
                right += ok
                n_obj = len(r.scenes[0].objects) if r.scenes else 0
                by_n.setdefault(n_obj, []).append(ok)
        print(f"  e.g. {task}: {answer!r} (truth {r.fields.get('bbox', r.fields.get('answer'))})", flush=True)
        scores[task] = right / n
        print(f"  {task} by number of shapes: " + tally(by_n))
    model.train()
    return scores


def optimise(opt, params, loss: torch.Tensor, step: int, total: int) -> None:
    """One AdamW step at the cosine rate of `step` of `total`, gradients clipped to norm 1."""
    for group in opt.param_groups:
        group["lr"] = cosine_lr(step, total, args.lr, min(100, total // 10))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


if args.restore_norm:
    b = text_batch(random.Random("restore-norm"), 32)
    print(f"ln_f back, weight {restore_final_norm(model, b['input_ids'], b['attention_mask']):.2f}", flush=True)
recorder = Recorder()
if args.guide:
    model.transformer.h[args.guide_layer].attn.attend = recorder
params = [p for p in model.parameters() if p.requires_grad] + list(oracle.parameters())
opt = adamw(params, args.lr)
rng, t0 = random.Random(args.seed), time.time()
print(f"features={args.features} objects={args.objects} init={args.init} lr={args.lr} batch={args.batch}", flush=True)
model.train()
text_params = [p for p in model.parameters() if p.requires_grad]
text_opt = adamw(text_params, args.lr)
for step in range(1, args.text_steps + 1):
    b = text_batch(rng, args.batch)
    loss = per_sample_loss(model(b["input_ids"], attention_mask=b["attention_mask"]), b["labels"]).mean()
    optimise(text_opt, text_params, loss, step, args.text_steps)
    if step % 100 == 0 or step == args.text_steps:
        print(f"text step {step} loss {loss.item():.4f} {time.time() - t0:.0f}s"
              + (f" held-out {text_accuracy():.2f}" if step % 500 == 0 or step == args.text_steps else ""), flush=True)
for step in range(1, args.steps + 1):
    b = batch(rng, args.batch, WARM_SPEC if step <= args.warm_steps else SPEC)
    with autocast(resolve_train_dtype("auto")):
        logits = model(b["input_ids"], image_features=b["image_features"], attention_mask=b["attention_mask"])
    loss = per_sample_loss(logits, b["labels"]).mean()
    guided = guide_loss(recorder.probs, b) if args.guide else loss.new_zeros(())
    optimise(opt, params, loss + args.guide * guided, step, args.steps)
    if step % 50 == 0:
        print(f"step {step} loss {loss.item():.4f} guide {guided.item():.3f} {time.time() - t0:.0f}s", flush=True)
    if step % args.eval_every == 0 or step == args.steps:
        scores = " ".join(f"{t} {v:.2f}" for t, v in evaluate(args.eval_n).items())
        print(f"step {step} samples {step * args.batch} {scores} {time.time() - t0:.0f}s", flush=True)
