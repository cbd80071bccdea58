"""The demo's measurements and artefacts: accuracy tables, the sampler comparison, grids, strips, loss curves and
report.md (see `ldm_tune.demo`)."""

from __future__ import annotations

import json
import os
import threading
import time
from functools import partial
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from diffusers.utils import make_image_grid

from ldm_tune.components import vae_space_to_latents
from ldm_tune.data.shapes import NEW_COLORS, SHAPES
from ldm_tune.evaluation import default_prompts, evaluate, format_table, score
from ldm_tune.inference import LDMInference
from ldm_tune.machine import SLOW_HOST_EXPONENT, SLOW_HOST_GFLOPS, describe_machine, machine_line, slow_host_estimate
from ldm_tune.plots import line_chart, strip
from ldm_tune.tracking import read_metrics


NEW_COLOR = next(iter(NEW_COLORS))
GRID_PROMPTS = 3  # rows of the prompts x samplers grid, and the prompts DDPM 1000 samples
# The first three rows are the seed's own table (DDPM 1000, DDIM 50, PLMS 100 steps: "15 s / 3 s / 8 s"); PLMS is
# the `pndm` scheduler (PNDMScheduler with skip_prk_steps, see `ldm-tune schedulers`).
SAMPLERS = [("ddpm", 1000), ("ddim", 50), ("pndm", 100), ("ddpm", 50), ("pndm", 50), ("dpm++", 20), ("euler", 30),
            ("lms", 30)]  # fmt: skip
# Images per sampling call of the accuracy runs: all of them. The demo's 8x8x4 latents leave its UNet calls
# overhead-bound (~12 ms a call whatever the batch): measured on 2 cores, 0.66 ms per sample at 64 samples per call
# (32 images with CFG) and 0.48 ms at 192 (96 images). Each prompt's noise is its own seed's, so the batch does not
# change which images are drawn.
EVAL_BATCH = 256


class PeakMemory:
    """Peak memory while sampling, in MiB: the process's resident set (CPU; /proc sampled every 5 ms; it includes
    the models and what earlier work left allocated), or CUDA memory allocated (GPU)."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self.peak = self._rss()
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
        # An increase over the start would be ~0 once the allocator holds earlier pages: report the level itself.
        self.mib = self.peak / 2**20


def sampler_table(model: Path, prompts: list[str], quick: bool, seed: int) -> tuple[list[dict], dict]:
    """Seconds per image, peak memory and accuracy of each sampler at guidance 5; also the images per sampler."""
    pipe = LDMInference.from_pretrained(model, device="cpu")
    rows, images = [], {}
    for name, steps in SAMPLERS:
        steps = min(steps, 3) if quick else steps
        # All 1000 training timesteps need "trailing" spacing: SD's "leading" spacing with steps_offset 1 would
        # ask for timestep 1000.
        pipe.set_scheduler(name, **({"timestep_spacing": "trailing"} if steps >= 1000 else {}))
        # 1000 steps cost 20x the others: the first GRID_PROMPTS prompts are enough to time and show them.
        used = prompts[:GRID_PROMPTS] if steps >= 1000 else prompts
        with PeakMemory(pipe.device) as memory:
            start = time.perf_counter()
            batch = pipe.generate(used, num_inference_steps=steps, guidance_scale=5.0, seed=seed, progress=False)
            seconds = time.perf_counter() - start
        result = score(batch, used, 1)
        label = f"{name} {steps}" + (f" ({len(used)} prompts)" if len(used) < len(prompts) else "")
        images[label] = batch
        rows.append({"sampler": label, "seconds_per_image": seconds / len(batch), "peak_memory_mib": memory.mib,
                     "color": result["color"], "shape": result["shape"], "joint": result["joint"]})  # fmt: skip
    return rows, images


def _markdown_samplers(rows: list[dict]) -> str:
    lines = [
        "| sampler (steps) | s / image | peak RSS MiB (process) | colour | shape | joint |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['sampler']} | {r['seconds_per_image']:.3f} | {r['peak_memory_mib']:.0f} | {r['color']:.1%} "
                     f"| {r['shape']:.1%} | {r['joint']:.1%} |")  # fmt: skip
    return "\n".join(lines)


@torch.no_grad()
def forward_strip(model: Path, image_path: Path, out: Path) -> Path:
    """One image noised to 0, 25, 50, 70 and 100 % of the schedule by the training noise scheduler, decoded."""
    from PIL import Image

    from ldm_tune.data.transforms import preprocess

    pipe = LDMInference.from_pretrained(model, device="cpu")
    scheduler = DDPMScheduler.from_config(pipe.base_scheduler_config)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    pixels = preprocess(Image.open(image_path).convert("RGB"), (size, size), True, False, None)[None]
    latents = vae_space_to_latents(pipe.vae, pipe.vae.encode(pixels).latent_dist.mean)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    images, labels = [], []
    for fraction in (0.0, 0.25, 0.5, 0.7, 1.0):
        t = torch.tensor([round(fraction * (scheduler.config.num_train_timesteps - 1))])
        noisy = latents if fraction == 0 else scheduler.add_noise(latents, noise, t)
        images.append(pipe.decode(noisy, "pil")[0])
        labels.append(f"{fraction:.0%}")
    return strip(images, labels, out)


@torch.no_grad()
def trajectory_strip(model: Path, prompt: str, steps: int, out: Path) -> Path:
    """The sampler's x0 predictions, decoded, along a DDIM trajectory (6 snapshots)."""
    pipe = LDMInference.from_pretrained(model, device="cpu", scheduler="ddim")
    wanted = {round(i * (steps - 1) / 5) for i in range(6)}
    frames, labels = [], []

    def keep(step, timestep, latents):
        if step in wanted and pipe.pred_original_sample is not None:
            frames.append(pipe.decode(pipe.pred_original_sample, "pil")[0])
            labels.append(f"t={int(timestep)}")

    pipe.generate(prompt, num_inference_steps=steps, guidance_scale=5.0, seed=0, callback=keep, progress=False)
    return strip(frames, labels, out)


