"""Keep freed host memory in the process for the next step, instead of glibc's mmap/munmap of every large tensor.

glibc serves each allocation above its mmap threshold (128 KiB, adapting up to 32 MiB) with a mapping of its own and
unmaps it on free, so the next step's tensor of the same size is a fresh mapping that the kernel zero-fills page by
page on first touch. On a CPU that is most of a large model's backward pass: SD 1.5's UNet has 3.4 GB of
gradients, and its weight-gradient convolutions at 8x8 and 4x4 ran 15x slower than the forward ones while they
faulted their outputs in (256 px training: 8.5 -> 4.9 s per update with this module, peak RSS +6 %; one UNet
evaluation at inference: 1.95 -> 1.58 s). `benchmarks/bench_training.py` and `bench_inference.py` measure it.

PyTorch's CPU tuning guide fixes this by swapping the allocator (jemalloc or tcmalloc through LD_PRELOAD,
https://pytorch.org/tutorials/recipes/recipes/tuning_guide.html#switch-memory-allocator); neither ships with the
pip wheels, and LD_PRELOAD only works when set before the process starts. glibc's own switches (mallopt(3)) do the
same from inside the process, for every allocation after the call: no private mapping for large blocks (they come
from the heap, where a freed block is reused) and no trimming of the heap's free top. The cost: memory a step frees
stays with the process (its RSS stays at its peak) rather than going back to the system between steps, and the heap
takes a few steps to settle: PyTorch's 64-byte-aligned blocks do not fit the exact hole a freed block of the same
size left, so a loop of one 64 MiB tensor held about 9 of them before it reused them (tests/test_host_memory.py);
a training step's many tensors coalesce (SD 1.5 above: +6 % peak RSS).
"""

from __future__ import annotations

import ctypes
import platform


# From glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_DEFAULT_MMAP_MAX = 65536
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
_NEVER = -1  # mallopt(3): "-1 disables trimming completely"


def _mallopt(option: int, value: int) -> bool:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False  # musl, macOS and Windows allocators have no such switch (and no such cost to avoid)
    return ctypes.CDLL("libc.so.6").mallopt(option, value) == 1


def keep_freed_memory(enable: bool = True) -> bool:
    """Make glibc keep freed memory for reuse (see the module's docstring); `enable=False` restores glibc's defaults
    (with a fixed mmap threshold: glibc's adaptive one cannot be turned back on). Process-wide, for allocations made
    after the call. Returns whether it was applied: False where the C library is not glibc."""
    mmap_max, trim = (0, _NEVER) if enable else (_DEFAULT_MMAP_MAX, _DEFAULT_TRIM_THRESHOLD)
    return _mallopt(M_MMAP_MAX, mmap_max) and _mallopt(M_TRIM_THRESHOLD, trim)
