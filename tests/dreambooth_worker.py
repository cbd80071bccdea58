"""Run by test_dreambooth.py under torchrun with 2 CPU processes: generates class images, records the items and
loss weights each rank sees, trains, and fingerprints the trained UNet."""

import hashlib
import json
import sys
from pathlib import Path

import ldm_tune.dreambooth
from ldm_tune.config import load_config
from ldm_tune.training import Trainer


def main() -> None:
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    generated = []
    original = ldm_tune.dreambooth.ensure_class_images

    def recording(*args, **kwargs):  # the trainer imports the function when it calls it: this wrapper is used
        generated.append(original(*args, **kwargs))
        return generated[-1]

    ldm_tune.dreambooth.ensure_class_images = recording
    trainer = Trainer(load_config(None, overrides))
    rank = trainer.accelerator.process_index
    trainer.sampler.start_epoch(0)
    seen = [[int(key[1]), float(weight)] for batch in trainer.train_loader
            for key, weight in zip(batch["keys"], batch["loss_weights"], strict=True)]  # fmt: skip
    summary = trainer.train()
    digest = hashlib.sha256()
    for name, tensor in sorted(trainer.saved_module(trainer.model).state_dict().items()):
        digest.update(name.encode() + tensor.detach().cpu().numpy().tobytes())
    result = {"generated": generated, "seen": seen, "items": trainer.train_items, "steps": summary["global_step"],
              "loss": summary["final_train_loss"], "unet_sha256": digest.hexdigest(),
              "processes": trainer.accelerator.num_processes}  # fmt: skip
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
