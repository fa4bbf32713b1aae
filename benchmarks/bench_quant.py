"""Decode speed of int8 / int4 weight-only models against fp32 and bf16, as a share of the memory-bandwidth roofline.

    .venv/bin/python benchmarks/bench_quant.py                      # Qwen2-VL-2B-sized LLM: fp32 bf16 int8 int4
    .venv/bin/python benchmarks/bench_quant.py --quick              # 4 layers of the same shapes: a check, not a result
    .venv/bin/python benchmarks/bench_quant.py --qwen-vl            # Qwen-VL-Chat-shaped 9.6B, GPTQ int4 (built so)
    .venv/bin/python benchmarks/bench_quant.py --qwen-vl --quick    # the same at 2 LM + 2 ViT layers (a check)
    .venv/bin/python benchmarks/bench_quant.py --modes bf16 int4 --threads 2 --json out/bench_quant.json

Every model runs as users get it, with qwenvl.fast_paths on (FastLinear bf16 GEMVs, fused projections, the Qwen2-VL
decode step of qwen2_vl_fast). Model: our Qwen2-VL decoder (qwenvl/qwen2_vl.py) at the Qwen2-VL-2B sizes (hidden 1536, 28 layers, 12 heads, 2 KV
heads, MLP 8960, vocab 151936), random weights, the vision tower cut to one block (decoding never runs it). fp32 and
bf16 keep lm_head tied to the embedding, as the 2B model does. int8 / int4 quantize every decoder linear and
lm_head (int8 per output channel; int4 group 128, symmetric), built directly in quantized form with random codes;
everything else (embedding, norms, activations, KV cache) is bf16. Greedy decoding of `--steps` tokens after a
16-token prompt; the first two steps are a warm-up (they load the kernels and build per-layer caches). All modes are
built first and decoded in turn, `--rounds` times: the table holds medians over rounds, and "x bf16" is the median of
each round's ratio (modes timed a minute apart on a shared host can differ by 2x for the host's reasons alone).

Roofline: the bytes of weights one decode step reads (every linear weight with its scales and zero points as the
kernel reads them, the norms, one embedding row; the KV cache of the short context is left out) over the read
bandwidth of a 1 GiB float32 tensor sum measured at the same thread count right after each mode's decode (a shared
host's bandwidth wanders by 2x from minute to minute; the GB/s column shows each mode's median):
    roofline tok/s = bandwidth / bytes per token,   share = measured tok/s / roofline tok/s.

--qwen-vl builds Qwen-VL-Chat's shapes (LM 32 x 4096, MLP 11008, vocab 151936; ViT-bigG 48 x 1664 at 448 px) with
the LM linears in the official GPTQ Int4 layout (`--format int4` for ours) and everything else bf16, straight from
the meta device: the fp32 model (38 GB) never exists. It reports the build RSS, decode tokens/s and the bf16
image-encode time of one 448 px image.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from statistics import median

import torch
from bench_models import materialise
from measure import cpu_name, decode_bytes, rss_gib, stream_bandwidth, timed
from torch import nn

from qwenvl import quant_kernels
from qwenvl.config import QWenConfig
from qwenvl.fast_paths import fast_step, use_fast_paths
from qwenvl.fused_projections import fuse_projections
from qwenvl.kv_cache import KVCache
from qwenvl.model import QWenLMHeadModel
from qwenvl.quantize import GPTQLinear, Int4Linear, quantized_swap
from qwenvl.qwen2_vl import Qwen2VL, new_kv_cache
from qwenvl.qwen2_vl_config import PRESETS, Qwen2VLConfig

# --------------------------------------------------------------------------- arguments
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--modes", nargs="+", default=["fp32", "bf16", "int8", "int4"],
                    choices=["fp32", "bf16", "int8", "int4"])
parser.add_argument("--quick", action="store_true",
                    help="4 decoder layers instead of 28 (--qwen-vl: 2 LM and 2 ViT layers); same layer shapes")
parser.add_argument("--qwen-vl", action="store_true", help="the Qwen-VL-Chat-shaped 9.6B int4 run instead")
parser.add_argument("--format", choices=["gptq", "int4"], default="gptq",
                    help="--qwen-vl: the LM linears as GPTQLinear (official Int4 layout) or our Int4Linear")
parser.add_argument("--steps", type=int, default=None, help="decode steps timed (default 32; 8 with --qwen-vl)")
parser.add_argument("--rounds", type=int, default=3, help="every mode in turn, this many times")
parser.add_argument("--threads", type=int, default=torch.get_num_threads())
parser.add_argument("--json", type=Path, default=Path("out/bench_quant.json"))
args = parser.parse_args()
torch.set_num_threads(args.threads)
torch.set_flush_denormal(True)          # random weights must not time denormal arithmetic
steps = args.steps or (8 if args.qwen_vl else 32)
PROMPT = 16


# --------------------------------------------------------------------------- building models
def qwen2_2b(mode: str) -> Qwen2VL:
    raw = json.loads(json.dumps(PRESETS["Qwen2-VL-2B-Instruct"]))
    raw["vision_config"]["depth"] = 1
    if args.quick:
        raw["num_hidden_layers"] = 4
    with torch.device("meta"):
        model = Qwen2VL(Qwen2VLConfig.from_dict(raw))
        if mode in ("int8", "int4"):
            bits = 8 if mode == "int8" else 4
            quantized_swap(model, {"quant_method": "qwenvl", "bits": bits, "group_size": 128, "sym": True,
                                   "lm_head": True})
    model = materialise(model, torch.float32 if mode == "fp32" else torch.bfloat16, torch.Generator().manual_seed(0))
    return use_fast_paths(model)


def qwen_vl_chat() -> QWenLMHeadModel:
    cfg = QWenConfig.from_name("Qwen-VL-Chat")
    if args.quick:
        cfg.num_hidden_layers, cfg.visual.layers = 2, 2
    scheme = ({"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False}
              if args.format == "gptq" else {"quant_method": "qwenvl", "bits": 4, "group_size": 128, "sym": True})
    with torch.device("meta"):
        model = QWenLMHeadModel(cfg)
        quantized_swap(model, scheme)
    return use_fast_paths(materialise(model, torch.bfloat16, torch.Generator().manual_seed(0)))


class Stub(nn.Module):
    """A linear that costs nothing: what is left of a decode step is the model's own time (norms, RoPE, attention)."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


