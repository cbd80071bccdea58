"""`ldm-tune export`: a model folder (+ training checkpoint, + merged LoRAs) as one single-file `.safetensors`."""

from __future__ import annotations

from ldm_tune.generate_cli import DTYPES, _lora_arg


def add_export_parser(sub) -> None:
    """The `export` subcommand."""
    parser = sub.add_parser(
        "export",
        help="Write a model as one .safetensors file in the original ldm layout (A1111, ComfyUI, from_single_file).",
        description="Convert a diffusers-format model (optionally with a training checkpoint's UNet and LoRAs fused "
        "in) to the original Stable Diffusion single-file layout. An existing file is never overwritten.",
    )
    add = parser.add_argument
    add("--model", required=True, help="Stable-Diffusion-format folder, hub id, or single file (with --config).")
    add("--config", help="For a single-file --model: a diffusers-format folder of its architecture.")
    add("--checkpoint", help="Training checkpoint-N, output folder, best/ or UNet folder whose UNet is exported.")
    add("--no-ema", dest="use_ema", action="store_false",
        help="Export a checkpoint's raw UNet, not its EMA weights (the default when it has them).")  # fmt: skip
    add("--lora", type=_lora_arg, action="append", default=[], metavar="PATH[:SCALE]",
        help="LoRA to fuse into the weights at SCALE (default 1.0); repeat for several.")  # fmt: skip
    add("--out", required=True, help="New .safetensors file to write.")
    add("--dtype", choices=list(DTYPES), default="fp16", help="dtype of the written weights (default: fp16).")


def run_export(args) -> None:
    from ldm_tune.export import export_single_file

    path = export_single_file(
        args.model,
        args.out,
        checkpoint=args.checkpoint,
        lora=args.lora,
        dtype=DTYPES[args.dtype],
        use_ema=args.use_ema,
        config=args.config,
    )
    print(f"Wrote {path} ({args.dtype})")
