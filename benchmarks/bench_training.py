"""Training speed, ours beside the reference loop and each speed lever, every ratio taken in one run of this script.

"reference" is ldm_tune set up as diffusers' train_text_to_image.py runs: the VAE and the text encoder encode
every image and caption at every step, foreach AdamW (torch's default there), no caches, default memory format,
no compile, glibc's default allocator. "ours" is ldm_tune as it ships for a fine-tune: latent and text-embedding
caches (each image and caption encoded once), fused AdamW, freed memory kept for reuse (ldm_tune.host_memory;
"ours, glibc default allocator" measures it). Each "ours + X" row adds one lever to "ours" (channels_last,
torch.compile through Accelerate with a cold inductor cache, the math attention backend instead of CPU flash
attention, pinned OpenMP threads, DataLoader workers, bf16 autocast). All train the same model on the same shapes data with the same seed;
each run is a child process (its own peak RSS), the configurations alternate, and each is repeated `--repeats` times.

Reports per configuration: steady samples/s (the median over updates after `--warmup`; the median and spread over
repeats) and its ratio to the reference, start-up seconds (process start to the end of update 1: model load, data
check, cache fill, compilation), peak RSS and its ratio, the UNet's achieved GFLOP/s (torch.utils.flop_counter,
attention on the math backend) against the machine's measured fp32 matmul ceiling. Writes JSON.
`--preset tiny` (default): 64 px, batch 16, every lever. `--preset sd15-arch`: the SD 1.5 architecture (random
weights) at 256 px, batch 1, gradient checkpointing, on 16 images, a few steps; the pair plus bf16 autocast.
Usage: python benchmarks/bench_training.py [--preset tiny|sd15-arch] [--steps 40] [--repeats 3] [--batch-size 16]
[--configs NAME ...] [--out outputs/bench/training.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

from bench_inference import describe_machine, in_child, work_folder

from ldm_tune.machine import peak_rss_mib


# Set, not left to the default: the default turns the caches on only where the run sees every image at least once
# (ldm_tune.data.cache_policy), which a few-step sd15-arch bench does not, while the runs it stands for do.
CACHES = ["data.cache_latents=true", "data.cache_text_embeddings=true"]
NO_CACHES = ["data.cache_latents=false", "data.cache_text_embeddings=false"]
# Accelerate's own torch.compile switch (what `accelerate launch --dynamo_backend inductor` sets): the trainer needs
# no code of its own for it. (Accelerate's regional compilation fails on diffusers' UNet2DConditionModel with torch
# 2.13: "GroupNorm does not support len()" with dynamic=False, a sympy Relational error with dynamic shapes.)
COMPILE = {"ACCELERATE_DYNAMO_BACKEND": "INDUCTOR"}
# name: (training overrides, environment, switch applied in the child). "ours" is what ships; each "ours + X" row
# is one lever measured on top of it, kept in the product only where the table shows it helps.
# The diffusers example runs on glibc's default allocator; ours keeps freed memory (ldm_tune.host_memory).
DEFAULT_MALLOC = "training.keep_freed_memory=false"
CONFIGS = {
    "reference": ([DEFAULT_MALLOC, *NO_CACHES], {}, "foreach_adamw"),
    "ours": (CACHES, {}, None),
    # No cache key set: what a user's config gets. Both caches come on at the default 40 updates of 16 (640 samples
    # over 512 images); at `--steps 30` (480 samples) the latent cache stays off (ldm_tune.data.cache_policy).
    "ours, caches left to the default": ([], {}, None),
    "ours, glibc default allocator": ([*CACHES, DEFAULT_MALLOC], {}, None),
    "ours + channels_last": (CACHES, {}, "channels_last"),
    "ours + torch.compile": (CACHES, COMPILE, None),
    "ours, math SDPA": (CACHES, {}, "math_sdpa"),
    # OpenMP threads pinned one per core (libgomp reads these when the process starts)
    "ours + pinned threads": (CACHES, {"OMP_PROC_BIND": "close", "OMP_PLACES": "cores"}, None),
    "ours + 2 loader workers": ([*CACHES, "data.dataloader_num_workers=2"], {}, None),
    "ours + bf16 autocast": ([*CACHES, "training.mixed_precision=bf16"], {}, None),
    # EMA of the weights (configs/sd15.yaml turns it on): ldm_tune's in-place update against diffusers' EMAModel.step
    "ours + EMA": ([*CACHES, "training.use_ema=true"], {}, None),
    "ours + EMA, diffusers' EMAModel.step": ([*CACHES, "training.use_ema=true"], {}, "diffusers_ema_step"),
}
# sd15-arch: each run takes minutes, so the pair and the levers that can change its verdict (allocator, AMX bf16,
# the EMA update).
DEFAULT_CONFIGS = {
    "tiny": list(CONFIGS),
    "sd15-arch": [
        "reference",
        "ours",
        "ours, glibc default allocator",
        "ours + bf16 autocast",
        "ours + EMA",
        "ours + EMA, diffusers' EMAModel.step",
    ],
}


def apply_switch(switch: str | None) -> None:
    """Process-wide changes a configuration makes before the trainer is built (in its own child process)."""
    import torch

    if switch == "foreach_adamw":  # the diffusers example's optimizer: torch's default foreach AdamW, not fused
        adamw = torch.optim.AdamW

        def foreach_adamw(params, **kwargs):
            kwargs.pop("fused", None)
            return adamw(params, foreach=True, **kwargs)

        torch.optim.AdamW = foreach_adamw
    elif switch == "math_sdpa":  # attention by the math backend instead of CPU flash attention
        from torch.nn.attention import SDPBackend, sdpa_kernel

        sdpa_kernel(SDPBackend.MATH).__enter__()
    elif switch == "diffusers_ema_step":  # the EMA update as diffusers' EMAModel does it (per-tensor loop)
        from diffusers.training_utils import EMAModel

        from ldm_tune.ema import ForeachEMA

        ForeachEMA.step = EMAModel.step


# preset: (image size, extra training overrides)
PRESETS = {"tiny": (64, []), "sd15-arch": (256, ["training.gradient_checkpointing=true"])}


def unet_flops_per_sample(model: str, batch: int, size: int) -> float:
    """FLOPs of one training sample through the UNet (forward and backward) at `size` px, counted by torch's
    FlopCounterMode with attention on the math backend (CPU flash attention reports no FLOPs)."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet").train()
    factor = 2 ** (len(json.loads((Path(model) / "vae" / "config.json").read_text())["block_out_channels"]) - 1)
    latents = torch.randn(batch, unet.config.in_channels, size // factor, size // factor)
    states = torch.randn(batch, 77, unet.config.cross_attention_dim)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        unet(latents, torch.full((batch,), 500), states).sample.square().mean().backward()
    return counter.get_total_flops() / batch


def run_child(name: str, model: str, data: str, out: str, steps: int, warmup: int, batch: int, preset: str) -> dict:
    """One training run of configuration `name` (in a child process)."""
    start = time.perf_counter()
    import torch

    from ldm_tune.config import load_config
    from ldm_tune.tracking import read_metrics
    from ldm_tune.training import Trainer

    overrides, _, switch = CONFIGS[name]
    apply_switch(switch)
    config = load_config(None, [
        f"model.pretrained_model_name_or_path={model}", f"data.train_data_dir={data}",
        f"data.resolution={PRESETS[preset][0]}", *PRESETS[preset][1],
        "data.center_crop=true", f"training.train_batch_size={batch}", f"training.max_train_steps={steps}",
        "training.lr_warmup_steps=0", "logging.logging_steps=1", f"checkpointing.checkpointing_steps={steps}",
        "validation.validation_steps=0", f"output_dir={out}", f"data.cache_dir={out}-cache", *overrides,
    ])  # fmt: skip
    trainer = Trainer(config)
    if switch == "channels_last":  # NHWC weights (oneDNN's preferred layout); activations follow the weights
        trainer.model.to(memory_format=torch.channels_last)
    first, original = [], trainer._after_update

    def after_update(*args):
        if not first:
            first.append(time.perf_counter() - start)
        original(*args)

    trainer._after_update = after_update
    trainer.train()
    rates = [r["samples_per_s"] for r in read_metrics(Path(out) / "metrics.jsonl") if "samples_per_s" in r]
    caches = {"latents": trainer.config.data.cache_latents, "text": trainer.config.data.cache_text_embeddings}
    return {"samples_per_s": statistics.median(rates[warmup:]), "start_up_s": first[0],
            "peak_rss_mib": peak_rss_mib(), "caches": caches}  # fmt: skip


def summarize(runs: list[dict]) -> dict:
    rates = [r["samples_per_s"] for r in runs]
    return {"samples_per_s": statistics.median(rates), "spread": [min(rates), max(rates)],
            "start_up_s": statistics.median(r["start_up_s"] for r in runs),
            "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in runs), "runs": runs}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="tiny")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), help="default: every lever on tiny, "
                        f"{DEFAULT_CONFIGS['sd15-arch']} on sd15-arch")  # fmt: skip
    parser.add_argument("--out", default="outputs/bench/training.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_child(**json.loads(args.child))))
        return

    from ldm_tune.data.shapes import make_shapes_dataset
    from ldm_tune.presets import init_model

    machine = describe_machine()
    work = work_folder("ldm-bench-train-")
    size = PRESETS[args.preset][0]
    model = init_model(args.preset, work / args.preset)
    images = 512 if args.preset == "tiny" else 16
    data = make_shapes_dataset(work / "shapes", n=images, size=size, validation_fraction=0)
    names = list(dict.fromkeys(["reference", "ours", *(args.configs or DEFAULT_CONFIGS[args.preset])]))
    runs = {name: [] for name in names}
    for repeat in range(args.repeats):
        for name in runs:  # alternating, so a drift of the machine touches every configuration alike
            run_dir = work / f"run-{list(CONFIGS).index(name)}-{repeat}"
            child = dict(
                name=name,
                model=str(model),
                data=str(data / "train"),
                steps=args.steps,
                out=str(run_dir),
                warmup=args.warmup,
                batch=args.batch_size,
                preset=args.preset,
            )
            # A cold compile, as a user's first run has: inductor's on-disk cache would hold an earlier run's code.
            # (A folder name without spaces: inductor passes it to g++ unquoted.)
            env = {**CONFIGS[name][1], "TORCHINDUCTOR_CACHE_DIR": f"{run_dir}-inductor"}
            runs[name].append(in_child(__file__, child, name, env))
            for folder in (run_dir, f"{run_dir}-cache", env["TORCHINDUCTOR_CACHE_DIR"]):  # sd15-arch: ~17 GB a run
                shutil.rmtree(folder, ignore_errors=True)
            print(f"  {name} #{repeat + 1}: {runs[name][-1]}", flush=True)
    table = {name: summarize(r) for name, r in runs.items()}
    reference = table["reference"]
    flops = unet_flops_per_sample(str(model), args.batch_size, size)
    for row in table.values():  # the UNet's share of the work, against the machine's fp32 matmul ceiling
        row["unet_gflops"] = flops * row["samples_per_s"] / 1e9
        row["percent_of_ceiling"] = 100 * row["unet_gflops"] / machine["fp32_matmul_gflops"]
        row["vs_reference"] = row["samples_per_s"] / reference["samples_per_s"]
        row["rss_vs_reference"] = row["peak_rss_mib"] / reference["peak_rss_mib"]
    print(f"\n{args.preset} preset, {size} px, batch {args.batch_size}, fp32, {args.steps} updates ({args.warmup} "
          f"warm-up), {args.repeats} repeats; medians, spread = min-max over repeats; start-up = process start to "
          "the end of update 1 (model load, caches, compilation)")  # fmt: skip
    print("| configuration | samples/s | spread | s/step | samples/s vs reference | start-up s | peak RSS MiB | "
          "RSS vs reference | UNet GFLOP/s | % of fp32 ceiling |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, row in table.items():
        print(f"| {name} | {row['samples_per_s']:.3g} | {row['spread'][0]:.3g}-{row['spread'][1]:.3g} | "
              f"{args.batch_size / row['samples_per_s']:.3g} | x{row['vs_reference']:.2f} | {row['start_up_s']:.1f} | "
              f"{row['peak_rss_mib']:.0f} | x{row['rss_vs_reference']:.2f} | {row['unet_gflops']:.1f} | "
              f"{row['percent_of_ceiling']:.0f} |")  # fmt: skip
    ratio = table["ours"]["vs_reference"]
    print(f"UNet forward + backward: {flops / 1e9:.2f} GFLOP per sample")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "preset": args.preset, "batch_size": args.batch_size, "steps": args.steps,
                               "unet_flops_per_sample": flops, "table": table, "ratio_samples_per_s": ratio},
                              indent=2))  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
