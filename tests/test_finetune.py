"""Fine-tuning end to end on the tiny checkpoint: official data rendering and checks, full / LoRA / Q-LoRA runs
through the CLI, gradient checkpointing, resume after SIGKILL, and torchrun (DDP, FSDP) vs one process."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qwenvl import quant_kernels
from qwenvl.bpe import save_tiktoken
from qwenvl.cli import main as cli_main
from qwenvl.data import DataError, pad_and_truncate
from qwenvl.finetune import FinetuneArgs, build_model, enable_gradient_checkpointing
from qwenvl.finetune_data import load_examples, make_batch
from qwenvl.lora import lora_layers
from qwenvl.peft_format import load_adapter
from qwenvl.tokenizer import QWenTokenizer
from qwenvl.weights import load_model

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "qwen_vl_tiny"
GOLDEN = json.loads((FIXTURES / "finetune_golden.json").read_text())
COLOURS = {"a": "red", "b": "blue", "c": "green", "d": "pink"}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def tiny_vocab(path: Path) -> None:
    """783 BPE ranks (bytes + letter pairs): with the 217 Qwen specials after them, <img> is id 997 as in the
    tiny checkpoint's config."""
    ranks = {bytes([b]): b for b in range(256)}
    for a in string.ascii_lowercase + " ":
        for b in string.ascii_lowercase + " ":
            if len(ranks) < 783:
                ranks[(a + b).encode()] = len(ranks)
    save_tiktoken(ranks, path)


def sample(i: int, with_image: bool = True) -> dict:
    name = "abcd"[i % 4]
    question = f"Picture 1: <img>imgs/{name}.png</img>\nwhat colour is it" if with_image else "what colour is it"
    conv = [{"from": "user", "value": question}, {"from": "assistant", "value": f"it is {COLOURS[name]}"}]
    if i % 3 == 0:
        conv += [{"from": "user", "value": "where is it"}, {"from": "assistant", "value": "<ref>it</ref><box>(10,20),(300,400)</box>"}]
    return {"id": f"s{i}", "conversations": conv}


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A workspace: model/ (tiny checkpoint + tokenizer), imgs/, train.json (images) and mixed.json (some text-only)."""
    root = tmp_path_factory.mktemp("ft")
    (root / "model").mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(TINY / name, root / "model" / name)
    tiny_vocab(root / "model" / "qwen.tiktoken")
    (root / "imgs").mkdir()
    for n in "abcd":
        shutil.copy(TINY / f"img_{n}.png", root / "imgs" / f"{n}.png")
    (root / "train.json").write_text(json.dumps([sample(i) for i in range(12)]))
    (root / "mixed.json").write_text(json.dumps([sample(i, with_image=i % 3 != 1) for i in range(12)]))
    return root


def args(ws: Path, out: Path, **kw) -> FinetuneArgs:
    base = dict(data=ws / "train.json", model=ws / "model", out=out, method="lora", max_steps=3, batch_size=2,
                grad_accum=1, lr=1e-3, lora_r=4, dtype="fp32", progress=False)
    return FinetuneArgs(**{**base, **kw})


def cli(ws: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "--data", str(ws / "train.json"), "--model", str(ws / "model"), "--out", str(out),
            "--batch-size", "2", "--grad-accum", "1", "--lr", "1e-3", "--lora-r", "4", "--dtype", "fp32",
            "--no-progress", *extra]


def losses(out: Path) -> list[tuple[str, str, str]]:
    with open(out / "loss.csv") as f:
        return [(r["step"], r["loss"], r["lr"]) for r in csv.DictReader(f)]


# ------------------------------------------------------------------------------------------- data

@pytest.fixture(scope="module")
def real_tok() -> QWenTokenizer:
    return QWenTokenizer(FIXTURES / "qwen.tiktoken")


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: c["name"])
def test_loaded_data_equals_the_official_preprocessing(case, real_tok, tmp_path):
    """The trainer's data path (JSON file -> checks -> render) gives the golden ids, labels and mask."""
    tok = real_tok
    for rel in ("assets/demo.jpeg", "assets/mm_tutorial/Chongqing.jpeg", "assets/mm_tutorial/Beijing.jpeg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(TINY / "img_a.png", tmp_path / rel)        # the ids depend on the path only; the file must open
    (tmp_path / "d.json").write_text(json.dumps([case["example"]]))
    load = lambda: load_examples(tmp_path / "d.json", tok, case["max_len"], case["system_message"], truncate=True)  # noqa: E731
    if "raises" in case or case["name"] == "truncated_inside_image_128":
        with pytest.raises(DataError, match=case["example"]["id"]):     # we refuse a cut through an image span
            load()
        return
    (example,) = load()
    ids, labels, mask = pad_and_truncate(example.rendered, case["max_len"], tok.pad_token_id)
    assert (ids.tolist(), labels.tolist(), mask.tolist()) == (case["input_ids"], case["labels"], case["attention_mask"])


BAD = [
    ([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}], r"turn 0 has role 'human'"),
    ([{"from": "user", "value": "<ref>dog</ref><box>(1,2),(3,4)"}, {"from": "assistant", "value": "x"}], r"unclosed <box>"),
    ([{"from": "user", "value": "a <img>imgs/a.png"}, {"from": "assistant", "value": "x"}], r"turn 0: unclosed <img>"),
    ([{"from": "user", "value": "<ref>a<box>(1,2),(3,4)</box></ref>"}, {"from": "assistant", "value": "x"}], r"opens inside"),
    ([{"from": "user", "value": "where"}, {"from": "assistant", "value": "<box>(1,2),(3,1200)</box>"}], r"out of range"),
    ([{"from": "user", "value": "where"}, {"from": "assistant", "value": "<box>(9,2),(3,4)</box>"}], r"out of range"),
    ([{"from": "user", "value": "where"}, {"from": "assistant", "value": "<box>1,2,3,4</box>"}], r"is not '\(x1,y1\)"),
    ([{"from": "user", "value": "<img>imgs/zz.png</img>what"}, {"from": "assistant", "value": "x"}], r"image 'imgs/zz.png' not found"),
    ([{"from": "user", "value": "<img>imgs/aaaaaaaaaaaa.png</img>what"}, {"from": "assistant", "value": "x"}], r"too long"),
    ([{"from": "user", "value": "hello " * 80}, {"from": "assistant", "value": "x"}], r"tokens > max_len 160"),
    ([{"from": "assistant", "value": "hi"}, {"from": "user", "value": "hi"}], r"no assistant reply"),
]


