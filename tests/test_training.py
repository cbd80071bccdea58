import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import compute_snr
from safetensors.torch import load_file

from ldm_tune.checkpointing import MARKER, CheckpointManager
from ldm_tune.inference import LDMInference
from ldm_tune.losses import min_snr_weights
from ldm_tune.presets import SD15_SCHEDULER
from ldm_tune.tracking import read_metrics
from ldm_tune.training import NonFiniteLossError, Trainer


REPO = Path(__file__).resolve().parents[1]


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def unet_weights(folder):
    return load_file(Path(folder) / "diffusion_pytorch_model.safetensors")


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_one_step_changes_the_unet_and_nothing_else(make_config):
    trainer = Trainer(make_config("training.max_train_steps=1"))
    unet, vae, text = snapshot(trainer.unet), snapshot(trainer.vae), snapshot(trainer.text_encoder)
    trainer.train()
    assert max_diff(unet, snapshot(trainer.accelerator.unwrap_model(trainer.unet))) > 0
    assert all(torch.equal(vae[k], v) for k, v in trainer.vae.state_dict().items())
    assert all(torch.equal(text[k], v) for k, v in trainer.text_encoder.state_dict().items())
    assert not any(p.requires_grad for p in trainer.vae.parameters())
    assert not any(p.requires_grad for p in trainer.text_encoder.parameters())


def test_trainable_modules_train_only_what_they_name(make_config):
    trainer = Trainer(make_config("training.max_train_steps=2", "training.trainable_modules=[attn2.to_k, attn2.to_v]"))
    before = snapshot(trainer.unet)
    trainer.train()
    after = snapshot(trainer.accelerator.unwrap_model(trainer.unet))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in changed)
    assert any(".attn2.to_q." in k for k in before)  # the tiny UNet has other attention weights that stayed
    exported = unet_weights(trainer.output_dir / "unet")
    assert all(torch.equal(exported[k], after[k]) for k in after)  # the whole UNet is exported
    with pytest.raises(ValueError, match="trainable_modules.*matches no parameter"):
        Trainer(make_config("training.trainable_modules=[no_such_layer]", output_dir=trainer.output_dir / "x"))


