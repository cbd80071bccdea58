"""`ldm-tune compare-pixel` (`make compare`): pixel-space diffusion (DDPM, arXiv 2006.11239) against latent
diffusion (LDM, arXiv 2112.10752) on the demo's shapes world, trained by the same trainer for the same time.

It checks the claim that moving diffusion into the VAE's latent space makes generation several times faster
(2.5 s per image for DDPM against 0.7 s for an LDM) and halves memory, at the same quality.

Stages (each resumes; a finished one is skipped), into `--out`:
  1. data: the demo's shapes world (base colours) at 32 px;
  2. VAE: a finished `make demo` VAE when there is one (`outputs/demo/vae/pipeline`), else one trained here as the
     demo trains it, its time reported apart: the budget is for the diffusion stage only;
  3. models: the latent model (the demo preset's UNet on 8x8x4 latents) and the pixel model (the same UNet width on
     32x32x3 pixels, same text encoder and tokenizer; see `ldm_tune.pixel_space.make_pixel_model`);
  4. probe: a few steps of each space measure its s / step (the trainer has no time limit), from which
     `max_train_steps = budget / (s / step)`;
  5. training: each space for its steps, the same recipe (`model.space: latent | pixel`);
  6. measurements, each in a fresh process: the trained models (s / image by DDIM 50 and DDPM 1000, peak memory,
     oracle accuracy at guidance 5), then the sampling cost at 64, 128 and 256 px with untrained weights;
  7. report: compare.md, compare.json and compare.png (ldm_tune.compare_report).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path


# Only the standard library at the top: `ldm-tune --help` imports this module; torch and diffusers load on use.


SPACES = ("latent", "pixel")  # the values of `model.space`, in the order they are trained and measured
DEMO_VAE_FOLDER = Path("outputs/demo/vae/pipeline")
# The claim under test: seconds per image of a pixel-space DDPM and of an LDM, and pixel / latent memory.
CLAIM = {"ddpm_seconds_per_image": 2.5, "ldm_seconds_per_image": 0.7, "memory_ratio": 2.0}
WARM_UP_STEPS = 2  # the first updates of a run pay one-off costs (allocations, the first cache reads)


@dataclass
class CompareSettings:
    """Sizes of one comparison; `quick()` is the version the test suite runs."""

    images: int = 2000
    size: int = 32
    batch_size: int = 32
    budget_seconds: float = 120.0  # training time of each space (its steps, not start-up, caching or saving)
    probe_steps: int = 12
    caption_dropout: float = 0.1  # the demo's: the empty caption trains the unconditional branch CFG needs
    learning_rate: float = 1e-3  # the demo UNet stage's recipe (AdamW, cosine decay, warm-up)
    vae_steps: int = 600  # only when no finished demo VAE is reused; 0: the preset's random VAE (plumbing tests)
    validation_inference_steps: int = 20  # the validation images at the end of each training run
    ddim_steps: int = 50
    ddpm_steps: int = 1000
    images_per_prompt: int = 2  # for the oracle accuracy, over the 24 colour x shape prompts
    cost_sizes: tuple[int, ...] = (64, 128, 256)
    cost_steps: int = 4  # DDIM steps timed per size; s / step is their median
    seed: int = 0

    @classmethod
    def quick(cls) -> CompareSettings:
        return cls(images=48, batch_size=8, budget_seconds=2.0, probe_steps=3, vae_steps=0, ddim_steps=3,
                   ddpm_steps=4, validation_inference_steps=2, images_per_prompt=1, cost_sizes=(64,),
                   cost_steps=2)  # fmt: skip


def _data(out: Path, s: CompareSettings) -> Path:
    from ldm_tune.data.shapes import make_shapes_dataset
    from ldm_tune.demo import _once

    return _once(out / "data" / "base", lambda p: make_shapes_dataset(p, n=s.images, size=s.size, seed=s.seed))


def _vae(out: Path, data: Path, s: CompareSettings, reuse: Path | None) -> tuple[Path, dict]:
    """A trained VAE's model folder (its UNet is the demo preset's random one) and how it was obtained."""
    from ldm_tune.demo import _stage, caption_words
    from ldm_tune.presets import init_model

    if reuse is not None:
        if not (reuse / "model_index.json").exists():
            raise ValueError(
                f"`vae` {str(reuse)!r} is not a model folder (no model_index.json); omit it to train one."
            )
        return reuse, {"source": str(reuse), "trained_here": False, "seconds": 0.0,
                       "text": f"`{reuse}`, trained before this run and reused"}  # fmt: skip
    init = out / "models" / "init"
    if not init.exists():
        init_model("demo", init, seed=s.seed, words=caption_words())
    if s.vae_steps == 0:
        return init, {"source": str(init), "trained_here": False, "seconds": 0.0,
                      "text": "the demo preset's random VAE, untrained (`vae_steps: 0`, a plumbing test)"}  # fmt: skip
    # The demo's VAE stage (ldm_tune.demo.train_stages), on this run's images.
    summary = _stage(out / "vae", [
        f"seed={s.seed}", f"data.resolution={s.size}", "data.center_crop=true", f"data.cache_dir={out / 'cache'}",
        f"training.train_batch_size={s.batch_size}", f"data.train_data_dir={data / 'train'}",
        f"data.validation_data_dir={data / 'validation'}", "stage=vae", f"model.pretrained_model_name_or_path={init}",
        "vae.from_scratch=true", f"training.max_train_steps={s.vae_steps}", "training.learning_rate=2e-3",
        "training.lr_scheduler=cosine", "training.lr_warmup_steps=20", "checkpointing.checkpoints_total_limit=1",
        f"checkpointing.checkpointing_steps={max(1, s.vae_steps // 2)}", "validation.validation_steps=0",
    ])  # fmt: skip
    seconds = json.loads((out / "timings.json").read_text())["vae"]
    text = f"trained here ({s.vae_steps} steps, {seconds:.0f} s, PSNR {summary.get('val_psnr') or 0:.1f} dB)"
    return out / "vae" / "pipeline", {"source": str(out / "vae"), "trained_here": True, "seconds": seconds,
                                      "text": text}  # fmt: skip


def train_overrides(out: Path, data: Path, s: CompareSettings, space: str, model: Path, steps: int) -> list[str]:
    """One recipe for both spaces; only `model.space`, the model and the latent cache (latents exist only in
    latent space; text embeddings are cached in both) differ."""
    return [
        f"seed={s.seed}", f"model.space={space}", f"model.pretrained_model_name_or_path={model}",
        f"data.train_data_dir={data / 'train'}", f"data.validation_data_dir={data / 'validation'}",
        f"data.resolution={s.size}", "data.center_crop=true", f"data.cache_dir={out / 'cache'}",
        f"data.cache_latents={space == 'latent'}", "data.cache_text_embeddings=true",
        f"data.caption_dropout={s.caption_dropout}", f"training.train_batch_size={s.batch_size}",
        f"training.max_train_steps={steps}", f"training.learning_rate={s.learning_rate}",
        "training.lr_scheduler=cosine", f"training.lr_warmup_steps={min(100, steps // 10)}",
        "logging.logging_steps=1", "checkpointing.checkpoints_total_limit=1",
        # A few checkpoints make a killed run resumable; each costs a save, so never more than every 10 steps.
        f"checkpointing.checkpointing_steps={max(10, steps // 4)}", "validation.validation_steps=0",
        "validation.validation_scheduler=ddim", "validation.validation_guidance_scale=5",
        f"validation.validation_inference_steps={s.validation_inference_steps}",
        "validation.validation_prompts=[a red circle on a white background, a blue square on a white background]",
    ]  # fmt: skip


def probe_overrides(out: Path, data: Path, s: CompareSettings, space: str, model: Path) -> list[str]:
    """The training recipe for a few steps, without the validation loss and images (they only cost time)."""
    steps = max(s.probe_steps, WARM_UP_STEPS + 1)
    return [*train_overrides(out, data, s, space, model, steps), "data.validation_data_dir=null",
            "validation.validation_prompts=[]"]  # fmt: skip


def seconds_per_step(run: Path, batch_size: int) -> tuple[float, float]:
    """(median s / step, samples / s) of a run's updates after the warm-up, from its metrics.jsonl."""
    from ldm_tune.tracking import read_metrics

    rates = [r["samples_per_s"] for r in read_metrics(run / "metrics.jsonl") if r.get("samples_per_s")]
    rates = rates[WARM_UP_STEPS:] or rates
    samples_per_second = statistics.median(rates)
    return batch_size / samples_per_second, samples_per_second


