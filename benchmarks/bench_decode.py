"""Prefill and decode speed of a Qwen-VL-Chat-shaped model with random weights, at reduced depth.

    .venv/bin/python benchmarks/bench_decode.py                      # 4 LM layers, 8 ViT layers, fp32 + bf16
    .venv/bin/python benchmarks/bench_decode.py --layers 2 --dtypes bfloat16 --new-tokens 16

Shapes are the real ones (hidden 4096, 32 heads, MLP 11008, vocab 151936; ViT 1664 wide, 448 px, 256
queries); only the depth is cut so it fits and runs quickly on a 2-core CPU. The prompt is a ChatML
question about one image (258 image positions + text). Per-layer costs scale linearly with depth.
"""
from __future__ import annotations

import argparse
import time

import torch

from qwenvl.config import QWenConfig
from qwenvl.generation import generate_stream
from qwenvl.kv_cache import KVCache
from qwenvl.model import QWenLMHeadModel
from qwenvl.sampling import SamplingParams

# --------------------------------------------------------------------------- arguments
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--layers", type=int, default=4, help="LM layers (the real model has 32)")
parser.add_argument("--vit-layers", type=int, default=8, help="ViT layers (the real model has 48)")
parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
parser.add_argument("--new-tokens", type=int, default=32)
parser.add_argument("--text-tokens", type=int, default=40, help="prompt text tokens besides the image span")
parser.add_argument("--threads", type=int, default=torch.get_num_threads())
args = parser.parse_args()
torch.set_num_threads(args.threads)


# --------------------------------------------------------------------------- model
def build(dtype: torch.dtype) -> QWenLMHeadModel:
    cfg = QWenConfig.from_name("Qwen-VL-Chat")
    cfg.num_hidden_layers, cfg.visual.layers = args.layers, args.vit_layers
    with torch.device("meta"):
        model = QWenLMHeadModel(cfg)
    model.to_empty(device="cpu").to(dtype)
    model.init_weights(torch.Generator().manual_seed(0))
    return model.eval()


def prompt(cfg: QWenConfig) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    span = [cfg.visual.image_start_id] + [cfg.visual.image_pad_id] * cfg.visual.n_queries + [cfg.visual.image_end_id]
    text = torch.randint(0, 150000, (args.text_tokens,), generator=g).tolist()
    return torch.tensor([text[:10] + span + text[10:]])


# --------------------------------------------------------------------------- measure
print(f"Qwen-VL-Chat shapes, {args.layers} LM layers (of 32), {args.vit_layers} ViT layers (of 48), "
      f"{args.threads} threads")
print(f"{'dtype':<10}{'params':>10}{'image encode':>15}{'prefill (LM)':>15}{'decode tok/s':>15}{'ms/token':>10}")
for name in args.dtypes:
    dtype = getattr(torch, name)
    model = build(dtype)
    n_params = sum(p.numel() for p in model.parameters())
    ids = prompt(model.config)
    pixels = torch.randn(1, 3, 448, 448)
    with torch.no_grad():
        model.encode_images(pixels[:, :, :224, :224])                       # warm-up
        t0 = time.perf_counter()
        feats = model.encode_images(pixels)
        t_img = time.perf_counter() - t0
        cache = KVCache.empty(model.config, 1, ids.shape[1] + 8, dtype)
        t0 = time.perf_counter()
        model(ids, image_features=feats, kv_cache=cache, last_only=True)
        t_prefill = time.perf_counter() - t0
    params = SamplingParams(max_new_tokens=args.new_tokens, do_sample=False)
    stream = generate_stream(model, ids, params, image_features=feats)
    next(stream)                                                             # prefill + first token
    t0 = time.perf_counter()
    n = sum(1 for _ in stream)
    t_decode = time.perf_counter() - t0
    print(f"{name:<10}{n_params / 1e9:>9.2f}B{t_img:>14.2f}s{t_prefill:>14.2f}s{n / t_decode:>15.2f}"
          f"{1000 * t_decode / n:>10.1f}")
    del model, cache, feats
