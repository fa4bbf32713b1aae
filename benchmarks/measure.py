"""What the benchmarks measure besides the models: read bandwidth, matmul peak, memory, the machine, weight bytes.

Imported by bench_quant.py and bench_inference.py (run as scripts, so this folder is on sys.path).
"""
from __future__ import annotations

import gc
import platform
import time
from pathlib import Path

import torch
from torch import nn

from qwenvl.heap import release_free_pages, resident_bytes
from qwenvl.quantize import GPTQLinear


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def timed_call(fn):
    """(fn(), seconds it took)."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def stream_bandwidth() -> float:
    """Read bandwidth in bytes/s: best of 5 sums of a 1 GiB float32 tensor (far larger than the caches)."""
    t = torch.ones(2**28)
    t.sum()
    best = min(timed(t.sum) for _ in range(5))
    del t
    return 2**30 / best


def matmul_peak(dtype: torch.dtype, m: int = 1024, k: int = 1280, n: int = 5120) -> float:
    """FLOP/s of torch's F.linear on a ViT-MLP-sized product: x [m, k] times a weight stored [n, k] as in every model
    (best of 40, after a warm-up: ~0.3 s in bf16 on AMX). Not `a @ b` with b [k, n]: on CPUs that emulate bf16 that
    layout takes a path ~60x slower than F.linear's, so it measured nothing a model does. Best of 5 (before session
    25) read 1380-1929 GFLOP/s on the Intel Xeon within one hour, best of 40 1861-2145: a peak is the best the
    hardware gives, and 5 calls of ~8 ms are easily caught by a busy moment."""
    x, w = torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype)
    torch.nn.functional.linear(x, w)
    return 2 * m * k * n / min(timed(lambda: torch.nn.functional.linear(x, w)) for _ in range(40))


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def memory_gib() -> float:
    """Total RAM of the machine in GiB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def rss_gib() -> tuple[float, float]:
    """(current, peak) resident set size of this process in GiB."""
    return tuple(resident_bytes(peak) / 2**30 for peak in (False, True))


def release_freed_memory() -> None:
    """Collect garbage and hand the allocator's freed pages back to the OS (glibc's malloc_trim), so that the RSS
    is the memory in use. Without it a freed model's pages stay resident in malloc's arenas, the next case reuses
    them, and its peak above the RSS before it reads ~0 (seen: int8 / int4 rows at 0.0 GB)."""
    gc.collect()
    release_free_pages()                        # not glibc: a no-op, and the RSS may overstate the memory in use


def reset_peak_rss() -> bool:
    """Set the peak RSS (VmHWM) back to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def decode_bytes(model: nn.Module) -> int:
    """Bytes of weights read by one decode step: all LLM tensors, one embedding row, no vision tower (a tied
    lm_head counts the whole table through the lm_head module)."""
    total = 0
    for name, module in model.named_modules():
        if name.startswith(("visual", "transformer.visual", "model.visual")):
            continue
        if isinstance(module, nn.Embedding):
            total += module.weight[0].nbytes
        elif isinstance(module, GPTQLinear):     # the kernel reads float32 scales + uint8 zeros, not qzeros / g_idx
            total += sum(t.nbytes for t in module.kernel_tensors())
        else:
            own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
            total += sum(t.nbytes for t in own)
    return total


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (shared tensors once), and of the weights PackedLinear holds packed."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.nbytes
    return total + sum(getattr(m, "packed_nbytes", 0) for m in model.modules())