def train_spaces(out: Path, data: Path, models: dict[str, Path], s: CompareSettings) -> dict[str, dict]:
    """Probe, then train each space for `budget_seconds` of steps; returns the training facts per space."""
    from ldm_tune.demo import _stage

    facts = {}
    for space in SPACES:
        probe = out / f"probe-{space}"
        _stage(probe, probe_overrides(out, data, s, space, models[space]))
        probe_step, _ = seconds_per_step(probe, s.batch_size)
        steps = max(1, int(s.budget_seconds / probe_step))
        run = out / f"train-{space}"
        summary = _stage(run, train_overrides(out, data, s, space, models[space], steps))
        step, rate = seconds_per_step(run, s.batch_size)
        timings = json.loads((out / "timings.json").read_text())
        facts[space] = {
            "steps": summary["global_step"],
            "probe_seconds_per_step": probe_step,
            "seconds_per_step": step,
            "samples_per_second": rate,
            "batch_size": s.batch_size,
            "training_seconds": step * summary["global_step"],
            "stage_seconds": timings[run.name],
            "final_train_loss": summary.get("final_train_loss"),
            "model": str(run / "pipeline"),
        }
    return facts


def measure(out: Path, training: dict[str, dict], s: CompareSettings) -> tuple[dict, list[dict]]:
    """The trained models' measurements and the cost rows, each in a fresh process (cached in out/measure/)."""
    from ldm_tune.compare_report import run_job

    spaces = {}
    for space in SPACES:
        job = {
            "kind": "trained",
            "space": space,
            "model": training[space]["model"],
            "seed": s.seed,
            "ddim_steps": s.ddim_steps,
            "ddpm_steps": s.ddpm_steps,
            "images_per_prompt": s.images_per_prompt,
        }
        measured = run_job(job, out / "measure" / f"trained-{space}.json")
        spaces[space] = {"training": training[space], "measured": measured}
    cost = []
    for size in s.cost_sizes:
        for space in SPACES:
            job = {"kind": "cost", "space": space, "size": size, "steps": s.cost_steps, "seed": s.seed}
            cost.append(run_job(job, out / "measure" / f"cost-{space}-{size}.json"))
    return spaces, cost


