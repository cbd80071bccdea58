"""Fine-tuning the UNet of a Stable-Diffusion-format model under Accelerate.

The VAE and text encoder are frozen and cast to the mixed-precision dtype; the UNet keeps fp32 master weights
under Accelerate's autocast. The loop is split like guided-diffusion's TrainLoop:
`run_loop -> run_step -> forward_backward`, with `evaluate`, `save` and `finish` beside them.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import logging
import math
import os
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, set_seed
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from ldm_tune.checkpointing import CheckpointManager, TrainState, check_layout, write_model_card
from ldm_tune.components import freeze, load_components, save_model_folder
from ldm_tune.config import TrainConfig, save_config, to_dict
from ldm_tune.data.dataset import STREAM_MODEL, item_seed
from ldm_tune.data.loaders import build_loaders
from ldm_tune.data.streaming import MainProcessStream
from ldm_tune.finetune import LORA_WEIGHT_NAME, make_method
from ldm_tune.guards import NonFiniteLossError, UpdateGuardMixin
from ldm_tune.host_memory import keep_freed_memory
from ldm_tune.io_utils import save_atomically
from ldm_tune.losses import denoising_loss, draw
from ldm_tune.pixel_space import make_space
from ldm_tune.sharding import check_sharded_training, gathered_copy, is_sharded
from ldm_tune.tracking import MetricsLogger, make_accelerator_trackers
from ldm_tune.validation import ValidationMixin


logger = logging.getLogger(__name__)


class Trainer(ValidationMixin, UpdateGuardMixin):
    """Builds everything from a `TrainConfig`; `train()` runs to `max_train_steps` and exports the model.

    This trainer fine-tunes the UNet; `ldm_tune.vae_training.VAETrainer` reuses the loop for the VAE.
    """

    model_cls, model_folder = UNet2DConditionModel, "unet"

    @property
    def unet(self):
        return self.model

    def saved_module(self, model):
        """The diffusers model inside a prepared (DDP-wrapped) one: what checkpoints and exports save.

        Under FSDP, inside `gathered()`: the gathered whole copy (see ldm_tune.sharding)."""
        return self._gathered if self._gathered is not None else self.accelerator.unwrap_model(model)

    @contextlib.contextmanager
    def gathered(self, everywhere: bool = False):
        """Every process enters: under FSDP the trained model's full weights are gathered (a collective) so that
        `saved_module` gives a whole model on the main process (on every one with `everywhere`); else a no-op."""
        if not is_sharded(self.accelerator):
            yield
            return
        self._gathered = gathered_copy(self.accelerator, self.model, self.model_cls, everywhere)
        try:
            yield
        finally:
            self._gathered = None

    def __init__(self, config: TrainConfig):
        self.config = config
        t = config.training
        if t.keep_freed_memory:  # before anything large is allocated
            keep_freed_memory()
        self.output_dir = Path(config.output_dir)
        log_with = make_accelerator_trackers(config.logging.report_to)
        # Accelerate only sets up CPU multi-process training (gloo) when told it runs on the CPU; a plain
        # `torchrun --nproc_per_node N train.py` on a machine without GPUs would otherwise run N separate trainings.
        cpu_processes = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.accelerator = Accelerator(
            cpu=cpu_processes,
            gradient_accumulation_steps=t.gradient_accumulation_steps,
            mixed_precision=t.mixed_precision,
            log_with=log_with,
            # Downloads, the scan and cache filling run before step 1 behind barriers: the default process-group
            # timeout (10 min for NCCL) ends a large run before it starts.
            kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=t.ddp_timeout))],
            project_config=ProjectConfiguration(
                project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")
            ),
        )
        self._gathered = None
        check_sharded_training(self.accelerator, config)
        self.checkpoints = CheckpointManager(
            self.accelerator, self.output_dir, config.checkpointing.checkpoints_total_limit
        )
        self.resume_path = self._check_output_dir()
        set_seed(config.seed)
        if t.allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
        self.state = TrainState()
        self._load_models()
        self._build_data()
        self._build_optimization()
        self.metrics = MetricsLogger(self.output_dir / "metrics.jsonl", self.accelerator)

    # ----------------------------------------------------------------------------------------------- set-up
    def _check_output_dir(self) -> Path | None:
        """Never overwrite an earlier run: an output folder holding one must be resumed (or another chosen)."""
        resume = self.checkpoints.resolve(self.config.checkpointing.resume_from_checkpoint)
        if self.config.checkpointing.resume_from_checkpoint is None:
            existing = [p.name for p in (self.output_dir.glob("checkpoint-*") if self.output_dir.is_dir() else [])]
            exported = (self.model_folder, "pipeline", LORA_WEIGHT_NAME)
            existing += [name for name in exported if (self.output_dir / name).exists()]
            if existing:
                raise ValueError(
                    f"`output_dir` {str(self.output_dir)!r} already holds a run ({sorted(existing)[:3]}); set "
                    "`checkpointing.resume_from_checkpoint=latest` to continue it, or choose a new `output_dir`."
                )
        elif resume is None:
            logger.warning("No complete checkpoint in %s: starting a new run.", self.output_dir)
        return resume

    def _load_models(self) -> None:
        m, t = self.config.model, self.config.training
        # Under DeepSpeed ZeRO-3, zero.Init would partition every model built here, and the frozen VAE and text
        # encoder run outside DeepSpeed's engine: load outside it, as diffusers' train_text_to_image.py does (the
        # trained UNet is partitioned when prepared).
        plugin = self.accelerator.state.deepspeed_plugin
        with plugin.zero3_init_context_manager(enable=False) if plugin is not None else contextlib.nullcontext():
            components = load_components(m.pretrained_model_name_or_path, revision=m.revision, variant=m.variant)
        self.tokenizer = components.tokenizer
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(t.mixed_precision, torch.float32)
        if self.config.dreambooth.with_prior_preservation:  # from the base model, before anything trains
            from ldm_tune.dreambooth import ensure_class_images

            ensure_class_images(self.config, self.accelerator, components, self.weight_dtype)
        # Frozen parts: no gradients, eval mode, half precision when mixed precision is on (they only run forward).
        freeze(components.vae, components.text_encoder)
        self.vae = components.vae.to(self.accelerator.device, dtype=self.weight_dtype)
        self.text_encoder = components.text_encoder.to(self.accelerator.device, dtype=self.weight_dtype)
        self.model = components.unet
        # What the UNet diffuses: VAE latents, or the pixels themselves (`model.space`, see ldm_tune.pixel_space).
        self.space = make_space(m.space, self.vae, self.model, self.weight_dtype)
        # What trains (the UNet's weights, or LoRA adapters) is decided by the method, see ldm_tune.finetune.
        self.method = make_method(self)
        self.trained_models = self.method.setup()
        if t.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        # The training noise schedule is the model's own, with the chosen parameterisation.
        self.prediction_type = m.prediction_type or components.scheduler_config.get("prediction_type", "epsilon")
        self.scheduler_config = {**components.scheduler_config, "prediction_type": self.prediction_type}
        self.noise_scheduler = DDPMScheduler.from_config(self.scheduler_config)
        self.ema = self.method.make_ema() if t.use_ema else None
        if self.ema is not None:
            self.ema.to(self.accelerator.device)

    def _build_data(self) -> None:
        d = self.config.data
        loaders = build_loaders(self.config, self.accelerator, self.tokenizer, self.vae, self.text_encoder,
                                self.weight_dtype)  # fmt: skip
        self.loaders, self.sampler = loaders, loaders.sampler
        self.train_loader, self.val_loader = loaders.train, loaders.validation
        streamed = d.train_shards is not None or d.streaming
        self.train_items = "streamed" if streamed else len(loaders.data.train.items)
        # With a cache the encoder is not needed during training: free its memory (validation images reload the
        # text encoder from disk; the VAE decoder stays for them).
        if d.cache_latents:
            self.vae.encoder = self.vae.quant_conv = None
        if d.cache_text_embeddings:
            self.text_encoder = None

    def _build_optimization(self) -> None:
        t, acc = self.config.training, self.accelerator
        scale = t.train_batch_size * t.gradient_accumulation_steps * acc.num_processes if t.scale_lr else 1
        kwargs = {"betas": (t.adam_beta1, t.adam_beta2), "weight_decay": t.adam_weight_decay, "eps": t.adam_epsilon}
        # Fused AdamW (one kernel over all parameters) on CUDA and CPU: on CPU the foreach path loops per tensor and
        # costs ~3.5x the fused step (8.9 vs 2.5 ms for the demo UNet); the foreach path elsewhere (e.g. MPS).
        kwargs["fused" if acc.device.type in ("cuda", "cpu") else "foreach"] = True
        optimizer = torch.optim.AdamW(self.method.param_groups(scale), **kwargs)
        self.streaming = isinstance(self.train_loader, MainProcessStream)
        if self.streaming:  # the stream shards its batches itself (see ldm_tune.data.streaming)
            *models, self.optimizer = acc.prepare(*self.trained_models, optimizer)
        else:
            *models, self.optimizer, self.train_loader = acc.prepare(
                *self.trained_models, optimizer, self.train_loader
            )
        # The denoiser first, then the text encoder when it trains (its prepared, DDP-wrapped form computes the loss).
        self.trained_models, self.model = models, models[0]
        if len(models) > 1:
            self.text_encoder = models[1]
        if self.val_loader is not None:
            self.val_loader = acc.prepare(self.val_loader)
        if not self.streaming:
            self.updates_per_epoch = math.ceil(len(self.train_loader) / t.gradient_accumulation_steps)
        self.max_train_steps = t.max_train_steps or t.num_train_epochs * self.updates_per_epoch
        # A prepared scheduler steps once per process per update (diffusers PR #8312), so scale its lengths.
        lr_scheduler = get_scheduler(t.lr_scheduler, optimizer=self.optimizer,
                                     num_warmup_steps=t.lr_warmup_steps * acc.num_processes,
                                     num_training_steps=self.max_train_steps * acc.num_processes)  # fmt: skip
        self.lr_scheduler = acc.prepare(lr_scheduler)
        acc.register_for_checkpointing(self.state)
        # Checkpoints hold what the method trains (whole diffusers models, or the adapters alone).
        acc.register_save_state_pre_hook(self.method.save_checkpoint)
        acc.register_load_state_pre_hook(self.method.load_checkpoint)

    # ------------------------------------------------------------------------------------------------- loop
    def train(self) -> dict:
        """Resume if asked, run to `max_train_steps`, export; returns a summary dict."""
        acc = self.accelerator
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.config, self._config_path())
        self.checkpoints.remove_partial()
        self.state.layout = self._layout()
        if self.resume_path is not None:
            acc.load_state(str(self.resume_path))
            check_layout(self.state.layout, self._layout(), self.resume_path)
            logger.info("Resumed from %s at step %d", self.resume_path, self.state.global_step)
        acc.init_trackers(self.config.logging.tracker_project_name, config=_flat_scalars(to_dict(self.config)))
        try:
            self.run_loop()
            return self.finish()
        finally:
            acc.end_training()  # also ends the process group: nothing collective may follow

    def _layout(self) -> dict:
        t = self.config.training
        return {"processes": self.accelerator.num_processes, "train_batch_size": t.train_batch_size,
                "gradient_accumulation_steps": t.gradient_accumulation_steps, "train_items": self.train_items}  # fmt: skip

    def _config_path(self) -> Path:
        # Keep the config of every (re)start: a resumed run with changed settings does not hide the original.
        path = self.output_dir / "config.yaml"
        return path if not path.exists() else self.output_dir / f"config-resume-step-{self.state.global_step}.yaml"

    def run_loop(self) -> None:
        """Iterate epochs and batches until `max_train_steps` updates; resumes mid-epoch at the saved position."""
        if not self.streaming and self.state.batch_in_epoch >= len(self.train_loader):
            self.state.epoch, self.state.batch_in_epoch = self.state.epoch + 1, 0
        self.progress = tqdm(total=self.max_train_steps, initial=self.state.global_step, desc="training",
                             disable=not self.accelerator.is_local_main_process)  # fmt: skip
        # loss sum, micro-batch count, non-finite losses, non-finite gradient norms
        self.window = torch.zeros(4, device=self.accelerator.device)
        self.step_started = time.perf_counter()
        self.state.stream_position = self.train_loader.state_dict if self.streaming else None
        while self.state.global_step < self.max_train_steps:
            self.sampler.start_epoch(self.state.epoch)
            loader, state = self.train_loader, self.state
            # A stream resumes at the position its checkpoint recorded; without one (a Hugging Face stream, an older
            # checkpoint) it can only be read past, in order.
            if state.batch_in_epoch and self.streaming:
                if not loader.load_state_dict(state.stream, state.epoch, state.batch_in_epoch):
                    loader = itertools.islice(iter(self.train_loader), state.batch_in_epoch, None)
            elif self.state.batch_in_epoch:
                loader = self.accelerator.skip_first_batches(self.train_loader, self.state.batch_in_epoch)
            for batch in loader:
                self.state.batch_in_epoch += 1
                if self.run_step(batch) and self.state.global_step >= self.max_train_steps:
                    break
            else:
                self.state.epoch, self.state.batch_in_epoch = self.state.epoch + 1, 0
        self.progress.close()

    def run_step(self, batch: dict) -> bool:
        """One micro-batch; at the end of an accumulation window, update, then log/evaluate/save. True if updated."""
        acc = self.accelerator
        for reason in batch["skipped"]:
            self._count_skipped(reason)
        if self._empty_anywhere(batch):
            return False
        with acc.accumulate(*self.trained_models):
            loss = self.forward_backward(batch)
            finite = torch.isfinite(loss)
            self.window[:3] += torch.stack([torch.where(finite, loss, 0.0), torch.ones_like(loss), (~finite).float()])
            if not acc.sync_gradients:
                return False
            grad_norm = self._clip_gradients()
            if grad_norm is not None:  # kept on the device: the reduce below is the one host sync of the update
                self.window[3] = (~torch.isfinite(grad_norm)).float()
            # One reduce for the loss sums and both non-finite counts: every process takes the same decision.
            loss_sum, count, nonfinite, bad_gradients = acc.reduce(self.window, reduction="sum").tolist()
            self.window.zero_()
            updated = self._step(skip=nonfinite > 0 or bad_gradients > 0)
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)  # the gradients of a skipped update are discarded here
        if updated and self.ema is not None:
            self.ema.step(self.method.ema_parameters())
        self.state.global_step += 1
        self._after_update(loss_sum / max(count - nonfinite, 1), not updated, grad_norm)
        return True

    def forward_backward(self, batch: dict) -> torch.Tensor:
        """Loss of one micro-batch, back-propagated (Accelerate scales it for accumulation and mixed precision)."""
        # Randomness inside the model (dropout, e.g. `lora_dropout`) is keyed by the micro-batch's position like
        # every other draw: a resumed run draws the masks the uninterrupted run drew, whatever consumed the global
        # generator in between (a new DataLoader iterator takes a seed from it).
        acc, state = self.accelerator, self.state
        # The micro-batch's index in the epoch's layout of batches for all processes (process r takes batches r,
        # r + n, ...): the same whether its batches run on n processes or as n accumulation steps on one.
        position = (state.batch_in_epoch - 1) * acc.num_processes + acc.process_index
        torch.manual_seed(item_seed(self.config.seed, STREAM_MODEL, state.epoch, position))
        losses = self.compute_losses(batch, seed=self.config.seed)
        # Per-item loss weights: 1, or `prior_loss_weight` for DreamBooth class items (see ldm_tune.dreambooth).
        loss = (losses * batch["loss_weights"].to(losses.device)).mean()
        acc.backward(loss)
        return loss.detach()

    def compute_losses(self, batch: dict, seed: int, distributed: bool = True) -> torch.Tensor:
        """Per-item denoising losses of a batch: encode with the frozen parts (or read the caches), noise, predict.

        `distributed=False` runs the unwrapped models: for evaluation, where processes may run different numbers of
        batches and DDP's forward must not take part in any collective.
        """
        t = self.config.training
        unet, text_encoder = self.model, self.text_encoder
        if not distributed:
            unwrap = self.accelerator.unwrap_model
            unet, text_encoder = self.saved_module(unet), None if text_encoder is None else unwrap(text_encoder)
        with torch.no_grad():
            mean, std = self.space.moments(batch)  # the posterior of x0: VAE latents, or the pixels (std 0)
            steps = self.noise_scheduler.config.num_train_timesteps
            draws = draw(batch["keys"].cpu(), tuple(mean.shape[1:]), steps, seed, t.noise_offset, t.input_perturbation)
            eps = draws.posterior_eps.to(mean.device, mean.dtype)
            latents = self.space.to_x0(mean + std * eps).float()
        if "encoder_hidden_states" in batch:
            encoder_hidden_states = batch["encoder_hidden_states"].to(self.weight_dtype)
        else:  # outside no_grad: a text encoder with LoRA adapters trains (a frozen one records no graph)
            encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
        return denoising_loss(unet, self.noise_scheduler, latents, encoder_hidden_states, draws,
                              self.prediction_type, t.snr_gamma, t.input_perturbation)  # fmt: skip

    def _after_update(self, loss: float, skipped: bool, grad_norm) -> None:
        state, cfg = self.state, self.config
        now = time.perf_counter()
        t = cfg.training
        samples = t.train_batch_size * t.gradient_accumulation_steps * self.accelerator.num_processes
        samples_per_s = samples / max(now - self.step_started, 1e-9)
        self.step_started = now
        self._count_nonfinite(skipped)
        lr = self.lr_scheduler.get_last_lr()[0]
        self.progress.update(1)
        self.progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{samples_per_s:.1f}")
        if state.global_step % cfg.logging.logging_steps == 0 or state.global_step == self.max_train_steps:
            record = {"step": state.global_step, "epoch": state.epoch, "loss": None if skipped else loss, "lr": lr,
                      "samples_per_s": samples_per_s, "nonfinite_total": state.nonfinite_total,
                      "items_skipped": state.items_skipped, "skipped_by_reason": dict(state.skipped_by_reason)}  # fmt: skip
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            self.metrics.log(record)
        self.last_train_loss = None if skipped else loss
        v = cfg.validation
        last = state.global_step == self.max_train_steps
        if last or (v.validation_steps and state.global_step % v.validation_steps == 0):
            self.validate()
        if last or state.global_step % cfg.checkpointing.checkpointing_steps == 0:
            self.save()
        self.step_started = time.perf_counter()  # validation and saving are not training time

    # ------------------------------------------------------------------------------------------ save, finish
    @contextlib.contextmanager
    def _eval_mode(self):
        """Evaluation mode (no dropout) for every trained model, then back to training mode."""
        for model in self.trained_models:
            model.eval()
        try:
            yield
        finally:
            for model in self.trained_models:
                model.train()

    @contextlib.contextmanager
    def _ema_weights(self):
        """Evaluate and export with the EMA weights when EMA is on, then restore the training weights."""
        if self.ema is None:
            yield
            return
        params = self.method.ema_parameters()
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)

    def _save_model(self, folder: Path, info: dict) -> None:
        with self._ema_weights(), self.gathered():
            if self.accelerator.is_main_process:

                def write(tmp: Path) -> None:
                    self.method.save_weights(tmp)
                    (tmp / "info.json").write_text(json.dumps(info, indent=2))

                save_atomically(write, folder)
        self.accelerator.wait_for_everyone()

    def save(self) -> Path:
        """Checkpoint the full training state (see `CheckpointManager.save`)."""
        info = {"epoch": self.state.epoch, "batch_in_epoch": self.state.batch_in_epoch}
        path = self.checkpoints.save(self.state.global_step, info)
        self.metrics.log({"step": self.state.global_step, "checkpoint": path.name})
        return path

    def finish(self) -> dict:
        """Export the trained model (EMA weights when on), `pipeline/` and the model card."""
        acc, state = self.accelerator, self.state
        summary = {"stage": self.config.stage, "global_step": state.global_step, "train_items": self.train_items,
                   "final_train_loss": getattr(self, "last_train_loss", None), "best_val_loss": state.best_val_loss,
                   "best_val_step": state.best_val_step, "nonfinite_total": state.nonfinite_total,
                   "prediction_type": self.prediction_type, "num_processes": acc.num_processes,
                   "finetune_method": self.config.training.finetune_method}  # fmt: skip
        with self._ema_weights(), self.gathered():
            if acc.is_main_process:
                summary.update(self.method.export())
        if acc.is_main_process:
            write_model_card(self.output_dir / "README.md", to_dict(self.config), summary)
            (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        acc.wait_for_everyone()
        return summary

    def export(self, unet) -> dict:
        """Write `unet/` and a full SD folder `pipeline/` with it; returns facts for the summary."""
        save_atomically(lambda tmp: unet.save_pretrained(tmp, safe_serialization=True), self.output_dir / "unet")
        m = self.config.model
        base = load_components(m.pretrained_model_name_or_path, revision=m.revision, variant=m.variant, unet=unet)
        base.scheduler_config = self.scheduler_config  # the trained prediction type travels with the model
        save_model_folder(base, self.output_dir / "pipeline", replace=True)
        return {}


def _flat_scalars(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat_scalars(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            flat[prefix + key] = "none" if value is None else value
    return flat


def make_trainer(config: TrainConfig) -> Trainer:
    """The trainer of the config's `stage`: the UNet (default) or the VAE."""
    if config.stage == "vae":
        from ldm_tune.vae_training import VAETrainer

        return VAETrainer(config)
    return Trainer(config)


def train(config: TrainConfig) -> dict:
    """Train with `config` and return a summary (steps, losses)."""
    return make_trainer(config).train()


__all__ = ["NonFiniteLossError", "Trainer", "make_trainer", "train"]
