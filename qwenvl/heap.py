"""Give the C heap's free pages back to the OS, so that loading a model costs the model's bytes and no more.

Loading converts each tensor as it is read (a bf16 file into float32: the bf16 copy is freed at once), fusing
projections replaces q/k/v by one tensor, and packing the vision weights (fast_linear.PackedLinear) frees the plain
ones; each freed tensor of up to 32 MB stays in glibc's heap as a hole, resident, until something of its size is
allocated there again. Over a 2B model in float32 those holes were 0.5-1 GB of peak
memory (measured: peak 8.86-9.27 GiB for 8.23 GiB of weights, 8.36 with a trim every 256 MB read).

    release_free_pages()                   # glibc's malloc_trim(0); False where there is no glibc (a no-op there)
    trim = TrimEvery(256 << 20)            # then trim.add(nbytes) after each tensor: trims once per 256 MB
    resident_bytes()                       # this process's resident memory (VmRSS; peak=True: VmHWM); None without /proc

Training churns the heap the same way (batches of varying shapes: the demo model's lm_pretrain held 2.75 GB
resident, 1.53 GB after one trim, session 24), so scripts/train_demo.py trims at each checkpoint and logs both.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
from pathlib import Path


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):            # not glibc (macOS, musl): nothing to call
        return None


def release_free_pages() -> bool:
    """Return the heap's free pages to the OS (glibc); False where that is not available."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


class TrimEvery:
    """Call release_free_pages once per `nbytes` added: bounded holes at a bounded cost (a trim walks the heap)."""

    def __init__(self, nbytes: int):
        self.nbytes, self.pending = nbytes, 0

    def add(self, nbytes: int) -> None:
        self.pending += nbytes
        if self.pending >= self.nbytes:
            release_free_pages()
            self.pending = 0


def resident_bytes(peak: bool = False) -> int | None:
    """This process's resident set size (VmRSS of /proc/self/status), or its peak so far (VmHWM) with `peak`; None
    where there is no such file."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    key = "VmHWM:" if peak else "VmRSS:"
    rss = [line.split()[1] for line in status.splitlines() if line.startswith(key)]
    return int(rss[0]) << 10 if rss else None               # the kernel reports kB
