"""Inference speed: `LDMInference.generate` next to diffusers' `StableDiffusionPipeline`, measured in one run.

Two settings (issue 17): the tiny preset at 64 px, 4 images, 30 steps, guidance 7.5, every sampler of the registry;
and the sd15-arch preset (the SD 1.5 architecture, random weights) at 256 px, 1 image, 10 DDIM steps. Each pipeline
is loaded from the same folder as a user loads it, on the same
scheduler, alternating call by call so that machine drift hits both alike; medians are reported with the max pixel
difference between the two (images in [0, 1]). Then the levers, on our pipeline against its own default images:
channels-last weights, bf16 autocast (this CPU may have AVX-512-BF16/AMX: measured, not assumed), torch.compile of
the UNet (inductor, cold cache; its first call, the compile, is reported), freed memory kept for reuse
(ldm_tune.host_memory, which `ldm-tune generate` applies; the rows before it and diffusers run on glibc's default
allocator), and that with the frozen compile (inductor `freezing`), as `ldm-tune generate --compile-frozen` runs.
For sd15-arch, diffusers and our pipeline also run once more, each configuration in a fresh process. Also times
the whole `ldm-tune generate` command. Prints the machine and its fp32 matmul ceiling, a markdown table, and writes
JSON.
Usage: python benchmarks/bench_inference.py [--repeats 5] [--quick] [--presets tiny sd15-arch]
[--out outputs/bench/inference.json]
(`--quick`: the tiny preset only, 3 samplers, 3 repeats, no compile.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ldm_tune.host_memory import keep_freed_memory
from ldm_tune.machine import describe_machine as measure_machine
from ldm_tune.machine import machine_line, peak_rss_mib


def describe_machine() -> dict:
    """The CPU, its thread count and measured fp32 matmul ceiling: printed with, and stored beside, every figure."""
    machine = measure_machine()
    print(f"machine: {machine_line(machine)}")
    return machine


def work_folder(prefix: str) -> Path:
    """A temporary folder removed when the benchmark exits (an sd15-arch model folder alone is 4 GB)."""
    import atexit
    import shutil

    folder = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def in_child(script: str, child: dict, what: str, env: dict | None = None) -> dict:
    """Run `script --child JSON` in a fresh process (its own peak RSS, no state shared with other runs; `env` added
    to its environment before it starts) and return the dict it printed on its `RESULT ` line."""
    import json
    import subprocess
    import sys

    command = [sys.executable, script, "--child", json.dumps(child)]
    environment = {**os.environ, **(env or {})}
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=environment)
    line = next((x for x in result.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{what} failed:\n{result.stderr[-3000:]}")
    return json.loads(line[len("RESULT ") :])


def time_call(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


SETTINGS = {
    "tiny": {"height": 64, "width": 64, "num_images_per_prompt": 4, "num_inference_steps": 30, "guidance_scale": 7.5},
    "sd15-arch": {"height": 256, "width": 256, "num_images_per_prompt": 1, "num_inference_steps": 10,
                  "guidance_scale": 7.5},
}  # fmt: skip
QUICK_SAMPLERS = ("dpm++", "ddim", "euler_a")


def _pipelines(preset: str, work: Path):
    """Our pipeline and diffusers', each loaded from the same folder as users load it."""
    from diffusers import StableDiffusionPipeline

    from ldm_tune.inference import LDMInference
    from ldm_tune.presets import init_model

    model = init_model(preset, work / preset, seed=0)
    ours = LDMInference.from_pretrained(model, device="cpu")
    theirs = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    return model, ours, theirs


def _timed(fn, repeats: int) -> tuple[list[float], object, float]:
    """Times of `repeats` calls after a warm-up call, the warm-up's images (the ones compared) and its seconds
    (with `torch.compile`, the compile time)."""
    start = time.perf_counter()
    result = fn(0)
    first = time.perf_counter() - start
    return [time_call(lambda i=i: fn(i + 1)) for i in range(repeats)], result, first


def ours_runner(ours, call: dict):
    """`seed -> images` of our pipeline for the benchmark's prompt and call."""
    return lambda seed: ours.generate("a red circle", seed=seed, progress=False, output_type="np", **call)


def theirs_runner(theirs, call: dict):
    """`seed -> images` of diffusers' pipeline, on our per-image seeds (seed + i on CPU generators)."""

    def run(seed):
        generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(call["num_images_per_prompt"])]
        return theirs("a red circle", generator=generators, output_type="np", **call).images

    return run


