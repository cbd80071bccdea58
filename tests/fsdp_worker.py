"""Run by test_fsdp.py under `accelerate launch --config_file configs/accelerate/fsdp.yaml` with 2 CPU processes.

Accelerate sets FSDP up only on accelerators (its `AcceleratorState` keeps CPU processes on DDP whatever the launch
config says), while torch's FSDP2 (`fully_shard`) itself runs on CPU tensors over gloo. So this worker lets the
trainer build its Accelerator as usual and then switches that one check: the FSDP plugin is the one Accelerate
builds from the environment `accelerate launch` set from the shipped config file, and everything after (wrapping,
sharded save/load, state dicts) is Accelerate's and torch's own FSDP code.

`worker out [--kill-after N] overrides...`: trains (optionally stopping right after update N, as a kill would) and
writes out/rank<r>.json.
"""

import json
import sys
from pathlib import Path

import accelerate
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

import ldm_tune.training as training
from ldm_tune.config import load_config


class CPUFSDPAccelerator(accelerate.Accelerator):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        assert self.distributed_type == DistributedType.MULTI_CPU  # the one gate this worker opens
        PartialState().distributed_type = DistributedType.FSDP
        AcceleratorState().distributed_type = DistributedType.FSDP
        self.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* environment of the launch


class Killed(BaseException):
    pass


def main() -> None:
    out, args = Path(sys.argv[1]), sys.argv[2:]
    kill_after = None
    if args[:1] == ["--kill-after"]:
        kill_after, args = int(args[1]), args[2:]
    training.Accelerator = CPUFSDPAccelerator
    trainer = training.make_trainer(load_config(None, args))
    rank = trainer.accelerator.process_index
    if kill_after is not None:
        original = trainer._after_update

        def killed(*a):
            original(*a)
            if trainer.state.global_step == kill_after:
                raise Killed

        trainer._after_update = killed
    result = {"distributed_type": str(trainer.accelerator.distributed_type), "model": type(trainer.model).__name__}
    try:
        summary = trainer.train()
        result.update(steps=summary["global_step"], best_val_loss=summary["best_val_loss"])
    except Killed:
        result["killed_at"] = trainer.state.global_step
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
