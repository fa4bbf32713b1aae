"""Training helpers: freeze switches, LR schedule, resume with the same loss curve, BPE, the staged recipe."""
from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import tiktoken

from qwenvl.bpe import save_tiktoken, train_bpe
from qwenvl.tokenizer import PAT_STR, QWenTokenizer
from qwenvl import quant_kernels
from qwenvl.train import (LossLog, adamw, autocast, bypass_final_norm, cosine_lr, load_state, plot_losses,
                          resolve_train_dtype, restore_final_norm, save_state, set_trainable, stage_minutes)
from qwenvl.weights import load_model

ROOT = Path(__file__).resolve().parent.parent
TINY = Path(__file__).parent / "fixtures" / "qwen_vl_tiny"


def test_freeze_switches_follow_the_paper_stages():
    model = load_model(TINY, "float32")
    set_trainable(model, vit=False, adapter=True, llm=True)          # stage 3 / finetune.py fix_vit
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "transformer.visual.attn_pool.query" in trainable
    assert "transformer.h.0.attn.c_attn.weight" in trainable
    assert "transformer.visual.conv1.weight" not in trainable
    assert "transformer.visual.proj" not in trainable                 # outside attn_pool, as in finetune.py
    assert "transformer.visual.attn_pool.pos_embed" not in trainable
    set_trainable(model, vit=True, adapter=True, llm=False)           # stage 1
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "transformer.visual.conv1.weight" in trainable and "lm_head.weight" not in trainable


def test_final_norm_bypass_and_restore_keep_the_logits_scale_and_the_official_keys():
    model = load_model(TINY, "float32")
    model.init_weights(torch.Generator().manual_seed(0), std=0.05, embedding_std=1.0)
    assert model.transformer.wte.weight.std().item() == pytest.approx(1.0, rel=0.05)
    assert model.transformer.h[0].attn.c_attn.weight.std().item() == pytest.approx(0.05, rel=0.05)
    ids = torch.randint(0, 900, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0                                                   # left padding is left out of the RMS
    bypass_final_norm(model)
    assert "transformer.ln_f.weight" not in model.state_dict()
    with torch.no_grad():
        bypassed = model(ids, attention_mask=mask)
    rms = restore_final_norm(model, ids, mask)
    assert "transformer.ln_f.weight" in model.state_dict() and rms > 0.5
    assert torch.allclose(model.transformer.ln_f.weight, torch.full_like(model.transformer.ln_f.weight, rms))
    with torch.no_grad():
        restored = model(ids, attention_mask=mask)
    assert not torch.allclose(restored, bypassed)                     # a norm again, not an identity
    scale = restored[mask.bool()].std() / bypassed[mask.bool()].std()
    assert 0.8 < scale.item() < 1.25                                  # logits keep their scale on average


def test_cosine_schedule_worked_example():
    assert cosine_lr(4, 110, 1.0, 10) == pytest.approx(0.5)
    assert cosine_lr(10, 110, 1.0, 10) == pytest.approx(1.0)
    assert cosine_lr(110, 110, 1.0, 10) == pytest.approx(0.1)


def _train(model, opt, rng, np_rng, steps):
    losses = []
    for _ in range(steps):
        ids = torch.tensor([[rng.randrange(900) for _ in range(8)]]) + int(np_rng.integers(0, 5))
        loss = model(ids)[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None]).mean().neg()
        loss = loss + 0.01 * torch.randn(()) ** 2                     # uses the torch RNG too
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_training_dtype_is_bf16_only_where_the_cpu_multiplies_bf16(monkeypatch):
    monkeypatch.setitem(quant_kernels._CPU, "native", True)
    assert resolve_train_dtype("auto") == "bf16" and resolve_train_dtype("fp32") == "fp32"
    monkeypatch.setitem(quant_kernels._CPU, "native", False)
    assert resolve_train_dtype("auto") == "fp32"
    with pytest.warns(UserWarning, match="emulates bf16"):
        assert resolve_train_dtype("bf16") == "bf16"                  # asked for: kept, with a warning
    with pytest.raises(ValueError, match="fp16"):
        resolve_train_dtype("fp16")
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    with autocast("bf16"):
        assert torch.nn.functional.linear(x, w).dtype == torch.bfloat16
    with autocast("fp32"):
        assert torch.nn.functional.linear(x, w).dtype == torch.float32