def loss_curves(out: Path) -> list[Path]:
    """One PNG per stage: training loss and validation loss (and PSNR for the VAE)."""
    paths = []
    for stage in ("vae", "unet", "finetune"):
        records = read_metrics(out / stage / "metrics.jsonl") if (out / stage / "metrics.jsonl").exists() else []
        series = {}
        for key in ("loss", "val_loss"):
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if points:
                series[key] = ([p[0] for p in points], [p[1] for p in points])
        paths.append(line_chart(series, out / f"loss-{stage}.png", title=f"{stage} stage", log_y=True))
    return paths


def write_report(out: Path, s, summaries: dict) -> dict:
    """Evaluate the trained models, write every artefact and report.md; returns the numbers."""
    from ldm_tune.demo import add_time, finetuned_model

    started = time.perf_counter()
    quick = s.unet_steps < 100
    old, new = default_prompts(), default_prompts(colors=[NEW_COLOR], shapes=SHAPES)
    steps = s.eval_steps
    # DDIM at the demo's steps, the same seeds and images per prompt for every model and prompt set.
    run = partial(
        evaluate,
        scheduler="ddim",
        steps=steps,
        images_per_prompt=s.eval_images_per_prompt,
        seed=s.seed,
        batch_size=EVAL_BATCH,
    )
    base = run(out / "unet" / "pipeline", old)
    new_count = s.new_concept_eval_images_per_prompt
    new_before = run(out / "unet" / "pipeline", new, (5.0,), images_per_prompt=new_count)
    tuned, loras = finetuned_model(out)  # a LoRA fine-tune is the base model plus its adapters
    new_after = run(tuned, new, (5.0,), lora=loras, images_per_prompt=new_count)
    old_after = run(tuned, old, (5.0,), lora=loras)
    rows, images = sampler_table(out / "unet" / "pipeline", old, quick, s.seed)
    (out / "samplers.md").write_text(_markdown_samplers(rows) + "\n")
    (out / "samplers.json").write_text(json.dumps(rows, indent=2))
    labels = list(images)
    grid = [images[label][p] for p in range(GRID_PROMPTS) for label in labels]
    make_image_grid(grid, rows=GRID_PROMPTS, cols=len(labels)).save(out / "grid.png")
    forward_strip(
        out / "unet" / "pipeline", next((out / "data" / "base" / "validation").glob("*.png")), out / "forward.png"
    )
    trajectory_strip(out / "unet" / "pipeline", old[0], max(steps, 6), out / "trajectory.png")
    curves = loss_curves(out)
    by_guidance = {r["guidance"]: r for r in base["rows"]}
    timings = add_time(out, "evaluation", time.perf_counter() - started, replace=True)
    results = {
        "wall_seconds": sum(timings.values()), "timings": timings, "machine": describe_machine(),
        "vae_psnr": summaries["vae"].get("val_psnr"), "base": base["rows"], "samplers": rows,
        "new_concept_before": new_before["rows"][0]["joint"], "new_concept_after": new_after["rows"][0]["joint"],
        "new_concept_images": len(new) * new_count,
        "old_after_finetune": old_after["rows"][0]["joint"], "old_before_finetune": by_guidance[5.0]["joint"],
        "finetune_method": s.finetune_method,
    }  # fmt: skip
    _write_markdown(out, s, results, base, rows, curves)
    return results


