"""FSDP (configs/accelerate/fsdp.yaml) under 2 CPU processes: the same UNet as DDP, exact resume from the sharded
state, uneven validation without a hang, and gathered whole-model files (see tests/fsdp_worker.py for how FSDP runs
on CPU processes)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from ldm_tune.sharding import check_sharded_training


ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, overrides: list[str], fsdp: bool = True, kill_after: int | None = None) -> list[dict]:
    """`accelerate launch` the worker with the shipped FSDP config file on 2 CPU processes (`fsdp=False`: DDP)."""
    out.mkdir(parents=True, exist_ok=True)
    accelerate = Path(sys.executable).parent / "accelerate"
    config = ["--config_file", str(ROOT / "configs/accelerate/fsdp.yaml")] if fsdp else ["--multi_gpu"]
    command = [str(accelerate), "launch", *config, "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--main_process_port", str(_free_port()),
               str(Path(__file__).with_name("fsdp_worker.py" if fsdp else "two_process_worker.py")), str(out)]  # fmt: skip
    if kill_after is not None:
        command += ["--kill-after", str(kill_after)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*command, *overrides], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


def _unet(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """DDP and FSDP trainings of the same 4 updates, and an FSDP one killed after update 2 and resumed."""
    from ldm_tune.data.shapes import make_shapes_dataset

    root = tmp_path_factory.mktemp("fsdp")
    # 5 validation items at batch 2: process 0 gets 3 (2 batches), process 1 gets 2 (1 batch).
    data = make_shapes_dataset(root / "data", n=21, size=32, seed=1, validation_fraction=0.25)
    base = [f"model.pretrained_model_name_or_path={tiny_model_dir}", f"data.train_data_dir={data / 'train'}",
            f"data.validation_data_dir={data / 'validation'}", "data.resolution=32", "training.train_batch_size=2",
            "training.max_train_steps=4", "training.lr_warmup_steps=0", "training.max_grad_norm=1.0",
            "checkpointing.checkpointing_steps=2", "validation.validation_steps=2", "validation.validation_batch_size=2",
            "validation.validation_prompts=[a red circle]", "validation.validation_inference_steps=2"]  # fmt: skip
    folders = {name: root / name for name in ("ddp", "fsdp", "split")}
    ranks = {
        "ddp": launch(folders["ddp"], [*base, f"output_dir={folders['ddp']}"], fsdp=False),
        "fsdp": launch(folders["fsdp"], [*base, f"output_dir={folders['fsdp']}"]),
        "killed": launch(folders["split"], [*base, f"output_dir={folders['split']}"], kill_after=2),
    }
    resumed = [*base, f"output_dir={folders['split']}", "checkpointing.resume_from_checkpoint=latest"]
    ranks["resumed"] = launch(folders["split"], resumed)
    return folders, ranks


def test_fsdp_trains_the_same_unet_as_ddp(runs):
    folders, ranks = runs
    assert all(r["distributed_type"] == "DistributedType.FSDP" for r in ranks["fsdp"])
    assert all(r["model"].startswith("FSDP") for r in ranks["fsdp"])  # torch's fully_shard wrapped the UNet
    assert all(r["steps"] == 4 for r in ranks["fsdp"] + ranks["ddp"])
    # Sharded gradients are reduce-scattered instead of all-reduced, and AdamW runs on the shards: the same sums.
    assert _max_diff(_unet(folders["fsdp"]), _unet(folders["ddp"])) <= 1e-5
    # The validation loss over uneven per-process batches (gathered copy on every process) is DDP's, on every rank.
    fsdp_losses = {r["best_val_loss"] for r in ranks["fsdp"]}
    assert len(fsdp_losses) == 1
    assert fsdp_losses.pop() == pytest.approx(ranks["ddp"][0]["best_val_loss"], rel=1e-5)


def test_fsdp_writes_whole_models_everywhere_the_trainer_saves(runs):
    folders, _ = runs
    run = folders["fsdp"]
    final = _unet(run)
    # The checkpoint of the last step holds the sharded state (for resume) and a whole diffusers UNet (for generate).
    assert (run / "checkpoint-4" / "pytorch_model_fsdp_0").is_dir()
    assert _max_diff(_unet(run / "checkpoint-4"), final) == 0.0
    assert _max_diff(_unet(run / "pipeline"), final) == 0.0
    best = json.loads((run / "best" / "info.json").read_text())
    assert _unet(run / "best").keys() == final.keys() and best["step"] in (2, 4)
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-2", "step-4"]
    # Whole tensors, not one process's shard: the shapes are the model's.
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel.from_pretrained(run / "unet")
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: tuple(v.shape) for k, v in final.items()}


def test_fsdp_resume_continues_exactly(runs):
    folders, ranks = runs
    assert all(r["killed_at"] == 2 for r in ranks["killed"])
    assert _max_diff(_unet(folders["split"]), _unet(folders["fsdp"])) == 0.0


@pytest.mark.parametrize(
    ("override", "named"),
    [({"use_ema": True}, "use_ema"), ({"finetune_method": "lora"}, "finetune_method: lora"),
     ({"stage": "vae"}, "stage: vae"), ({"fsdp_version": 1}, "fsdp_version: 1")],
)  # fmt: skip
def test_fsdp_refuses_what_it_cannot_shard(override, named):
    training = SimpleNamespace(use_ema=False, finetune_method="full")
    training.__dict__.update({k: v for k, v in override.items() if k in ("use_ema", "finetune_method")})
    plugin = SimpleNamespace(fsdp_version=override.get("fsdp_version", 2))
    accelerator = SimpleNamespace(distributed_type=DistributedType.FSDP, state=SimpleNamespace(fsdp_plugin=plugin))
    config = SimpleNamespace(training=training, stage=override.get("stage", "unet"))
    with pytest.raises(ValueError, match="FSDP") as error:
        check_sharded_training(accelerator, config)
    assert named in str(error.value) and "multi-gpu.yaml" in str(error.value)
    accelerator.distributed_type = DistributedType.MULTI_GPU  # DDP takes all of them
    check_sharded_training(accelerator, config)
