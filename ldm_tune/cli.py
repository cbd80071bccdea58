"""The `ldm-tune` command line: `train`, `generate`, `init-model`, `make-dataset`, `inspect-data`, `schedulers`."""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from ldm_tune.compare_pixel import add_compare_parser, run_compare
from ldm_tune.evaluation import add_evaluate_parser, run_evaluate
from ldm_tune.export_cli import add_export_parser, run_export
from ldm_tune.generate_cli import DTYPES, _lora_arg, add_generate_parser, run_generate


__all__ = ["DTYPES", "_lora_arg", "build_parser", "main"]  # _lora_arg: evaluate's --lora parses as generate's


def _add_init_model(sub) -> None:
    parser = sub.add_parser("init-model", help="Write a random-weight Stable-Diffusion-format model folder.")
    parser.add_argument(
        "--preset",
        required=True,
        choices=["tiny", "sd15-arch", "demo"],
        help="tiny: CPU-fast, 64 px. sd15-arch: the exact SD 1.5 architecture (3.4 GB UNet in fp32). demo: 32 px.",
    )
    parser.add_argument("--out", required=True, help="New (or empty) folder to write the model into.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random weights.")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="dtype of the saved weights.")


def _config_arguments(parser, config_help: str) -> None:
    parser.add_argument("--config", help=config_help)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="Dotted overrides of config keys.")


def _add_train(sub) -> None:
    parser = sub.add_parser(
        "train",
        help="Fine-tune the UNet (same code as `accelerate launch train.py`).",
        description="Train from a YAML config; override any key with section.key=value, e.g. training.learning_rate=1e-5.",
    )
    _config_arguments(parser, "YAML config file (see configs/); defaults apply to missing keys.")
    parser.add_argument("--help-config", action="store_true", help="Print every config key with its default and exit.")


def _add_train_vae(sub) -> None:
    parser = sub.add_parser("train-vae", help="Train the VAE: the same as `train` with stage=vae.")
    _config_arguments(parser, "YAML config file; `stage` is set to vae.")


def _add_demo(sub) -> None:
    parser = sub.add_parser("demo", help="Train a small text-to-image model from nothing, fine-tune, evaluate.")
    parser.add_argument("--out", default="outputs/demo", help="Output folder (a second run resumes).")
    parser.add_argument("--quick", action="store_true", help="A few steps of everything (for tests).")


def _add_inspect_data(sub) -> None:
    parser = sub.add_parser("inspect-data", help="Check the data of a training config and print the report.")
    _config_arguments(parser, "YAML training config (its model gives the tokenizer).")


def _add_make_dataset(sub) -> None:
    parser = sub.add_parser("make-dataset", help="Write a procedural image-caption dataset (image folders).")
    parser.add_argument("kind", choices=["shapes"], help="shapes: coloured geometric shapes with captions.")
    parser.add_argument("--out", required=True, help="New folder; gets train/ and validation/ image folders.")
    parser.add_argument("--n", type=int, default=1000, help="Number of images in all.")
    parser.add_argument("--size", type=int, default=64, help="Image size in pixels.")
    parser.add_argument("--seed", type=int, default=0, help="Seed (the dataset is deterministic for a seed).")
    parser.add_argument("--validation-fraction", type=float, default=0.1, help="Held-out fraction.")
    parser.add_argument("--colors", nargs="+", help="Colours to draw (default: the six base colours; cyan is the "
                        "new-concept colour; `any`: a random hue per image, no colour word in captions).")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ldm-tune", description="Fine-tune and sample latent diffusion models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="Log at INFO level.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_train_vae(sub)
    add_generate_parser(sub)
    _add_init_model(sub)
    _add_make_dataset(sub)
    _add_inspect_data(sub)
    _add_demo(sub)
    add_evaluate_parser(sub)
    add_compare_parser(sub)
    add_export_parser(sub)
    sub.add_parser("schedulers", help="List the sampler names, one line each.")
    return parser


def _run_init_model(args) -> None:
    from ldm_tune.presets import init_model

    path = init_model(args.preset, args.out, seed=args.seed, dtype=DTYPES[args.dtype])
    print(f"Wrote the {args.preset} model to {path}")


