"""Full fine-tune against LoRA (rank 4 and 16): what each trains, keeps in memory, writes and costs per step.

Each configuration trains in its own process (so peak RSS is its own) on the tiny preset at 64 px and on the
`sd15-arch` preset (the exact SD 1.5 architecture, random weights) at 256 px, fp32 on the CPU. Reported per run:
trainable parameters, optimizer-state bytes, size of the last checkpoint folder, size of the exported weights,
the process's peak RSS and the median seconds per update after the warm-up. Prints the machine and its fp32
matmul ceiling, a table, and writes JSON.
Usage: python benchmarks/bench_lora.py [--presets tiny,sd15-arch] [--steps 5] [--out outputs/bench/lora.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from bench_inference import describe_machine, work_folder

from ldm_tune.machine import peak_rss_mib


PRESETS = {  # preset -> (resolution, batch size)
    "tiny": (64, 16),
    "sd15-arch": (256, 1),
}
METHODS = {
    "full": ["training.finetune_method=full"],
    "lora r4": ["training.finetune_method=lora", "training.lora_rank=4"],
    "lora r16": ["training.finetune_method=lora", "training.lora_rank=16"],
}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def run_one(model: str, data: str, resolution: int, batch: int, steps: int, method: list[str], out: str) -> dict:
    """Train in this process and measure (called in a child process by `main`)."""
    from ldm_tune.config import load_config
    from ldm_tune.tracking import read_metrics
    from ldm_tune.training import Trainer

    config = load_config(None, [
        f"model.pretrained_model_name_or_path={model}", f"data.train_data_dir={data}", f"data.resolution={resolution}",
        "data.center_crop=true", f"training.train_batch_size={batch}", f"training.max_train_steps={steps}",
        "training.lr_warmup_steps=0", "logging.logging_steps=1", f"checkpointing.checkpointing_steps={steps}",
        "validation.validation_steps=0", f"output_dir={out}", *method,
    ])  # fmt: skip
    trainer = Trainer(config)
    trainer.train()
    params = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    state_bytes = sum(t.numel() * t.element_size() for s in trainer.optimizer.state.values() for t in s.values()
                      if hasattr(t, "numel"))  # fmt: skip
    rates = [r["samples_per_s"] for r in read_metrics(Path(out) / "metrics.jsonl") if "samples_per_s" in r]
    exported = [Path(out) / name for name in ("unet", "pytorch_lora_weights.safetensors")]
    return {
        "trainable_parameters": sum(p.numel() for p in params),
        "optimizer_state_bytes": state_bytes,
        "checkpoint_bytes": folder_bytes(Path(out) / f"checkpoint-{steps}"),
        "export_bytes": sum(folder_bytes(p) if p.is_dir() else p.stat().st_size for p in exported if p.exists()),
        "peak_rss_bytes": round(peak_rss_mib() * 2**20),
        "seconds_per_step": [batch / r for r in rates],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,sd15-arch")
    parser.add_argument("--steps", type=int, default=5, help="updates per run; the first is warm-up")
    parser.add_argument("--out", default="outputs/bench/lora.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # one measurement, in its own process
        print("RESULT " + json.dumps(run_one(**json.loads(args.child))))
        return

    from ldm_tune.data.shapes import make_shapes_dataset
    from ldm_tune.presets import init_model

    machine = describe_machine()
    work = work_folder("ldm-bench-lora-")
    rows = []
    for preset in args.presets.split(","):
        resolution, batch = PRESETS[preset]
        model = init_model(preset, work / preset)
        data = make_shapes_dataset(work / f"data-{resolution}", n=32, size=resolution, validation_fraction=0) \
            if not (work / f"data-{resolution}").exists() else work / f"data-{resolution}"  # fmt: skip
        for name, method in METHODS.items():
            child = {"model": str(model), "data": str(data / "train"), "resolution": resolution, "batch": batch,
                     "steps": args.steps, "method": method, "out": str(work / f"run-{preset}-{name.replace(' ', '')}")}  # fmt: skip
            result = subprocess.run([sys.executable, __file__, "--child", json.dumps(child)], capture_output=True,
                                    text=True, check=False)  # fmt: skip
            line = next((x for x in result.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                raise RuntimeError(f"{preset} {name} failed:\n{result.stderr[-3000:]}")
            measured = json.loads(line[7:])
            measured["median_seconds_per_step"] = statistics.median(measured["seconds_per_step"][1:])
            rows.append({"preset": preset, "resolution": resolution, "batch": batch, "method": name, **measured})
            print(f"  {preset} {name}: {measured['median_seconds_per_step']:.3f} s/step", flush=True)
    print(f"\nfp32, CPU, {args.steps} updates per run (the first is warm-up); sizes in MiB")
    print("| preset | method | trainable params | optimizer state | checkpoint | export | peak RSS | s/step |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    mib = 2**20
    for r in rows:
        print(f"| {r['preset']} {r['resolution']} px b{r['batch']} | {r['method']} | {r['trainable_parameters']:,} | "
              f"{r['optimizer_state_bytes'] / mib:.1f} | {r['checkpoint_bytes'] / mib:.1f} | {r['export_bytes'] / mib:.1f} "
              f"| {r['peak_rss_bytes'] / mib:.0f} | {r['median_seconds_per_step']:.3f} |")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "steps": args.steps, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
