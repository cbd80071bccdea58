"""The machine a figure was measured on: CPU, AVX-512, threads and the measured fp32 matmul ceiling.

Printed and stored beside every benchmark, the comparison report and the demo's report, so that times taken on
hosts ~3x apart in speed can be compared through the ceiling.
"""

from __future__ import annotations

import math
import platform
import statistics
import time
from pathlib import Path

import torch


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def has_avx512() -> bool:
    try:
        return "avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """fp32 `torch.matmul` throughput, the ceiling this machine gives our kernels."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def describe_machine() -> dict:
    """The CPU, its thread count, the vector width PyTorch's kernels use (`ATEN_CPU_CAPABILITY` can lower it below
    what the CPU has, as the demo's AVX2 run did) and the measured fp32 matmul ceiling (a second or two of matmuls)."""
    return {"cpu": cpu_name(), "avx512": has_avx512(), "kernels": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(),
            "fp32_matmul_gflops": round(matmul_gflops(), 1), "torch": torch.__version__,
            "python": platform.python_version()}  # fmt: skip


def peak_rss_mib() -> float:
    """This process's peak resident set in MiB: Linux's VmHWM, which starts afresh with each program (`exec`).
    `getrusage(RUSAGE_SELF).ru_maxrss` does not: a benchmark's child reported its parent's 16 GiB (two SD 1.5
    pipelines held at the fork) as its own peak. Elsewhere (no /proc), ru_maxrss (KiB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as handle:
            line = next(x for x in handle if x.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024  # kB
    except (OSError, StopIteration):
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def machine_line(machine: dict) -> str:
    kernels = f" (kernels {machine['kernels']})" if "kernels" in machine else ""  # absent from older JSON
    return (f"{machine['cpu']}, {machine['threads']} threads, AVX-512 {machine['avx512']}{kernels}, "
            f"fp32 matmul ceiling {machine['fp32_matmul_gflops']} GFLOP/s, torch {machine['torch']}")  # fmt: skip


# The demo's time target is for the slowest host type we run on: AVX2 only, fp32 matmul ceiling ~66 GFLOP/s on 2
# threads. The one pair of hosts that ran the same demo (2026-11-24 and 12-01) took 7.7 min at a 190 GFLOP/s
# ceiling and 18.6 min at 66: time ~ ceiling ** -0.84. Other hosts are scaled by that ratio (an estimate: the
# demo is not matmul-bound, and hosts differ in more than their matmul ceiling).
SLOW_HOST_GFLOPS = 66.0
SLOW_HOST_EXPONENT = math.log(18.6 / 7.7) / math.log(190 / SLOW_HOST_GFLOPS)


def slow_host_estimate(seconds: float, machine: dict) -> float:
    """`seconds` measured on `machine`, scaled to the slow host type by the ceiling ratio (never below `seconds`)."""
    ratio = max(machine["fp32_matmul_gflops"] / SLOW_HOST_GFLOPS, 1.0)
    return seconds * ratio**SLOW_HOST_EXPONENT
