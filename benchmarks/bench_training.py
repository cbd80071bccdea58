"""Training speed of the tiny preset on this machine: samples/s at 64 px, batch 16 (fp32, no caches).

Builds the tiny model and a shapes dataset in a temporary folder, trains `--steps` updates with metrics logged at
every step, and reports the median samples/s after `--warmup` updates, with the machine and its fp32 matmul
ceiling. Usage: python benchmarks/bench_training.py [--steps 60] [--out outputs/bench/training.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench_inference import describe_machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default="outputs/bench/training.json")
    args = parser.parse_args()

    from ldm_tune.config import load_config
    from ldm_tune.data.shapes import make_shapes_dataset
    from ldm_tune.presets import init_model
    from ldm_tune.tracking import read_metrics
    from ldm_tune.training import train

    machine = describe_machine()
    work = Path(tempfile.mkdtemp(prefix="ldm-bench-train-"))
    model = init_model("tiny", work / "tiny")
    data = make_shapes_dataset(work / "shapes", n=512, size=64, validation_fraction=0)
    config = load_config(None, [
        f"model.pretrained_model_name_or_path={model}", f"data.train_data_dir={data / 'train'}",
        "data.resolution=64", "data.center_crop=true", f"training.train_batch_size={args.batch_size}",
        f"training.max_train_steps={args.steps}", "training.lr_warmup_steps=0", "logging.logging_steps=1",
        f"checkpointing.checkpointing_steps={args.steps}", "validation.validation_steps=0", f"output_dir={work / 'run'}",
    ])  # fmt: skip
    start = time.perf_counter()
    train(config)
    wall = time.perf_counter() - start
    rates = [r["samples_per_s"] for r in read_metrics(work / "run" / "metrics.jsonl") if "samples_per_s" in r]
    median = statistics.median(rates[args.warmup :])
    print(f"\ntiny preset, 64 px, batch {args.batch_size}, fp32, {args.steps} updates ({args.warmup} warm-up)")
    print(f"samples/s median {median:.1f} (min {min(rates[args.warmup:]):.1f}, max {max(rates[args.warmup:]):.1f}); "
          f"whole run incl. load, checkpoint and export: {wall:.1f} s")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "batch_size": args.batch_size, "steps": args.steps,
                               "samples_per_s_median": median, "samples_per_s": rates, "wall_s": wall}, indent=2))  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
