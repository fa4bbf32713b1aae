"""`qwenvl eval` end to end on a tiny random model and the synthetic held-out sets: batching, resume,
torchrun sharding, likelihood ranking, the endpoint mode against our own server, TouchStone with a stub
judge, MME's folder layout, and clear errors for bad inputs."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from tiny_checkpoint import write_tiny_checkpoint
from qwenvl.cli import main
from qwenvl.config import GenerationConfig
from qwenvl.evaluation import runner, tasks
from qwenvl.evaluation.datasets import ReadOptions, read_choice, read_refcoco, read_vqa
from qwenvl.evaluation.local import LocalModel
from qwenvl.synthetic import write_eval_sets

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval_model")
    write_tiny_checkpoint(d, n_queries=16, generation_config=GenerationConfig(max_new_tokens=5))
    return d


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval_sets")
    write_eval_sets(d, seed=0, n=5)
    return d


@pytest.fixture(scope="module")
def local(model_dir):
    return LocalModel.from_dir(model_dir, "float32")


def run(*args) -> int:
    return main(["eval", "--no-progress", *map(str, args)])


def read(path: Path):
    return json.loads(path.read_text())


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def vqa_run(model_dir, sets, tmp_path_factory):
    """The reference run: vqa_en, batch 1 (every sample alone)."""
    out = tmp_path_factory.mktemp("vqa_alone")
    assert run("--task", "vqa", "--data", sets / "vqa_en.jsonl", "--model", model_dir, "--out", out,
               "--batch-size", 1) == 0
    return out


# ------------------------------------------------------------------ end to end, batching, resume


def test_local_model_decodes_on_the_fast_paths_with_the_reference_answers(model_dir, sets, local, monkeypatch):
    from qwenvl import generation

    reference = LocalModel.from_dir(model_dir, "float32", fast=False)
    assert generation.fast_step(local.model) is not None and generation.fast_step(reference.model) is None
    samples = read_vqa(sets / "vqa_en.jsonl", ReadOptions())[:3]
    expected = reference.generate(samples, max_new_tokens=5)
    steps, found = [], generation.fast_step

    def counted(model):
        step = found(model)
        return None if step is None else (lambda *a: steps.append(1) or step(*a))
    monkeypatch.setattr(generation, "fast_step", counted)
    assert local.generate(samples, max_new_tokens=5) == expected
    assert len(steps) == 4                                   # 5 new tokens: the prefill, then 4 whole steps


def test_batched_run_equals_one_sample_at_a_time(model_dir, sets, vqa_run, tmp_path, capsys):
    assert run("--task", "vqa", "--data", sets / "vqa_en.jsonl", "--model", model_dir, "--out", tmp_path,
               "--batch-size", 3) == 0
    assert json.loads(capsys.readouterr().out)["overall"] == read(vqa_run / "summary.json")["metrics"]["overall"]
    assert lines(tmp_path / "predictions.jsonl") == lines(vqa_run / "predictions.jsonl")
    assert read(tmp_path / "summary.json") == read(vqa_run / "summary.json")
    official = read(tmp_path / "results_vqa.json")
    assert [r["question_id"] for r in official] == list(range(5)) and all(isinstance(r["answer"], str) for r in official)


def test_resume_after_an_interruption_gives_the_same_summary(model_dir, sets, vqa_run, tmp_path, monkeypatch):
    calls, killed = [], []
    real = runner.answer_batch

    def dies_on_the_third_batch(task, backend, batch):
        calls.append(len(batch))
        if len(calls) == 3 and not killed:
            killed.append(True)
            raise RuntimeError("killed")
        return real(task, backend, batch)

    monkeypatch.setattr(runner, "answer_batch", dies_on_the_third_batch)
    args = ("--task", "vqa", "--data", sets / "vqa_en.jsonl", "--model", model_dir, "--out", tmp_path, "--batch-size", 1)
    assert run(*args) == 2
    assert not (tmp_path / "summary.json").exists()
    log = tmp_path / "predictions.rank0.jsonl"
    assert len(log.read_text().splitlines()) == 2
    with open(log, "a") as f:
        f.write('{"id": "4", "predic')                     # a write cut short by the kill
    calls.clear()
    assert run(*args) == 0
    assert calls == [1, 1, 1]                              # only the three missing samples were answered
    assert read(tmp_path / "summary.json") == read(vqa_run / "summary.json")
    assert lines(tmp_path / "predictions.jsonl") == lines(vqa_run / "predictions.jsonl")


def test_rescoring_with_other_options_reuses_the_predictions(model_dir, sets, tmp_path, monkeypatch):
    args = ["--task", "refcoco", "--data", sets / "grounding_en.jsonl", "--model", model_dir, "--out", tmp_path]
    assert run(*args) == 0
    monkeypatch.setattr(LocalModel, "from_dir", lambda *a: pytest.fail("the model must not be loaded again"))
    assert run(*args, "--box-scale", 1000) == 0
    summary = read(tmp_path / "summary.json")
    assert summary["metrics"]["box_scale"] == 1000 and summary["metrics"]["total"] == 5
    assert run("--task", "refcoco", "--data", sets / "grounding_zh.jsonl", "--model", model_dir, "--out", tmp_path) == 2


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on CPU")
def test_two_torchrun_processes_give_the_same_summary_as_one(model_dir, sets, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--task", "refcoco", "--data", str(sets / "grounding_en.jsonl"), "--model", str(model_dir),
              "--batch-size", "2", "--no-progress"]
    assert main(["eval", *common, "--out", str(one)]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "qwenvl.cli", "eval", *common, "--out", str(two)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in two.glob("predictions.rank*.jsonl")) == ["predictions.rank0.jsonl",
                                                                          "predictions.rank1.jsonl"]
    assert [r["id"] for r in lines(two / "predictions.rank1.jsonl")] == ["1", "3"]      # strided shard
    assert read(two / "summary.json") == read(one / "summary.json")
    assert lines(two / "predictions.jsonl") == lines(one / "predictions.jsonl")


# ------------------------------------------------------------------ scoring through the runner


class Oracle:
    """A backend that answers from the ground truth (right on even ids, wrong on odd ones)."""

    has_likelihood = True

    def __init__(self, answer):
        self.answer = answer

    def generate(self, samples, max_new_tokens, min_new_tokens=0):
        return [self.answer(s) if int(s.id) % 2 == 0 else "wrong" for s in samples]

    def option_losses(self, samples):
        return [[0.0 if i == s.target else 1.0 for i in range(len(s.choices))] for s in samples]


def _ctx(data: Path, out: Path, **options) -> tasks.Context:
    return tasks.Context(tasks.EvalOptions(**options), data, out)


def test_runner_scores_vqa_and_grounding_from_an_oracle(sets, tmp_path):
    data = sets / "vqa_en.jsonl"
    samples = read_vqa(data, ReadOptions())
    summary = runner.run_task(tasks.TASKS["vqa"], samples, lambda: Oracle(lambda s: s.target[0]),
                              _ctx(data, tmp_path / "vqa"), 2, runner.Dist(), {"t": 1}, progress=False)
    # ids 0, 2, 4 are right, but id 4's gold answer is "the red star": the prediction loses its article
    # and the unanimous gts keep theirs (official quirk Q1), so only the corrected metric counts it
    assert summary["metrics"]["overall"] == 40.0
    summary = runner.merge_and_score(tasks.TASKS["vqa"], samples, _ctx(data, tmp_path / "vqa", corrected=True))
    assert summary["metrics"]["overall"] == 60.0

    data = sets / "grounding_en.jsonl"
    samples = read_refcoco(data, ReadOptions())

    def box(s):
        (x1, y1, x2, y2), (w, h) = s.target
        return f"({round(x1 / w * 999)},{round(y1 / h * 999)}),({round(x2 / w * 999)},{round(y2 / h * 999)})</box>"

    summary = runner.run_task(tasks.TASKS["refcoco"], samples, lambda: Oracle(box), _ctx(data, tmp_path / "ref"), 4,
                              runner.Dist(), {"t": 1}, progress=False)
    assert summary["metrics"]["correct"] == 3 and summary["metrics"]["precision@1"] == 0.6


def _choice_file(sets: Path, path: Path, copies: bool = False) -> Path:
    images = sorted((sets / "images" / "vqa_en").glob("*.png"))
    recs = [{"index": i, "image": str(images[i]), "hint": "" if i else "a hint", "question": f"Which colour {i}?",
             "choices": ["red", "green", "blue"][: 2 + i % 2], "answer": i % 2} for i in range(3)]
    if copies:
        from qwenvl.evaluation.multiple_choice import circular_copies

        recs = [{**r, "index": idx, "choices": ch, "answer": a} for r in recs
                for idx, ch, a in circular_copies(r["index"], r["choices"], r["answer"])]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_likelihood_fast_path_equals_the_reference_path(local, sets, tmp_path):
    samples = read_choice(_choice_file(sets, tmp_path / "sqa.jsonl"), ReadOptions())
    assert samples[0].prompt.endswith("Context: a hint\nQuestion: Which colour 0?\nOptions: A. red\nB. green\nAnswer:")
    assert "Context: N/A" in samples[1].prompt
    fast = local.option_losses(samples)
    for s, losses in zip(samples, fast):
        ref = local.reference_losses(s)
        assert losses == pytest.approx(ref, abs=1e-4)
        assert min(range(len(ref)), key=ref.__getitem__) == min(range(len(losses)), key=losses.__getitem__)


def test_scienceqa_and_mmbench_circular_through_the_cli(model_dir, sets, tmp_path):
    data = _choice_file(sets, tmp_path / "sqa.jsonl")
    assert run("--task", "scienceqa", "--data", data, "--model", model_dir, "--out", tmp_path / "sqa") == 0
    preds = lines(tmp_path / "sqa" / "predictions.jsonl")
    assert all(p["prediction"] == min(range(len(p["losses"])), key=p["losses"].__getitem__) for p in preds)
    assert 0 <= read(tmp_path / "sqa" / "summary.json")["metrics"]["accuracy"] <= 1

    data = _choice_file(sets, tmp_path / "mmb.jsonl", copies=True)
    samples = read_choice(data, ReadOptions())
    summary = runner.run_task(tasks.TASKS["mmbench"], samples, lambda: Oracle(None), _ctx(data, tmp_path / "mmb"), 4,
                              runner.Dist(), {"t": 1}, progress=False)
    m = summary["metrics"]
    assert m["accuracy"] == 1.0 and m["circular_strict"]["total"] == 3 and m["circular_vote"]["correct"] == 3
    assert len(read(tmp_path / "mmb" / "results_mmbench.json")) == len(samples)


def test_seedbench_frames_and_official_result_file(model_dir, sets, tmp_path):
    frames = [str(p) for p in sorted((sets / "images" / "multi_image_en").glob("00000-*.png"))]
    recs = [{"question_id": "v1", "frames": frames, "question": "What happens?", "choice_a": "a", "choice_b": "b",
             "choice_c": "c", "choice_d": "d", "answer": "B", "question_type_id": 10},
            {"question_id": "i1", "prompt": f"<img>{frames[0]}</img>\nQuestion: q\nOptions: A. w\nB. x\nC. y\nD. z\nAnswer:",
             "answer": "A"}]
    data = tmp_path / "seed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert run("--task", "seedbench", "--data", data, "--model", model_dir, "--out", tmp_path / "out") == 0
    result = lines(tmp_path / "out" / "result.jsonl")
    assert [r["question_id"] for r in result] == ["v1", "i1"] and all(r["prediction"] in "ABCD" for r in result)


def test_mme_folder_layout(model_dir, sets, tmp_path):
    results, images = tmp_path / "Your_Results", tmp_path / "images"
    results.mkdir()
    for subtask in ("existence", "code_reasoning"):
        (images / subtask).mkdir(parents=True)
        for k in range(2):
            shutil.copy(sets / "images" / "vqa_en" / f"0000{k}-1.png", images / subtask / f"{k}.png")
        (results / f"{subtask}.txt").write_text("".join(f"{k}.png\tIs there a shape?\t{a}\n"
                                                        for k in range(2) for a in ("Yes", "No")))
    assert run("--task", "mme", "--data", results, "--model", model_dir, "--out", tmp_path / "out",
               "--max-new-tokens", 4) == 0
    m = read(tmp_path / "out" / "summary.json")["metrics"]
    assert set(m["subtasks"]) == {"existence", "code_reasoning"} and m["perception"] == m["subtasks"]["existence"]["score"]
    assert len((tmp_path / "out" / "mme_results" / "existence.txt").read_text().splitlines()) == 4


# ------------------------------------------------------------------ endpoint mode and TouchStone


def test_endpoint_mode_against_our_server_equals_local_chat(model_dir, sets, tmp_path):
    pytest.importorskip("fastapi")
    from qwenvl.server import BackgroundServer, ServeConfig, create_app
    from qwenvl.tokenizer import QWenTokenizer
    from qwenvl.weights import load_model

    model, tok = load_model(model_dir, "float32").eval(), QWenTokenizer.from_pretrained(model_dir)
    app = create_app(model, tok, GenerationConfig(), ServeConfig(model_name="tiny", max_batch=4, max_len=512))
    data = sets / "multi_image_en.jsonl"
    with BackgroundServer(app) as server:
        assert run("--task", "vqa", "--data", data, "--endpoint", server.url, "--endpoint-model", "tiny",
                   "--out", tmp_path / "remote", "--chat", "--batch-size", 3) == 0
    assert run("--task", "vqa", "--data", data, "--model", model_dir, "--out", tmp_path / "local", "--chat") == 0
    remote, here = lines(tmp_path / "remote" / "predictions.jsonl"), lines(tmp_path / "local" / "predictions.jsonl")
    assert [r["prediction"] for r in remote] == [r["prediction"] for r in here]


class StubJudge:
    """An OpenAI-compatible judge on 127.0.0.1: answers "8 6" and counts its calls."""

    def __init__(self):
        self.calls = 0
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                assert body["stop"] == ["\n"] and body["temperature"] == 0 and body["model"] == "judge-x"
                judge.calls += 1
                reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": "8 6"}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_touchstone_with_a_local_judge_and_a_resumable_judge_log(model_dir, sets, tmp_path):
    images = sorted((sets / "images" / "vqa_en").glob("*.png"))
    recs = [{"index": i, "image": str(images[i]), "question": "Describe it.", "human_annotation": "shapes",
             "gpt4_ha_answer": "Some shapes.", "category": "description,recognition", "task_name": "t"}
            for i in range(2)]
    data = tmp_path / "touchstone.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    judge = StubJudge()
    args = ("--task", "touchstone", "--data", data, "--model", model_dir, "--out", tmp_path / "out",
            "--max-new-tokens", 6, "--judge-url", judge.url, "--judge-model", "judge-x")
    assert run(*args) == 0
    m = read(tmp_path / "out" / "summary.json")["metrics"]
    assert m["score"] == pytest.approx(700) and m["reference_score"] == pytest.approx(700)   # (6 + 8) / 2
    assert set(m["per_category"]) == {"description", "recognition"} and judge.calls == 4
    assert run(*args) == 0 and judge.calls == 4                                      # judged once
    judge.server.shutdown()


# ------------------------------------------------------------------ bad inputs


def test_clear_errors_for_bad_inputs(model_dir, sets, tmp_path, capsys):
    assert run("--task", "vqa", "--data", tmp_path / "nope.jsonl", "--model", model_dir) == 2
    assert "nope.jsonl: no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": null, "question": "q", "question_id": 1}\n{"question": oops}\n')
    assert run("--task", "vqa", "--data", bad, "--model", model_dir) == 2
    assert "bad.jsonl: line 2: not valid JSON" in capsys.readouterr().err
    assert run("--task", "vqa2000", "--data", bad, "--model", model_dir) == 2
    assert "unknown task 'vqa2000'" in capsys.readouterr().err
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"image": "gone.png", "question": "q", "question_id": 1, "answer": "a"}\n')
    assert run("--task", "vqa", "--data", missing, "--model", model_dir) == 2
    err = capsys.readouterr().err
    assert "missing.jsonl: line 1: image 'gone.png' not found" in err and "--image-root" in err
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"image": "images/grounding_en/00000-1.png", "sent": "a dog"}\n')
    assert run("--task", "refcoco", "--data", nofield, "--image-root", sets, "--model", model_dir) == 2
    assert "nofield.jsonl: line 1: missing field 'bbox'" in capsys.readouterr().err
    assert run("--task", "vqa", "--data", sets / "vqa_en.jsonl", "--model", model_dir, "--endpoint", "http://x") == 2
    assert "not both" in capsys.readouterr().err


IMG = "images/grounding_en/00000-1.png"


@pytest.mark.parametrize("task, record, message", [
    ("refcoco", {"image": IMG, "sent": "a", "bbox": [50, 5, 10, 20], "width": 9, "height": 9}, "x1 <= x2 and y1 <= y2"),
    ("refcoco", {"image": IMG, "sent": "a", "bbox": [1, 1, 5, 5], "width": 0, "height": 9}, "positive numbers"),
    ("refcoco", {"image": IMG, "sent": "a", "bbox": [1, 1, 5, 5], "width": True, "height": 9}, "positive numbers"),
    ("seedbench", {"question_id": 1, "image": IMG, "question": "q", "choices": "abcd", "answer": "A"},
     "field 'choices' should be list, got str"),
    ("seedbench", {"question_id": 1, "frames": IMG, "question": "q", "choices": ["a", "b"], "answer": "A"},
     "field 'frames' should be list, got str"),
])
def test_wrong_shapes_that_used_to_pass_silently_are_refused(sets, tmp_path, capsys, task, record, message):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(record) + "\n")
    assert run("--task", task, "--data", data, "--image-root", sets, "--endpoint", "http://127.0.0.1:9") == 2
    assert f"d.jsonl: line 1: " in (err := capsys.readouterr().err) and message in err


def test_bad_records_flags_and_out_folders_are_clear_errors(sets, tmp_path, capsys):
    caption = tmp_path / "cap.json"
    caption.write_text(json.dumps({"images": [7], "annotations": []}))
    assert run("--task", "caption", "--data", caption, "--endpoint", "http://127.0.0.1:9") == 2
    assert "cap.json: line 1: expected an object with 'id', got int" in capsys.readouterr().err
    vqa = sets / "vqa_en.jsonl"
    train = tmp_path / "train.jsonl"
    train.write_text('{"image": "x.png"}\n')
    assert run("--task", "vqa", "--data", vqa, "--few-shot", "1", "--train", train, "--endpoint", "http://x:9") == 2
    assert "train.jsonl: line 1: missing field 'question'" in capsys.readouterr().err
    assert run("--task", "vqa", "--data", vqa, "--max-new-tokens", "0", "--endpoint", "http://x:9") == 2
    assert "--max-new-tokens 0: must be >= 1" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    for out, message in ((tmp_path / "file", "is a file, not a folder"), (tmp_path / "file" / "s", "cannot create")):
        assert run("--task", "vqa", "--data", vqa, "--out", out, "--endpoint", "http://x:9") == 2
        assert message in capsys.readouterr().err
    for text, message in (("{bad", "run.json is not valid JSON"), ("[1]", "should hold a JSON object")):
        out = tmp_path / f"run{len(text)}"
        out.mkdir()
        (out / "run.json").write_text(text)
        (out / "predictions.rank0.jsonl").write_text('{"id": "1", "prediction": "a"}\n')
        assert run("--task", "vqa", "--data", vqa, "--out", out, "--endpoint", "http://x:9") == 2
        assert message in capsys.readouterr().err


# ------------------------------------------------------------------ pieces


def test_min_new_tokens_forbids_end_of_text_at_first(local):
    from qwenvl.evaluation.local import NoEosBefore
    from qwenvl.generation import generate
    from qwenvl.sampling import SamplingParams

    eod = local.tokenizer.eod_id

    class WantsToStop(torch.nn.Module):                  # the tiny model, but <|endoftext|> always wins
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, *a, **k):
            logits = self.inner(*a, **k).clone()
            logits[..., eod] = 1e4
            return logits

    ids = torch.tensor([local.tokenizer.encode("Hello")])
    params = SamplingParams(max_new_tokens=6, do_sample=False)
    out = generate(NoEosBefore(WantsToStop(local.model), eod, 3), ids, params, eos_token_id=eod)[0].tolist()
    assert eod not in out[:3] and out[3] == eod
    assert generate(WantsToStop(local.model), ids, params, eos_token_id=eod)[0].tolist()[0] == eod


def test_endpoint_message_and_unreachable_server(sets, tmp_path, capsys):
    from qwenvl.evaluation.endpoint import completions_url, user_message

    image = sets / "images" / "vqa_en" / "00000-1.png"
    msg = user_message(f"Picture 1: <img>{image}</img>\nWhat colour?", [image])
    assert msg["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert msg["content"][1] == {"type": "text", "text": "What colour?"}
    assert completions_url("http://h:1/v1/") == completions_url("http://h:1") == "http://h:1/v1/chat/completions"
    assert run("--task", "vqa", "--data", sets / "vqa_en.jsonl", "--endpoint", "http://127.0.0.1:9",
               "--out", tmp_path, "--limit", 1) == 2
    assert "cannot reach http://127.0.0.1:9/v1/chat/completions" in capsys.readouterr().err


def test_few_shot_prompts_are_drawn_per_sample_and_name_their_images(sets):
    opts = ReadOptions(few_shot=2, train=sets / "vqa_zh.jsonl", seed=1)
    a, b = read_vqa(sets / "vqa_en.jsonl", opts), read_vqa(sets / "vqa_en.jsonl", opts)
    assert [s.prompt for s in a] == [s.prompt for s in b]                  # deterministic per sample
    assert all(len(s.images) == 3 and s.prompt.count(" Answer:") == 3 for s in a)
    plain = read_vqa(sets / "vqa_en.jsonl", ReadOptions())
    assert all(s.prompt.endswith(p.prompt) and s.images[-1] == p.images[0] for s, p in zip(a, plain))


def test_vqa_scoring_with_the_official_annotation_files(tmp_path):
    from qwenvl.evaluation.datasets import Sample

    golden = json.loads((Path(__file__).parent / "fixtures" / "eval_golden.json").read_text())["vqa_accuracy"]
    (tmp_path / "ann.json").write_text(json.dumps(golden["inputs"]["annotation_file"]))
    (tmp_path / "q.json").write_text(json.dumps(golden["inputs"]["questions_file"]))
    samples = [Sample(str(q["question_id"]), q["question"]) for q in golden["inputs"]["questions_file"]["questions"]]
    preds = {str(r["question_id"]): {"prediction": r["answer"]} for r in golden["inputs"]["results_file"]}
    ctx = _ctx(tmp_path / "vqa.jsonl", tmp_path, annotation=tmp_path / "ann.json", questions=tmp_path / "q.json")
    out = tasks.score_vqa(ctx, samples, preds)
    expected = golden["outputs"]["accuracy"]
    assert (out["overall"], out["perQuestionType"], out["perAnswerType"]) == \
        (expected["overall"], expected["perQuestionType"], expected["perAnswerType"])
