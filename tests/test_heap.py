"""qwenvl.heap: freed tensors' pages go back to the OS, and reading a checkpoint trims as it goes."""
from __future__ import annotations

import mmap
import platform
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from qwenvl import heap, weights

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# 4000 tensors of 100 kB (below glibc's mmap threshold, so in the heap), every other one freed: 200 MB of holes that
# stay resident until trimmed.
HOLES = """
import torch
from qwenvl.heap import release_free_pages, resident_bytes as rss
keep = [torch.ones(25_000) for _ in range(4000)]
del keep[::2]
before = rss()
assert release_free_pages()
print((before - rss()) / 1e6)
"""


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's")
def test_release_free_pages_gives_the_holes_of_freed_tensors_back():
    out = subprocess.run([sys.executable, "-c", HOLES], capture_output=True, text=True, check=True)
    assert float(out.stdout) > 150          # MB of the 200 freed (measured: 192)


@pytest.mark.skipif(platform.system() != "Linux", reason="/proc/self/status is Linux's")
def test_resident_bytes_follows_touched_memory():
    # A fresh anonymous mapping, not a tensor: the allocator may place a tensor in pages an earlier test freed and
    # left resident (CI saw 0.6 MB of growth for a 50 MB tensor in a 1.29 GB process).
    before = heap.resident_bytes()
    with mmap.mmap(-1, 50 * 2**20) as block:        # 50 MB, every page written: resident
        block.write(b"\1" * len(block))
        assert heap.resident_bytes() - before > 40e6
        assert heap.resident_bytes(peak=True) >= heap.resident_bytes()
    assert heap.resident_bytes() - before < 10e6    # unmapped: gone again


def test_resident_bytes_is_none_without_proc(monkeypatch):
    def missing(self, *args, **kwargs):
        raise FileNotFoundError(self)
    monkeypatch.setattr(heap.Path, "read_text", missing)
    assert heap.resident_bytes() is None


def test_trim_every_trims_once_per_threshold(monkeypatch):
    calls = []
    monkeypatch.setattr(heap, "release_free_pages", lambda: calls.append(1))
    trim = heap.TrimEvery(100)
    for n in (40, 40, 40, 99, 1, 250):
        trim.add(n)
    assert len(calls) == 3                  # at 120, then 99 + 1, then 250 (each trim starts the count again)
    trim.add(99)
    assert len(calls) == 3


def test_reading_a_checkpoint_trims_as_it_reads(tmp_path, monkeypatch):
    state = {f"w{i}": torch.randn(512, 512).to(torch.bfloat16) for i in range(10)}     # 0.5 MB each
    save_file(state, tmp_path / "model.safetensors")
    calls = []
    monkeypatch.setattr(heap, "release_free_pages", lambda: calls.append(1))
    monkeypatch.setattr(weights, "TRIM_BYTES", 3 * 512 * 512 * 2)                     # every third tensor
    read = dict(weights.iter_tensors(tmp_path / "model.safetensors"))
    assert len(calls) == 3
    assert all(torch.equal(read[k], v) for k, v in state.items())
