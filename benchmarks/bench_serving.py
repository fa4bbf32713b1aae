"""Serving benchmark: aggregate tokens/s with 1, 4 and 8 concurrent streams, and time-to-first-token
with a cold and a warm image-feature cache, against a real `qwenvl serve` process on 127.0.0.1.

    .venv/bin/python benchmarks/bench_serving.py                  # random-weight model below, about a minute
    .venv/bin/python benchmarks/bench_serving.py --model DIR       # any checkpoint folder (e.g. the demo model)
    .venv/bin/python benchmarks/bench_serving.py --threads 2 --new-tokens 64

Targets (the serving issue): 8 streams >= 4x the single-stream aggregate; a warm cache cuts TTFT >= 5x.
The default model is small and random (real vocabulary; LM 512 wide x 4 layers; ViT 448 px, 512 wide
x 8 layers, 256 queries), with greedy decoding, so it runs on one CPU core in about a minute. Every
measured request streams over HTTP through the whole stack: JSON, image decoding, the engine, SSE.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- arguments
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", type=Path, help="checkpoint folder (default: a random one built here)")
parser.add_argument("--threads", type=int, default=1, help="torch threads in the server")
parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8])
parser.add_argument("--new-tokens", type=int, default=48, help="tokens per stream")
parser.add_argument("--ttft-repeats", type=int, default=5)
parser.add_argument("--port", type=int, default=8765)
parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"],
                    help="server dtype (bfloat16, the official one, uses AMX/AVX512-BF16 matmuls where the CPU has them)")
args = parser.parse_args()

BENCH_CONFIG = dict(vocab_size=151936, hidden_size=512, num_hidden_layers=4, num_attention_heads=8, kv_channels=64,
                    intermediate_size=2752, torch_dtype="float32",
                    visual=dict(image_size=448, patch_size=14, width=512, layers=8, heads=8, mlp_ratio=4.0,
                                output_dim=512, n_queries=256, image_start_id=151857))


# --------------------------------------------------------------------------- model
def random_checkpoint(out: Path) -> Path:
    from qwenvl.config import GenerationConfig, QWenConfig
    from qwenvl.weights import save_random_checkpoint

    save_random_checkpoint(QWenConfig.from_dict(BENCH_CONFIG), out, seed=0, generation_config=GenerationConfig())
    shutil.copy(ROOT / "tests" / "fixtures" / "qwen.tiktoken", out / "qwen.tiktoken")
    return out


# --------------------------------------------------------------------------- server process
def start_server(model_dir: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, "-m", "qwenvl.cli", "serve", "--model", str(model_dir), "--port", str(args.port),
           "--threads", str(args.threads), "--dtype", args.dtype, "--max-batch", str(max(args.streams)), "--name", "bench"]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited:\n{log.read_text()}")
        try:
            if httpx.get(f"{URL}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start within 120 s")


URL = f"http://127.0.0.1:{args.port}"


# --------------------------------------------------------------------------- one streamed request
def stream(messages: list, max_tokens: int, client: httpx.Client | None = None) -> tuple[float, float, int]:
    """(seconds to the first chunk, total seconds, completion tokens) of one streamed request."""
    body = {"model": "bench", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, tokens = None, 0
    with (client or httpx).stream("POST", f"{URL}/v1/chat/completions", json=body, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            first = first or time.perf_counter() - t0
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first, time.perf_counter() - t0, tokens


def image_message(seed: int, question: str, before: str = "") -> list:
    """One user message with a smooth 640x480 photo-like JPEG (a new seed gives new content: a cache miss).
    Text `before` the image changes the prompt prefix, so only the image-feature cache can help."""
    buf = io.BytesIO()
    coarse = Image.frombytes("RGB", (8, 6), random.Random(seed).randbytes(8 * 6 * 3))
    coarse.resize((640, 480), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
    uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    parts = [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": question}]
    return [{"role": "user", "content": ([{"type": "text", "text": before}] if before else []) + parts}]


# --------------------------------------------------------------------------- throughput
def throughput(n: int) -> tuple[float, int, float]:
    """(aggregate tokens/s, tokens, seconds) of n concurrent streams with different short text prompts."""
    results: list[tuple[float, float, int]] = [None] * n

    def run(i: int) -> None:
        results[i] = stream([{"role": "user", "content": f"Story number {i}: tell me about the sea."}], args.new_tokens)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    tokens = sum(r[2] for r in results)
    return tokens / seconds, tokens, seconds


# --------------------------------------------------------------------------- run
with tempfile.TemporaryDirectory() as tmp:
    model_dir = args.model or random_checkpoint(Path(tmp) / "model")
    proc = start_server(model_dir, Path(tmp) / "server.log")
    try:
        stream([{"role": "user", "content": "warm up"}], 4)                           # first-call overheads
        print(f"model: {model_dir if args.model else 'random, ' + json.dumps(BENCH_CONFIG)}")
        print(f"server: {args.dtype}, {args.threads} torch thread(s), max batch {max(args.streams)}, greedy, "
              f"{args.new_tokens} new tokens per stream\n")
        print(f"{'streams':>8}{'tokens':>8}{'seconds':>9}{'tok/s':>9}{'vs 1':>7}")
        rates = {}
        for n in args.streams:
            rate, tokens, seconds = throughput(n)
            rates[n] = rate
            print(f"{n:>8}{tokens:>8}{seconds:>9.2f}{rate:>9.1f}{rate / rates[args.streams[0]]:>6.1f}x")

        cold, features_only, warm = [], [], []
        with httpx.Client() as client:                                                 # one keep-alive connection
            for k in range(args.ttft_repeats):
                message = image_message(k + 1, "What is in the picture?")
                cold.append(stream(message, 1, client)[0])                             # new image: vision tower
                other = image_message(k + 1, "What is in the picture?", before=f"Look ({k}):")
                features_only.append(stream(other, 1, client)[0])                      # features cached, new prefix
                warm.append(stream(message, 1, client)[0])                             # same image re-asked
        c, f, w = (statistics.median(x) for x in (cold, features_only, warm))
        print(f"\nTTFT (one 640x480 JPEG + question, median of {args.ttft_repeats}):")
        print(f"  cold caches                          {c * 1000:6.0f} ms")
        print(f"  warm image-feature cache only        {f * 1000:6.0f} ms  ({c / f:.1f}x faster)")
        print(f"  warm (features + prompt-prefix K/V)  {w * 1000:6.0f} ms  ({c / w:.1f}x faster)")
        health = httpx.get(f"{URL}/health").json()["engine"]
        for name in ("feature_cache", "prefix_cache"):
            print(f"{name.replace('_', ' ')}: {health[name]['entries']} entries, {health[name]['bytes'] / 2**20:.1f} MiB, "
                  f"hits {health[name]['hits']}, misses {health[name]['misses']}")
        scaling = rates[max(args.streams)] / rates[min(args.streams)]
        print(f"\ntargets: {max(args.streams)} streams {scaling:.1f}x the single-stream aggregate (>= 4x: "
              f"{'met' if scaling >= 4 else 'NOT met'}); warm TTFT {c / w:.1f}x faster (>= 5x: "
              f"{'met' if c / w >= 5 else 'NOT met'})")
    finally:
        proc.terminate()
        proc.wait(30)
