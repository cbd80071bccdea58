"""Guards of the update step: what one process meets alone, and non-finite losses or gradients.

A mixin of `Trainer` (it uses the trainer's accelerator, optimizer, state and checkpoints). Every decision here is
taken from values all processes share (a reduce, or gradients after DDP's all-reduce), so that all processes skip
or step together and their collectives keep pairing up.
"""

from __future__ import annotations

import logging
import math

import torch
from torch.distributed.tensor import DTensor


logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Raised after `max_nonfinite_steps` updates in a row skipped for a non-finite loss or gradient."""


class UpdateGuardMixin:
    def _count_skipped(self, reason: str, count: int = 1) -> None:
        self.state.items_skipped += count
        self.state.skipped_by_reason[reason] = self.state.skipped_by_reason.get(reason, 0) + count

    def _empty_anywhere(self, batch: dict) -> bool:
        """True when this micro-batch is empty here or on another process (all its items failed to load: files
        changed since the scan). Every process then skips it together, so the gradient all-reduce and the loss
        reduce keep pairing the same steps on every process; the items of the others are counted as skipped."""
        acc, size = self.accelerator, len(batch["keys"])
        empty = size == 0
        # A stream hands every process rows of the same batch (see MainProcessStream): empty on one is empty on all,
        # so only the batch sampler's per-process batches need the (per micro-batch) flag reduce.
        if acc.num_processes > 1 and not self.streaming:
            empty = acc.reduce(torch.tensor([float(empty)], device=acc.device), reduction="sum").item() > 0
            if empty and size:
                self._count_skipped("empty_batch_on_another_process", size)
        self._count_empty(empty)
        return empty

    def _count_empty(self, empty: bool) -> None:
        """Stop a run whose data yields nothing usable (every streamed sample bad, every file gone) instead of
        looping forever; all processes count the same micro-batches, so all stop together."""
        state, limit = self.state, self.config.data.max_empty_batches
        state.empty_in_row = state.empty_in_row + 1 if empty else 0
        if state.empty_in_row >= limit:
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(state.skipped_by_reason.items(), key=lambda kv: -kv[1]))
            raise ValueError(
                f"{state.empty_in_row} micro-batches in a row held no usable item (`data.max_empty_batches` {limit}); "
                f"stopping at step {state.global_step}. Items skipped so far by reason: {reasons or 'none'}."
            )

    def _clip_gradients(self) -> torch.Tensor | None:
        """Clip to `max_grad_norm` (when > 0); returns the gradients' norm (None under DeepSpeed, which checks them).

        The norm is computed even with clipping off: in bf16 or fp32 a finite loss can still give inf or NaN
        gradients, which would write NaN into the weights, the optimizer state and the EMA.
        """
        t = self.config.training
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        norm = self.accelerator.clip_grad_norm_(params, t.max_grad_norm if t.max_grad_norm > 0 else math.inf)
        # Under FSDP2 the gradients are DTensors and so is their norm: every process takes the whole value.
        return norm.full_tensor() if isinstance(norm, DTensor) else norm

    def _step(self, skip: bool) -> bool:
        """Step the optimizer unless `skip`; True when the weights were updated (the fp16 GradScaler may skip too)."""
        scaler = self.accelerator.scaler
        if skip:
            if scaler is not None:  # its unscale_ ran in clipping: close the step, lowering the scale on overflow
                scaler.update()
            return False
        self.optimizer.step()
        return not self.accelerator.optimizer_step_was_skipped

    def _count_nonfinite(self, skipped: bool) -> None:
        state = self.state
        if not skipped:
            state.nonfinite_in_row = 0
            return
        state.nonfinite_in_row += 1
        state.nonfinite_total += 1
        logger.warning(
            "Non-finite loss or gradients at step %d: update skipped (%d in a row).",
            state.global_step,
            state.nonfinite_in_row,
        )
        if state.nonfinite_in_row >= self.config.training.max_nonfinite_steps:
            last = self.checkpoints.latest()
            raise NonFiniteLossError(
                f"The loss or the gradients were not finite for {state.nonfinite_in_row} updates in a row, the last "
                f"at step {state.global_step}; stopping. Last good checkpoint: {str(last) if last else 'none'}. "
                "Try a lower `training.learning_rate`, bf16 instead of fp16, or `training.max_grad_norm`."
            )
