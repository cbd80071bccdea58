"""Run by test_training.py under torchrun with 2 CPU processes: what one process meets alone must not desync them.

Rank 1 alone gets an empty first micro-batch (all its items "failed to load") and an inf gradient in update 2;
validation batches are uneven across ranks. Each rank writes what it ended with.
"""

import json
import sys
from pathlib import Path

import torch

from ldm_tune.config import load_config
from ldm_tune.data.dataset import VALIDATION_EPOCH, collate
from ldm_tune.training import Trainer


def main() -> None:
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    trainer = Trainer(load_config(None, overrides))
    rank = trainer.accelerator.process_index
    group = torch.distributed.distributed_c10d._get_default_group()
    timeout = group._get_backend(torch.device("cpu")).options._timeout.total_seconds()  # before train() ends it
    run_step, forward_backward, calls = trainer.run_step, trainer.forward_backward, [0]

    def empty_first_batch_on_rank_1(batch):
        calls[0] += 1
        if rank == 1 and calls[0] == 1:
            batch = {"keys": batch["keys"][:0], "skipped": ["injected_failure"] * len(batch["keys"]),
                     "loss_weights": batch["loss_weights"][:0]}  # fmt: skip
        return run_step(batch)

    def inf_gradient_in_update_2_on_rank_1(batch):
        if rank == 1 and trainer.state.global_step == 1:
            weight = trainer.accelerator.unwrap_model(trainer.model).conv_in.weight
            handle = weight.register_hook(lambda grad: grad * float("inf"))
            try:
                return forward_backward(batch)
            finally:
                handle.remove()
        return forward_backward(batch)

    trainer.run_step, trainer.forward_backward = empty_first_batch_on_rank_1, inf_gradient_in_update_2_on_rank_1
    summary = trainer.train()
    # The validation loss of one process over every validation item, for comparison with the reduced one.
    dataset = trainer.val_loader.dataset
    batch = collate([dataset[(VALIDATION_EPOCH, i)] for i in range(len(dataset))])
    with torch.no_grad():
        losses = trainer.compute_losses(batch, seed=trainer.config.validation.validation_seed, distributed=False)
    trained = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    result = {"state": trainer.state.state_dict(), "best_val_loss": summary["best_val_loss"],
              "val_loss_one_process": losses.mean().item(), "val_items": len(dataset),
              "trained_sum": sum(p.detach().double().sum().item() for p in trained), "timeout": timeout}  # fmt: skip
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
