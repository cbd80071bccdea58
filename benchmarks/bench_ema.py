"""The EMA update of the trained weights: diffusers' `EMAModel` (loop and foreach) against ldm_tune's `ForeachEMA`.

One `step` per update of a `training.use_ema` run, on the UNets of the tiny, demo and sd15-arch presets (random
weights, fp32, CPU, freed memory kept as the trainer keeps it by default), each implementation in a process of its
own: median ms per step, the memory its first step allocates on top of the weights and their average (peak RSS
over the step minus RSS before it; Linux's peak is reset through /proc/self/clear_refs), and the largest difference
of the averages from `EMAModel`'s loop on the same weights.
Prints the machine and its fp32 matmul ceiling, a table, and writes JSON.
Usage: python benchmarks/bench_ema.py [--presets tiny,demo,sd15-arch] [--steps 5] [--out outputs/bench/ema.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from bench_inference import describe_machine, in_child
from diffusers import UNet2DConditionModel
from diffusers.training_utils import EMAModel

from ldm_tune.ema import ForeachEMA
from ldm_tune.host_memory import keep_freed_memory
from ldm_tune.presets import DEMO_UNET, SD15_UNET, TINY_UNET


UNETS = {"tiny": TINY_UNET, "demo": DEMO_UNET, "sd15-arch": SD15_UNET}
LOOP = "diffusers EMAModel (loop, the default)"
IMPLEMENTATIONS = {
    LOOP: lambda params: EMAModel(params, decay=0.999),
    "diffusers EMAModel (foreach=True)": lambda params: EMAModel(params, decay=0.999, foreach=True),
    "ldm_tune ForeachEMA": lambda params: ForeachEMA(params, decay=0.999),
}


def rss_mib(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as handle:
        return int(next(x for x in handle if x.startswith(field + ":")).split()[1]) / 1024


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM to the current RSS (proc(5))."""
    Path("/proc/self/clear_refs").write_text("5")


def drive(params: list[torch.nn.Parameter], ema, steps: int) -> tuple[list[float], list[float]]:
    """`steps` EMA updates, each after every weight moved as an optimizer would move it; returns the seconds and the
    MiB each update added to the process's peak RSS."""
    times, extra = [], []
    for step in range(steps):
        with torch.no_grad():
            torch._foreach_add_(params, 1e-3 * (step + 1))
        reset_peak_rss()
        before = rss_mib()
        start = time.perf_counter()
        ema.step(params)
        times.append(time.perf_counter() - start)
        extra.append(rss_mib("VmHWM") - before)
    return times, extra


def run_one(preset: str, implementation: str, steps: int) -> dict:
    """One implementation in a fresh process (called by `main` through `--child`): the first update's extra memory is
    then the temporaries it allocates (freed memory is kept afterwards, as in the trainer, so later ones reuse it)."""
    keep_freed_memory()  # the trainer's default (training.keep_freed_memory)
    torch.manual_seed(0)
    params = list(UNet2DConditionModel(**UNETS[preset]).parameters())
    ema = IMPLEMENTATIONS[implementation](params)
    times, extra = drive(params, ema, steps)
    diff = 0.0
    if implementation != LOOP:  # the same weight trajectory through EMAModel's loop, compared afterwards
        with torch.no_grad():
            torch._foreach_add_(params, -1e-3 * steps * (steps + 1) / 2)
        reference = IMPLEMENTATIONS[LOOP](params)
        drive(params, reference, steps)
        diff = max((a - b).abs().max().item() for a, b in zip(ema.shadow_params, reference.shadow_params, strict=True))
    return {"tensors": len(params), "weights_mib": sum(p.numel() * p.element_size() for p in params) / 2**20,
            "ms_per_step": [1000 * t for t in times], "median_ms": 1000 * statistics.median(times[1:] or times),
            "first_step_extra_mib": extra[0], "max_abs_diff_vs_loop": diff}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,demo,sd15-arch")
    parser.add_argument("--steps", type=int, default=5, help="EMA steps per implementation; the first is warm-up")
    parser.add_argument("--out", default="outputs/bench/ema.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_one(**json.loads(args.child))))
        return
    machine = describe_machine()
    rows = []
    for preset in args.presets.split(","):
        for name in IMPLEMENTATIONS:
            child = {"preset": preset, "implementation": name, "steps": args.steps}
            rows.append({"preset": preset, "implementation": name, **in_child(__file__, child, f"{preset} {name}")})
            print(f"  {preset} {name}: {rows[-1]['median_ms']:.2f} ms", flush=True)
    print(f"\nfp32, CPU, each implementation in its own process, median of {args.steps - 1} EMA steps after one "
          "warm-up; extra = what the first step added to the peak RSS (its temporaries)")  # fmt: skip
    print("| UNet (tensors, MiB) | implementation | ms / step | vs loop | extra MiB | max diff vs loop |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        loop = next(x for x in rows if x["preset"] == r["preset"] and x["implementation"] == LOOP)["median_ms"]
        print(f"| {r['preset']} ({r['tensors']}, {r['weights_mib']:,.0f}) | {r['implementation']} | "
              f"{r['median_ms']:,.2f} | x{loop / r['median_ms']:.2f} | {r['first_step_extra_mib']:,.0f} | "
              f"{r['max_abs_diff_vs_loop']:.1e} |")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "steps": args.steps, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
