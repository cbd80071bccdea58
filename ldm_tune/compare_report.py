"""The measurements and artefacts of `ldm-tune compare-pixel` (see `ldm_tune.compare_pixel`).

Every measurement runs in a fresh Python process (`python -m ldm_tune.compare_report JOB`), so that its peak memory
is its own: the process's resident set, sampled every 5 ms by the demo's `PeakMemory`, includes the models and the
torch runtime but nothing another measurement left allocated. Its result is stored as JSON: a resumed run skips it.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from ldm_tune.demo_report import PeakMemory
from ldm_tune.machine import machine_line


GUIDANCE = 5.0
SPACE_LABELS = {"latent": "latent (LDM)", "pixel": "pixel (DDPM)"}


# ------------------------------------------------------------------------------------------------ measurements
def run_job(job: dict, result_file: Path) -> dict:
    """Run `job` in a fresh process unless `result_file` holds its result already; returns the result."""
    if result_file.exists():
        return json.loads(result_file.read_text())
    done = subprocess.run([sys.executable, "-m", "ldm_tune.compare_report", json.dumps(job)], capture_output=True,
                          text=True, check=False)  # fmt: skip
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"The measurement {job['kind']} {job['space']} failed:\n{done.stderr[-3000:]}")
    result_file.parent.mkdir(parents=True, exist_ok=True)
    result_file.write_text(line[len("RESULT ") :])
    return json.loads(result_file.read_text())


def _sample(pipe, prompts: list[str], sampler: str, steps: int, seed: int, per_prompt: int = 1,
            callback=None) -> dict:  # fmt: skip
    """Generate at guidance 5, timed, with the process's peak RSS while sampling."""
    # All 1000 training timesteps need "trailing" spacing (see ldm_tune.demo_report.sampler_table).
    pipe.set_scheduler(sampler, **({"timestep_spacing": "trailing"} if steps >= 1000 else {}))
    with PeakMemory(pipe.device) as memory:
        start = time.perf_counter()
        images = pipe.generate(prompts, num_inference_steps=steps, guidance_scale=GUIDANCE, seed=seed,
                               num_images_per_prompt=per_prompt, callback=callback, progress=False)  # fmt: skip
        seconds = time.perf_counter() - start
    return {"images": images, "seconds": seconds, "seconds_per_image": seconds / len(images),
            "peak_rss_mib": memory.mib, "rss_before_mib": memory.base / 2**20}  # fmt: skip


def measure_trained(job: dict) -> dict:
    """A trained model: one image by DDIM 50 and by DDPM 1000 (latency, peak memory), then every colour x shape
    prompt by DDIM 50 in one batch (throughput, oracle accuracy)."""
    from ldm_tune.evaluation import default_prompts, score
    from ldm_tune.inference import LDMInference
    from ldm_tune.pixel_space import PixelInference

    pipeline_cls = PixelInference if job["space"] == "pixel" else LDMInference
    pipe = pipeline_cls.from_pretrained(job["model"], device="cpu")
    prompts, seed = default_prompts(), job["seed"]
    _sample(pipe, prompts[:1], "ddim", 1, seed)  # warm-up: first-call allocations are not sampling cost
    result = {}
    for sampler, steps in (("ddim", job["ddim_steps"]), ("ddpm", job["ddpm_steps"])):
        row = _sample(pipe, prompts[:1], sampler, steps, seed)
        result[f"{sampler}_one_image"] = {k: v for k, v in row.items() if k != "images"} | {"steps": steps}
    batch = _sample(pipe, prompts, "ddim", job["ddim_steps"], seed, per_prompt=job["images_per_prompt"])
    accuracy = score(batch.pop("images"), prompts, job["images_per_prompt"])
    result["ddim_batch"] = {**batch, "steps": job["ddim_steps"], "count": len(prompts) * job["images_per_prompt"],
                            **{k: accuracy[k] for k in ("color", "shape", "joint")}}  # fmt: skip
    return result


