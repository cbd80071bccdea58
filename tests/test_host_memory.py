"""ldm_tune.host_memory: freed large blocks stay with the process and are reused without page faults; the trainer
applies it unless `training.keep_freed_memory` is off."""

import platform
import subprocess
import sys

import pytest

from ldm_tune import training
from ldm_tune.training import Trainer


glibc = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="a glibc allocator switch"
)

BLOCK = 64 * 2**20  # a gradient-sized block, well above glibc's largest mmap threshold (32 MiB)
# What training steps do with a gradient: allocate, write, free, 16 times. Prints the RSS the first freed block
# leaves behind, then the RSS growth and the minor page faults of the last 4 steps.
STEPS = f"""
import resource, sys, torch
from ldm_tune.host_memory import keep_freed_memory
assert keep_freed_memory(sys.argv[1] == "keep") is True
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(2**18).sum()  # load the kernels and start the threads before measuring
before = rss()
torch.ones({BLOCK} // 4).sum()
kept = rss() - before
for _ in range(11):
    torch.ones({BLOCK} // 4).sum()
rss_12, faults_12 = rss(), faults()
for _ in range(4):
    torch.ones({BLOCK} // 4).sum()
print(kept, rss() - rss_12, faults() - faults_12)
"""


def run_steps(mode: str) -> tuple[int, int, int]:
    result = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True)
    kept, growth, faults = map(int, result.stdout.split())
    return kept, growth, faults


@glibc
def test_freed_blocks_are_kept_and_reused_without_page_faults():
    kept, growth, faults = run_steps("keep")
    assert kept > BLOCK * 0.9  # the freed block stayed with the process...
    # ...and, once the heap holds the step's blocks (glibc's aligned allocations take a few steps to find their
    # freed predecessors), steps reuse them: no growth, no fresh pages to fault in.
    assert growth < BLOCK * 0.1
    assert faults < 4 * BLOCK // 4096 // 20
    kept, growth, _ = run_steps("default")  # glibc's defaults: unmapped on free, so each block is faulted in anew
    assert kept < BLOCK * 0.5 and growth < BLOCK * 0.1


def test_the_trainer_keeps_freed_memory_unless_told_not_to(make_config, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(training, "keep_freed_memory", lambda: calls.append(True))
    Trainer(make_config("training.max_train_steps=1"))
    assert calls == [True]
    Trainer(make_config("training.max_train_steps=1", "training.keep_freed_memory=false", output_dir=tmp_path / "off"))
    assert calls == [True]
