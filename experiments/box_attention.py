"""Issue #3 diagnostic: do a box's digits look at the asked shape, as a one-word answer about it does?

On scenes of two to five shapes the shipped demo model names the colour of a named shape ~70% of the time but boxes
the asked shape ~5% of the time (scripts/grounding_errors.py). This script teacher-forces the right answer of each
fresh grounding sample (and of each colour question) and measures, at every position that predicts an answer token,
how the language model's attention over the 64 image tokens splits between the asked shape and the others.

Where an image token "is": the resampler's attention of its query over the 16 x 16 patches (mean over heads), and a
patch belongs to a shape when its centre lies inside the shape's box (shapes drawn later win). For an answer
position, layer l, head h: asked = sum over image tokens s of p(s) * footprint(s, asked shape); others likewise; the
printed share is asked / (asked + others), against the share a uniform look over the image tokens would give.

    .venv/bin/python experiments/box_attention.py --n 120              # the shipped model, fresh scenes
    .venv/bin/python experiments/box_attention.py --model /tmp/demo26a --stage runs/demo26a/stage2_ground/model.pt

Measured (session 27, --n 150, the shipped model): colour answers put 0.91 / 0.70 of layers 2-3's attention on the
image and layer 2's heads give 0.42-0.56 of it to the asked shape (uniform 0.31); box digits put 0.01-0.03 of layers
1-3's attention on the image at all and prefer no shape (layer 0: 0.22, evenly). The same in every stage of
session 26's run from stage2_ground1 on (docs/demo_model.md).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from qwenvl.data import render_sft
from qwenvl.images import load_image, preprocess_v1
from qwenvl.model import image_span_mask
from qwenvl.synthetic import SceneSpec, build_task, render_scene, sample_rng
from qwenvl.text import QWenAttention
from qwenvl.tokenizer import QWenTokenizer
from qwenvl.train import bypass_final_norm
from qwenvl.weights import load_model

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", type=Path, default=Path(__file__).resolve().parents[1] / "qwenvl/assets/demo_model")
parser.add_argument("--stage", type=Path, help="a train_demo.py stage's model.pt to probe instead (with --model: its run's "
                                               "export, for the config and vocabulary); stage 2 prompts are raw")
parser.add_argument("--seed", type=int, default=4321,
                    help="grounding scenes are the fresh grounding set's of this seed (drawn as write_eval_sets draws "
                         "them); colour questions come from a split of their own")
parser.add_argument("--n", type=int, default=120, help="samples drawn per task (one-shape scenes are skipped)")
parser.add_argument("--work", type=Path, default=Path("/tmp/box_attention"), help="where the scenes are rendered")
args = parser.parse_args()

model = load_model(args.model, "float32").eval()
RAW = args.stage is not None and "stage3" not in str(args.stage)     # stages 1-2 train on raw prompts
if args.stage:
    state = torch.load(args.stage, map_location="cpu", weights_only=True)
    if "transformer.ln_f.weight" not in state:
        bypass_final_norm(model)                                      # stages before 3 train with ln_f bypassed
    model.load_state_dict(state)
tok = QWenTokenizer.from_pretrained(args.model)
cfg = model.config.visual
GRID = cfg.image_size // cfg.patch_size


class Recorder:
    """Swapped in as an attention module's `attend`: softmax attention that keeps its probabilities [B, H, T, S]."""

    def __init__(self):
        self.probs = None

    def __call__(self, q, k, v, mask):
        scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        self.probs = scores.softmax(-1)
        return self.probs @ v


recorders = []
for block in model.transformer.h:
    rec = Recorder()
    block.attn.attend = rec
    recorders.append(rec)
assert all(isinstance(b.attn, QWenAttention) for b in model.transformer.h)

pool_probs = {}
image_mass: dict[str, list] = {}      # task -> per sample and layer, [H] attention mass on image tokens


