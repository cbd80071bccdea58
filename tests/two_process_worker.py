"""Run by test_data.py under torchrun with 2 CPU processes: records which items each rank sees, then trains."""

import json
import os
import sys
from pathlib import Path

from ldm_tune.config import load_config
from ldm_tune.training import Trainer


def main() -> None:
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    if os.environ.get("LDM_TUNE_TEST_NO_DISK_ON_RANK1") and os.environ.get("RANK") == "1":
        import ldm_tune.data.loaders as loaders  # this rank alone would find no room for a cache

        loaders.free_bytes = lambda root: 0
    trainer = Trainer(load_config(None, overrides))
    rank = trainer.accelerator.process_index
    seen = {}
    for epoch in (0, 1):
        trainer.sampler.start_epoch(epoch)
        seen[epoch] = [int(i) for batch in trainer.train_loader for i in batch["keys"][:, 1]]
    trainer.sampler.start_epoch(0)
    summary = trainer.train()
    trained = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    result = {"seen": seen, "items": trainer.train_items, "processes": trainer.accelerator.num_processes,
              "steps": summary["global_step"], "best_val_loss": summary["best_val_loss"],
              "trained_sum": sum(p.detach().double().sum().item() for p in trained),
              "caches": [trainer.config.data.cache_latents, trainer.config.data.cache_text_embeddings]}  # fmt: skip
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
