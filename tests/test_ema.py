"""`ForeachEMA` averages exactly as diffusers' `EMAModel` does (decay schedule, frozen tensors copied)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers.training_utils import EMAModel

from ldm_tune.ema import ForeachEMA


def _params(seed: int) -> list[torch.nn.Parameter]:
    torch.manual_seed(seed)
    trained = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    frozen = torch.nn.Parameter(torch.randn(4), requires_grad=False)
    return [trained[0], frozen, trained[1]]


def _drift(params: list[torch.nn.Parameter], step: int) -> None:
    """What an optimizer (and, for the frozen tensor, a buffer-like update) does between EMA steps."""
    gen = torch.Generator().manual_seed(step)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)


@pytest.mark.parametrize("kwargs", [{"decay": 0.9}, {"decay": 0.999, "use_ema_warmup": True, "power": 0.75}])
def test_foreach_ema_matches_diffusers_ema(kwargs):
    ours_params, theirs_params = _params(0), _params(0)
    ours, theirs = ForeachEMA(ours_params, **kwargs), EMAModel(theirs_params, **kwargs)
    for step in range(30):
        _drift(ours_params, step)
        _drift(theirs_params, step)
        ours.step(ours_params)
        theirs.step(theirs_params)
    assert ours.optimization_step == theirs.optimization_step == 30
    assert ours.cur_decay_value == theirs.cur_decay_value
    for mine, ref, param in zip(ours.shadow_params, theirs.shadow_params, ours_params, strict=True):
        torch.testing.assert_close(mine, ref, rtol=0, atol=1e-6)
        if not param.requires_grad:  # copied, not averaged
            assert torch.equal(mine, param)
    # The average lags the weights: a step that copied them would also pass the frozen check above.
    assert not torch.allclose(ours.shadow_params[0], ours_params[0], atol=1e-3)


def test_foreach_ema_with_shadows_in_another_dtype_follows_diffusers():
    ours_params, theirs_params = _params(1), _params(1)
    ours, theirs = ForeachEMA(ours_params, decay=0.9), EMAModel(theirs_params, decay=0.9)
    ours.to(dtype=torch.float64)
    theirs.to(dtype=torch.float64)
    for step in range(5):
        _drift(ours_params, step)
        _drift(theirs_params, step)
        ours.step(ours_params)
        theirs.step(theirs_params)
    for mine, ref in zip(ours.shadow_params, theirs.shadow_params, strict=True):
        assert mine.dtype == torch.float64
        torch.testing.assert_close(mine, ref, rtol=0, atol=1e-12)


def test_foreach_ema_refuses_a_parameter_list_of_another_length():
    params = _params(2)
    ema = ForeachEMA(params, decay=0.9)
    with pytest.raises(ValueError):
        ema.step(params[:2])


def test_bench_ema_runs_and_agrees_with_the_loop(tmp_path):
    """`benchmarks/bench_ema.py` (in `make bench`) on the tiny UNet: the three implementations, the same averages."""
    out = tmp_path / "ema.json"
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_ema.py"
    subprocess.run([sys.executable, str(bench), "--presets", "tiny", "--steps", "2", "--out", str(out)], check=True,
                   capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [r["implementation"] for r in rows] == [
        "diffusers EMAModel (loop, the default)", "diffusers EMAModel (foreach=True)", "ldm_tune ForeachEMA"]  # fmt: skip
    assert all(r["tensors"] > 100 and r["median_ms"] > 0 for r in rows)
    assert rows[0]["max_abs_diff_vs_loop"] == 0.0
    assert max(r["max_abs_diff_vs_loop"] for r in rows) < 1e-6  # rounding apart, the same averages