def stub_linears(model: Qwen2VL) -> Qwen2VL:
    """Every linear the fast decode step calls (the fused q/k/v and gate/up, o_proj, down_proj, lm_head) stubbed."""
    for layer, fused in zip(model.model.layers, fuse_projections(model)):
        for name in fused:
            fused[name] = Stub(fused[name].out_features)
        layer.self_attn.o_proj = Stub(layer.self_attn.o_proj.out_features)
        layer.mlp.down_proj = Stub(layer.mlp.down_proj.out_features)
    model.lm_head = Stub(model.lm_head.out_features)
    return model


def outside_linears(stubbed: Qwen2VL) -> tuple[float, float]:
    """ms per token of a decode step whose linears are stubbed: with the decode-step glue kernels, and with torch's
    ops in their place (the kernels' wrappers declining), alternately for --rounds; medians."""
    glue, torch_ops, names = [], [], ("add_rms_norm", "rope", "silu_mul", "decode_attention")
    kernels = {name: getattr(quant_kernels, name) for name in names}
    for _ in range(args.rounds):
        glue.append(1000 / decode_speed(stubbed, torch.bfloat16))
        try:
            for name in names:
                setattr(quant_kernels, name, lambda *a, **k: None)
            torch_ops.append(1000 / decode_speed(stubbed, torch.bfloat16))
        finally:
            for name, fn in kernels.items():
                setattr(quant_kernels, name, fn)
    return median(glue), median(torch_ops)


