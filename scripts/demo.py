"""The README's demo: ask a question and a grounding question about a picture, draw the boxes.

    make demo                 # (= .venv/bin/python scripts/demo.py)

With the bundled demo model (qwenvl/assets/demo_model) it answers for real. Until that model ships, it
runs the same pipeline (tokenizer, ChatML, image loading, vision tower, generation, box parsing, drawing)
on a randomly initialised tiny checkpoint built on the real Qwen vocabulary, so the answers are noise.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

from qwenvl.cli import DEMO_MODEL_DIR, main
from qwenvl.config import GenerationConfig, QWenConfig
from qwenvl.weights import save_random_checkpoint

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "out"
OUT.mkdir(exist_ok=True)


# --------------------------------------------------------------------------- model
def random_tiny_checkpoint(folder: Path) -> Path:
    cfg = QWenConfig.from_dict(dict(
        vocab_size=151936, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, kv_channels=32,
        intermediate_size=128, torch_dtype="float32",
        visual=dict(image_size=112, patch_size=14, width=32, layers=2, heads=2, mlp_ratio=2.0, output_dim=64,
                    n_queries=64, image_start_id=151857)))
    save_random_checkpoint(cfg, folder, seed=0, generation_config=GenerationConfig(max_new_tokens=24))
    shutil.copy(ROOT / "tests" / "fixtures" / "qwen.tiktoken", folder / "qwen.tiktoken")
    return folder


bundled = (DEMO_MODEL_DIR / "config.json").is_file()
model_args: list[str] = []
if not bundled:
    print("NOTE: the demo model is not bundled yet; running the pipeline on a RANDOM tiny checkpoint "
          "(answers are noise).\n")
    model_args = ["--model", str(random_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="qwenvl-demo-"))))]

# --------------------------------------------------------------------------- picture
picture = ROOT / "examples" / "shapes.png"
if not picture.is_file():
    picture.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (448, 448), (235, 235, 225))
    d = ImageDraw.Draw(img)
    d.ellipse((60, 80, 180, 200), fill=(220, 40, 40))
    d.rectangle((260, 240, 400, 380), fill=(40, 90, 220))
    img.save(picture)

# --------------------------------------------------------------------------- questions
rel = str(picture.relative_to(ROOT)) if picture.is_relative_to(ROOT) else str(picture)
for question, extra in (("What is in the picture?", []),
                        ("Where is the red circle?", ["--draw", str(OUT / "demo_boxes.png")])):
    print(f"Q: {question}\nA: ", end="", flush=True)
    code = main(["chat", *model_args, "--image", rel, "--greedy", "--max-new-tokens", "24", *extra, question])
    if code:
        sys.exit(code)
print(f"\n(grounding answers are drawn to {OUT / 'demo_boxes.png'} when the answer holds a box)")
