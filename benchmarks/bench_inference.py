"""CPU inference speed, qwenvl against transformers in one run: image encode, prefill, time to first token, decode
tokens/s at batch 1, peak memory, and the share of the memory-bandwidth roofline each run reaches.

    .venv/bin/python benchmarks/bench_inference.py                 # the real table (2 threads, ~15 min, ~10 GB)
    .venv/bin/python benchmarks/bench_inference.py --quick         # 2 LM + 2 ViT layers, 8 steps: a check, < 3 min
    .venv/bin/python benchmarks/bench_inference.py --threads 2 --skip-qwen-vl --json out/bench_inference.json

Qwen2-VL-2B shapes (LM 28 x 1536, 12 heads / 2 KV heads, MLP 8960, vocab 151936 tied; ViT 32 x 1280 at 448 x 448 =
1024 patches -> 256 image tokens), random N(0, 0.02) weights saved once as a bf16 checkpoint under --cache-dir. The
prompt is 50 random text ids around one image span; greedy decoding of --steps tokens, no early stop.

    transformers  Qwen2VLForConditionalGeneration.from_pretrained(ckpt, dtype=fp32|bf16, sdpa), its own image
                  processor (PIL backend), generate() with its default (dynamic) cache; a streamer times each token.
    qwenvl        fp32 / bf16: qwen2_vl_weights.load_model(ckpt, dtype) + fast_paths (FastLinear; FastDecoder with fused
                  projections and the static KV cache); int8 / int4 (LM linears and lm_head; ViT and embedding bf16): built directly in
                  quantized form with random codes (as bench_quant.py), since quantizing 1.5 B weights to int4 takes
                  minutes and a quantized checkpoint would load the same bytes.
    Qwen-VL-Chat  qwenvl alone (no transformers implementation): LM 4096 wide, MLP 11008, vocab 151936; ViT-bigG
                  48 x 1664 at 448 px; --qwen-vl-layers LM layers of 32 (16 by default: the bf16 model at full depth
                  is 19 GB, too close to this machine's 24 GB); bf16 and int4 with qwenvl.fast_paths on (FastLinear, the
                  decode-attention kernel); built in place, random.

Definitions (encode and prefill: the best of 3 calls): encode = the vision tower on preprocessed pixels; prefill = the
language model's forward over the prompt, the image features and the M-RoPE positions computed beforehand
(transformers: inputs_embeds and position_ids; measured directly since session 25: the earlier "forward with pixels
minus encode" carried both calls' noise and hid a 7-8% change in session 23); time to first token (TTFT) =
preprocessing the PIL image + generate() until the first new token;
decode tok/s = (tokens - 1) / (time of the last token - time of the first). Roofline = read bandwidth (1 GiB tensor
sum, measure.py, same thread count, measured right after each case's decode: a shared host's bandwidth wanders) /
weight bytes read per decoded token (all LLM tensors as stored, one embedding
row, the tied lm_head once). Peak memory = peak RSS during the case (reset with /proc/self/clear_refs) minus the RSS
before it (freed memory handed back to the OS first), against weight bytes (whole model) + KV cache.
Matmul peak = torch's F.linear of [1024 x 1280] by a [5120 x 1280] weight; encode and prefill shares are against the
faster of its fp32 and bf16 rates (where a CPU emulates bf16, our bf16 path multiplies in float32).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from bench_models import materialise
from measure import (
    cpu_name,
    decode_bytes,
    matmul_peak,
    memory_gib,
    release_freed_memory,
    reset_peak_rss,
    rss_gib,
    stream_bandwidth,
    timed,
    timed_call,
    weight_bytes,
)
from PIL import Image

from qwenvl import quant_kernels
from qwenvl.config import QWenConfig
from qwenvl.fast_paths import fast_step, use_fast_paths
from qwenvl.generation import generate_stream as v1_generate_stream
from qwenvl.images import preprocess_v1
from qwenvl.model import QWenLMHeadModel
from qwenvl.positions import get_rope_index
from qwenvl.processor import preprocess_images
from qwenvl.quantize import quantized_swap
from qwenvl.qwen2_vl import Qwen2VL, new_kv_cache
from qwenvl.qwen2_vl_config import PRESETS, Qwen2VLConfig
from qwenvl.qwen2_vl_generation import VisionInputs, generate_stream
from qwenvl.qwen2_vl_weights import load_model, save_checkpoint
from qwenvl.sampling import SamplingParams

# --------------------------------------------------------------------------- arguments
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--quick", action="store_true", help="2 LM and 2 ViT layers of the same shapes, 8 steps")
parser.add_argument("--threads", type=int, default=torch.get_num_threads())
parser.add_argument("--steps", type=int, default=None, help="decode steps (default 32, quick 8)")
parser.add_argument("--modes", nargs="+", default=["fp32", "bf16", "int8", "int4"])
parser.add_argument("--skip-transformers", action="store_true")
parser.add_argument("--skip-qwen-vl", action="store_true")
parser.add_argument("--qwen-vl-layers", type=int, default=16, help="Qwen-VL-Chat LM layers (of 32)")
parser.add_argument("--cache-dir", type=Path, default=Path("out/bench_inference"), help="the random checkpoint")
parser.add_argument("--json", type=Path, default=Path("out/bench_inference.json"))
parser.add_argument("--prepare", action="store_true", help="only write the random checkpoint, then exit")
args = parser.parse_args()
torch.set_num_threads(args.threads)
torch.set_flush_denormal(True)           # random weights must not time denormal arithmetic
STEPS = args.steps or (8 if args.quick else 32)
TEXT_TOKENS, IMAGE_PX = 50, 448
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.bfloat16, "int4": torch.bfloat16}
QUANT = {"int8": {"quant_method": "qwenvl", "bits": 8, "lm_head": True},
         "int4": {"quant_method": "qwenvl", "bits": 4, "group_size": 128, "sym": True, "lm_head": True}}


# --------------------------------------------------------------------------- inputs and the checkpoint
def qwen2_raw() -> dict:
    raw = json.loads(json.dumps(PRESETS["Qwen2-VL-2B-Instruct"]))
    if args.quick:
        raw["num_hidden_layers"], raw["vision_config"]["depth"] = 2, 2
    return raw


def checkpoint(raw: dict) -> Path:
    """The random bf16 checkpoint of these shapes (written once, then reused)."""
    out = args.cache_dir / ("qwen2_vl_2b_quick" if args.quick else "qwen2_vl_2b")
    if (out / "model.safetensors").is_file():
        return out
    with torch.device("meta"):
        model = Qwen2VL(Qwen2VLConfig.from_dict(raw))
    model = materialise(model, torch.bfloat16, torch.Generator().manual_seed(0))
    save_checkpoint(model, out)
    return out


def test_image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (IMAGE_PX, IMAGE_PX, 3), dtype=np.uint8))


def text_ids() -> list[int]:
    return torch.randint(0, 150000, (TEXT_TOKENS,), generator=torch.Generator().manual_seed(1)).tolist()


def qwen2_prompt(cfg: Qwen2VLConfig, n_image_tokens: int) -> torch.Tensor:
    text = text_ids()
    span = [cfg.vision_start_token_id] + [cfg.image_token_id] * n_image_tokens + [cfg.vision_end_token_id]
    return torch.tensor([text[:10] + span + text[10:]])                              # [1, T]


# --------------------------------------------------------------------------- one case
def start_case() -> float:
    release_freed_memory()
    reset_peak_rss()
    return rss_gib()[0]


def finish(row: dict, model, baseline: float, kv_bytes: int, tok_s: float) -> dict:
    """The row's memory and roofline numbers. The read bandwidth is measured right after the case's decode (this
    host's bandwidth wanders by 2x from minute to minute), once its peak memory has been read."""
    nbytes, wbytes = decode_bytes(model), weight_bytes(model)
    peak = (rss_gib()[1] - baseline) * 2**30
    bandwidth = stream_bandwidth()
    row.update(decode_tok_s=tok_s, weight_GB=wbytes / 1e9, decode_GB_per_token=nbytes / 1e9,
               bandwidth_GBps=bandwidth / 1e9, roofline_tok_s=bandwidth / nbytes, roofline_share=tok_s * nbytes / bandwidth,
               kv_cache_GB=kv_bytes / 1e9, peak_GB=peak / 1e9, peak_vs_weights_kv=peak / (wbytes + kv_bytes))
    print("   " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    return row


def best_of(fn, n: int = 3) -> float:
    """The best of n timed calls (the first also warms up oneDNN's primitives for these shapes)."""
    return min(timed(fn) for _ in range(n))


def token_times(stream) -> list[float]:
    times = []
    for _ in stream:
        times.append(time.perf_counter())
    return times


def rate(times: list[float]) -> float:
    return (len(times) - 1) / (times[-1] - times[0])


# --------------------------------------------------------------------------- qwenvl, Qwen2-VL
def build_qwenvl(mode: str, ckpt: Path, raw: dict) -> Qwen2VL:
    """The model as users get it: loaded (or built quantized), then qwenvl.fast_paths switched on."""
    if mode in QUANT:
        with torch.device("meta"):
            model = Qwen2VL(Qwen2VLConfig.from_dict(raw))
            quantized_swap(model, QUANT[mode])
        return use_fast_paths(materialise(model, torch.bfloat16, torch.Generator().manual_seed(0)))
    return use_fast_paths(load_model(ckpt, dtype=DTYPES[mode]))


@torch.no_grad()
def run_qwenvl(mode: str, ckpt: Path, raw: dict, image: Image.Image) -> dict:
    baseline = start_case()
    model, load_s = timed_call(lambda: build_qwenvl(mode, ckpt, raw))
    patches, grid = preprocess_images([image])
    ids = qwen2_prompt(model.config, patches.shape[0] // 4)
    encode_s = best_of(lambda: model.encode_vision(patches, grid))
    features, cfg = model.encode_vision(patches, grid), model.config
    positions, _ = get_rope_index(ids, grid, None, cfg.image_token_id, cfg.video_token_id,
                                  cfg.vision.spatial_merge_size)
    prefill_s = best_of(lambda: model(ids, position_ids=positions, image_features=features, last_only=True))
    params = SamplingParams(max_new_tokens=STEPS + 1, do_sample=False)
    cache = new_kv_cache(model.config, 1, ids.shape[1] + STEPS + 1, DTYPES[mode])
    t0 = time.perf_counter()
    preprocess_s = timed(lambda: preprocess_images([image]))
    vision = VisionInputs(*preprocess_images([image]))
    times = token_times(generate_stream(model, ids, params, vision=vision, kv_cache=cache, step=fast_step(model)))
    row = {"library": "qwenvl", "mode": mode, "load_s": load_s, "preprocess_s": preprocess_s, "encode_s": encode_s,
           "prefill_s": prefill_s, "ttft_s": times[0] - t0 - preprocess_s}
    return finish(row, model, baseline, cache.nbytes(), rate(times))


# --------------------------------------------------------------------------- transformers, Qwen2-VL
def hf_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    return Qwen2VLImageProcessorPil()


def clock_streamer():
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        """Records when each new token arrives (the first put() is the prompt)."""

        def __init__(self):
            self.times, self.prompt_seen = [], False

        def put(self, value):
            if self.prompt_seen:
                self.times.append(time.perf_counter())
            self.prompt_seen = True

        def end(self):
            pass

    return Clock()


@torch.no_grad()
def run_transformers(mode: str, ckpt: Path, image: Image.Image) -> dict:
    from transformers import Qwen2VLForConditionalGeneration

    baseline = start_case()
    model, load_s = timed_call(lambda: Qwen2VLForConditionalGeneration.from_pretrained(
        ckpt, dtype=DTYPES[mode], attn_implementation="sdpa").eval())
    processor = hf_processor()
    pix = processor(images=[image], return_tensors="pt")
    cfg = model.config
    ids = qwen2_prompt(Qwen2VLConfig.from_json(ckpt / "config.json"), int(pix["image_grid_thw"].prod()) // 4)
    extra = {"mm_token_type_ids": (ids == cfg.image_token_id).long(), "attention_mask": torch.ones_like(ids)}
    encode_s = best_of(lambda: model.get_image_features(pix["pixel_values"].to(model.dtype), pix["image_grid_thw"]))
    embeds, positions = hf_prefill_inputs(model, ids, pix, extra)
    prefill_s = best_of(lambda: model(inputs_embeds=embeds, position_ids=positions,
                                      attention_mask=extra["attention_mask"], logits_to_keep=1, use_cache=False))
    clock = clock_streamer()
    t0 = time.perf_counter()
    preprocess_s = timed(lambda: processor(images=[image], return_tensors="pt"))
    inputs = processor(images=[image], return_tensors="pt")
    model.generate(input_ids=ids, **inputs, **extra, max_new_tokens=STEPS + 1, min_new_tokens=STEPS + 1,
                   do_sample=False, streamer=clock, pad_token_id=0)
    kv_bytes = 2 * cfg.text_config.num_hidden_layers * cfg.text_config.num_key_value_heads * (
        ids.shape[1] + STEPS + 1) * (cfg.text_config.hidden_size // cfg.text_config.num_attention_heads) * (
        4 if mode == "fp32" else 2)
    row = {"library": "transformers", "mode": mode, "load_s": load_s, "preprocess_s": preprocess_s,
           "encode_s": encode_s, "prefill_s": prefill_s, "ttft_s": clock.times[0] - t0 - preprocess_s}
    return finish(row, model, baseline, kv_bytes, rate(clock.times))


def hf_prefill_inputs(model, ids: torch.Tensor, pix: dict, extra: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The language model's inputs for a prompt with an image, made by transformers' own code: the text embeddings
    with the image features written over the placeholders [1, T, C], and the M-RoPE position_ids."""
    inner = model.model
    features = inner.get_image_features(pix["pixel_values"].to(model.dtype), pix["image_grid_thw"], return_dict=True)
    features = torch.cat(features.pooler_output, dim=0)
    embeds = inner.get_input_embeddings()(ids)
    where, _ = inner.get_placeholder_mask(ids, inputs_embeds=embeds, image_features=features)
    embeds = embeds.masked_scatter(where, features.to(embeds.dtype))
    positions, _ = inner.get_rope_index(ids, extra["mm_token_type_ids"], image_grid_thw=pix["image_grid_thw"],
                                        attention_mask=extra["attention_mask"])
    return embeds, positions


# --------------------------------------------------------------------------- qwenvl, Qwen-VL-Chat
def build_qwen_vl(mode: str) -> QWenLMHeadModel:
    cfg = QWenConfig.from_name("Qwen-VL-Chat")
    cfg.num_hidden_layers = 2 if args.quick else args.qwen_vl_layers
    if args.quick:
        cfg.visual.layers = 2
    with torch.device("meta"):
        model = QWenLMHeadModel(cfg)
        if mode in QUANT:
            quantized_swap(model, QUANT[mode])
    return use_fast_paths(materialise(model, torch.bfloat16, torch.Generator().manual_seed(0)))


@torch.no_grad()
def run_qwen_vl(mode: str, image: Image.Image) -> dict:
    baseline = start_case()
    model, load_s = timed_call(lambda: build_qwen_vl(mode))
    vis = model.config.visual
    pixels = preprocess_v1(image, vis.image_size)[None].bfloat16()                    # [1, 3, 448, 448]
    text = text_ids()
    ids = torch.tensor([text[:10] + [vis.image_start_id] + [vis.image_pad_id] * vis.n_queries
                        + [vis.image_start_id + 1] + text[10:]])
    encode_s = best_of(lambda: model.encode_images(pixels))
    features = model.encode_images(pixels)
    prefill_s = best_of(lambda: model(ids, image_features=features, last_only=True))
    params = SamplingParams(max_new_tokens=STEPS + 1, do_sample=False)
    t0 = time.perf_counter()
    preprocess_s = timed(lambda: preprocess_v1(image, vis.image_size))
    times = token_times(v1_generate_stream(model, ids, params, images=preprocess_v1(image, vis.image_size)[None]
                                           .bfloat16()))
    kv_bytes = 2 * model.config.num_hidden_layers * model.config.hidden_size * (ids.shape[1] + STEPS + 1) * 2
    row = {"library": "qwenvl", "mode": mode, "load_s": load_s, "preprocess_s": preprocess_s, "encode_s": encode_s,
           "prefill_s": prefill_s, "ttft_s": times[0] - t0 - preprocess_s}
    return finish(row, model, baseline, kv_bytes, rate(times))


# --------------------------------------------------------------------------- FLOPs (for the matmul-peak share)
def qwen2_flops(raw: dict, n_patches: int, n_tokens: int) -> tuple[float, float]:
    """(vision encode, LM prefill) multiply-add FLOPs: 2 x rows x weights of every linear, plus attention."""
    cfg = Qwen2VLConfig.from_dict(raw)
    v, t = cfg.vision, cfg.text
    e, n = v.embed_dim, n_patches
    vit = v.depth * (2 * n * (4 * e * e + 2 * e * v.mlp_dim) + 4 * n * n * e) + 2 * n * v.patch_dim * e
    vit += 2 * (n // 4) * ((4 * e) ** 2 + 4 * e * t.hidden_size)
    c, d = t.hidden_size, t.head_dim
    per_layer = 2 * n_tokens * (c * (t.num_attention_heads + 2 * t.num_key_value_heads) * d
                                + t.num_attention_heads * d * c + 3 * c * t.intermediate_size)
    lm = t.num_hidden_layers * (per_layer + 2 * n_tokens * n_tokens * c) + 2 * c * t.vocab_size
    return float(vit), float(lm)


# --------------------------------------------------------------------------- run
def main() -> None:
    if args.prepare:
        print(f"checkpoint: {checkpoint(qwen2_raw())}")
        return
    t0 = time.perf_counter()
    quant_kernels.library()
    bandwidth, peaks = stream_bandwidth(), {m: matmul_peak(DTYPES[m]) for m in ("fp32", "bf16")}
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": args.threads,
               "memory_GiB": round(memory_gib(), 1), "torch": torch.__version__, "bandwidth_GBps": bandwidth / 1e9,
               "matmul_peak_GFLOPs": {k: v / 1e9 for k, v in peaks.items()}, "steps": STEPS, "quick": args.quick,
               "kernels": f"{quant_kernels.lanes()} float32 lanes" if quant_kernels.library() else "none"}
    print(f"{machine['cpu']}, {args.threads} threads, {machine['memory_GiB']} GiB, torch {torch.__version__}; "
          f"read bandwidth {bandwidth / 1e9:.1f} GB/s; matmul peak fp32 {peaks['fp32'] / 1e9:.0f} / bf16 "
          f"{peaks['bf16'] / 1e9:.0f} GFLOP/s", flush=True)
    raw, image = qwen2_raw(), test_image()
    ckpt = checkpoint(raw)
    results = {"machine": machine, "qwen2_vl_2b": [], "qwen_vl_chat": []}
    layers = f"{raw['num_hidden_layers']} LM / {raw['vision_config']['depth']} ViT layers"
    print(f"Qwen2-VL-2B shapes ({layers}), {IMAGE_PX}px image + {TEXT_TOKENS} text tokens, {STEPS} steps", flush=True)
    for mode in ("fp32", "bf16") if not args.skip_transformers else ():
        print(f" transformers {mode}", flush=True)
        results["qwen2_vl_2b"].append(run_transformers(mode, ckpt, image))
    for mode in args.modes:
        print(f" qwenvl {mode}", flush=True)
        results["qwen2_vl_2b"].append(run_qwenvl(mode, ckpt, raw, image))
    for mode in ("bf16", "int4") if not args.skip_qwen_vl else ():
        print(f" Qwen-VL-Chat qwenvl {mode}", flush=True)
        results["qwen_vl_chat"].append(run_qwen_vl(mode, image))
    n_tokens = TEXT_TOKENS + 2 + (IMAGE_PX // 28) ** 2
    results["flops"] = dict(zip(("encode", "prefill"), qwen2_flops(raw, (IMAGE_PX // 14) ** 2, n_tokens)))
    results["ratios"] = ratios(results)
    results["wall_s"] = time.perf_counter() - t0
    report(results, layers)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.json} ({results['wall_s']:.0f}s)")


def ratios(results: dict) -> dict:
    """The issue's targets as measured ratios (absent when a case was skipped)."""
    rows = {(r["library"], r["mode"]): r for r in results["qwen2_vl_2b"]}
    tf = {m: rows[("transformers", m)] for m in ("fp32", "bf16") if ("transformers", m) in rows}
    out = {}
    if "bf16" in tf and ("qwenvl", "bf16") in rows:
        ours = rows[("qwenvl", "bf16")]
        out["decode_bf16_vs_transformers_bf16"] = ours["decode_tok_s"] / tf["bf16"]["decode_tok_s"]
        out["encode_transformers_bf16_over_ours_bf16"] = tf["bf16"]["encode_s"] / ours["encode_s"]
        out["prefill_transformers_bf16_over_ours_bf16"] = tf["bf16"]["prefill_s"] / ours["prefill_s"]
        out["ttft_transformers_bf16_over_ours_bf16"] = tf["bf16"]["ttft_s"] / ours["ttft_s"]
    if tf and ("qwenvl", "int8") in rows:
        best = max(r["decode_tok_s"] for r in tf.values())
        out["decode_int8_vs_transformers_best"] = rows[("qwenvl", "int8")]["decode_tok_s"] / best
    peak = max(results["machine"]["matmul_peak_GFLOPs"].values()) * 1e9
    for key, row in rows.items():
        out[f"{key[0]}_{key[1]}_encode_share_of_matmul_peak"] = results["flops"]["encode"] / row["encode_s"] / peak
        out[f"{key[0]}_{key[1]}_prefill_share_of_matmul_peak"] = results["flops"]["prefill"] / row["prefill_s"] / peak
    return out


def report(results: dict, layers: str) -> None:
    head = (f"{'model':<14}{'library':<14}{'mode':<6}{'encode s':>9}{'prefill s':>10}{'TTFT s':>8}{'tok/s':>8}"
            f"{'GB/s':>6}{'roofline':>9}{'share':>7}{'peak GB':>8}{'/(W+KV)':>8}")
    print("\n" + head)
    for model, key in (("Qwen2-VL-2B", "qwen2_vl_2b"), ("Qwen-VL-Chat", "qwen_vl_chat")):
        for r in results[key]:
            print(f"{model:<14}{r['library']:<14}{r['mode']:<6}{r['encode_s']:>9.2f}{r['prefill_s']:>10.2f}"
                  f"{r['ttft_s']:>8.2f}{r['decode_tok_s']:>8.2f}{r['bandwidth_GBps']:>6.1f}{r['roofline_tok_s']:>9.2f}"
                  f"{100 * r['roofline_share']:>6.0f}%{r['peak_GB']:>8.2f}{r['peak_vs_weights_kv']:>8.2f}")
    print(f"(Qwen2-VL: {layers}; Qwen-VL-Chat: "
          f"{2 if args.quick else args.qwen_vl_layers} LM / {2 if args.quick else 48} ViT layers)")
    for k, v in results["ratios"].items():
        print(f"  {k}: {v:.2f}")


main()
