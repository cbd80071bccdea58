"""Data pipeline speed: preprocessing images/s per worker, and tiny training samples/s with and without caches.

1. decode + resize + crop (the training transform, PIL/numpy) of JPEG photos-sized images in one process;
2. the tiny preset trained at 64 px, batch 16, from pixels and from both caches (latents + text embeddings),
   measured in the same run. Prints the machine and its fp32 matmul ceiling; writes JSON.
Usage: python benchmarks/bench_data.py [--out outputs/bench/data.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
from bench_inference import describe_machine, work_folder
from PIL import Image


def preprocessing_rate(folder: Path, size: tuple[int, int], resolution: int, count: int) -> float:
    from ldm_tune.data.images import decode_image
    from ldm_tune.data.transforms import preprocess

    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        # Smooth random colour fields: compress like photographs, not like noise or flat colour.
        small = rng.integers(0, 255, (size[1] // 32, size[0] // 32, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
        paths.append(folder / f"{i}.jpg")
        image.save(paths[-1], quality=90)
    start = time.perf_counter()
    for path in paths:
        preprocess(decode_image(path, 10**9), (resolution, resolution), True, False, rng)
    return count / (time.perf_counter() - start)


def training_rate(work: Path, model: Path, data: Path, cached: bool, steps: int, warmup: int) -> float:
    from ldm_tune.config import load_config
    from ldm_tune.tracking import read_metrics
    from ldm_tune.training import train

    name = "cached" if cached else "pixels"
    overrides = [f"model.pretrained_model_name_or_path={model}", f"data.train_data_dir={data / 'train'}",
                 "data.resolution=64", "data.center_crop=true", "training.train_batch_size=16",
                 f"training.max_train_steps={steps}", "training.lr_warmup_steps=0", "logging.logging_steps=1",
                 f"checkpointing.checkpointing_steps={steps}", f"output_dir={work / name}",
                 f"data.cache_dir={work / 'cache'}"]  # fmt: skip
    overrides += [f"data.cache_latents={str(cached).lower()}", f"data.cache_text_embeddings={str(cached).lower()}"]
    train(load_config(None, overrides))
    rates = [r["samples_per_s"] for r in read_metrics(work / name / "metrics.jsonl") if "samples_per_s" in r]
    return statistics.median(rates[warmup:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default="outputs/bench/data.json")
    args = parser.parse_args()

    from accelerate.state import AcceleratorState

    from ldm_tune.data.shapes import make_shapes_dataset
    from ldm_tune.presets import init_model

    machine = describe_machine()
    work = work_folder("ldm-bench-data-")
    (work / "photos").mkdir()
    result = {"machine": machine}
    (work / "photos-large").mkdir()
    result["preprocess_1024x768_to_512_images_per_s"] = preprocessing_rate(work / "photos-large", (1024, 768), 512, 60)
    result["preprocess_768x512_to_256_images_per_s"] = preprocessing_rate(work / "photos", (768, 512), 256, 60)
    model = init_model("tiny", work / "tiny")
    data = make_shapes_dataset(work / "shapes", n=512, size=64, validation_fraction=0)
    result["tiny_train_samples_per_s_pixels"] = training_rate(work, model, data, False, args.steps, 10)
    AcceleratorState._reset_state(reset_partial_state=True)
    result["tiny_train_samples_per_s_cached"] = training_rate(work, model, data, True, args.steps, 10)
    print("\nper worker (one process): JPEG decode + lanczos resize + center crop + to tensor")
    print(f"  1024x768 -> 512 px: {result['preprocess_1024x768_to_512_images_per_s']:.1f} images/s")
    print(f"  768x512 -> 256 px: {result['preprocess_768x512_to_256_images_per_s']:.1f} images/s")
    print(f"tiny preset, 64 px, batch 16, fp32, median of {args.steps - 10} updates:")
    pixels, cached = result["tiny_train_samples_per_s_pixels"], result["tiny_train_samples_per_s_cached"]
    print(f"  from pixels: {pixels:.1f} samples/s; from both caches: {cached:.1f} samples/s ({cached / pixels:.2f}x)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