def _target(ok: bool) -> str:
    return "met" if ok else "**not met**"


_FINETUNED = {True: "`finetune/pytorch_lora_weights.safetensors` (a LoRA on `unet/pipeline`).",
              False: "`finetune/pipeline`."}  # fmt: skip
_METHOD_TEXT = {
    "attn2": "`attn2`: only the UNet's cross-attention trains",
    "full": "every UNet weight trains",
    "lora": "a rank-16 LoRA on the UNet's attention projections",
    "lora-attn2": "a rank-16 LoRA on the UNet's cross-attention projections",
}


def _write_markdown(out: Path, s, r: dict, base: dict, rows: list[dict], curves: list[Path]) -> None:
    g = {row["guidance"]: row for row in r["base"]}
    psnr = r["vae_psnr"] or 0.0
    drop = r["old_before_finetune"] - r["old_after_finetune"]
    slow = slow_host_estimate(r["wall_seconds"], r["machine"])
    lines = [
        "# ldm_tune demo report", "",
        f"Wall time: **{r['wall_seconds'] / 60:.1f} min** on this machine, summed over resumed runs: "
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in r["timings"].items()) + ".", "",
        # Hosts differ ~3-6x in speed: the time is comparable across them through the measured ceiling.
        f"Machine: {machine_line(r['machine'])}.", "",
        f"Estimated on the slow host type (AVX2 only, fp32 matmul ceiling {SLOW_HOST_GFLOPS:.0f} GFLOP/s; this run's "
        f"time x (ceiling ratio)^{SLOW_HOST_EXPONENT:.2f}, see ldm_tune.machine): **{slow / 60:.1f} min** (target "
        f"<= 10 min there: {_target(slow <= 600)}).", "",
        "## Accuracy on the colour x shape prompts (DDIM, guidance per row)", "", format_table(base), "",
        "| target | measured | |", "|---|---:|---|",
        f"| colour accuracy >= 90 % (guidance 5) | {g[5.0]['color']:.1%} | {_target(g[5.0]['color'] >= 0.9)} |",
        f"| shape accuracy >= 70 % (guidance 5) | {g[5.0]['shape']:.1%} | {_target(g[5.0]['shape'] >= 0.7)} |",
        f"| guidance 5 beats 1 by >= 15 points (joint) | {100 * (g[5.0]['joint'] - g[1.0]['joint']):+.1f} points | "
        f"{_target(g[5.0]['joint'] - g[1.0]['joint'] >= 0.15)} |",
        f"| VAE validation PSNR >= 28 dB | {psnr:.1f} dB | {_target(psnr >= 28)} |",
        f"| new concept ({NEW_COLOR}) joint accuracy >= 70 % after fine-tuning ({r['new_concept_images']} images) | "
        f"{r['new_concept_before']:.1%} -> {r['new_concept_after']:.1%} | {_target(r['new_concept_after'] >= 0.7)} |",
        f"| old concepts drop <= 10 points | {r['old_before_finetune']:.1%} -> {r['old_after_finetune']:.1%} | "
        f"{_target(drop <= 0.10)} |", "",
        "Recipe: the VAE is trained from scratch on unlabelled shapes in all seven colours (cyan included: an "
        "autoencoder has seen every colour before a word is fine-tuned); the UNet learns the six base colours with "
        f"a frozen random text encoder; the fine-tune ({_METHOD_TEXT[r['finetune_method']]}) learns the {NEW_COLOR} "
        f"images, each seen {s.new_concept_repeats} times per epoch, mixed with replayed base images.", "",
        "## Samplers (guidance 5)", "", _markdown_samplers(rows), "",
        "![prompts x samplers](grid.png)", "", "Forward diffusion (0, 25, 50, 70, 100 % noise):", "",
        "![forward](forward.png)", "", "Denoising trajectory (decoded x0 predictions):", "", "![trajectory](trajectory.png)",
        "", "## Loss curves", "", *[f"![{p.stem}]({p.name})" for p in curves], "",
        "Models: `vae/pipeline`, `unet/pipeline` (base), and the new concept in " + _FINETUNED[
            r["finetune_method"].startswith("lora")],
    ]  # fmt: skip
    (out / "report.md").write_text("\n".join(lines) + "\n")