def test_outputs_load_everywhere(make_config, tiny_model_dir):
    config = make_config("training.max_train_steps=2", "checkpointing.checkpointing_steps=1")
    Trainer(config).train()
    out = Path(config.output_dir)
    for name in ("config.yaml", "metrics.jsonl", "README.md", "unet/diffusion_pytorch_model.safetensors"):
        assert (out / name).exists(), name
    assert str(tiny_model_dir) in (out / "README.md").read_text()
    pipe = StableDiffusionPipeline.from_pretrained(
        out / "pipeline", safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a red circle", num_inference_steps=2, output_type="np").images.shape == (1, 64, 64, 3)
    ours = LDMInference.from_pretrained(out / "pipeline", device="cpu", scheduler="ddim")
    from_checkpoint = LDMInference.from_pretrained(tiny_model_dir, checkpoint=out / "checkpoint-2", device="cpu",
                                                   scheduler="ddim")  # fmt: skip
    kwargs = {"prompt": "a red circle", "seed": 0, "num_inference_steps": 2, "output_type": "np", "progress": False}
    assert torch.equal(torch.from_numpy(ours.generate(**kwargs)), torch.from_numpy(from_checkpoint.generate(**kwargs)))


def test_overfits_eight_images(make_config):
    config = make_config("data.max_train_samples=8", "training.train_batch_size=8", "training.max_train_steps=250",
                         "training.learning_rate=1e-3", "data.caption_dropout=0", "logging.logging_steps=1")  # fmt: skip
    Trainer(config).train()
    losses = [r["loss"] for r in read_metrics(Path(config.output_dir) / "metrics.jsonl") if "loss" in r]
    first, last = sum(losses[:10]) / 10, sum(losses[-25:]) / 25
    assert last < 0.5 * first, (first, last)


def test_accumulation_matches_the_large_batch(make_config, tmp_path, tiny_model_dir):
    common = ["data.max_train_samples=8", "training.max_train_steps=2", "training.learning_rate=1e-3"]
    big = make_config(*common, "training.train_batch_size=8", output_dir=tmp_path / "big")
    small = make_config(*common, "training.train_batch_size=4", "training.gradient_accumulation_steps=2",
                        output_dir=tmp_path / "small")  # fmt: skip
    Trainer(big).train()
    Trainer(small).train()
    base = unet_weights(tiny_model_dir / "unet")
    updates = [torch.cat([(unet_weights(tmp_path / run / "unet")[k] - base[k]).flatten() for k in base])
               for run in ("big", "small")]  # fmt: skip
    # Same items, keyed noise and timesteps; only the float summation order of the gradient differs. AdamW divides
    # by |g| + eps, so weights whose gradient is ~0 can move by noise-level amounts: the tolerance is stated on the
    # whole update (relative L2 error <= 1e-4) and per weight: at most 1 in 10,000 weights off by more than 1% of
    # the largest single-weight update, none by more than 10% (an Intel AMX host: 7 of 1.47 M past 1 %, max 2.1 %).
    difference, largest = updates[0] - updates[1], updates[0].abs().max()
    assert difference.norm() <= 1e-4 * updates[0].norm()
    assert (difference.abs() > 0.01 * largest).float().mean() <= 1e-4
    assert difference.abs().max() <= 0.1 * largest


RESUME = ["data.max_train_samples=8", "training.train_batch_size=3", "training.gradient_accumulation_steps=2",
          "training.max_train_steps=6", "training.lr_scheduler=cosine", "training.lr_warmup_steps=2",
          "training.use_ema=true", "data.caption_dropout=0.3", "data.random_flip=true",
          "checkpointing.checkpointing_steps=3", "logging.logging_steps=1"]  # fmt: skip


def test_resume_continues_exactly(straight_and_resumed, tmp_path):
    straight_and_resumed(RESUME, kill_after=3)  # mid-epoch: 8 items in batches of 3, 2 per update
    for folder in ("unet", "checkpoint-6/unet", "checkpoint-6/unet_ema"):  # exported EMA, raw weights, EMA state
        assert max_diff(unet_weights(tmp_path / "full" / folder), unet_weights(tmp_path / "split" / folder)) <= 1e-6
    full = [r for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if "loss" in r]
    split = [r for r in read_metrics(tmp_path / "split" / "metrics.jsonl") if "loss" in r]
    assert [r["lr"] for r in full] == [r["lr"] for r in split]  # the LR schedule continued
    assert [round(r["loss"], 6) for r in full] == [round(r["loss"], 6) for r in split]  # same data, noise, steps


class Killed(Exception):
    pass


def test_kill_inside_save_state_keeps_the_previous_checkpoint(make_config, tmp_path, monkeypatch):
    from accelerate import Accelerator

    config = make_config("training.max_train_steps=4", "checkpointing.checkpointing_steps=2")
    original = Accelerator.save_state

    def dies_at_step_4(self, output_dir, **kwargs):
        if "checkpoint-4" in str(output_dir):
            original(self, output_dir, **kwargs)
            (Path(output_dir) / "optimizer.bin").write_bytes(b"half")  # torn write
            raise Killed
        return original(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", dies_at_step_4)
    with pytest.raises(Killed):
        Trainer(config).train()
    out = Path(config.output_dir)
    assert (out / "checkpoint-2" / MARKER).exists() and not (out / "checkpoint-4").exists()
    assert (out / ".checkpoint-4.tmp").exists()
    assert CheckpointManager(None, out).latest() == out / "checkpoint-2"

    monkeypatch.setattr(Accelerator, "save_state", original)
    resumed = Trainer(make_config("training.max_train_steps=4", "checkpointing.checkpointing_steps=2",
                                  "checkpointing.resume_from_checkpoint=latest"))  # fmt: skip
    assert resumed.resume_path == out / "checkpoint-2"
    assert resumed.train()["global_step"] == 4
    assert (out / "checkpoint-4" / MARKER).exists() and not (out / ".checkpoint-4.tmp").exists()


def test_rotation_keeps_the_newest_complete_checkpoints(make_config):
    config = make_config("training.max_train_steps=4", "checkpointing.checkpointing_steps=1",
                         "checkpointing.checkpoints_total_limit=2", "checkpointing.resume_from_checkpoint=latest")  # fmt: skip
    out = Path(config.output_dir)
    (out / "checkpoint-0").mkdir(parents=True)  # not ours (no marker): never deleted, never resumed
    Trainer(config).train()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-0", "checkpoint-3", "checkpoint-4"]


def test_an_earlier_run_is_never_overwritten(make_config):
    config = make_config("training.max_train_steps=1")
    Trainer(config).train()
    with pytest.raises(ValueError, match="already holds a run.*resume_from_checkpoint=latest"):
        Trainer(config)
    with pytest.raises(ValueError, match="is not a complete checkpoint"):
        Trainer(make_config("training.max_train_steps=1", "checkpointing.resume_from_checkpoint=checkpoint-7"))


def test_validation_loss_best_unet_and_images(make_config, shapes_dir):
    config = make_config("training.max_train_steps=2", "validation.validation_steps=1",
                         f"data.validation_data_dir={shapes_dir / 'validation'}",
                         "validation.validation_prompts=[a red circle, a blue square]",
                         "validation.validation_inference_steps=2", "validation.num_validation_images=2")  # fmt: skip
    trainer = Trainer(config)
    trainer.train()
    assert trainer.evaluate() == trainer.evaluate()  # fixed noise and timesteps
    out = Path(config.output_dir)
    val = [r for r in read_metrics(out / "metrics.jsonl") if "val_loss" in r]
    assert [r["step"] for r in val] == [1, 2]
    best = json.loads((out / "best" / "info.json").read_text())
    assert best["val_loss"] == min(r["val_loss"] for r in val)
    assert (out / "best" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    for step in (1, 2):
        assert len(list((out / "samples" / f"step-{step}").glob("00000-0?.png"))) == 4
        assert (out / "samples" / f"step-{step}" / "00000-grid.png").exists()


def test_nonfinite_losses_skip_updates_then_stop(make_config, monkeypatch):
    config = make_config("training.max_train_steps=10", "checkpointing.checkpointing_steps=1",
                         "training.max_nonfinite_steps=3")  # fmt: skip
    original = Trainer.compute_losses

    def nan_after_step_1(self, batch, seed):
        losses = original(self, batch, seed)
        return losses * float("nan") if self.state.global_step >= 1 else losses

    monkeypatch.setattr(Trainer, "compute_losses", nan_after_step_1)
    with pytest.raises(NonFiniteLossError, match=r"3 updates in a row, the last at step 4.*checkpoint-3"):
        Trainer(config).train()
    out = Path(config.output_dir)
    assert max_diff(unet_weights(out / "checkpoint-1" / "unet"), unet_weights(out / "checkpoint-3" / "unet")) == 0


def test_v_prediction_and_min_snr_train_and_export(make_config):
    config = make_config("model.prediction_type=v_prediction", "training.snr_gamma=5", "training.max_train_steps=1",
                         "training.noise_offset=0.05", "training.input_perturbation=0.1")  # fmt: skip
    Trainer(config).train()
    scheduler = json.loads((Path(config.output_dir) / "pipeline" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction" and scheduler["clip_sample"] is False


def test_min_snr_weights_for_epsilon_and_v():
    scheduler = DDPMScheduler.from_config(SD15_SCHEDULER)
    timesteps = torch.tensor([0, 50, 300, 999])
    snr = compute_snr(scheduler, timesteps)
    torch.testing.assert_close(min_snr_weights(scheduler, timesteps, 5.0, "epsilon"), torch.clamp(snr, max=5) / snr)
    torch.testing.assert_close(
        min_snr_weights(scheduler, timesteps, 5.0, "v_prediction"), torch.clamp(snr, max=5) / (snr + 1)
    )
    assert min_snr_weights(scheduler, timesteps[-1:], 5.0, "epsilon").item() == pytest.approx(1.0)


def test_cli_train_runs_the_same_code(make_config, capsys, tiny_model_dir, shapes_dir, tmp_path):
    from ldm_tune.cli import main

    code = main(["train", "--config", str(REPO / "configs" / "tiny.yaml"),
                 f"model.pretrained_model_name_or_path={tiny_model_dir}", f"data.train_data_dir={shapes_dir / 'train'}",
                 f"data.validation_data_dir={shapes_dir / 'validation'}", "data.resolution=32",
                 "training.max_train_steps=1", "validation.validation_inference_steps=2",
                 f"output_dir={tmp_path / 'cli'}"])  # fmt: skip
    assert code == 0 and (tmp_path / "cli" / "pipeline" / "model_index.json").exists()
    assert main(["train", "--config", str(REPO / "configs" / "tiny.yaml"), "training.learning_rat=1"]) == 2
    assert "Unknown config key(s) ['training.learning_rat']" in capsys.readouterr().err


def test_accelerate_launch_end_to_end(tiny_model_dir, shapes_dir, tmp_path):
    accelerate = Path(sys.executable).parent / "accelerate"
    command = [str(accelerate), "launch", "--config_file", str(REPO / "configs" / "accelerate" / "cpu.yaml"),
               str(REPO / "train.py"), "--config", str(REPO / "configs" / "tiny.yaml"),
               f"model.pretrained_model_name_or_path={tiny_model_dir}", f"data.train_data_dir={shapes_dir / 'train'}",
               f"data.validation_data_dir={shapes_dir / 'validation'}", "data.resolution=32",
               "training.max_train_steps=3", "checkpointing.checkpointing_steps=2",
               "validation.validation_inference_steps=2", f"output_dir={tmp_path / 'launched'}"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "launched"
    assert (out / "checkpoint-2" / MARKER).exists() and (out / "checkpoint-3" / MARKER).exists()
    assert UNet2DConditionModel.from_pretrained(out / "unet") is not None
    assert json.loads((out / "summary.json").read_text())["global_step"] == 3


def test_bf16_with_gradient_checkpointing_and_validation_images(make_config):
    config = make_config("training.mixed_precision=bf16", "training.gradient_checkpointing=true",
                         "training.use_ema=true", "training.max_train_steps=1",
                         "validation.validation_prompts=[a red circle]", "validation.validation_inference_steps=2")  # fmt: skip
    trainer = Trainer(config)
    assert trainer.vae.dtype == trainer.text_encoder.dtype == torch.bfloat16
    trainer.train()
    assert trainer.accelerator.unwrap_model(trainer.unet).dtype == torch.float32  # fp32 master weights
    assert (Path(config.output_dir) / "samples" / "step-1" / "00000-00.png").exists()


def test_hf_dataset_from_disk_with_caption_lists(make_config, shapes_dir, tmp_path):
    import datasets

    records = [json.loads(line) for line in (shapes_dir / "train" / "metadata.jsonl").read_text().splitlines()]
    dataset = datasets.Dataset.from_dict(
        {"picture": [str(shapes_dir / "train" / r["file_name"]) for r in records],
         "captions": [[r["text"], f"{r['color']} {r['shape']}"] for r in records]}
    ).cast_column("picture", datasets.Image())  # fmt: skip
    datasets.DatasetDict({"train": dataset, "validation": dataset.select(range(3))}).save_to_disk(tmp_path / "hf")
    config = make_config("data.train_data_dir=null", f"data.dataset_name={tmp_path / 'hf'}", "data.image_column=picture",
                         "data.caption_column=captions", "training.max_train_steps=1",
                         "data.validation_dataset_split=validation")  # fmt: skip
    trainer = Trainer(config)
    item = trainer.train_loader.dataset[(0, 0)]
    assert (
        item["pixel_values"].shape == (3, 32, 32)
        and -1 <= item["pixel_values"].min() < item["pixel_values"].max() <= 1
    )
    captions = {trainer.tokenizer.decode(trainer.train_loader.dataset[(e, 0)]["input_ids"], skip_special_tokens=True)
                for e in range(40)}  # fmt: skip
    assert len(captions) >= 2  # one of the list is picked at random per epoch (and "" by caption dropout)
    assert trainer.train()["global_step"] == 1
    assert len(trainer.val_loader.dataset) == 3 and trainer.state.best_val_loss is not None
    with pytest.raises(ValueError, match=r"Dataset columns \['image'\] not found"):
        Trainer(make_config("data.train_data_dir=null", f"data.dataset_name={tmp_path / 'hf'}",
                            "data.caption_column=captions", output_dir=tmp_path / "other"))  # fmt: skip


@pytest.mark.parametrize("precision, clip", [("'no'", 1.0), ("'no'", 0.0), ("bf16", 1.0)])
def test_nonfinite_gradients_skip_the_update(make_config, monkeypatch, precision, clip):
    """A finite loss with an inf gradient (bf16/fp32 overflow) must not write NaN into weights, Adam or EMA."""
    config = make_config("training.max_train_steps=6", "checkpointing.checkpointing_steps=1", "training.use_ema=true",
                         f"training.mixed_precision={precision}", f"training.max_grad_norm={clip}",
                         "training.max_nonfinite_steps=3")  # fmt: skip
    original = Trainer.forward_backward

    def inf_gradient_from_step_2(self, batch):
        if self.state.global_step >= 1:  # one weight's gradient overflows during backward
            weight = self.accelerator.unwrap_model(self.model).conv_in.weight
            handle = weight.register_hook(lambda grad: grad * float("inf"))
            try:
                return original(self, batch)
            finally:
                handle.remove()
        return original(self, batch)

    monkeypatch.setattr(Trainer, "forward_backward", inf_gradient_from_step_2)
    with pytest.raises(NonFiniteLossError, match=r"3 updates in a row, the last at step 4.*checkpoint-3"):
        Trainer(config).train()
    out = Path(config.output_dir)
    for step in (1, 2, 3):
        weights = unet_weights(out / f"checkpoint-{step}" / "unet")
        assert all(torch.isfinite(v).all() for v in weights.values()), step
        assert all(torch.isfinite(v).all() for v in unet_weights(out / f"checkpoint-{step}" / "unet_ema").values())
    assert max_diff(unet_weights(out / "checkpoint-1" / "unet"), unet_weights(out / "checkpoint-3" / "unet")) == 0
    optimizer = torch.load(out / "checkpoint-3" / "optimizer.bin", weights_only=True)
    assert all(torch.isfinite(t).all() for s in optimizer["state"].values() for t in s.values() if t.dim())


def test_what_one_process_meets_alone_keeps_both_in_step(tiny_model_dir, shapes_dir, tmp_path, run_two_processes):
    """Rank 1 alone: an empty micro-batch, then an inf gradient; validation batches of 3 and 1 items. No hang, no
    desync: both ranks skip the same micro-batch and the same update and agree on one exact validation loss."""
    overrides = [f"model.pretrained_model_name_or_path={tiny_model_dir}", f"data.train_data_dir={shapes_dir / 'train'}",
                 f"data.validation_data_dir={shapes_dir / 'validation'}", "validation.validation_batch_size=3",
                 "data.resolution=32", "training.train_batch_size=3", "training.max_train_steps=4",
                 "validation.validation_steps=0", "training.learning_rate=1e-3", "training.ddp_timeout=1234",
                 f"output_dir={tmp_path / 'run'}"]  # fmt: skip
    ranks = run_two_processes("robustness_worker.py", overrides)
    assert [r["timeout"] for r in ranks] == [1234, 1234]  # the process group waits as long as configured
    states = [r["state"] for r in ranks]
    assert states[0]["epoch"] == states[1]["epoch"] and states[0]["batch_in_epoch"] == states[1]["batch_in_epoch"]
    assert states[1]["skipped_by_reason"]["injected_failure"] == 3
    assert states[0]["skipped_by_reason"]["empty_batch_on_another_process"] == 3  # its items of that micro-batch
    assert [s["nonfinite_total"] for s in states] == [1, 1]  # the inf of rank 1 skipped the update on both
    assert ranks[0]["trained_sum"] == ranks[1]["trained_sum"] and torch.isfinite(torch.tensor(ranks[0]["trained_sum"]))
    assert ranks[0]["val_items"] == 4 and ranks[0]["best_val_loss"] == ranks[1]["best_val_loss"]
    assert ranks[0]["best_val_loss"] == pytest.approx(ranks[0]["val_loss_one_process"], rel=1e-5)


@pytest.mark.parametrize("method", [[], ["training.finetune_method=lora", "training.lora_dropout=0.5"]],
                         ids=["full", "lora-with-dropout"])  # fmt: skip
def test_two_processes_train_like_one_with_accumulation(tiny_model_dir, shapes_dir, tmp_path, run_two_processes,
                                                        method):  # fmt: skip
    """Batches of 4 on 2 processes == the same batches as 2 accumulation steps on 1 process: the same keyed draws,
    dropout masks included (keyed by the micro-batch's place in the epoch's layout, not by the process)."""
    common = [f"model.pretrained_model_name_or_path={tiny_model_dir}", f"data.train_data_dir={shapes_dir / 'train'}",
              "data.resolution=32", "data.max_train_samples=8", "training.train_batch_size=4",
              "training.max_train_steps=3", "training.learning_rate=1e-3", "data.random_flip=true",
              "training.lr_scheduler=cosine", "training.lr_warmup_steps=1", *method]  # fmt: skip
    run_two_processes(
        "two_process_worker.py", [*common, f"output_dir={tmp_path / 'two' / 'run'}"], out=tmp_path / "two"
    )
    run_two_processes("two_process_worker.py", [*common, "training.gradient_accumulation_steps=2",
                                                f"output_dir={tmp_path / 'one' / 'run'}"], processes=1, out=tmp_path / "one")  # fmt: skip
    if method:
        two, one = (load_file(tmp_path / run / "run" / "pytorch_lora_weights.safetensors") for run in ("two", "one"))
        assert max(v.abs().max().item() for k, v in one.items() if "lora_B" in k) > 0  # it trained
    else:
        two, one = (unet_weights(tmp_path / run / "run" / "unet") for run in ("two", "one"))
        assert max_diff(one, unet_weights(tiny_model_dir / "unet")) > 1e-4  # it trained
    assert max_diff(two, one) <= 1e-6


def test_resume_with_another_layout_stops_and_names_both(make_config, tiny_model_dir, shapes_dir, tmp_path,
                                                         run_two_processes):  # fmt: skip
    """A checkpoint's data position and LR schedule count batches of its own layout: another process count, batch
    size or accumulation must not silently skip or repeat items."""
    common = ["training.max_train_steps=2", "checkpointing.checkpointing_steps=1", "training.train_batch_size=4"]
    Trainer(make_config(*common)).train()
    resume = ["checkpointing.resume_from_checkpoint=latest", "training.max_train_steps=4"]
    with pytest.raises(ValueError, match=r"written by a run with \{'processes': 1, 'train_batch_size': 4.*this run "
                                         r"has \{'processes': 1, 'train_batch_size': 2"):  # fmt: skip
        Trainer(make_config(*common, *resume, "training.train_batch_size=2")).train()
    overrides = [f"model.pretrained_model_name_or_path={tiny_model_dir}", f"data.train_data_dir={shapes_dir / 'train'}",
                 "data.resolution=32", *common, *resume, "training.lr_warmup_steps=0",
                 f"output_dir={tmp_path / 'run'}"]  # fmt: skip
    error = run_two_processes("two_process_worker.py", overrides, fails=True)  # 1 process -> 2 processes
    assert "{'processes': 1," in error and "this run has {'processes': 2," in error
    Trainer(make_config(*common, *resume)).train()  # the same layout resumes