@pytest.mark.parametrize("conv, message", BAD, ids=[m for _, m in BAD])
def test_bad_data_names_the_sample_and_the_problem(conv, message, ws, tmp_path):
    data = tmp_path / "bad.json"
    data.write_text(json.dumps([sample(0), {"id": "bad-1", "conversations": conv}]))
    shutil.copytree(ws / "imgs", tmp_path / "imgs")
    tok = QWenTokenizer.from_pretrained(ws / "model")
    with pytest.raises(DataError, match=r"sample 'bad-1'.*" + message):
        load_examples(data, tok, 160)


def test_bad_files_and_a_box_split_across_turns(ws, tmp_path):
    tok = QWenTokenizer.from_pretrained(ws / "model")
    shutil.copytree(ws / "imgs", tmp_path / "imgs")
    for text, message in (("{", "not valid JSON"), ("{}", "non-empty JSON list"), ("[1]", "sample #0 is a int"),
                          (json.dumps([sample(0), sample(0)]), "appears twice")):
        (tmp_path / "f.json").write_text(text)
        with pytest.raises(DataError, match=message):
            load_examples(tmp_path / "f.json", tok, 256)
    with pytest.raises(DataError, match="not found"):
        load_examples(tmp_path / "missing.json", tok, 64)
    # The official grounding prompt opens <box> in the question and the reply closes it: accepted.
    conv = [{"from": "user", "value": "<ref>it</ref><box>"}, {"from": "assistant", "value": "(1,2),(3,4)</box>"}]
    (tmp_path / "f.json").write_text(json.dumps([{"id": "split", "conversations": conv}]))
    assert load_examples(tmp_path / "f.json", tok, 64)[0].id == "split"


