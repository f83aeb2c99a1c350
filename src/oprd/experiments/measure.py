"""What a piece of work costs in memory: the probes the demo and the bench share.

On the CPU the kernel keeps each process's resident-set high-water mark (VmHWM), and writing "5"
to /proc/self/clear_refs resets it to the current resident set, so a peak over any block of work
is exact, with no sampling thread. glibc keeps freed memory resident in its heap unless told
otherwise, so a caller that wants the resident set to follow live tensors calls
`return_big_blocks_to_kernel` before its first large allocation (the bench's memory processes do).
"""

from __future__ import annotations

import ctypes
import gc
from pathlib import Path

import torch

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def rss_bytes(field: str = "VmRSS") -> int:
    """This process's resident set (VmRSS) or its high-water mark (VmHWM), from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> None:
    """Resets VmHWM to the current resident set."""
    Path("/proc/self/clear_refs").write_text("5")


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL("libc.so.6")


def release_memory() -> None:
    """Frees what Python, the CUDA caching allocator and glibc's heap hold but no longer use."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    _libc().malloc_trim(0)


def return_big_blocks_to_kernel(threshold_bytes: int = 1 << 16) -> None:
    """Makes glibc map every block above `threshold_bytes` on its own and unmap it when freed.
    Must run before the process's first large allocation to take effect for all of them."""
    if not _libc().mallopt(M_MMAP_THRESHOLD, threshold_bytes):
        raise RuntimeError("glibc refused mallopt(M_MMAP_THRESHOLD)")


class PeakRSS:
    """Peak resident set of this process while the block runs, above its value at entry (after
    freeing what the previous work left behind): `with PeakRSS() as memory: ...; memory.delta`."""

    def __init__(self):
        self.baseline = self.peak = 0

    def __enter__(self) -> PeakRSS:
        release_memory()
        self.baseline = rss_bytes()
        reset_peak_rss()
        return self

    def __exit__(self, *exc) -> None:
        self.peak = rss_bytes("VmHWM")

    @property
    def delta(self) -> int:
        return self.peak - self.baseline
