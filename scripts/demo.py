"""The README's demo: ask a question and a grounding question about a picture, draw the boxes.

    make demo                 # (= .venv/bin/python scripts/demo.py)

It runs `qwenvl chat` with no --model, that is on the bundled demo model (qwenvl/assets/demo_model, trained by
scripts/train_demo.py on the synthetic world), on a bundled scene (examples/scene.png).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from qwenvl.cli import DEMO_MODEL_DIR, main

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "out"
OUT.mkdir(exist_ok=True)

if not (DEMO_MODEL_DIR / "config.json").is_file():
    sys.exit(f"the demo model is missing from {DEMO_MODEL_DIR}: rebuild it with "
             "`.venv/bin/python scripts/train_demo.py --export qwenvl/assets/demo_model` (about 2 hours)")

# --------------------------------------------------------------------------- picture and questions
# examples/ is written by scripts/make_examples.py (synthetic scenes with fixed seeds); questions.json names
# an object that is unique in each picture.
picture = ROOT / "examples" / "scene.png"
grounding_question = json.loads((ROOT / "examples" / "questions.json").read_text())[picture.name]["ground_en"]
rel = str(picture.relative_to(ROOT))
for question, extra in (("What is in this picture?", []),
                        (grounding_question, ["--draw", str(OUT / "demo_boxes.png")])):
    print(f"Q: {question}\nA: ", end="", flush=True)
    code = main(["chat", "--image", rel, "--greedy", "--max-new-tokens", "48", *extra, question])
    if code:
        sys.exit(code)
print(f"\n(when the grounding answer holds a box, it is drawn on the picture in {OUT / 'demo_boxes.png'})")
