"""Teaching the demo a new concept: LoRA against cross-attention only against every weight, at equal wall time.

Needs a finished demo (`make demo`): its base UNet (`unet/pipeline`) and data. Each method of
`ldm_tune.demo.FINETUNE_METHODS` first trains `--probe-steps` updates to measure its seconds per update; then every
method trains for the wall time the reference method (`--reference`, the demo's default) needs for the demo's
fine-tuning steps, and is scored like the demo: new-concept joint accuracy (cyan x 4 shapes) and old-concept joint
accuracy (24 prompts) before and after, DDIM 50, guidance 5, averaged over `--seeds` (training seed; sampling
seeds fixed). Prints the machine, a table, and writes JSON.
Usage: python benchmarks/bench_finetune_methods.py [--demo outputs/demo] [--seeds 0,1,2] [--images-per-prompt 8]
       [--out outputs/bench/finetune_methods.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

from bench_inference import describe_machine


def seconds_per_step(run: Path) -> float:
    from ldm_tune.tracking import read_metrics

    rates = [r["samples_per_s"] for r in read_metrics(run / "metrics.jsonl") if "samples_per_s" in r]
    return statistics.median(1.0 / r for r in rates[1:])  # seconds per sample; x batch below


def train(out: Path, data: dict, s, method: str, steps: int, run: Path, seed: int = 0) -> float:
    """Train `method` for `steps` updates into `run` (replaced); returns the wall seconds of the training."""
    from accelerate.state import AcceleratorState

    from ldm_tune.config import load_config
    from ldm_tune.demo import finetune_overrides
    from ldm_tune.training import train as train_config

    shutil.rmtree(run, ignore_errors=True)
    # Validation images and losses would cost the same for every method; leave them out of the timing.
    extra = ("validation.validation_steps=0", "validation.validation_prompts=[]", "data.validation_data_dir=null",
             f"checkpointing.checkpointing_steps={steps}", f"output_dir={run}", f"seed={seed}")  # fmt: skip
    config = load_config(None, finetune_overrides(out, data, s, method, steps, extra))
    start = time.perf_counter()
    try:
        train_config(config)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    return time.perf_counter() - start


def score(out: Path, run: Path | None, s, images_per_prompt: int) -> dict:
    from ldm_tune.data.shapes import NEW_COLORS, SHAPES
    from ldm_tune.demo import finetuned_model
    from ldm_tune.evaluation import default_prompts, evaluate

    model, lora = finetuned_model(out, run) if run is not None else (out / "unet" / "pipeline", [])
    new = default_prompts(colors=list(NEW_COLORS), shapes=SHAPES)
    args = ((5.0,), "ddim", s.eval_steps, images_per_prompt, s.seed)
    return {"new": evaluate(model, new, *args, lora=lora)["rows"][0]["joint"],
            "old": evaluate(model, default_prompts(), *args, lora=lora)["rows"][0]["joint"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", default="outputs/demo", help="a finished demo's output folder")
    parser.add_argument("--reference", default="attn2", help="the method whose demo steps set the wall time")
    parser.add_argument("--probe-steps", type=int, default=12)
    parser.add_argument("--seeds", default="0,1,2", help="training seeds; accuracies are averaged over them")
    parser.add_argument("--images-per-prompt", type=int, default=8)
    parser.add_argument("--out", default="outputs/bench/finetune_methods.json")
    args = parser.parse_args()

    from ldm_tune.demo import FINETUNE_METHODS, DemoSettings, make_data

    machine = describe_machine()
    out, s = Path(args.demo), DemoSettings()
    if not (out / "unet" / "summary.json").exists():
        raise SystemExit(f"{out} holds no finished demo UNet: run `make demo` (or `ldm-tune demo --out {out}`) first.")
    data = make_data(out, s)
    work = out / "bench-finetune"
    per_step = {}
    for method in FINETUNE_METHODS:
        train(out, data, s, method, args.probe_steps, work / f"probe-{method}")
        per_step[method] = seconds_per_step(work / f"probe-{method}") * s.batch_size
    budget = per_step[args.reference] * s.finetune_steps
    before = score(out, None, s, args.images_per_prompt)
    seeds = [int(x) for x in args.seeds.split(",")]
    rows = []
    for method in FINETUNE_METHODS:
        steps = max(1, round(budget / per_step[method]))
        runs = []
        for seed in seeds:
            wall = train(out, data, s, method, steps, work / f"{method}-seed{seed}", seed)
            runs.append({"seed": seed, "train_wall_s": wall, **score(out, work / f"{method}-seed{seed}", s,
                                                                       args.images_per_prompt)})  # fmt: skip
        mean = {key: statistics.mean(r[key] for r in runs) for key in ("new", "old", "train_wall_s")}
        rows.append({"method": method, "overrides": FINETUNE_METHODS[method], "seconds_per_step": per_step[method],
                     "steps": steps, "runs": runs, **{f"mean_{k}": v for k, v in mean.items()},
                     "old_change": mean["old"] - before["old"]})  # fmt: skip
        new, old = ", ".join(f"{r['new']:.1%}" for r in runs), ", ".join(f"{r['old']:.1%}" for r in runs)
        print(f"  {method}: {steps} steps, new [{new}], old [{old}]", flush=True)
    print(f"\nEqual training time: {budget:.1f} s ({s.finetune_steps} steps of {args.reference}); before the fine-tune: "
          f"new concept {before['new']:.1%}, old concepts {before['old']:.1%} (DDIM {s.eval_steps}, guidance 5, "
          f"{args.images_per_prompt} images per prompt); means over seeds {seeds}")  # fmt: skip
    print("| method | s/step | steps | training s | new concept | old concepts | old change |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['seconds_per_step']:.3f} | {r['steps']} | {r['mean_train_wall_s']:.1f} | "
              f"{r['mean_new']:.1%} | {r['mean_old']:.1%} | {100 * r['old_change']:+.1f} pts |")  # fmt: skip
    result = {"machine": machine, "budget_s": budget, "reference": args.reference, "seeds": seeds,
              "images_per_prompt": args.images_per_prompt, "before": before, "rows": rows}  # fmt: skip
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