# --------------------------------------------------------------------------- decoding
@torch.no_grad()
def decode_speed(model: nn.Module, dtype: torch.dtype, whole_step: bool = True) -> float:
    """Greedy decode tokens/s after a PROMPT-token prompt (2 untimed warm-up steps). whole_step=False: Qwen2-VL's
    fast step op by op (FastDecoder.whole_step off), to time what the one-call step (decode_step.cpp) saves."""
    ids = torch.randint(0, 150000, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    max_len = PROMPT + steps + 3
    if isinstance(model, Qwen2VL):
        cache = new_kv_cache(model.config, 1, max_len, dtype)
        fast, no_delta = fast_step(model), torch.zeros(1, dtype=torch.long)
        if fast is not None:
            fast.__self__.whole_step = whole_step
        step = (lambda tok: fast(tok[:, 0], cache, no_delta)[:, None]) if fast else (
            lambda tok: model(tok, position_ids=cache.next_position.view(1, 1, 1).expand(3, 1, 1), kv_cache=cache,
                              last_only=True))
    else:
        cache = KVCache.empty(model.config, 1, max_len, dtype)
        step = lambda tok: model(tok, kv_cache=cache, last_only=True)
    tok = model(ids, kv_cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
    for _ in range(2):
        tok = step(tok)[:, -1].argmax(-1, keepdim=True)
    t0 = time.perf_counter()
    for _ in range(steps):
        tok = step(tok)[:, -1].argmax(-1, keepdim=True)
    elapsed = time.perf_counter() - t0
    if isinstance(model, Qwen2VL) and fast is not None:
        fast.__self__.whole_step = True
    return steps / elapsed


def summarise(runs: list[tuple[float, float]], nbytes: int, bf16: list[tuple[float, float]] | None) -> dict:
    """Medians over rounds of (tok/s, bandwidth): speed, roofline share, and the speed over bf16's in the same round."""
    tok_s = [t for t, _ in runs]
    shares = [t * nbytes / bw for t, bw in runs]
    row = {"tok_s": median(tok_s), "tok_s_rounds": tok_s, "weight_GB_per_token": nbytes / 1e9,
           "bandwidth_GBps": median(bw for _, bw in runs) / 1e9,
           "roofline_tok_s": median(bw / nbytes for _, bw in runs), "roofline_share": median(shares), "shares": shares}
    if bf16 is not None:
        row["vs_bf16"] = median(t / b for (t, _), (b, _) in zip(runs, bf16))
    return row


# --------------------------------------------------------------------------- run
t0 = time.perf_counter()
lib = quant_kernels.library()
kernels = (f"compiled kernels, {quant_kernels.lanes()} float32 lanes (ready in {time.perf_counter() - t0:.1f}s)"
           if lib is not None else f"no compiled kernels ({quant_kernels.unavailable_reason()})")
bandwidth = stream_bandwidth()
print(f"{cpu_name()}, {args.threads} threads, torch {torch.__version__}; {kernels}")
print(f"stream read bandwidth (1 GiB sum): {bandwidth / 1e9:.1f} GB/s")
results: dict = {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__, "kernels": kernels,
                 "bandwidth_GBps": bandwidth / 1e9, "steps": steps}

if args.qwen_vl:
    before = rss_gib()[0]
    t0 = time.perf_counter()
    model = qwen_vl_chat()
    build_s, (rss, peak) = time.perf_counter() - t0, rss_gib()
    n_params = sum(p.numel() for p in model.parameters()) + sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, (GPTQLinear, Int4Linear)))
    depth = f" ({model.config.num_hidden_layers} LM / {model.config.visual.layers} ViT layers)" if args.quick else ""
    layout = "GPTQ int4 (the official layout)" if args.format == "gptq" else "our int4 (group 128, symmetric)"
    print(f"Qwen-VL-Chat shapes{depth}, {n_params / 1e9:.2f}B parameters, LM linears {layout}, rest bf16: "
          f"built in {build_s:.0f}s, RSS {rss:.1f} GiB (peak {peak:.1f}, {before:.1f} before)")
    pixels = torch.randn(1, 3, 448, 448).bfloat16()
    with torch.no_grad():
        model.encode_images(pixels[:, :, :224, :224])                       # warm-up
        image_s = timed(lambda: model.encode_images(pixels))
    tok_s, nbytes = decode_speed(model, torch.bfloat16), decode_bytes(model)
    share = tok_s * nbytes / bandwidth
    print(f"decode {tok_s:.2f} tok/s ({1000 / tok_s:.0f} ms/token), {nbytes / 1e9:.2f} GB of weights per token, "
          f"{100 * share:.0f}% of the roofline ({bandwidth / nbytes:.2f} tok/s); image encode (448 px, bf16 ViT) "
          f"{image_s:.1f}s; peak RSS {rss_gib()[1]:.1f} GiB")
    results["qwen_vl_chat_int4" + ("_quick" if args.quick else "")] = {
        "format": args.format, "params_B": n_params / 1e9, "build_s": build_s, "rss_GiB": rss,
        "peak_rss_GiB": rss_gib()[1], "decode_tok_s": tok_s, "weight_GB_per_token": nbytes / 1e9,
        "roofline_share": share, "image_encode_s": image_s}