def test_a_file_that_is_not_an_image_is_refused_before_training(ws, tmp_path):
    shutil.copytree(ws / "imgs", tmp_path / "imgs")
    (tmp_path / "imgs" / "x.png").write_bytes(b"<html>not found</html>")
    conv = [{"from": "user", "value": "<img>imgs/x.png</img>what"}, {"from": "assistant", "value": "x"}]
    (tmp_path / "d.json").write_text(json.dumps([sample(0), {"id": "bad-img", "conversations": conv}]))
    with pytest.raises(DataError, match=r"sample 'bad-img': image .*x.png is not a readable image"):
        load_examples(tmp_path / "d.json", QWenTokenizer.from_pretrained(ws / "model"), 256)


@pytest.mark.parametrize("kw, message", [
    ({"lr": 0.0}, "lr 0.0: must be a number > 0"), ({"lr": float("inf")}, "lr inf"),
    ({"epochs": 0.0, "max_steps": None}, "epochs 0.0: must be a number > 0"),
    ({"epochs": float("nan"), "max_steps": None}, "epochs nan"), ({"max_steps": 0}, "max_steps 0: must be >= 1"),
    ({"max_steps": -1}, "max_steps -1"), ({"warmup_ratio": 2.0}, "warmup_ratio 2.0"),
    ({"weight_decay": -1.0}, "weight_decay -1.0"), ({"max_grad_norm": -1.0}, "max_grad_norm -1.0"),
    ({"max_len": 0}, "max_len 0"), ({"lora_alpha": 0.0}, "alpha=0.0"), ({"lora_r": 0}, "r=0"),
])
def test_flag_values_that_would_train_nothing_are_refused_before_loading(ws, tmp_path, kw, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        args(ws, tmp_path / "o", **kw)


def test_an_out_that_is_a_file_or_an_unreadable_checkpoint_is_a_clear_error(ws, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for out, message in ((tmp_path / "file", "is a file, not a folder"), (tmp_path / "file" / "sub", "cannot create")):
        assert cli_main(cli(ws, out, "--max-steps", "1")) == 2
        assert message in capsys.readouterr().err
    out = tmp_path / "run"
    (out / "checkpoint").mkdir(parents=True)
    for content, message in ((b"junk", "not a readable training checkpoint"), (None, "not a qwenvl fine-tune")):
        if content is None:
            torch.save({"step": 1}, out / "checkpoint" / "state.pt")
        else:
            (out / "checkpoint" / "state.pt").write_bytes(content)
        assert cli_main(cli(ws, out, "--max-steps", "1")) == 2
        assert message in capsys.readouterr().err
        assert (out / "checkpoint" / "state.pt").is_file()                    # left for the user to judge


def test_merge_lora_and_finetune_never_write_over_a_checkpoint(ws, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(ws / "model", model)
    adapter = tmp_path / "adapter"
    assert cli_main(cli(ws, adapter, "--max-steps", "1")) == 0
    (tmp_path / "file").write_text("x")
    for out, message in ((model, "is the input checkpoint"), (tmp_path / "file", "is a file"),
                         (ws / "model", "already holds a checkpoint")):
        assert cli_main(["merge-lora", "--model", str(model), "--adapter", str(adapter), "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
    before = (model / "model.safetensors").read_bytes()
    argv = cli(ws, model, "--max-steps", "1")
    argv[argv.index("--model") + 1] = str(model)
    assert cli_main(argv) == 2 and "is the model folder" in capsys.readouterr().err
    assert (model / "model.safetensors").read_bytes() == before


def test_ctrl_c_keeps_the_finished_steps_and_the_rerun_resumes(ws, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "qwenvl.cli", *cli(ws, out, "--max-steps", "12", "--save-every", "1000")]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while proc.poll() is None and len(losses(out) if (out / "loss.csv").is_file() else []) < 3:
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=120)[1]
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=False)
    assert 3 <= state["step"] < 12 and f"holds step {state['step']}/12: rerun the same command" in err
    resumed = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [s for s, _, _ in losses(out)] == [str(i) for i in range(1, 13)]


def test_an_image_failing_at_its_step_keeps_the_finished_steps(ws, tmp_path, monkeypatch):
    import qwenvl.finetune as ft

    calls = []

    def failing(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise DataError("sample 's4': cannot load image imgs/a.png")
        return make_batch(*a, **kw)

    monkeypatch.setattr(ft, "make_batch", failing)
    with pytest.raises(DataError, match=r"s4.*at step 3/5; .*state.pt holds step 2/5"):
        ft.finetune(args(ws, tmp_path / "run", max_steps=5, save_every=1000))
    assert torch.load(tmp_path / "run" / "checkpoint" / "state.pt", weights_only=False)["step"] == 2


def test_image_paths_are_relative_to_the_json_file(ws, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                                                   # not the data folder
    tok = QWenTokenizer.from_pretrained(ws / "model")
    examples = load_examples(ws / "train.json", tok, 256)
    assert examples[0].images == [str(ws / "imgs" / "a.png")]
    assert tok.image_paths(examples[0].rendered.input_ids) == ["imgs/a.png"]      # the ids keep the written path
    batch = make_batch(examples[:3], tok.pad_token_id, 112)
    assert batch["images"].shape == (3, 3, 112, 112) and batch["input_ids"].shape[0] == 3


# ------------------------------------------------------------------------------------------- model pieces

def test_gradient_checkpointing_gives_the_same_gradients(ws, tmp_path):
    tok = QWenTokenizer.from_pretrained(ws / "model")
    batch = make_batch(load_examples(ws / "train.json", tok, 256)[:2], tok.pad_token_id, 112)
    grads = []
    for checkpointing in (False, True):
        model, _ = build_model(args(ws, tmp_path, method="full"))
        if checkpointing:
            enable_gradient_checkpointing(model)
        logits = model(batch["input_ids"], images=batch["images"], attention_mask=batch["attention_mask"])
        logits.float().logsumexp(-1).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and "transformer.visual.attn_pool.query" in grads[0]
    assert "transformer.visual.conv1.weight" not in grads[0]                    # the ViT stays frozen (fix_vit)
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


def test_official_lora_defaults(ws, tmp_path, monkeypatch):
    monkeypatch.setitem(quant_kernels._CPU, "native", True)                  # a CPU with bf16 instructions
    model, spec = build_model(FinetuneArgs(data=ws / "train.json", model=ws / "model", out=tmp_path))
    assert (spec.r, spec.alpha, spec.dropout, spec.modules_to_save) == (64, 16.0, 0.05, ("wte", "lm_head"))
    assert model.transformer.h[0].attn.c_attn.base_layer.weight.dtype == torch.bfloat16   # bf16 frozen base
    assert model.transformer.h[0].attn.c_attn.lora_A.weight.dtype == torch.float32
    monkeypatch.setitem(quant_kernels._CPU, "native", False)                 # AVX2: bf16 is emulated, train in fp32
    fp32, _ = build_model(FinetuneArgs(data=ws / "train.json", model=ws / "model", out=tmp_path))
    assert fp32.transformer.h[0].attn.c_attn.base_layer.weight.dtype == torch.float32
    chat_dir = tmp_path / "Qwen-VL-Chat"
    shutil.copytree(ws / "model", chat_dir)
    _, spec = build_model(FinetuneArgs(data=ws / "train.json", model=chat_dir, out=tmp_path))
    assert spec.modules_to_save == ()                                            # a chat model keeps wte/lm_head


# ------------------------------------------------------------------------------------------- runs

def test_lora_run_through_the_cli(ws, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(cli(ws, out, "--max-steps", "3", "--merge")) == 0
    assert {"adapter_config.json", "adapter_model.safetensors", "loss.csv", "loss.png", "finished.json",
            "qwen.tiktoken", "merged"} <= {p.name for p in out.iterdir()}
    assert not (out / "checkpoint").exists()
    assert [s for s, _, _ in losses(out)] == ["1", "2", "3"]
    unmerged = load_model(ws / "model", "float32")
    load_adapter(unmerged, out)
    ids = torch.tensor([[5, 17, 300, 42, 12, 7]])
    merged = load_model(out / "merged", "float32")
    assert not list(lora_layers(merged))
    assert torch.allclose(merged(ids), unmerged.eval()(ids), atol=1e-4)
    assert cli_main(cli(ws, out, "--max-steps", "3")) == 2                      # finished: refuse to overwrite
    assert "already holds a finished run" in capsys.readouterr().err
    assert cli_main(["merge-lora", "--model", str(ws / "model"), "--adapter", str(out), "--out", str(tmp_path / "m2")]) == 0
    assert load_file(str(tmp_path / "m2" / "model.safetensors")).keys() == load_file(str(out / "merged" / "model.safetensors")).keys()


@pytest.mark.filterwarnings("ignore:this CPU has no bf16")   # bf16 on purpose: the path of CPUs that have it
def test_qlora_loss_falls_over_a_frozen_int4_base(ws, tmp_path):
    out = tmp_path / "q"
    assert cli_main(cli(ws, out, "--method", "qlora", "--dtype", "bf16", "--q-group-size", "16", "--max-steps", "12",
                        "--lr", "5e-3", "--merge")) == 0
    curve = [float(loss) for _, loss, _ in losses(out)]
    assert sum(curve[-3:]) / 3 < 0.8 * sum(curve[:3]) / 3, curve
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["modules_to_save"] is None                                    # official: none with Q-LoRA
    assert json.loads((out / "finished.json").read_text())["method"] == "qlora"
    assert "quantization_config" not in json.loads((out / "merged" / "config.json").read_text())  # merged into float


def test_full_finetune_writes_an_official_checkpoint(ws, tmp_path):
    out = tmp_path / "full"
    assert cli_main(cli(ws, out, "--method", "full", "--max-steps", "2")) == 0
    before, after = load_model(ws / "model", "float32").state_dict(), load_model(out, "float32").state_dict()
    assert before.keys() == after.keys()
    assert torch.equal(before["transformer.visual.conv1.weight"], after["transformer.visual.conv1.weight"])
    assert torch.equal(before["transformer.visual.proj"], after["transformer.visual.proj"])   # outside attn_pool
    assert not torch.equal(before["transformer.visual.attn_pool.query"], after["transformer.visual.attn_pool.query"])
    assert not torch.equal(before["transformer.h.0.mlp.w1.weight"], after["transformer.h.0.mlp.w1.weight"])


def test_resume_after_sigkill_repeats_the_loss_curve(ws, tmp_path):
    steps = "16"
    straight = tmp_path / "straight"
    # Both runs in subprocesses with the same environment (thread count), so float reductions agree.
    cmd_straight = [sys.executable, "-m", "qwenvl.cli", *cli(ws, straight, "--max-steps", steps, "--save-every", "1")]
    assert subprocess.run(cmd_straight, env=ENV, capture_output=True, timeout=600).returncode == 0
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "qwenvl.cli", *cli(ws, out, "--max-steps", steps, "--save-every", "1")]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while proc.poll() is None and len(losses(out) if (out / "loss.csv").is_file() else []) < 3:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not (out / "finished.json").exists() and len(losses(out)) < int(steps)      # killed mid-run
    resumed = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert losses(out) == losses(straight)                                      # step, loss, lr: every row


@pytest.fixture(scope="module")
def single_run(ws, tmp_path_factory) -> Path:
    """LoRA + resampler, some samples without images, global batch 4 in one process (2 x 2)."""
    out = tmp_path_factory.mktemp("single") / "run"
    assert cli_main(_dist_cli(ws, out, "2")) == 0
    return out


def _dist_cli(ws: Path, out: Path, batch: str) -> list[str]:
    return ["finetune", "--data", str(ws / "mixed.json"), "--model", str(ws / "model"), "--out", str(out),
            "--batch-size", batch, "--grad-accum", "2", "--lr", "1e-3", "--lora-r", "4", "--lora-dropout", "0",
            "--train", "adapter", "--dtype", "fp32", "--max-steps", "3", "--no-progress"]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_two_processes_match_one(mode, ws, single_run, tmp_path):
    out = tmp_path / mode
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "qwenvl.cli", *_dist_cli(ws, out, "1"), "--distributed", mode]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "finished.json").read_text())["world_size"] == 2
    for (s1, l1, r1), (s2, l2, r2) in zip(losses(single_run), losses(out), strict=True):
        assert (s1, r1) == (s2, r2) and float(l1) == pytest.approx(float(l2), abs=1e-5)
    ours, theirs = (load_file(str(d / "adapter_model.safetensors")) for d in (single_run, out))
    assert ours.keys() == theirs.keys() and any("attn_pool" in k for k in ours)
    for k in ours:
        assert torch.allclose(ours[k], theirs[k], atol=1e-5), k
