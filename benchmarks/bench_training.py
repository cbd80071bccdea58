"""Training speed of the tiny preset, ours beside the reference loop, each ratio taken in one run of this script.

"reference" is ldm_tune set up as diffusers' train_text_to_image.py runs: the VAE and the text encoder encode
every image and caption at every step, foreach AdamW (torch's default there), no caches. "ours" is ldm_tune as it
ships for a fine-tune: latent and text-embedding caches (each image and caption encoded once), fused AdamW. Both
train the tiny preset at 64 px, batch 16, fp32, on the same shapes data with the same seed; each run is a child
process (its own peak RSS), the configurations alternate, and each is repeated `--repeats` times.

Reports per configuration: steady samples/s (the median over updates after `--warmup`; the median and spread over
repeats), start-up seconds (process start to the end of update 1: model load, data check, cache fill), peak RSS;
and the ratio ours / reference. Prints the machine and its measured fp32 matmul ceiling; writes JSON.
`--preset sd15-arch`: the SD 1.5 architecture (random weights) at 256 px, batch 1, gradient checkpointing, on 16
images (the latent cache encodes each once), a few steps.
Usage: python benchmarks/bench_training.py [--preset tiny|sd15-arch] [--steps 40] [--repeats 3] [--batch-size 16]
[--out outputs/bench/training.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

from bench_inference import describe_machine, in_child, work_folder


CONFIGS = {
    "reference": [],  # plus foreach AdamW, see run_child
    "ours": ["data.cache_latents=true", "data.cache_text_embeddings=true"],
    # A lever measured and not kept: bf16 autocast (this CPU may have AVX-512-BF16/AMX; measured, not assumed).
    "ours, bf16 autocast": [
        "data.cache_latents=true",
        "data.cache_text_embeddings=true",
        "training.mixed_precision=bf16",
    ],  # fmt: skip
}


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

    if name == "reference":  # the diffusers example's optimizer: torch's default foreach AdamW, not fused
        adamw = torch.optim.AdamW

        def foreach_adamw(params, **kwargs):
            kwargs.pop("fused", None)
            return adamw(params, foreach=True, **kwargs)

        torch.optim.AdamW = foreach_adamw
    config = load_config(None, [
        f"model.pretrained_model_name_or_path={model}", f"data.train_data_dir={data}",
        f"data.resolution={PRESETS[preset][0]}", *PRESETS[preset][1],
        "data.center_crop=true", f"training.train_batch_size={batch}", f"training.max_train_steps={steps}",
        "training.lr_warmup_steps=0", "logging.logging_steps=1", f"checkpointing.checkpointing_steps={steps}",
        "validation.validation_steps=0", f"output_dir={out}", f"data.cache_dir={out}-cache", *CONFIGS[name],
    ])  # fmt: skip
    trainer = Trainer(config)
    first, original = [], trainer._after_update

    def after_update(*args):
        if not first:
            first.append(time.perf_counter() - start)
        original(*args)

    trainer._after_update = after_update
    trainer.train()
    rates = [r["samples_per_s"] for r in read_metrics(Path(out) / "metrics.jsonl") if "samples_per_s" in r]
    return {"samples_per_s": statistics.median(rates[warmup:]), "start_up_s": first[0],
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # fmt: skip


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
    # The bf16 lever was measured on tiny (not kept); on sd15-arch each run takes minutes, so only the pair.
    runs = {name: [] for name in (CONFIGS if args.preset == "tiny" else ("reference", "ours"))}
    for repeat in range(args.repeats):
        for name in runs:  # alternating, so a drift of the machine touches both alike
            child = {"name": name, "model": str(model), "data": str(data / "train"), "steps": args.steps,
                     "out": str(work / f"{name}-{repeat}"), "warmup": args.warmup, "batch": args.batch_size,
                     "preset": args.preset}  # fmt: skip
            runs[name].append(in_child(__file__, child, name))
            print(f"  {name} #{repeat + 1}: {runs[name][-1]}", flush=True)
    table = {name: summarize(r) for name, r in runs.items()}
    ratio = table["ours"]["samples_per_s"] / table["reference"]["samples_per_s"]
    flops = unet_flops_per_sample(str(model), args.batch_size, size)
    for row in table.values():  # the UNet's share of the work, against the machine's fp32 matmul ceiling
        row["unet_gflops"] = flops * row["samples_per_s"] / 1e9
        row["percent_of_ceiling"] = 100 * row["unet_gflops"] / machine["fp32_matmul_gflops"]
    print(f"\n{args.preset} preset, {size} px, batch {args.batch_size}, fp32, {args.steps} updates ({args.warmup} warm-up), "
          f"{args.repeats} repeats; medians, spread = min-max over repeats")  # fmt: skip
    print(
        "| configuration | samples/s | spread | s/step | start-up s | peak RSS MiB | UNet GFLOP/s | % of fp32 ceiling |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, row in table.items():
        print(f"| {name} | {row['samples_per_s']:.3g} | {row['spread'][0]:.3g}-{row['spread'][1]:.3g} | "
              f"{args.batch_size / row['samples_per_s']:.3g} | {row['start_up_s']:.1f} | {row['peak_rss_mib']:.0f} | "
              f"{row['unet_gflops']:.1f} | {row['percent_of_ceiling']:.0f} |")  # fmt: skip
    rss = table["ours"]["peak_rss_mib"] / table["reference"]["peak_rss_mib"]
    print(f"| ours / reference | x{ratio:.2f} | | x{1 / ratio:.2f} | | x{rss:.2f} | | |")
    print(f"UNet forward + backward: {flops / 1e9:.2f} GFLOP per sample")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "preset": args.preset, "batch_size": args.batch_size, "steps": args.steps,
                               "unet_flops_per_sample": flops, "table": table, "ratio_samples_per_s": ratio},
                              indent=2))  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
