"""Memory and speed switches (issue 18 item 6): VAE slicing and tiling, attention slicing, CPU offload, compile and
`--batches`."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_tune.cli import main


FAST = dict(num_inference_steps=2, output_type="np", progress=False)


@pytest.fixture
def pipe(tiny_pipe):
    yield tiny_pipe
    tiny_pipe.disable_vae_slicing()
    tiny_pipe.disable_vae_tiling()
    tiny_pipe.vae.tile_sample_min_size = tiny_pipe.vae.config.sample_size
    tiny_pipe.vae.tile_latent_min_size = tiny_pipe.vae.config.sample_size // tiny_pipe.vae_scale_factor
    tiny_pipe.disable_attention_slicing()


def batch(pipe, **kwargs):
    return pipe.generate("a red circle", seed=1, num_images_per_prompt=2, **kwargs, **FAST)


def run_cli(*args):
    return main(["generate", *map(str, args)])


def test_vae_slicing_gives_the_same_images(pipe):
    base = batch(pipe)
    pipe.enable_vae_slicing()
    # One image at a time instead of three: convolutions round differently at another batch size (~3e-6 here).
    assert np.abs(batch(pipe) - base).max() <= 1e-5
    assert pipe.switches["vae_tiling"] is None  # slicing does not change pixels: not recorded


def test_attention_slicing_within_1e_5_and_off_again(pipe):
    base = batch(pipe)
    for size in ("auto", "max"):
        pipe.enable_attention_slicing(size)
        assert np.abs(batch(pipe) - base).max() <= 1e-5
    assert pipe.switches["attention_slicing"] == "max"
    pipe.disable_attention_slicing()
    assert np.array_equal(batch(pipe), base) and pipe.switches["attention_slicing"] is None


def test_vae_tiling_decodes_large_images_in_tiles(pipe):
    base = batch(pipe)
    pipe.enable_vae_tiling(tile_size=64)  # the native size: a 64 px image is one tile, decoded as before
    assert np.array_equal(batch(pipe), base)
    pipe.enable_vae_tiling(tile_size=32)
    tiled = batch(pipe)
    # 2x2 tiles overlapping by a quarter, blended at the seams: another image, but the same picture.
    diff = np.abs(tiled - base)
    print(f"tiling: max {diff.max():.3f}, mean {diff.mean():.3f}")
    assert 1e-3 < diff.mean() < 0.15
    large = pipe.generate("a red circle", seed=1, height=96, width=96, **FAST)  # 3x3 tiles
    assert large.shape == (1, 96, 96, 3) and np.isfinite(large).all()
    assert pipe.switches["vae_tiling"] == 32
    with pytest.raises(ValueError, match="`tile_size` must be a positive multiple of 4"):
        pipe.enable_vae_tiling(tile_size=30)


def test_cpu_offload_needs_cuda(pipe, tiny_model_dir, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="`enable_model_cpu_offload` needs a CUDA device, got 'cuda' \\(this machine"):
        pipe.enable_model_cpu_offload()
    assert pipe.device.type == "cpu"
    code = run_cli("--model", tiny_model_dir, "--prompt", "x", "--cpu-offload", "--device", "cpu", "--out", tmp_path)
    assert code == 2 and "`cpu_offload` (--cpu-offload) needs a CUDA device, got 'cpu'" in capsys.readouterr().err


def test_compile_unet_wraps_the_unet_in_place(pipe, monkeypatch):
    # A real compile of the tiny UNet takes ~85 s on this 2-core CPU (later calls 0.8 s per 3-step batch), too slow
    # for the suite: check the call instead. `nn.Module.compile` keeps the module, its config and LoRA loading.
    calls = []
    monkeypatch.setattr(pipe.unet, "compile", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(pipe, "_compile_mode", None)
    pipe.compile_unet(mode="reduce-overhead")
    assert calls == [{"mode": "reduce-overhead", "fullgraph": False}]
    assert pipe.switches["compile"] == "reduce-overhead"


def test_frozen_compile_passes_inductor_freezing_and_then_refuses_lora_changes(pipe, monkeypatch):
    # The compile itself runs in benchmarks/bench_inference.py (pixels within 3e-6 of eager on tiny).
    calls = []
    monkeypatch.setattr(pipe.unet, "compile", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(pipe, "_compile_mode", None)
    with pytest.raises(ValueError, match="`mode` must be None with `freeze=True`"):
        pipe.compile_unet(mode="max-autotune", freeze=True)
    assert calls == [] and pipe.switches["compile"] is None
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config, "freezing", False)
    pipe.compile_unet(freeze=True)
    # Dynamo must see the switch when it traces (the first call), not only inductor: `options={"freezing": True}`
    # left the weights as graph inputs (no faster than a plain compile).
    assert calls == [{"fullgraph": False, "mode": None}] and torch._inductor.config.freezing is True
    assert pipe.switches["compile"] == "freezing"
    # Frozen weights would silently ignore a LoRA loaded afterwards: refused, before the file is even read.
    with pytest.raises(ValueError, match="compiled with `freeze=True`"):
        pipe.load_lora("any-lora.safetensors")


def test_batches_continue_the_seeds(tiny_model_dir, tmp_path):
    common = ("--model", tiny_model_dir, "--prompt", "a red circle", "--steps", 2, "--height", 32, "--width", 32,
              "--seed", 8)  # fmt: skip
    assert run_cli(*common, "--num-images", 4, "--out", tmp_path / "one") == 0
    assert run_cli(*common, "--num-images", 2, "--batches", 2, "--out", tmp_path / "two") == 0
    one = [np.asarray(Image.open(tmp_path / "one" / f"00000-0{i}.png")).astype(int) for i in range(4)]
    two = [np.asarray(Image.open(tmp_path / "two" / f"0000{run}-0{i}.png")).astype(int) for run in (0, 1)
           for i in range(2)]  # fmt: skip
    # The same four images (up to one level: batches of 2 round differently from one batch of 4).
    assert all(np.abs(a - b).max() <= 1 for a, b in zip(one, two, strict=True))
    seeds = [
        image["seed"]
        for run in (0, 1)
        for image in json.loads((tmp_path / "two" / f"0000{run}.json").read_text())["images"]
    ]
    assert seeds == [8, 9, 10, 11]
    assert run_cli(*common, "--batches", 0, "--out", tmp_path / "bad") == 2


def test_vae_tiling_is_recorded_and_comes_back_with_from_png(tiny_model_dir, tmp_path):
    common = ("--steps", 2, "--seed", 2, "--height", 96, "--width", 96)  # larger than the VAE's 64 px
    assert run_cli("--model", tiny_model_dir, "--prompt", "a red circle", "--vae-tiling", "--vae-slicing",
                   "--attention-slicing", *common, "--out", tmp_path / "a") == 0  # fmt: skip
    record = json.loads((tmp_path / "a" / "00000.json").read_text())
    assert record["switches"] == {"vae_tiling": 64, "attention_slicing": "auto", "compile": None}
    original = tmp_path / "a" / "00000-00.png"
    assert run_cli("--from-png", original, "--out", tmp_path / "b") == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b" / "00000-00.png")), np.asarray(Image.open(original)))
    assert json.loads((tmp_path / "b" / "00000.json").read_text())["switches"] == record["switches"]


def test_channels_last_changes_the_memory_order_not_the_images(pipe):
    # Off by default (benchmarks/bench_inference.py: faster on the tiny preset, slower on the SD 1.5 architecture).
    assert pipe.unet.conv_in.weight.is_contiguous()
    default = batch(pipe)
    pipe.enable_channels_last()
    try:
        for weight in (pipe.unet.conv_in.weight, pipe.vae.decoder.conv_in.weight):
            assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
        assert np.abs(batch(pipe) - default).max() <= 1e-5
    finally:
        pipe.disable_channels_last()
    assert pipe.unet.conv_in.weight.is_contiguous()
