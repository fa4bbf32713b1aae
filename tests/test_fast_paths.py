"""The user-facing loaders switch the fast inference paths on (fast_paths.py), and nothing a user sees changes.

On tiny bf16 checkpoints, with the fast paths and without (QWENVL_FAST=0 or fast=False): the chat API's greedy answer
(Qwen-VL), `qwenvl chat`'s greedy answer and the server engine's greedy tokens, one request and a left-padded batch
(Qwen2-VL), are identical, as are Qwen2-VL's image features and prefill logits, and the fast path did run (the
kernel / FastDecoder.step / the row kernels were called). Loading and saving again writes the checkpoint's very
tensors. LoRA still wraps and merges a fast model; a swapped projection turns the fused decode step off rather than
bypassing the new module.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from qwen2_vl_tiny import hf_config_dict, prompt, random_image
from test_serve_qwen2_vl import STOPS, image_input, tokenizer_json
from tiny_checkpoint import VOCAB, tiny_config
from qwenvl import quant_kernels
from qwenvl.api import AutoModelForCausalLM, AutoTokenizer
from qwenvl.cli import main
from qwenvl.config import GenerationConfig
from qwenvl.engine import Engine, Request
from qwenvl.families import load_family
from qwenvl.fast_linear import FastLinear, PackedLinear, packable
from qwenvl.fast_paths import ENV, fast_enabled, fast_step
from qwenvl.lora import LoraSpec, apply_lora, merge_lora
from qwenvl.model import QWenLMHeadModel
from qwenvl.processor import preprocess_images
from qwenvl.qwen2_vl import Qwen2VL
from qwenvl.qwen2_vl_config import Qwen2VLConfig
from qwenvl.qwen2_vl_fast import FastDecoder
from qwenvl.qwen2_vl_weights import save_checkpoint as save_qwen2
from qwenvl.sampling import SamplingParams
from qwenvl.weights import load_model, save_checkpoint


@pytest.fixture(autouse=True)
def default_env(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)


@pytest.fixture(scope="module")
def v1_dir(tmp_path_factory):
    """Qwen-VL, 2 layers, the real vocabulary, weights wide enough for clear-cut greedy choices, stored in bf16."""
    d = tmp_path_factory.mktemp("fast_v1")
    model = QWenLMHeadModel(tiny_config(layers=2))
    model.init_weights(torch.Generator().manual_seed(0), std=0.08)
    save_checkpoint(model, d, GenerationConfig(max_new_tokens=12), dtype=torch.bfloat16)
    shutil.copy(VOCAB, d / "qwen.tiktoken")
    return d


@pytest.fixture(scope="module")
def v2_dir(tmp_path_factory):
    """Qwen2-VL (tests/qwen2_vl_tiny.py), byte-level tokenizer, stored in bf16."""
    d = tmp_path_factory.mktemp("fast_v2")
    model = Qwen2VL(Qwen2VLConfig.from_dict(hf_config_dict())).eval()
    model.init_weights(torch.Generator().manual_seed(0), std=0.08)
    with torch.no_grad():
        model.lm_head.weight[256:980] = 0          # ids the byte tokenizer lacks never win: the answers are text
    save_qwen2(model, d, dtype=torch.bfloat16)
    (d / "tokenizer.json").write_text(json.dumps(tokenizer_json()))
    random_image(100, 150, 0).save(d / "x.png")
    return d


def count_kernel_results(monkeypatch, name: str) -> list[int]:
    """[n]: how often quant_kernels.<name> returned a result (not None: it applied) from now on."""
    calls, kernel = [0], getattr(quant_kernels, name)

    def spy(*args):
        out = kernel(*args)
        calls[0] += out is not None
        return out

    monkeypatch.setattr(quant_kernels, name, spy)
    return calls


@pytest.fixture
def kernel_calls(monkeypatch):
    """How often the compiled dense GEMV computed a FastLinear's output (0 without the compiled kernels)."""
    return count_kernel_results(monkeypatch, "dense_linear")


@pytest.fixture
def step_calls(monkeypatch):
    calls, step = [0], FastDecoder.step

    def spy(self, *args):
        calls[0] += 1
        return step(self, *args)

    monkeypatch.setattr(FastDecoder, "step", spy)
    return calls


def n_fast_linears(model: nn.Module) -> int:
    return sum(isinstance(m, FastLinear) for m in model.modules())


# ------------------------------------------------------------------------------------------ Qwen-VL: chat API

@pytest.fixture
def whole_step_calls(monkeypatch):
    """How often a Qwen-VL decode step ran as one kernel call (qwen_vl_fast; 0 without the compiled kernels)."""
    return count_kernel_results(monkeypatch, "decode_step")


