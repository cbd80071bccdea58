"""Shared fixtures. Everything is built in code and offline: an accidental hub download fails loudly."""

import os


os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub is imported anywhere
# Downloads, scan results and latent/text caches of the tests go to a throwaway folder, not ~/.cache.
os.environ["LDM_TUNE_CACHE"] = __import__("tempfile").mkdtemp(prefix="ldm-tune-test-cache-")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A Stable-Diffusion-format folder of the `tiny` preset, written by the real `init_model`."""
    from ldm_tune.presets import init_model

    return init_model("tiny", tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_pipe(tiny_model_dir):
    """`LDMInference` on the tiny model, CPU fp32. Tests that change the scheduler must set it back."""
    from ldm_tune.inference import LDMInference

    return LDMInference.from_pretrained(tiny_model_dir, device="cpu")


@pytest.fixture(scope="session")
def _sd_pipeline_once(tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def sd_pipeline(_sd_pipeline_once):
    """diffusers' own StableDiffusionPipeline on the same folder: the reference our inference must match. Loaded once;
    a test may swap its scheduler, which is set back after the test."""
    scheduler = _sd_pipeline_once.scheduler
    yield _sd_pipeline_once
    _sd_pipeline_once.scheduler = scheduler


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    """A small procedural image folder: 12 training and 4 validation images of 32 px."""
    from ldm_tune.data.shapes import make_shapes_dataset

    return make_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", n=16, size=32, seed=0,
                               validation_fraction=0.25)  # fmt: skip


@pytest.fixture
def make_config(tiny_model_dir, shapes_dir, tmp_path):
    """`make_config("training.max_train_steps=3", ...)`: a fast CPU training config on the tiny model."""
    from ldm_tune.config import load_config

    def make(*overrides, output_dir=None):
        base = [
            f"model.pretrained_model_name_or_path={tiny_model_dir}",
            f"data.train_data_dir={shapes_dir / 'train'}",
            "data.resolution=32",
            "training.train_batch_size=4",
            "training.max_train_steps=2",
            "training.lr_warmup_steps=0",
            "checkpointing.checkpointing_steps=1000",
            "validation.validation_steps=0",
            f"output_dir={output_dir or tmp_path / 'run'}",
        ]
        return load_config(None, base + list(overrides))

    return make


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Accelerate keeps one global state per process; tests build trainers with different precisions."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


class Killed(BaseException):
    """Stands for a kill: a BaseException, so no `except Exception` in the trainer can swallow it."""


@pytest.fixture
def straight_and_resumed(make_config, tmp_path, monkeypatch):
    """`straight_and_resumed(overrides, kill_after)`: train `overrides` straight into tmp/full, then into tmp/split
    killed right after update `kill_after` and resumed from its latest checkpoint; returns (full, split) folders."""
    from ldm_tune.training import Trainer, make_trainer

    def run(overrides, kill_after: int):
        full, split = tmp_path / "full", tmp_path / "split"
        make_trainer(make_config(*overrides, output_dir=full)).train()
        original = Trainer._after_update

        def killed(self, *args):
            original(self, *args)
            if self.state.global_step == kill_after:
                raise Killed

        with monkeypatch.context() as patch:
            patch.setattr(Trainer, "_after_update", killed)
            with pytest.raises(Killed):
                make_trainer(make_config(*overrides, output_dir=split)).train()
        exported = ("unet", "vae", "pipeline", "pytorch_lora_weights.safetensors")
        assert not any((split / name).exists() for name in exported)  # a killed run exports nothing
        resumed = make_config(*overrides, "checkpointing.resume_from_checkpoint=latest", output_dir=split)
        make_trainer(resumed).train()
        return full, split

    return run


@pytest.fixture
def run_two_processes(tmp_path):
    """`run_two_processes(worker, overrides, processes=2, out=tmp_path)`: run tests/<worker> under torchrun with
    CPU processes (gloo), one thread each, as `worker out *overrides`; returns what each rank wrote to
    out/rank<r>.json (with `fails=True`: asserts that it failed and returns its stderr)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    def run(worker: str, overrides: list[str], processes: int = 2, out: Path | None = None, fails: bool = False):
        out = out or tmp_path
        out.mkdir(parents=True, exist_ok=True)
        torchrun = Path(sys.executable).parent / "torchrun"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        command = [str(torchrun), "--standalone", f"--nproc_per_node={processes}",
                   str(Path(__file__).with_name(worker)), str(out), *overrides]  # fmt: skip
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        if fails:  # expected to stop with an error: return what it said
            assert result.returncode != 0
            return result.stderr
        assert result.returncode == 0, result.stderr[-3000:]
        return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(processes)]

    return run


@pytest.fixture
def ema_checkpoint():
    """`ema_checkpoint(model_dir, folder)`: writes a checkpoint as the trainer does with EMA: `unet/` (the raw
    weights, moved off the base) and `unet_ema/` (`EMAModel.save_pretrained`, still the base); returns `folder`."""
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import EMAModel

    from ldm_tune.components import load_components

    def write(model_dir, folder):
        unet = load_components(model_dir).unet
        ema = EMAModel(unet.parameters(), model_cls=UNet2DConditionModel, model_config=unet.config)
        with torch.no_grad():
            for parameter in unet.parameters():
                parameter.add_(0.01 * torch.randn_like(parameter))
        unet.save_pretrained(folder / "unet")
        ema.save_pretrained(folder / "unet_ema")
        return folder

    return write
