"""LoRA on the one trainer: only adapters train and are saved, resume is exact, the files load in diffusers."""

import hashlib
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from ldm_tune.tracking import read_metrics
from ldm_tune.training import NonFiniteLossError, Trainer


LORA = ["training.finetune_method=lora", "training.lora_rank=4", "training.lora_alpha=8",
        "training.learning_rate=1e-3"]  # fmt: skip


def lora_weights(folder):
    return load_file(Path(folder) / "pytorch_lora_weights.safetensors")


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def base_state(model):
    """The model's own (non-adapter) weights, under their base names."""
    state = model.state_dict()
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in state.items() if "lora_" not in k}


def folder_digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file()}  # fmt: skip


def test_lora_trains_only_adapters_and_never_writes_the_base(make_config, tiny_model_dir):
    before_files = folder_digest(tiny_model_dir)
    config = make_config(*LORA, "training.max_train_steps=2", "checkpointing.checkpointing_steps=1",
                         "training.train_text_encoder_lora=true")  # fmt: skip
    trainer = Trainer(config)
    unet, text = trainer.accelerator.unwrap_model(trainer.unet), trainer.text_encoder
    unet_base, text_base, vae = base_state(unet), base_state(text), base_state(trainer.vae)
    trainable = {id(p) for p in [*unet.parameters(), *text.parameters()] if p.requires_grad}
    names = [n for n, p in [*unet.named_parameters(), *text.named_parameters()] if p.requires_grad]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == trainable  # only adapter parameters go to the optimizer
    summary = trainer.train()

    assert max_diff(unet_base, base_state(unet)) == 0 and max_diff(text_base, base_state(text)) == 0
    assert max_diff(vae, base_state(trainer.vae)) == 0
    assert folder_digest(tiny_model_dir) == before_files  # the base model's files are untouched
    out = Path(config.output_dir)
    exported = lora_weights(out)
    assert any(k.startswith("text_encoder.") for k in exported) and any(k.startswith("unet.") for k in exported)
    assert any(v.abs().max() > 0 for k, v in exported.items() if "lora_B" in k or ".up." in k)  # B moved off zero
    assert (out / "lora_kohya.safetensors").exists()
    assert not (out / "unet").exists() and not (out / "pipeline").exists()
    assert summary["finetune_method"] == "lora" and summary["trainable_parameters"] == sum(
        p.numel() for group in trainer.optimizer.param_groups for p in group["params"]
    )
    for step in (1, 2):  # checkpoints hold the adapters and the training state, never the base weights
        files = {p.name for p in (out / f"checkpoint-{step}").iterdir()}
        assert "pytorch_lora_weights.safetensors" in files and "optimizer.bin" in files
        assert not any(name.startswith(("model", "unet")) for name in files), files
    # The exported file is the trained adapters: diffusers loads it onto the base model and the images change.
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"prompt": "a red circle", "num_inference_steps": 2, "output_type": "np"}
    base = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(out)
    tuned = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    assert abs(base - tuned).max() > 0


def test_lora_target_modules_must_match(make_config):
    with pytest.raises(ValueError, match=r"`training.lora_target_modules` \['no_such_proj'\] matches no module"):
        Trainer(make_config(*LORA, "training.lora_target_modules=[no_such_proj]"))


RESUME = [*LORA, "data.max_train_samples=8", "training.train_batch_size=3", "training.gradient_accumulation_steps=2",
          "training.max_train_steps=6", "training.lr_scheduler=cosine", "training.lr_warmup_steps=2",
          "training.use_ema=true", "training.ema_decay=0.9", "data.caption_dropout=0.3", "data.random_flip=true",
          "training.train_text_encoder_lora=true", "training.text_encoder_lr=5e-4", "training.lora_dropout=0.1",
          "checkpointing.checkpointing_steps=3", "logging.logging_steps=1"]  # fmt: skip


def test_lora_resume_continues_exactly(straight_and_resumed):
    full, split = straight_and_resumed(RESUME, kill_after=3)  # mid-epoch: 8 items in batches of 3, 2 per update
    # exported (EMA) adapters, raw adapters of the last checkpoint, and its EMA state
    assert max_diff(lora_weights(full), lora_weights(split)) <= 1e-6
    assert max_diff(lora_weights(full / "checkpoint-6"), lora_weights(split / "checkpoint-6")) <= 1e-6
    assert max_diff(load_file(full / "checkpoint-6" / "ema" / "ema.safetensors"),
                    load_file(split / "checkpoint-6" / "ema" / "ema.safetensors")) <= 1e-6  # fmt: skip
    assert max_diff(lora_weights(full), lora_weights(full / "checkpoint-6")) > 0  # EMA is not the raw weights
    full_log = [r for r in read_metrics(full / "metrics.jsonl") if "loss" in r]
    split_log = [r for r in read_metrics(split / "metrics.jsonl") if "loss" in r]
    assert [r["lr"] for r in full_log] == [r["lr"] for r in split_log]
    assert [round(r["loss"], 6) for r in full_log] == [round(r["loss"], 6) for r in split_log]


