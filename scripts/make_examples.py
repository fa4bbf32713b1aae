"""Write the bundled example pictures (examples/*.png) and the questions the demo asks about them.

    .venv/bin/python scripts/make_examples.py

Deterministic: the scenes come from the synthetic world with fixed seeds, so the files only change when
the world's renderer does. examples/questions.json names, for each picture, a grounding question about
an object that is unique in it (English and Chinese), which scripts/demo.py asks.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from qwenvl.synthetic import SceneSpec, render_scene, sample_scene
from qwenvl.synthetic_world import object_phrase

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "examples"


def unique_object(scene):
    """The first shape whose colour + kind is unique in the scene (None if there is none)."""
    keys = [(o.colour, o.kind) for o in scene.objects]
    return next((o for o in scene.objects if keys.count((o.colour, o.kind)) == 1 and o.visible > 0.9), None)


def pick_scene(seed: str, spec: SceneSpec):
    """The first scene of the seed's sequence that has a unique, unoccluded shape."""
    rng = random.Random(seed)
    while True:
        scene = sample_scene(rng, spec)
        target = unique_object(scene)
        if target is not None and len(scene.objects) == spec.n_objects[1]:
            return scene, target


def main() -> None:
    OUT.mkdir(exist_ok=True)
    wanted = {"scene": SceneSpec(n_objects=(3, 3), n_texts=(1, 1), max_occlusion=0.0),
              "scene_zh": SceneSpec(n_objects=(2, 2), n_texts=(1, 1), text_langs=("zh",), max_occlusion=0.0),
              "pair_1": SceneSpec(n_objects=(2, 2), n_texts=(0, 0)),
              "pair_2": SceneSpec(n_objects=(4, 4), n_texts=(0, 0))}
    questions = {}
    for name, spec in wanted.items():
        scene, target = pick_scene(f"examples/{name}", spec)
        render_scene(scene).save(OUT / f"{name}.png", optimize=True)
        questions[f"{name}.png"] = {
            "ground_en": f"Where is {object_phrase(target.colour, target.kind, 'en')}? Answer with its box.",
            "ground_zh": f"{object_phrase(target.colour, target.kind, 'zh')}在哪里？请给出它的框。",
            "objects": [f"{o.colour} {o.kind} {list(o.bbox)}" for o in scene.objects],
            "texts": [t.text for t in scene.texts]}
    (OUT / "questions.json").write_text(json.dumps(questions, ensure_ascii=False, indent=2) + "\n")
    print(json.dumps(questions, ensure_ascii=False, indent=2))


if __name__ == "__main__":
    main()