def _run_schedulers(args) -> None:
    from ldm_tune.schedulers import describe_schedulers

    print("\n".join(describe_schedulers()))


def _run_train(args) -> None:
    from ldm_tune.config import describe_config, load_config

    if getattr(args, "help_config", False):
        print(describe_config())
        return
    overrides = [*args.overrides, "stage=vae"] if args.command == "train-vae" else args.overrides
    config = load_config(args.config, overrides)  # all config errors surface here, before any model loads
    from ldm_tune.training import train

    summary = train(config)
    print(f"Trained the {config.stage} for {summary['global_step']} steps; model in {config.output_dir}/pipeline")


def _run_inspect_data(args) -> None:
    from transformers import CLIPTokenizer

    from ldm_tune.config import load_config
    from ldm_tune.data.pipeline import prepare_data

    config = load_config(args.config, args.overrides)
    m, d = config.model, config.data
    tokenizer = CLIPTokenizer.from_pretrained(
        m.pretrained_model_name_or_path, subfolder="tokenizer", revision=m.revision
    )
    if d.train_shards is not None or d.streaming:
        _inspect_stream(config, tokenizer)
        return
    data = prepare_data(d, tokenizer, config.seed, dreambooth=config.dreambooth)  # exit 2 past max_bad_fraction
    print(data.report.format("training data"))
    if data.validation_report is not None:
        print(data.validation_report.format("validation data"))
    elif data.validation is not None:
        print(f"validation: {len(data.validation.items)} items held out of the training data")
    buckets = sorted(set(data.train.sizes))
    print(f"crop sizes: {', '.join(f'{w}x{h}' for w, h in buckets)}")


def _inspect_stream(config, tokenizer) -> None:
    from collections import Counter

    from ldm_tune.data.dataset import TextImageDataset
    from ldm_tune.data.loaders import stream_loader

    class _OneProcess:  # reading a stream for a report needs no distributed set-up
        num_processes, device = 1, torch.device("cpu")

    transforms = TextImageDataset(None, [], [], tokenizer, center_crop=config.data.center_crop)
    stream = stream_loader(config, _OneProcess(), transforms)
    stream.start_epoch(0)
    kept, skipped, sizes = 0, Counter(), Counter()
    for batch in stream:
        kept += len(batch["keys"])
        skipped.update(batch["skipped"])
        if "pixel_values" in batch:
            sizes[tuple(batch["pixel_values"].shape[:1:-1])] += len(batch["keys"])
    print(f"streamed training data: {kept + sum(skipped.values())} samples, {kept} kept, "
          f"{sum(skipped.values())} skipped")  # fmt: skip
    for reason, count in skipped.most_common():
        print(f"  skipped  {reason:<24}{count:>7}")
    print(f"crop sizes: {', '.join(f'{w}x{h}' for w, h in sorted(sizes))}")


def _run_demo(args) -> None:
    from ldm_tune.demo import DemoSettings, run_demo

    results = run_demo(args.out, DemoSettings.quick() if args.quick else DemoSettings())
    print(f"Demo finished in {results['wall_seconds'] / 60:.1f} min; see {args.out}/report.md")


def _run_make_dataset(args) -> None:
    from ldm_tune.data.shapes import make_shapes_dataset

    path = make_shapes_dataset(args.out, n=args.n, size=args.size, seed=args.seed,
                               validation_fraction=args.validation_fraction, colors=args.colors)  # fmt: skip
    print(f"Wrote the {args.kind} dataset to {path} (train/ and validation/)")


COMMANDS = {
    "train": _run_train,
    "train-vae": _run_train,
    "generate": run_generate,
    "init-model": _run_init_model,
    "make-dataset": _run_make_dataset,
    "inspect-data": _run_inspect_data,
    "demo": _run_demo,
    "evaluate": run_evaluate,
    "compare-pixel": run_compare,
    "export": run_export,
    "schedulers": _run_schedulers,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `ldm-tune` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as error:
        print(f"ldm-tune {args.command}: error: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        if type(error).__name__ != "NonFiniteLossError":
            raise
        print(f"ldm-tune {args.command}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