def sampler_row(ours, theirs, name: str, call: dict, repeats: int) -> dict:
    """ours vs diffusers for one sampler: alternating calls, medians, and the max pixel difference."""
    from ldm_tune.schedulers import make_scheduler

    ours.set_scheduler(name)
    theirs.scheduler = make_scheduler(name, ours.base_scheduler_config)
    count = call["num_images_per_prompt"]
    run_ours, run_theirs = ours_runner(ours, call), theirs_runner(theirs, call)
    a, b = run_ours(0), run_theirs(0)
    t_ours, t_theirs = [], []
    for i in range(repeats):  # alternating, so that drift hits both alike
        t_ours.append(time_call(lambda i=i: run_ours(i + 1)))
        t_theirs.append(time_call(lambda i=i: run_theirs(i + 1)))
    ips_ours, ips_theirs = count / statistics.median(t_ours), count / statistics.median(t_theirs)
    return {"sampler": name, "ldm_tune_images_per_s": round(ips_ours, 3), "diffusers_images_per_s": round(ips_theirs, 3),
            "ratio": round(ips_ours / ips_theirs, 3), "max_pixel_diff": float(np.abs(a - b).max()),
            "ldm_tune_s": [round(t, 4) for t in t_ours], "diffusers_s": [round(t, 4) for t in t_theirs]}  # fmt: skip


def lever_rows(ours, name: str, call: dict, repeats: int, reference_ips: float, compile: bool = True) -> list[dict]:
    """Each lever on our pipeline: images/s, the ratio to diffusers' fp32 figure, and the max pixel difference to our
    own fp32 images (1/255 = 0.0039 is the tolerance the issue sets unless the table says otherwise)."""
    import contextlib

    ours.set_scheduler(name)
    count = call["num_images_per_prompt"]
    run = ours_runner(ours, call)

    def frozen_with_kept_memory():
        keep_freed_memory()
        ours.compile_unet(freeze=True)

    base = run(0)
    # (context, switch on, switch off); each compile stays on the UNet once switched on, so they come last, and
    # the frozen one, with freed memory kept as `ldm-tune generate --compile-frozen` runs it, after the plain one
    levers = {
        "channels_last": (contextlib.nullcontext, ours.enable_channels_last, ours.disable_channels_last),
        "bf16 autocast": (lambda: torch.autocast("cpu", torch.bfloat16), lambda: None, lambda: None),
        "kept freed memory": (contextlib.nullcontext, keep_freed_memory, lambda: keep_freed_memory(False)),
        "torch.compile": (contextlib.nullcontext, ours.compile_unet, torch._dynamo.reset),
        # inductor freezing: a compile of its own (dynamo's caches were reset after the plain one)
        "kept freed memory + torch.compile, frozen weights": (
            contextlib.nullcontext,
            frozen_with_kept_memory,
            lambda: keep_freed_memory(False),
        ),
    }
    if not compile:  # --quick: a cold compile takes a minute or more
        del levers["torch.compile"], levers["kept freed memory + torch.compile, frozen weights"]
    rows = []
    for lever, (context, switch_on, switch_off) in levers.items():
        switch_on()
        with context():
            times, images, first = _timed(run, repeats)
        switch_off()
        ips = count / statistics.median(times)
        rows.append({"lever": lever, "sampler": name, "images_per_s": round(ips, 3),
                     "ratio_to_diffusers": round(ips / reference_ips, 3), "first_call_s": round(first, 2),
                     "max_pixel_diff_to_fp32": float(np.abs(images - base).max())})  # fmt: skip
    return rows


# Each in a process of its own, as a user runs one of them (in one process, the rows before a lever change its
# figure: glibc's heap state and page faults carry over from call to call).
FRESH_CONFIGS = ("diffusers", "ours", "ours, kept freed memory", "ours, kept freed memory + frozen compile")


def run_child(child: dict) -> None:
    """One configuration of `fresh_process_rows`, in this fresh process: prints its RESULT line, saves its images."""
    from ldm_tune.schedulers import make_scheduler

    model, config, call = Path(child["model"]), child["config"], child["call"]
    if config == "diffusers":
        from diffusers import StableDiffusionPipeline

        theirs = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
        theirs.set_progress_bar_config(disable=True)
        theirs.scheduler = make_scheduler(child["sampler"], theirs.scheduler.config)
        run = theirs_runner(theirs, call)
    else:
        from ldm_tune.inference import LDMInference

        ours = LDMInference.from_pretrained(model, device="cpu")
        ours.set_scheduler(child["sampler"])
        if "kept" in config:
            keep_freed_memory()
        if "frozen" in config:
            ours.compile_unet(freeze=True)
        run = ours_runner(ours, call)
    times, images, first = _timed(run, child["repeats"])
    np.save(child["images"], images)
    peak = peak_rss_mib()
    print("RESULT " + json.dumps({"times": times, "first_call_s": first, "peak_rss_mib": peak}))


def fresh_process_rows(model: Path, sampler: str, call: dict, repeats: int, work: Path) -> list[dict]:
    """`FRESH_CONFIGS`, each in a fresh process: seconds per image, the ratio to diffusers, peak RSS and the max pixel
    difference to diffusers' images."""
    rows, images = [], {}
    for config in FRESH_CONFIGS:
        path = work / f"fresh-{len(rows)}.npy"
        child = {"model": str(model), "config": config, "call": call, "sampler": sampler, "repeats": repeats,
                 "images": str(path)}  # fmt: skip
        result = in_child(__file__, child, f"{config} in a fresh process")
        images[config] = np.load(path)
        seconds = statistics.median(result["times"]) / call["num_images_per_prompt"]
        rows.append({"configuration": config, "sampler": sampler, "seconds_per_image": round(seconds, 3),
                     "times": [round(t, 3) for t in result["times"]], "first_call_s": round(result["first_call_s"], 1),
                     "peak_rss_mib": round(result["peak_rss_mib"]),
                     "max_pixel_diff_to_diffusers": float(np.abs(images[config] - images["diffusers"]).max())})  # fmt: skip
    for row in rows:
        row["speed_vs_diffusers"] = round(rows[0]["seconds_per_image"] / row["seconds_per_image"], 3)
    return rows