def compare_spaces(
    out_dir: str | Path = "outputs/compare", settings: CompareSettings | None = None, vae: str | Path | None = None
) -> dict:
    """Run (or resume) the comparison into `out_dir`; returns the numbers (also in compare.json and compare.md).

    `vae`: a trained VAE's model folder to reuse (the demo's `vae/pipeline`); None trains one here.
    """
    from ldm_tune.compare_report import write_chart, write_markdown
    from ldm_tune.demo import add_time
    from ldm_tune.machine import describe_machine
    from ldm_tune.pixel_space import make_pixel_model
    from ldm_tune.presets import DEMO_UNET

    s = settings or CompareSettings()
    if s.size % 16:  # the latent UNet runs at size / 4, and both UNets halve it twice
        raise ValueError(f"`size` must be a multiple of 16, got {s.size}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data = _data(out, s)
    vae_folder, vae_facts = _vae(out, data, s, None if vae is None else Path(vae))
    pixel = out / "models" / "pixel"
    if not pixel.exists():
        make_pixel_model(vae_folder, pixel, s.size, seed=s.seed)
    add_time(out, "data-and-models", time.perf_counter() - started)
    training = train_spaces(out, data, {"latent": vae_folder, "pixel": pixel}, s)
    measuring = time.perf_counter()
    spaces, cost = measure(out, training, s)
    add_time(out, "measurements", time.perf_counter() - measuring)
    results = {
        "settings": asdict(s),
        "machine": describe_machine(),
        "vae": vae_facts,
        "spaces": spaces,
        "cost": cost,
        "unet_width": DEMO_UNET["block_out_channels"],
        "claim": CLAIM,
    }
    results["timings"] = json.loads((out / "timings.json").read_text())
    (out / "compare.json").write_text(json.dumps(results, indent=2))
    write_chart(spaces, cost, out / "compare.png")
    write_markdown(out, results)
    return results


def add_compare_parser(sub) -> None:
    """Add the `compare-pixel` subcommand to an argparse subparsers object."""
    parser = sub.add_parser(
        "compare-pixel", help="Train pixel-space and latent diffusion for the same time on the shapes world; "
        "compare speed, memory and accuracy (compare.md, compare.json, compare.png).",
    )  # fmt: skip
    parser.add_argument("--out", default="outputs/compare", help="Output folder (a second run resumes).")
    parser.add_argument("--quick", action="store_true", help="Tiny sizes and a few steps (for tests).")
    parser.add_argument("--budget-seconds", type=float, help="Training time of each space (default: 120; quick: "
                        "2); a finished training stage keeps its steps.")  # fmt: skip
    parser.add_argument("--vae", help=f"Trained VAE model folder to reuse (default: {DEMO_VAE_FOLDER} when it "
                        "exists, except with --quick); `none`: train one here.")  # fmt: skip


def run_compare(args) -> None:
    """Run the `compare-pixel` subcommand."""
    settings = CompareSettings.quick() if args.quick else CompareSettings()
    if args.budget_seconds is not None:
        if args.budget_seconds <= 0:
            raise ValueError(f"`--budget-seconds` must be > 0, got {args.budget_seconds}.")
        settings.budget_seconds = args.budget_seconds
    vae = args.vae
    if vae is None and not args.quick and DEMO_VAE_FOLDER.exists():
        vae = DEMO_VAE_FOLDER
    results = compare_spaces(args.out, settings, None if vae == "none" else vae)
    minutes = sum(results["timings"].values()) / 60
    print(
        f"Compared pixel and latent space in {minutes:.1f} min (summed over resumed runs); see {args.out}/compare.md"
    )