def test_v1_chat_greedy_answer_is_the_same_with_the_fast_paths(v1_dir, kernel_calls, whole_step_calls):
    tok = AutoTokenizer.from_pretrained(v1_dir)
    fast, ref = AutoModelForCausalLM.from_pretrained(v1_dir), AutoModelForCausalLM.from_pretrained(v1_dir, fast=False)
    assert fast.model.lm_head.weight.dtype == torch.bfloat16
    assert n_fast_linears(fast.model.transformer.h) == 2 * 5 and isinstance(fast.model.lm_head, FastLinear)
    assert not any(type(m) is nn.Linear for m in fast.model.modules()) and n_fast_linears(ref.model) == 0
    answers = {}
    for name, model in (("ref", ref), ("fast", fast)):
        kernel_calls[0] = 0
        answers[name] = model.chat(tok, "Hello, who are you?", do_sample=False)[0]
        answers[name + "_stream"] = list(model.chat_stream(tok, "Hello, who are you?", do_sample=False))[-1]
        answers[name + "_calls"] = kernel_calls[0]
        answers[name + "_steps"], whole_step_calls[0] = whole_step_calls[0], 0
    assert answers["fast"] == answers["ref"] == answers["fast_stream"] == answers["ref_stream"]
    assert answers["fast"]
    assert answers["ref_calls"] == answers["ref_steps"] == 0
    assert answers["fast_calls"] > 0 or quant_kernels.library() is None
    assert answers["fast_steps"] > 0 or quant_kernels.library() is None


