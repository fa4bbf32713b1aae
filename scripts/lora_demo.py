"""LoRA-teach the demo model something it cannot do, and measure held-out accuracy before/after.

    .venv/bin/python scripts/lora_demo.py --model qwenvl/assets/demo_model --data runs/lora_demo/french \\
        --out runs/lora_demo/french --task french   # 600 steps of 8; 15 min on 2 shared cores: French 0% -> 98%
    .venv/bin/python scripts/lora_demo.py --model M --data D --out O --task heart   # a new shape
    .venv/bin/python scripts/lora_demo.py --model M --data D --out O --smoke   # a few steps (pipeline check)

--task french: the world speaks English and Chinese. Half the questions ask for the colour of the one object
"in French" (rouge, bleu, ...), half ask it in English as in training: before tuning the model answers in
English (0% French); after, the French answers are scored for the right colour, and the English half checks
that nothing else broke.

--task heart: the synthetic world has seven shapes (circle, square, triangle, star, diamond, hexagon, cross).
This script draws single-object scenes on the world's backgrounds, half with a world shape and half with a heart, and
asks "What shape is the <colour> object?" in English. Before tuning the model can only answer with a shape it
knows, so it gets every heart wrong; LoRA on the official targets (no full wte/lm_head copies) teaches the
new word while the held-out questions about the known shapes check that nothing else broke.

The data is written in the official fine-tune format (DATA/train.json, DATA/test.json, DATA/img/*.png, paths
relative to the JSON), trained with `qwenvl.finetune` exactly as `qwenvl finetune` would, and the results go to
OUT/results.json and OUT/results.md (a table ready for the README).
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from qwenvl.data import render_sft
from qwenvl.finetune import FinetuneArgs, finetune
from qwenvl.generation import generate, left_pad
from qwenvl.images import load_image, preprocess_v1
from qwenvl.lora import merge_lora
from qwenvl.peft_format import load_adapter
from qwenvl.sampling import SamplingParams
from qwenvl.synthetic_scenes import SceneSpec, render_scene, sample_scene
from qwenvl.synthetic_world import colour_name, shape_name
from qwenvl.tokenizer import QWenTokenizer
from qwenvl.weights import load_model

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", type=Path, required=True, help="the demo model (or any Qwen-VL checkpoint)")
parser.add_argument("--data", type=Path, required=True, help="data folder (written if it has no train.json)")
parser.add_argument("--out", type=Path, required=True, help="fine-tune output folder (resumable)")
parser.add_argument("--n-train", type=int, default=800)
parser.add_argument("--n-test", type=int, default=100, help="held-out questions (half the new skill)")
parser.add_argument("--epochs", type=float, default=6.0)
parser.add_argument("--lr", type=float, default=1e-3)
parser.add_argument("--lora-r", type=int, default=16)
parser.add_argument("--batch-size", type=int, default=8)
parser.add_argument("--threads", type=int, default=torch.get_num_threads())
parser.add_argument("--task", choices=["french", "heart"], default="french",
                    help="french: name colours in a new language; heart: a new shape")
parser.add_argument("--smoke", action="store_true", help="tiny data and 3 steps: checks the pipeline only")
args = parser.parse_args()
torch.set_num_threads(args.threads)
if args.smoke:
    args.n_train, args.n_test, args.epochs = 16, 8, 0.0
NEW = "heart"
FRENCH = {"red": "rouge", "orange": "orange", "yellow": "jaune", "green": "vert", "blue": "bleu", "purple": "violet",
          "pink": "rose", "brown": "marron", "black": "noir"}
GROUPS = {"heart": ("heart", "known shapes"), "french": ("in French", "in English")}[args.task]


# --------------------------------------------------------------------------- the new shape
def heart_mask(side: int) -> Image.Image:
    """A filled heart in a side x side square: two circles on top of a downward triangle."""
    img = Image.new("L", (side, side), 0)
    d = ImageDraw.Draw(img)
    r = side / 4
    d.ellipse((0, 0, 2 * r, 2 * r), fill=255)
    d.ellipse((2 * r - 1, 0, 4 * r - 1, 2 * r), fill=255)
    d.polygon([(0.15 * r, 1.35 * r), (3.85 * r - 1, 1.35 * r), (2 * r - 0.5, side - 1)], fill=255)
    return img


def make_sample(rng: random.Random, k: int, split: str, folder: Path) -> dict:
    """One scene with one object; even samples are the new skill (a heart of the same colour, or French)."""
    scene = sample_scene(rng, SceneSpec(n_objects=(1, 1), n_texts=(0, 0)))
    obj = scene.objects[0]
    new = k % 2 == 0
    if args.task == "heart" and new:
        img = render_scene(scene.__class__(scene.width, scene.height, scene.background, (), ()))
        img.paste(obj.rgb, (obj.x, obj.y, obj.x + obj.side, obj.y + obj.side), heart_mask(obj.side))
    else:
        img = render_scene(scene)
    rel = f"img/{split[:2]}{k:04d}.png"     # 14 bytes: a path must fit the image span (n_queries - 2 bytes)
    img.save(folder / rel)
    if args.task == "heart":
        question = rng.choice((f"What shape is the {colour_name(obj.colour, 'en')} object?",
                               f"What is the shape of the {colour_name(obj.colour, 'en')} object?"))
        answer = NEW if new else shape_name(obj.kind, "en")
    else:
        what = f"the {shape_name(obj.kind, 'en')}"
        question = rng.choice((f"What colour is {what}?", f"What is the colour of {what}?"))
        question, answer = (question + " Answer in French.", FRENCH[obj.colour]) if new else \
            (question, colour_name(obj.colour, "en"))
    return {"id": f"{split}-{k}", "group": GROUPS[0] if new else GROUPS[1], "conversations": [
        {"from": "user", "value": f"Picture 1: <img>{rel}</img>\n{question}"},
        {"from": "assistant", "value": answer}]}


def write_data(folder: Path) -> None:
    (folder / "img").mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", args.n_train, 1), ("test", args.n_test, 2)):
        rng = random.Random(f"lora-demo-{split}-{seed}")
        samples = [make_sample(rng, k, split, folder) for k in range(n)]
        (folder / f"{split}.json").write_text(json.dumps(samples, indent=1, ensure_ascii=False))


if not (args.data / "train.json").is_file():
    print(f"writing {args.n_train} + {args.n_test} samples to {args.data}", flush=True)
    write_data(args.data)


# --------------------------------------------------------------------------- held-out accuracy
@torch.no_grad()
def accuracy(model, tok: QWenTokenizer, samples: list[dict], image_size: int, batch: int = 16) -> dict:
    """Greedy answers to the held-out questions; exact match (case and final '.' ignored), per group."""
    model.eval()
    right, answers = {g: [] for g in GROUPS}, Counter()
    for i in range(0, len(samples), batch):
        chunk = samples[i:i + batch]
        prompts = [render_sft(s["conversations"][:1], tok).input_ids + tok.encode("<|im_start|>assistant\n")
                   for s in chunk]
        ids, mask = left_pad(prompts, tok.pad_token_id)
        pixels = torch.stack([preprocess_v1(load_image(str(args.data / p)), image_size)
                              for s in chunk for p in tok.image_paths(tok.encode(s["conversations"][0]["value"]))])
        out = generate(model, ids, SamplingParams(max_new_tokens=8, do_sample=False), attention_mask=mask,
                       images=pixels, eos_token_id=tok.im_end_id)
        for s, row in zip(chunk, out.tolist()):
            n = next((j for j, t in enumerate(row) if t >= tok.eod_id), len(row))   # the reply ends at a special
            answer = tok.decode(row[:n]).strip().rstrip(".").lower()
            gold = s["conversations"][1]["value"]
            answers[answer] += 1
            right[s["group"]].append(answer == gold)
    return {k: round(sum(v) / max(1, len(v)), 3) for k, v in right.items()} | {"answers": dict(answers.most_common())}


tok = QWenTokenizer.from_pretrained(args.model)
test = json.loads((args.data / "test.json").read_text())
base = load_model(args.model, "float32")
image_size = base.config.visual.image_size
before = accuracy(base, tok, test, image_size)
print(f"before LoRA: {before}", flush=True)
n_params = sum(p.numel() for p in base.parameters())
del base                                  # so the peak memory below is the fine-tune's, not two models'

# --------------------------------------------------------------------------- LoRA
t0, cpu0 = time.time(), time.process_time()
if not (args.out / "finished.json").is_file():                         # a rerun reuses the finished adapter
    finetune(FinetuneArgs(
        data=args.data / "train.json", model=args.model, out=args.out, method="lora", epochs=args.epochs,
        max_steps=3 if args.smoke else None, batch_size=args.batch_size, grad_accum=1, lr=args.lr,
        warmup_ratio=0.05, lora_r=args.lora_r, lora_alpha=2 * args.lora_r, modules_to_save="none", dtype="fp32",
        max_len=512, save_every=50))
minutes, cpu_minutes = (time.time() - t0) / 60, (time.process_time() - cpu0) / 60
summary = json.loads((args.out / "finished.json").read_text())         # steps, last loss, trainable parameters
peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KiB; the process high-water mark
print(f"LoRA: {summary['trainable_parameters']:,} trainable parameters ({summary['trainable_parameters'] / n_params:.2%} "
      f"of {n_params:,}), peak RSS {peak_mb:.0f} MB, {minutes:.1f} min ({cpu_minutes:.2f} CPU min)", flush=True)
tuned = load_model(args.model, "float32")
load_adapter(tuned, args.out)
merge_lora(tuned)
after = accuracy(tuned, tok, test, image_size)
print(f"after LoRA:  {after}  ({minutes:.1f} min of training)", flush=True)

# --------------------------------------------------------------------------- report
results = {"task": args.task, "before": before, "after": after, "n_train": summary["samples"], "n_test": len(test), "epochs": args.epochs,
           "lr": args.lr, "lora_r": args.lora_r, "train_minutes": round(minutes, 1),
           "train_cpu_minutes": round(cpu_minutes, 2), "threads": args.threads,
           "trainable_parameters": summary["trainable_parameters"], "model_parameters": n_params,
           "peak_rss_mb": round(peak_mb), "finetune": summary}
(args.out / "results.json").write_text(json.dumps(results, indent=2))
table = ["| held-out questions | before LoRA | after LoRA |", "|---|---|---|"]
table += [f"| {k} ({sum(1 for s in test if s['group'] == k)}) | {before[k]:.0%} | {after[k]:.0%} |" for k in GROUPS]
(args.out / "results.md").write_text("\n".join(table) + "\n")
print("\n".join(table))
sys.exit(0)