def _untrained_pipe(space: str, size: int, seed: int):
    """Random-weight demo-preset components at `size` px: the same UNet width in both spaces; the latent UNet at
    size / f (f = 4, the demo VAE), the pixel UNet at full size on RGB."""
    from ldm_tune.components import vae_scale_factor
    from ldm_tune.demo import caption_words
    from ldm_tune.inference import LDMInference
    from ldm_tune.pixel_space import PIXEL_SCHEDULER, PixelInference, pixel_unet_config
    from ldm_tune.presets import DEMO_UNET, build_demo

    c = build_demo(seed, caption_words())
    torch.manual_seed(seed)
    if space == "pixel":
        unet = UNet2DConditionModel(**pixel_unet_config(DEMO_UNET, size))
        return PixelInference(c.vae, c.text_encoder, c.tokenizer, unet, PIXEL_SCHEDULER)
    unet = UNet2DConditionModel(**{**DEMO_UNET, "sample_size": size // vae_scale_factor(c.vae)})
    return LDMInference(c.vae, c.text_encoder, c.tokenizer, unet, c.scheduler_config)


def measure_cost(job: dict) -> dict:
    """Sampling cost at `size` px with untrained weights: seconds per sampler step (median over `steps` steps of
    one image) and the fixed part (prompt encoding, VAE decode), extrapolated to DDIM 50 and DDPM 1000."""
    pipe = _untrained_pipe(job["space"], job["size"], job["seed"])
    for model in (pipe.vae, pipe.text_encoder, pipe.unet):
        if model is not None:
            model.eval().requires_grad_(False)
    prompt, size = ["a red circle on a white background"], job["size"]
    warm_up = _sample(pipe, prompt, "ddim", 1, job["seed"])
    # Cheap sizes are timed three times and the fastest kept: a stall of a shared CPU is not the model's cost.
    row, per_step, stamps = None, None, []
    for _ in range(3 if warm_up["seconds"] < 2.0 else 1):
        stamps.clear()
        timed = _sample(
            pipe, prompt, "ddim", job["steps"], job["seed"], callback=lambda *_: stamps.append(time.perf_counter())
        )
        if row is None or timed["seconds"] < row["seconds"]:
            row, per_step = timed, statistics.median(b - a for a, b in itertools.pairwise(stamps))
    # The rest of the call (prompt encoding, the first step's one-off costs, the VAE decode) is paid once per image.
    fixed = max(row["seconds"] - job["steps"] * per_step, 0.0)
    assert row["images"][0].size == (size, size), row["images"][0].size
    return {"space": job["space"], "size": size, "unet_side": pipe.unet.config.sample_size,
            "unet_channels": pipe.unet.config.in_channels, "timed_steps": job["steps"], "seconds_per_step": per_step,
            "fixed_seconds": fixed, "ddim50_seconds_per_image": fixed + 50 * per_step,
            "ddpm1000_seconds_per_image": fixed + 1000 * per_step, "peak_rss_mib": row["peak_rss_mib"],
            "rss_before_mib": row["rss_before_mib"]}  # fmt: skip


JOBS = {"trained": measure_trained, "cost": measure_cost}


def _child(argv: list[str]) -> None:
    job = json.loads(argv[0])
    torch.manual_seed(job["seed"])
    result = JOBS[job["kind"]](job)
    print("RESULT " + json.dumps(result))


# ------------------------------------------------------------------------------------------------------ report
def _ratio(pixel: float, latent: float) -> str:
    return f"{pixel / latent:.2g}x" if latent > 0 and math.isfinite(pixel / latent) else "n/a"


def _trained_table(spaces: dict) -> list[str]:
    lat, pix = spaces["latent"], spaces["pixel"]
    ddim, ddpm = lat["measured"]["ddim_one_image"]["steps"], lat["measured"]["ddpm_one_image"]["steps"]
    count, batch = lat["measured"]["ddim_batch"]["count"], lat["training"]["batch_size"]
    # (label, where the value is: a training fact or a (measurement, key) pair, format)
    rows = [
        (f"training s / step (batch {batch})", "seconds_per_step", "{:.3f}"),
        ("training samples / s", "samples_per_second", "{:.0f}"),
        ("training steps in the budget", "steps", "{:d}"),
        ("training stage wall s (start-up, caches, checkpoints included)", "stage_seconds", "{:.0f}"),
        (f"DDIM {ddim}: s / image (1 image)", ("ddim_one_image", "seconds_per_image"), "{:.3f}"),
        (f"DDPM {ddpm}: s / image (1 image)", ("ddpm_one_image", "seconds_per_image"), "{:.3f}"),
        (f"peak RSS MiB, DDIM {ddim}, 1 image (process)", ("ddim_one_image", "peak_rss_mib"), "{:.0f}"),
        (f"peak RSS MiB, DDPM {ddpm}, 1 image (process)", ("ddpm_one_image", "peak_rss_mib"), "{:.0f}"),
        (f"DDIM {ddim}: s / image, batched ({count} images)", ("ddim_batch", "seconds_per_image"), "{:.3f}"),
        ("colour accuracy (oracle, guidance 5)", ("ddim_batch", "color"), "{:.1%}"),
        ("shape accuracy (oracle, guidance 5)", ("ddim_batch", "shape"), "{:.1%}"),
        ("joint accuracy (oracle, guidance 5)", ("ddim_batch", "joint"), "{:.1%}"),
    ]
    lines = ["| 32 px, trained | latent (LDM) | pixel (DDPM) | pixel / latent |", "|---|---:|---:|---:|"]
    for label, key, fmt in rows:
        a, b = (s["measured"][key[0]][key[1]] if isinstance(key, tuple) else s["training"][key] for s in (lat, pix))
        ratio = "" if "accuracy" in label else _ratio(b, a)
        lines.append(f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {ratio} |")
    return lines


def _rise(row: dict) -> float:
    return row["peak_rss_mib"] - row["rss_before_mib"]


def _cost_table(cost: list[dict]) -> list[str]:
    lines = [
        "| size | space | UNet input | s / step | DDIM 50 s / image | DDPM 1000 s / image | peak RSS MiB "
        "| RSS rise MiB |",
        "|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in cost:
        side, channels = r["unet_side"], r["unet_channels"]
        lines.append(
            f"| {r['size']} | {r['space']} | {side}x{side}x{channels} | {r['seconds_per_step']:.3f} | "
            f"{r['ddim50_seconds_per_image']:.2f} | {r['ddpm1000_seconds_per_image']:.1f} | "
            f"{r['peak_rss_mib']:.0f} | {_rise(r):.0f} |"
        )
    return lines


def verdict(spaces: dict, cost: list[dict]) -> list[str]:
    """What the numbers say about the claim: 2.5 s (DDPM) against 0.7 s (LDM) per image, half the memory."""
    lat, pix = spaces["latent"]["measured"], spaces["pixel"]["measured"]
    steps = lat["ddpm_one_image"]["steps"]
    pixel_s, latent_s = pix["ddpm_one_image"]["seconds_per_image"], lat["ddpm_one_image"]["seconds_per_image"]
    memory = _ratio(pix["ddim_one_image"]["peak_rss_mib"], lat["ddim_one_image"]["peak_rss_mib"])
    lines = [
        f"- 32 px, trained, DDPM {steps} steps, one image: pixel {pixel_s:.2f} s, latent {latent_s:.2f} s "
        f"({_ratio(pixel_s, latent_s)}; the claim: 2.5 s against 0.7 s, 3.6x); peak RSS {memory} (the claim: 2x).",
        f"- Quality at equal training time (joint accuracy, guidance 5): pixel {pix['ddim_batch']['joint']:.1%}, "
        f"latent {lat['ddim_batch']['joint']:.1%} (the claim: the same quality).",
    ]
    rows = {(r["space"], r["size"]): r for r in cost}
    for size in sorted({r["size"] for r in cost}):
        p, q = rows.get(("pixel", size)), rows.get(("latent", size))
        if p is None or q is None:
            continue
        lines.append(
            f"- {size} px, untrained: DDIM 50 {_ratio(p['ddim50_seconds_per_image'], q['ddim50_seconds_per_image'])} "
            f"the latent time in pixel space; RSS rise while sampling {_rise(p):.0f} against {_rise(q):.0f} MiB, "
            f"peak RSS {_ratio(p['peak_rss_mib'], q['peak_rss_mib'])}."
        )
    return lines


def write_chart(spaces: dict, cost: list[dict], path: Path) -> Path:
    """s / image (DDIM 50, log scale) and peak RSS against image size, both spaces, side by side in one PNG."""
    from PIL import Image

    from ldm_tune.plots import line_chart

    charts = (
        ("ddim50_seconds_per_image", "DDIM 50 s / image vs size (px); 32 px: trained model", True),
        ("peak_rss_mib", "peak RSS MiB while sampling vs image size (px)", False),
    )
    panels = []
    for key, title, log_y in charts:
        series = {}
        for space in ("latent", "pixel"):
            one = spaces[space]["measured"]["ddim_one_image"]
            trained = {"ddim50_seconds_per_image": one["seconds_per_image"], "peak_rss_mib": one["peak_rss_mib"]}
            points = [(32, trained[key])] + [(r["size"], r[key]) for r in cost if r["space"] == space]
            points.sort()
            series[SPACE_LABELS[space]] = ([p[0] for p in points], [p[1] for p in points])
        panels.append(line_chart(series, path.with_name(f"{path.stem}-{key}.png"), title=title, log_y=log_y))
    images = [Image.open(p) for p in panels]
    canvas = Image.new("RGB", (sum(i.width for i in images), max(i.height for i in images)), "white")
    for n, image in enumerate(images):
        canvas.paste(image, (n * images[0].width, 0))
    canvas.save(path)
    return path


def write_markdown(out: Path, results: dict) -> Path:
    m, s, spaces, cost = results["machine"], results["settings"], results["spaces"], results["cost"]
    vae = results["vae"]
    lines = [
        "# Pixel-space diffusion (DDPM) against latent diffusion (LDM) on the shapes world", "",
        f"Machine: {machine_line(m)}.", "",
        f"Both UNets have the demo preset's width (block_out_channels {results['unet_width']}), the same text "
        f"encoder and tokenizer, caption dropout {s['caption_dropout']}, AdamW at the same learning rate and "
        f"schedule, batch {s['batch_size']}, and were trained by the same trainer (`model.space`) for the same "
        f"budget of {s['budget_seconds']:.0f} s of training steps each (steps = budget / s per step measured in a "
        f"{s['probe_steps']}-step probe: the trainer has no time limit). The latent model's VAE is {vae['text']}; "
        "the budget covers the diffusion stage only.", "",
        "## Trained at 32 px (guidance 5)", "", *_trained_table(spaces), "",
        "Memory is the process's resident set (RSS) sampled every 5 ms while sampling, each measurement in a fresh "
        "process: models and the torch runtime included.", "",
        "## Cost at larger sizes (untrained weights)", "", *_cost_table(cost), "",
        f"Untrained weights (cost does not depend on them), the same UNet width in both spaces; the latent model "
        f"samples size/4 latents (the demo VAE's factor; Stable Diffusion's is 8) and decodes with the VAE, the "
        f"pixel model samples at full size. One image, CFG (UNet batch 2). s / step is the median over "
        f"{s['cost_steps']} DDIM steps; DDIM 50 and DDPM 1000 are extrapolated from it plus the measured fixed part "
        "(prompt encoding, VAE decode). RSS rise: peak minus the level before sampling.", "",
        "## What the numbers say about the claim", "", *verdict(spaces, cost), "",
        "![s / image and peak memory against size](compare.png)",
    ]  # fmt: skip
    path = out / "compare.md"
    path.write_text("\n".join(lines) + "\n")
    return path


if __name__ == "__main__":
    _child(sys.argv[1:])