def test_v1_load_then_save_writes_the_checkpoint_tensors(v1_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(v1_dir).model
    assert n_fast_linears(model) > 0
    save_checkpoint(model, tmp_path)
    assert_same_tensors(load_file(str(tmp_path / "model.safetensors")), load_file(str(v1_dir / "model.safetensors")))


def test_lora_wraps_and_merges_a_fast_model(v1_dir):
    outs = []
    for fast in (False, True):
        model = AutoModelForCausalLM.from_pretrained(v1_dir, dtype="float32", fast=fast).model
        apply_lora(model, LoraSpec(r=4, dropout=0.0), torch.Generator().manual_seed(0))
        for p in model.parameters():
            if p.requires_grad:                    # B starts at zero: give the update something to merge
                torch.nn.init.normal_(p.data, std=0.1, generator=torch.Generator().manual_seed(1))
        ids = torch.tensor([[10, 20, 30, 40]])
        with torch.no_grad():
            before = model(ids)
            merge_lora(model)
            outs.append((before, model(ids)))
    (ref_before, ref_merged), (fast_before, fast_merged) = outs
    torch.testing.assert_close(fast_before, ref_before)
    torch.testing.assert_close(fast_merged, ref_merged)


# ------------------------------------------------------------------------------------------ Qwen2-VL: CLI, engine

def cli_answer(v2_dir, capsys) -> str:
    argv = ["chat", "--model", str(v2_dir), "--image", str(v2_dir / "x.png"), "--greedy", "--max-new-tokens", "12",
            "--max-pixels", str(100 * 150), "what is it?"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "error" not in captured.err
    return captured.out


def test_v2_cli_greedy_answer_is_the_same_with_the_fast_paths(v2_dir, capsys, monkeypatch, step_calls, kernel_calls):
    fast = cli_answer(v2_dir, capsys)
    assert step_calls[0] > 0
    assert kernel_calls[0] > 0 or quant_kernels.library() is None
    monkeypatch.setenv(ENV, "0")
    step_calls[0] = kernel_calls[0] = 0
    ref = cli_answer(v2_dir, capsys)
    assert step_calls[0] == kernel_calls[0] == 0
    assert fast == ref and fast.strip()


def engine_tokens(model, family) -> list[list[int]]:
    img, other = random_image(100, 150, 0), random_image(60, 90, 1)
    greedy = SamplingParams(max_new_tokens=10, do_sample=False)
    one = [Request(prompt(5, ("image", 20), 7), greedy, [image_input(img)])]
    batch = one + [Request(prompt(3, ("image", 6), 2), greedy, [image_input(other)])]     # left-padded together
    tokens = []
    for requests in (one, batch):
        tokens += Engine(model, max_batch=2, max_len=64, eos_token_id=STOPS[0], family=family).generate(requests)
    return tokens


def test_v2_engine_greedy_tokens_are_the_same_with_the_fast_paths(v2_dir, step_calls):
    model, _, family = load_family(v2_dir)
    assert model.lm_head.weight.dtype == torch.bfloat16 and fast_step(model) is not None
    fast = engine_tokens(model, family)
    assert step_calls[0] > 0
    model, _, family = load_family(v2_dir, fast=False)
    step_calls[0] = 0
    assert fast_step(model) is None and n_fast_linears(model) == 0
    assert engine_tokens(model, family) == fast
    assert step_calls[0] == 0


def test_v2_image_encode_and_prefill_are_the_same_with_the_fast_paths(v2_dir, monkeypatch):
    rope_calls = count_kernel_results(monkeypatch, "rows_rope")
    gelu_calls = count_kernel_results(monkeypatch, "rows_quick_gelu_")
    patches, grid = preprocess_images([random_image(100, 150, 0)])
    ids = torch.tensor([prompt(5, ("image", int(grid.prod()) // 4), 7)])
    outputs = []
    for fast in (True, False):
        model = load_family(v2_dir, fast=fast)[0]
        with torch.no_grad():
            outputs.append((model.encode_vision(patches, grid), model(ids, pixel_patches=patches, image_grid_thw=grid)))
        if fast:
            assert (rope_calls[0] > 0 and gelu_calls[0] > 0) or quant_kernels.library() is None
            rope_calls[0] = gelu_calls[0] = 0
            n_packed = sum(isinstance(m, PackedLinear) for m in model.visual.modules())
            expected = 4 * len(model.visual.blocks) + 2 if packable(model.visual.blocks[0].mlp.fc1) else 0
            assert n_packed == expected                              # qkv, proj, fc1, fc2 per block; the merger
    assert rope_calls[0] == gelu_calls[0] == 0                       # off: the reference ops ran
    (features, logits), (ref_features, ref_logits) = outputs
    assert features.dtype == torch.bfloat16
    assert torch.equal(features, ref_features) and torch.equal(logits, ref_logits)


def test_v2_load_then_save_writes_the_checkpoint_tensors(v2_dir, tmp_path):
    model = load_family(v2_dir)[0]
    assert fast_step(model) is not None              # projections fused: their tensors are views now
    save_qwen2(model, tmp_path)
    assert_same_tensors(load_file(str(tmp_path / "model.safetensors")), load_file(str(v2_dir / "model.safetensors")))


def test_a_swapped_projection_turns_the_fused_step_off(v2_dir):
    model = load_family(v2_dir)[0]
    attn = model.model.layers[1].self_attn
    attn.k_proj = nn.Sequential(attn.k_proj)           # what a LoRA wrap does: a new module the fused step skips
    assert fast_step(model) is None


# ------------------------------------------------------------------------------------------ the switch

def test_the_switch(v1_dir, v2_dir, monkeypatch):
    assert fast_enabled() and fast_enabled(True) and not fast_enabled(False)
    for off in ("0", "false", "OFF", "no"):
        monkeypatch.setenv(ENV, off)
        assert not fast_enabled() and fast_enabled(True)
    assert n_fast_linears(AutoModelForCausalLM.from_pretrained(v1_dir).model) == 0
    model = load_family(v2_dir)[0]
    assert n_fast_linears(model) == 0 and fast_step(model) is None
    assert n_fast_linears(AutoModelForCausalLM.from_pretrained(v1_dir, fast=True).model) > 0   # the keyword wins
    monkeypatch.setenv(ENV, "maybe")
    with pytest.raises(ValueError, match="QWENVL_FAST"):
        fast_enabled()
    monkeypatch.setenv(ENV, "1")
    assert n_fast_linears(load_model(v1_dir)) == 0                  # the plain loader (fine-tuning's) never swaps


def assert_same_tensors(saved: dict, original: dict) -> None:
    assert sorted(saved) == sorted(original)
    for key, tensor in original.items():
        assert saved[key].dtype == tensor.dtype and torch.equal(saved[key], tensor), key


# ------------------------------------------------------------------------------------------ both: the vision towers

def test_every_vision_matmul_takes_the_upcast_hook(v1_dir, v2_dir, monkeypatch):
    """The patch embeddings (Qwen-VL's conv1, Qwen2-VL's Conv3d), the ViT, the resampler and the final projection all
    go through quant_kernels.linear (float32 where a CPU emulates bf16), and where bf16 is native the features are
    the reference tower's, bit for bit."""
    weights, real = [], quant_kernels.linear
    monkeypatch.setattr(quant_kernels, "linear", lambda x, w, b: weights.append(tuple(w.shape)) or real(x, w, b))
    monkeypatch.setitem(quant_kernels._CPU, "native", True)
    v1 = {fast: AutoModelForCausalLM.from_pretrained(v1_dir, fast=fast).model for fast in (True, False)}
    size = v1[True].config.visual.image_size
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(v1[True].encode_images(pixels), v1[False].encode_images(pixels))
    conv = v1[True].transformer.visual.conv1.weight
    assert (conv.shape[0], conv[0].numel()) in weights
    weights.clear()
    v2 = {fast: load_family(v2_dir, fast=fast)[0] for fast in (True, False)}
    embed = v2[True].visual.patch_embed.proj.weight                           # [E, C, Tp, P, P]
    patches, grid = torch.randn(16, embed[0].numel()), torch.tensor([[1, 4, 4]])
    with torch.no_grad():
        assert torch.equal(v2[True].encode_vision(patches, grid), v2[False].encode_vision(patches, grid))
    assert (embed.shape[0], embed[0].numel()) in weights
