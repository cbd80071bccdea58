"""Inference speed: `LDMInference.generate` next to diffusers' `StableDiffusionPipeline`, measured in one run.

Tiny preset, 64 px, 4 images, 30 steps, guidance 7.5, fp32 on the CPU. Both run on the same components and
scheduler, alternating call by call so that machine drift hits both alike; medians are reported. Also times the
whole `ldm-tune generate` command (start-up included). Prints the machine and its fp32 matmul ceiling, and writes
JSON. Usage: python benchmarks/bench_inference.py [--repeats 5] [--out outputs/bench/inference.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
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
    """The CPU, its thread count and measured fp32 matmul ceiling: printed with, and stored beside, every figure."""
    machine = {"cpu": cpu_name(), "avx512": has_avx512(), "threads": torch.get_num_threads(),
               "fp32_matmul_gflops": round(matmul_gflops(), 1), "torch": torch.__version__,
               "python": platform.python_version()}  # fmt: skip
    print(f"machine: {machine['cpu']}, {machine['threads']} threads, AVX-512 {machine['avx512']}, "
          f"fp32 matmul ceiling {machine['fp32_matmul_gflops']} GFLOP/s")  # fmt: skip
    return machine


def in_child(script: str, child: dict, what: str) -> dict:
    """Run `script --child JSON` in a fresh process (its own peak RSS, no state shared with other runs) and return
    the dict it printed on its `RESULT ` line."""
    import json
    import subprocess
    import sys

    result = subprocess.run([sys.executable, script, "--child", json.dumps(child)], capture_output=True, text=True,
                            check=False)  # fmt: skip
    line = next((x for x in result.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{what} failed:\n{result.stderr[-3000:]}")
    return json.loads(line[len("RESULT ") :])


def time_call(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--schedulers", default="dpm++,ddim,euler_a")
    parser.add_argument("--out", default="outputs/bench/inference.json")
    args = parser.parse_args()

    from diffusers import StableDiffusionPipeline

    from ldm_tune.inference import LDMInference
    from ldm_tune.presets import init_model
    from ldm_tune.schedulers import make_scheduler

    machine = describe_machine()
    work = Path(tempfile.mkdtemp(prefix="ldm-bench-"))
    model = init_model("tiny", work / "tiny", seed=0)
    ours = LDMInference.from_pretrained(model, device="cpu")
    theirs = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    call = {"prompt": "a red circle", "num_inference_steps": 30, "guidance_scale": 7.5, "num_images_per_prompt": 4}

    rows = []
    for name in args.schedulers.split(","):
        ours.set_scheduler(name)
        theirs.scheduler = make_scheduler(name, ours.base_scheduler_config)

        def run_ours(seed):
            return ours.generate(seed=seed, progress=False, **call)

        def run_theirs(seed):
            return theirs(generator=torch.Generator("cpu").manual_seed(seed), **call)

        run_ours(0), run_theirs(0)  # warm-up
        t_ours, t_theirs = [], []
        for i in range(args.repeats):
            t_ours.append(time_call(lambda i=i: run_ours(i)))
            t_theirs.append(time_call(lambda i=i: run_theirs(i)))
        ips_ours = 4 / statistics.median(t_ours)
        ips_theirs = 4 / statistics.median(t_theirs)
        rows.append(
            {
                "scheduler": name,
                "ldm_tune_images_per_s": round(ips_ours, 2),
                "diffusers_images_per_s": round(ips_theirs, 2),
                "ratio": round(ips_ours / ips_theirs, 3),
                "ldm_tune_s": [round(t, 4) for t in t_ours],
                "diffusers_s": [round(t, 4) for t in t_theirs],
            }
        )

    cli = [
        str(Path(sys.executable).parent / "ldm-tune"),
        "generate", "--model", str(model), "--prompt", "a red circle", "--steps", "30", "--num-images", "4",
        "--seed", "0", "--out", str(work / "cli"),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cli_times = [time_call(lambda: subprocess.run(cli, check=True, env=env, capture_output=True)) for _ in range(3)]

    print(f"\ntiny preset, 64 px, 4 images, 30 steps, guidance 7.5, fp32; median of {args.repeats} calls each")
    print(f"{'scheduler':<10} {'ldm_tune img/s':>15} {'diffusers img/s':>16} {'ratio':>7}")
    for row in rows:
        print(
            f"{row['scheduler']:<10} {row['ldm_tune_images_per_s']:>15.2f} {row['diffusers_images_per_s']:>16.2f}"
            f" {row['ratio']:>7.3f}"
        )
    cli_median = statistics.median(cli_times)
    print(f"`ldm-tune generate` whole command (start-up + load + 4 images, dpm++): {cli_median:.2f} s median of 3")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine, "setting": call, "repeats": args.repeats, "rows": rows}
    result["cli_command_s"] = [round(t, 3) for t in cli_times]
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