def test_lora_under_bf16_keeps_fp32_adapters_and_makes_validation_outputs(make_config, shapes_dir):
    config = make_config(*LORA, "training.mixed_precision=bf16", "training.gradient_checkpointing=true",
                         "training.max_train_steps=2", "validation.validation_steps=1",
                         f"data.validation_data_dir={shapes_dir / 'validation'}", "training.snr_gamma=5",
                         "validation.validation_prompts=[a red circle]", "validation.validation_inference_steps=2")  # fmt: skip
    trainer = Trainer(config)
    trainer.train()
    unet = trainer.accelerator.unwrap_model(trainer.unet)
    dtypes = {n: p.dtype for n, p in unet.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if "lora_" in n)
    assert all(d == torch.bfloat16 for n, d in dtypes.items() if "lora_" not in n)  # the frozen base, half size
    out = Path(config.output_dir)
    assert (out / "samples" / "step-2" / "00000-00.png").exists()
    assert (out / "best" / "pytorch_lora_weights.safetensors").exists() and trainer.state.best_val_loss is not None
    assert torch.isfinite(torch.tensor(trainer.state.best_val_loss))


def test_text_encoder_lora_has_its_own_learning_rate(make_config):
    config = make_config(*LORA, "training.train_text_encoder_lora=true", "training.text_encoder_lr=0",
                         "training.adam_weight_decay=0", "training.max_train_steps=2")  # fmt: skip
    trainer = Trainer(config)
    text = trainer.text_encoder
    before = {n: p.detach().clone() for n, p in text.named_parameters() if p.requires_grad}
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [1e-3, 0.0]
    trainer.train()
    after = {n: p for n, p in trainer.accelerator.unwrap_model(trainer.text_encoder).named_parameters() if n in before}
    assert all(torch.equal(before[n], after[n]) for n in before)  # lr 0: untouched, though it received gradients


def test_nonfinite_loss_leaves_the_adapters_alone(make_config, monkeypatch):
    config = make_config(*LORA, "training.max_train_steps=10", "checkpointing.checkpointing_steps=1",
                         "training.max_nonfinite_steps=2", "training.use_ema=true")  # fmt: skip
    original = Trainer.compute_losses

    def nan_after_step_1(self, batch, seed):
        losses = original(self, batch, seed)
        return losses * float("nan") if self.state.global_step >= 1 else losses

    monkeypatch.setattr(Trainer, "compute_losses", nan_after_step_1)
    with pytest.raises(NonFiniteLossError, match=r"2 updates in a row.*checkpoint-2"):
        Trainer(config).train()
    out = Path(config.output_dir)
    assert max_diff(lora_weights(out / "checkpoint-1"), lora_weights(out / "checkpoint-2")) == 0  # step 2 skipped
    ema = [load_file(out / f"checkpoint-{s}" / "ema" / "ema.safetensors") for s in (1, 2)]
    assert max_diff(*ema) == 0 and all(torch.isfinite(v).all() for v in ema[1].values())


def test_two_processes_train_one_lora(tiny_model_dir, shapes_dir, tmp_path, run_two_processes):
    # 12 items in batches of 5 over 2 processes: batches of 5, 5 and 2 split into 3+2: uneven per process.
    overrides = [f"model.pretrained_model_name_or_path={tiny_model_dir}", f"data.train_data_dir={shapes_dir / 'train'}",
                 f"data.validation_data_dir={shapes_dir / 'validation'}", "data.resolution=32", *LORA,
                 "training.train_text_encoder_lora=true", "training.use_ema=true", "training.train_batch_size=5",
                 "training.max_train_steps=3", "validation.validation_steps=2", "checkpointing.checkpointing_steps=2",
                 f"output_dir={tmp_path / 'run'}"]  # fmt: skip
    ranks = run_two_processes("two_process_worker.py", overrides)
    assert all(r["processes"] == 2 and r["steps"] == 3 for r in ranks)
    assert ranks[0]["trained_sum"] == ranks[1]["trained_sum"]  # one model: gradients were averaged every step
    assert ranks[0]["best_val_loss"] == ranks[1]["best_val_loss"]
    out = tmp_path / "run"
    assert (out / "checkpoint-2" / "pytorch_lora_weights.safetensors").exists()
    assert (out / "pytorch_lora_weights.safetensors").exists() and not (out / "unet").exists()