def print_table(machine: dict, results: dict) -> None:
    print(f"\n{time.strftime('%Y-%m-%d')}, {machine['cpu']}, {machine['threads']} threads, AVX-512 "
          f"{machine['avx512']}, fp32 matmul ceiling {machine['fp32_matmul_gflops']} GFLOP/s")  # fmt: skip
    print("| preset | sampler | ldm_tune img/s | diffusers img/s | ours / diffusers | max pixel diff |")
    print("|---|---|---:|---:|---:|---:|")
    for preset, block in results.items():
        for r in block["rows"]:
            print(f"| {preset} | {r['sampler']} | {r['ldm_tune_images_per_s']:.3f} | {r['diffusers_images_per_s']:.3f} "
                  f"| x{r['ratio']:.2f} | {r['max_pixel_diff']:.1e} |")  # fmt: skip
    print("\n| preset | lever (sampler) | img/s | / diffusers fp32 | first call s | max pixel diff to our fp32 |")
    print("|---|---|---:|---:|---:|---:|")
    for preset, block in results.items():
        for r in block["levers"]:
            print(
                f"| {preset} | {r['lever']} ({r['sampler']}) | {r['images_per_s']:.3f} | x{r['ratio_to_diffusers']:.2f} "
                f"| {r['first_call_s']:.1f} | {r['max_pixel_diff_to_fp32']:.1e} |"
            )
    fresh = [(preset, r) for preset, block in results.items() for r in block.get("fresh_processes", [])]
    if fresh:
        print("\n| preset | configuration, fresh process each (sampler) | s / image | speed vs diffusers | first call s "
              "| peak RSS MiB | max pixel diff to diffusers |")  # fmt: skip
        print("|---|---|---:|---:|---:|---:|---:|")
        for preset, r in fresh:
            print(f"| {preset} | {r['configuration']} ({r['sampler']}) | {r['seconds_per_image']:.2f} "
                  f"| x{r['speed_vs_diffusers']:.2f} | {r['first_call_s']:.1f} | {r['peak_rss_mib']:,} "
                  f"| {r['max_pixel_diff_to_diffusers']:.1e} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny preset only, 3 samplers, 3 repeats")
    parser.add_argument("--presets", nargs="+", choices=list(SETTINGS), help="only these presets (default: both)")
    parser.add_argument("--out", default="outputs/bench/inference.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_child(json.loads(args.child))
    from ldm_tune.schedulers import scheduler_names

    machine = describe_machine()
    work = work_folder("ldm-bench-")
    # torch.compile's figure is a cold compile, as a user's first run has (inductor keeps compiled code on disk).
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(work / "inductor")
    repeats = 3 if args.quick else args.repeats
    plan = {"tiny": QUICK_SAMPLERS if args.quick else scheduler_names()}
    if not args.quick:
        plan["sd15-arch"] = ("ddim",)
    plan = {preset: samplers for preset, samplers in plan.items() if preset in (args.presets or plan)}
    results = {}
    for preset, samplers in plan.items():
        call = SETTINGS[preset]
        model, ours, theirs = _pipelines(preset, work)
        rows = [sampler_row(ours, theirs, name, call, repeats if preset == "tiny" else 3) for name in samplers]
        levers = lever_rows(ours, rows[0]["sampler"], call, repeats if preset == "tiny" else 3,
                            rows[0]["diffusers_images_per_s"], compile=not args.quick)  # fmt: skip
        results[preset] = {"setting": call, "rows": rows, "levers": levers, "model": str(model)}
        del ours, theirs
        if preset == "sd15-arch":
            results[preset]["fresh_processes"] = fresh_process_rows(model, rows[0]["sampler"], call, 3, work)

    cli_times = []
    if "tiny" in results:
        cli = [
            str(Path(sys.executable).parent / "ldm-tune"),
            "generate", "--model", results["tiny"]["model"], "--prompt", "a red circle", "--steps", "30",
            "--num-images", "4", "--seed", "0", "--out", str(work / "cli"),
        ]  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        cli_times = [
            time_call(lambda: subprocess.run(cli, check=True, env=env, capture_output=True)) for _ in range(3)
        ]
    print_table(machine, results)
    if cli_times:
        print(f"`ldm-tune generate` whole command (start-up + load + 4 images, dpm++): "
              f"{statistics.median(cli_times):.2f} s median of 3")  # fmt: skip

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine, "repeats": repeats, "quick": args.quick, "presets": results,
              "cli_command_s": [round(t, 3) for t in cli_times]}  # fmt: skip
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
