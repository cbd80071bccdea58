"""Run by test_streaming.py under torchrun with 2 CPU processes: trains from shards; `--kill-after=N` stops every
process right after update N (its checkpoint written), as a kill would."""

import json
import sys
from pathlib import Path

from ldm_tune.config import load_config
from ldm_tune.training import Trainer


class Killed(BaseException):
    """A BaseException, so that no `except Exception` in the trainer swallows it."""


def main() -> None:
    out, args = Path(sys.argv[1]), sys.argv[2:]
    kill_after = next((int(a.split("=")[1]) for a in args if a.startswith("--kill-after=")), None)
    trainer = Trainer(load_config(None, [a for a in args if not a.startswith("--kill-after=")]))
    original = trainer._after_update

    def after_update(*update):
        original(*update)
        if trainer.state.global_step == kill_after:
            raise Killed

    trainer._after_update = after_update
    summary = trainer.train()
    result = {"steps": summary["global_step"], "processes": trainer.accelerator.num_processes}
    (out / f"rank{trainer.accelerator.process_index}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