def test_resume_gives_the_same_loss_curve(tmp_path):
    def fresh():
        torch.manual_seed(0)
        model = load_model(TINY, "float32").train()
        return model, adamw(model.parameters(), 1e-3), random.Random(1), np.random.default_rng(2)

    model, opt, rng, np_rng = fresh()
    straight = _train(model, opt, rng, np_rng, 6)
    model, opt, rng, np_rng = fresh()
    first = _train(model, opt, rng, np_rng, 3)
    save_state(tmp_path / "state.pt", model, opt, 3, rng, np_rng)
    model, opt, rng, np_rng = fresh()
    step, _ = load_state(tmp_path / "state.pt", model, opt, rng, np_rng)
    assert step == 3
    assert first + _train(model, opt, rng, np_rng, 3) == pytest.approx(straight, abs=1e-6)


def test_loss_log_truncates_on_resume_and_plots(tmp_path):
    log = LossLog(tmp_path / "loss.csv")
    for s in (10, 20, 30):
        log.append(step=s, stage="a", loss=1.0 / s)
    LossLog(tmp_path / "loss.csv", resume_step=20, stage="a")
    assert [int(r["step"]) for r in LossLog.read(tmp_path / "loss.csv")] == [10, 20]
    plot_losses(tmp_path / "loss.csv", tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 1000


def test_stage_minutes_uses_each_stages_median_rate(tmp_path):
    log = LossLog(tmp_path / "loss.csv")
    for step, rate in ((10, 20.0), (20, 0.5), (30, 20.0)):       # a pause inside stage "a": its median ignores it
        log.append(step=step, stage="a", loss=1.0, samples_per_s=rate)
    for step in (10, 20):
        log.append(step=step, stage="b", loss=1.0, samples_per_s=8.0)
    log.append(step=10, stage="c", loss=1.0, samples_per_s=1.0)
    minutes = stage_minutes(LossLog.read(tmp_path / "loss.csv"), {"a": 4, "b": 2, "missing": 3})
    assert minutes == pytest.approx({"a": 30 * 4 / 20 / 60, "b": 20 * 2 / 8 / 60})     # "c" has no batch given


def test_bpe_round_trips_and_compresses(tmp_path):
    texts = ["the red circle is left of the blue square", "红色的圆形在蓝色正方形的左边", "(123,456),(789,12)"] * 50
    ranks = train_bpe(texts, 256 + 60, PAT_STR)
    assert len(ranks) == 316 and all(ranks[bytes([b])] == b for b in range(256))
    enc = tiktoken.Encoding("t", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens={})
    sample = "the circle 红色 (42) 🐱 café"
    assert enc.decode(enc.encode(sample)) == sample
    assert len(enc.encode(texts[0])) < len(texts[0]) / 2
    save_tiktoken(ranks, tmp_path / "qwen.tiktoken")
    tok = QWenTokenizer(tmp_path / "qwen.tiktoken", image_span=8)
    assert tok.eod_id == 316 and tok.img_pad_id == 316 + 216
    assert train_bpe(texts, 300, PAT_STR) == train_bpe(texts, 300, PAT_STR)      # deterministic


def test_the_recipe_is_reproducible_from_its_seed(tmp_path):
    """Two runs with one seed give the same losses and the same checkpoint, bit for bit; another seed does not
    (until session 26 the ViT pretraining's patch heads drew from torch's unseeded generator)."""
    def run(name: str, seed: int) -> tuple[list[tuple], bytes]:
        cmd = [sys.executable, str(ROOT / "scripts" / "train_demo.py"), "--smoke", "--seed", str(seed),
               "--out", str(tmp_path / name), "--export", str(tmp_path / f"{name}_model"), "--only", "vit_pretrain",
               "lm_pretrain", "stage1"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        losses = [(row["step"], row["stage"], row["loss"]) for row in LossLog.read(tmp_path / name / "loss.csv")]
        return losses, (tmp_path / f"{name}_model" / "model.safetensors").read_bytes()

    first, again, other = run("a", 3), run("b", 3), run("c", 4)
    assert len(first[0]) >= 3 and first == again                  # logged rows of the three stages
    assert first[0] != other[0] and first[1] != other[1]


def test_every_stage_of_the_recipe_runs_and_resumes(tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts" / "train_demo.py"), "--smoke", "--out", str(tmp_path / "run"),
           "--export", str(tmp_path / "model")]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    stages = ("vit_pretrain", "lm_pretrain", "stage1", "stage2_read", "stage2_warmup", "stage2_pairs", "stage2_pairs_all",
              "stage2_ground1", "stage2_ground", "stage2_easy", "stage2", "stage3")
    assert all((tmp_path / "run" / s / "DONE").is_file() for s in stages)
    assert (tmp_path / "run" / "loss.png").is_file()
    probed = first.stdout.count(": probe (")                      # after every stage of stage 1 onwards
    assert probed == len([s for s in stages if s.startswith("stage")]) + 4, first.stdout[-2000:]
    assert "stage2_pairs@2: probe (" in first.stdout                 # inside the stages with probe_every
    assert "stage2_ground1@2: probe (" in first.stdout and "stage2_ground@2: probe (" in first.stdout
    assert "stage2@2: probe (" in first.stdout
    probes = json.loads((tmp_path / "run" / "probes.json").read_text())
    assert set(probes["vit_pretrain"]) == {"colour", "shape", "char", "row", "col"}   # per-patch, after the stage
    assert all(0.0 <= v <= 1.0 for v in probes["vit_pretrain"].values())
    captions = [probes["stage1"][f"caption_{lang}"][images] for lang in ("en", "zh") for images in ("real", "blank")]
    assert all(0.0 <= v <= 1.0 for v in captions)                 # share of caption tokens, teacher-forced
    assert first.stdout.count(": retrieval probe (") == 1         # after lm_pretrain
    assert first.stdout.count("ln_f back") == 1                   # before stage 3 (bypassed until then)
    if sys.platform == "linux":                                   # checkpoints trim the heap and log its size
        assert re.search(r"stage3 step 1: resident [\d.]+ GiB, [\d.]+ after returning free pages", first.stdout)
    timed = re.search(r"training time at each stage's median rate: [\d.]+ min \((.*?);", first.stdout)
    assert timed and sorted(part.split()[0] for part in timed.group(1).split(", ")) == sorted(stages)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("done earlier") == len(stages)
    assert ": probe (" not in again.stdout                        # nothing trained: nothing probed again
    model = load_model(tmp_path / "model")
    tok = QWenTokenizer.from_pretrained(tmp_path / "model")
    assert model.config.vocab_size >= tok.n_vocab
    assert model.config.visual.image_start_id == tok.img_start_id
    # `--only eval --export`: nothing trains; the last finished stage (stage3) is what is exported.
    cmd_export = cmd[:5] + ["--only", "eval", "--export", str(tmp_path / "model2")]
    third = subprocess.run(cmd_export, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0 and "loaded stage3" in third.stdout, third.stderr[-2000:]
    again_model = load_model(tmp_path / "model2")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again_model.state_dict().values()))
    # `--only stage3` trains stage 3 on the finished stages before it (loaded), and refuses when one is missing.
    run = tmp_path / "run"
    for name in ("stage3", "stage2"):
        (run / name / "DONE").rename(run / name / "DONE.kept")
    cmd_only = cmd[:5] + ["--only", "stage3"]
    missing = subprocess.run(cmd_only, capture_output=True, text=True, timeout=600)
    assert missing.returncode != 0 and "stage2 is not finished" in missing.stderr, missing.stderr[-2000:]
    (run / "stage2" / "DONE.kept").rename(run / "stage2" / "DONE")
    fourth = subprocess.run(cmd_only, capture_output=True, text=True, timeout=600)
    assert fourth.returncode == 0, fourth.stderr[-2000:]
    assert all(f"{s}: done earlier, loaded" in fourth.stdout for s in stages[:-1])
    assert "stage3: finished" in fourth.stdout