def resampler_hook(module, inputs, output):
    """Recompute the resampler's query -> patch attention (mean over heads) [Q, L] for the footprints."""
    query, key, _ = inputs
    wq, wk, _ = module.in_proj_weight.chunk(3)
    bq, bk, _ = module.in_proj_bias.chunk(3)
    q, k = module._split(query @ wq.T + bq), module._split(key @ wk.T + bk)          # [N, H, Q|L, D]
    pool_probs["a"] = ((q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5).softmax(-1).mean(1)[0]   # [Q, L]


model.transformer.visual.attn_pool.attn.register_forward_hook(resampler_hook)


def patch_owner(scene) -> torch.Tensor:
    """[L] index of the shape whose box holds each patch centre (the last drawn wins), -1 for none."""
    owner = torch.full((GRID * GRID,), -1)
    for i, shape in enumerate(scene.objects):
        x1, y1, x2, y2 = (v * GRID / scene.width for v in shape.bbox)
        for r in range(GRID):
            for c in range(GRID):
                if x1 <= c + 0.5 < x2 and y1 <= r + 0.5 < y2:
                    owner[r * GRID + c] = i
    return owner


def shares(task: str, split: str) -> list[torch.Tensor]:
    """Per sample [layers, heads] share of the answer positions' shape-attention that goes to the asked shape,
    and the uniform-look baseline as the last row."""
    out = []
    args.work.mkdir(parents=True, exist_ok=True)
    for i in range(args.n):
        r = build_task(sample_rng(args.seed, split, i), task, "en", SceneSpec(), heldout=True)
        scene = r.scenes[0]
        if len(scene.objects) < 2:
            continue
        asked = r.fields["objects"][0]
        path = args.work / f"{task}-{i:05d}.png"
        render_scene(scene).save(path)
        user, answer = r.turns[0]
        prompt = f"Picture 1: <img>{path}</img>\n{user}"
        if RAW:
            ids = torch.tensor([tok.encode(prompt) + tok.encode(answer) + [tok.eod_id]])
        else:
            ids = torch.tensor([render_sft([{"from": "user", "value": prompt},
                                            {"from": "assistant", "value": answer}], tok).input_ids])
        answer_ids = tok.encode(answer)
        image = image_span_mask(ids, cfg.image_start_id, cfg.n_queries)[0]             # [T]
        with torch.no_grad():
            model(ids, images=preprocess_v1(load_image(str(path)), cfg.image_size)[None])
        owner = patch_owner(scene)
        a = pool_probs["a"]                                                            # [Q, L]
        on_asked = a[:, owner == asked].sum(1)                                         # [Q]
        on_other = a[:, (owner >= 0) & (owner != asked)].sum(1)
        # the positions that predict the answer's tokens: where the answer's ids sit, after the image
        row, m = ids[0].tolist(), len(answer_ids)
        start = max(t for t in range(len(row) - m + 1) if row[t:t + m] == answer_ids)
        answer_at = torch.arange(start, start + m)
        if task == "grounding":                      # the coordinates' digits only (not "<ref>…</ref>", brackets)
            answer_at = torch.tensor([t for t in answer_at.tolist() if tok.decode([row[t]]).isdigit()])
        predicting = answer_at - 1
        rows = []
        for rec in recorders:
            p = rec.probs[0][:, predicting][:, :, image]                               # [H, A, Q]
            asked_mass, other_mass = (p * on_asked).sum(-1), (p * on_other).sum(-1)    # [H, A]
            rows.append((asked_mass / (asked_mass + other_mass)).mean(-1))             # [H]
            image_mass.setdefault(task, []).append(p.sum(-1).mean(-1))                 # [H]: on the image at all
        rows.append((on_asked.sum() / (on_asked.sum() + on_other.sum())).expand(len(rows[0])))
        out.append(torch.stack(rows))
    return out


for task, split in (("grounding", "eval-grounding"), ("vqa_colour", "eval-vqa-colour")):
    got = shares(task, split)
    if not got:
        print(f"{task}: no multi-shape samples among the first {args.n}")
        continue
    mean = torch.stack(got).mean(0)                                                    # [layers + 1, H]
    print(f"{task}: {len(got)} samples of 2-5 shapes; share of the shape-attention on the asked shape, per head")
    for layer, row in enumerate(mean[:-1]):
        print(f"  layer {layer}: " + " ".join(f"{v:.2f}" for v in row.tolist()))
    print(f"  a uniform look over the image tokens: {mean[-1, 0]:.2f}")
    mass = torch.stack(image_mass[task]).view(len(got), len(recorders), -1).mean(0)   # [layers, H]
    print("  attention mass on the image tokens at all, per layer (mean over heads): "
          + " ".join(f"{v:.2f}" for v in mass.mean(-1).tolist()))
