"""The README's demo: ask a question and a grounding question about a picture, draw the boxes.

    make demo                 # (= .venv/bin/python scripts/demo.py)

With the bundled demo model (qwenvl/assets/demo_model) it answers for real. Until that model ships, it
runs the same pipeline (tokenizer, ChatML, image loading, vision tower, generation, box parsing, drawing)
on a randomly initialised tiny checkpoint built on the real Qwen vocabulary, so the answers are noise.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

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

# --------------------------------------------------------------------------- picture and questions
# examples/ is written by scripts/make_examples.py (synthetic scenes with fixed seeds); questions.json names
# an object that is unique in each picture.
picture = ROOT / "examples" / "scene.png"
grounding_question = json.loads((ROOT / "examples" / "questions.json").read_text())[picture.name]["ground_en"]
rel = str(picture.relative_to(ROOT))
for question, extra in (("What is in the picture?", []),
                        (grounding_question, ["--draw", str(OUT / "demo_boxes.png")])):
    print(f"Q: {question}\nA: ", end="", flush=True)
    code = main(["chat", *model_args, "--image", rel, "--greedy", "--max-new-tokens", "48", *extra, question])
    if code:
        sys.exit(code)
print(f"\n(when the grounding answer holds a box, it is drawn on the picture in {OUT / 'demo_boxes.png'})")