else:
    layers = 4 if args.quick else 28
    print(f"Qwen2-VL-2B-sized LLM ({layers} of 28 layers), batch 1, {steps} greedy decode steps; {args.rounds} rounds "
          f"of every mode in turn (medians: the host's speed drifts, so each round's ratios are taken within it)")
    models = {mode: qwen2_2b(mode) for mode in args.modes}           # all at once: ~12 GB at full depth
    nbytes = {mode: decode_bytes(model) for mode, model in models.items()}
    runs = {mode: [] for mode in models}                             # per round: (tok/s, bandwidth just after)
    per_op = {mode: [] for mode in models}                           # per round: ms/token the one-call step saved
    for r in range(args.rounds):
        for mode, model in models.items():
            dtype = torch.float32 if mode == "fp32" else torch.bfloat16
            tok_s = {}
            for whole in (True, False) if r % 2 == 0 else (False, True):        # alternate which goes first
                tok_s[whole] = decode_speed(model, dtype, whole_step=whole)
                if whole:
                    runs[mode].append((tok_s[True], stream_bandwidth()))
            per_op[mode].append(1000 / tok_s[False] - 1000 / tok_s[True])
        print(f"  round {r + 1}: " + ", ".join(f"{mode} {runs[mode][-1][0]:.2f} (op by op {per_op[mode][-1]:+.1f} ms)"
                                               for mode in models) + " tok/s")
    rows = {mode: summarise(runs[mode], nbytes[mode], runs.get("bf16")) for mode in models}
    for mode, row in rows.items():
        row["per_op_step_extra_ms_rounds"] = per_op[mode]
        row["per_op_step_extra_ms_per_token"] = median(per_op[mode])
    print(f"{'mode':<6}{'GB/token':>10}{'tok/s':>9}{'ms/token':>10}{'GB/s':>7}{'roofline':>10}{'share':>8}{'x bf16':>8}"
          f"{'op by op':>10}   (medians of {args.rounds} rounds; share range; op by op: extra ms/token of the step "
          f"without decode_step.cpp)")
    for mode, row in rows.items():
        print(f"{mode:<6}{row['weight_GB_per_token']:>10.2f}{row['tok_s']:>9.2f}{1000 / row['tok_s']:>10.1f}"
              f"{row['bandwidth_GBps']:>7.1f}{row['roofline_tok_s']:>10.2f}{100 * row['roofline_share']:>7.0f}%"
              f"{row.get('vs_bf16', 0):>8.2f}{row['per_op_step_extra_ms_per_token']:>+10.1f}"
              f"   ({100 * min(row['shares']):.0f}-{100 * max(row['shares']):.0f}%)")
    if "bf16" in models:
        glue, torch_ops = outside_linears(stub_linears(models["bf16"]))
        results["outside_linears_ms_per_token"] = glue
        results["outside_linears_torch_ops_ms_per_token"] = torch_ops
        print(f"time outside the linears (all linears stubbed, bf16): {glue:.1f} ms/token (norms, RoPE, attention, "
              f"the Python around them); {torch_ops:.1f} with torch's ops instead of the glue kernels")
    results["qwen2_vl_2b" + ("_quick" if args.quick else "")] = rows

args.json.parent.mkdir(parents=True, exist_ok=True)
args.json.write_text(json.dumps(results, indent=2))
print(f"wrote {args.json}")
