import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from ldm_tune.cli import main
from ldm_tune.schedulers import SCHEDULERS


def test_schedulers_command_lists_every_name(capsys):
    assert main(["schedulers"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == list(SCHEDULERS)


def test_generate_writes_pngs_grid_and_parameters(tiny_model_dir, tmp_path, capsys):
    code = main(
        [
            "generate",
            "--model",
            str(tiny_model_dir),
            "--prompt",
            "a red circle",
            "--prompt",
            "a blue square",
            "--negative-prompt",
            "blurry",
            "--scheduler",
            "dpmpp_2m",
            "--scheduler-arg",
            "use_karras_sigmas=true",
            "--steps",
            "3",
            "--seed",
            "4",
            "--num-images",
            "2",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0
    out = tmp_path / "out"
    assert len(list(out.glob("00000-0?.png"))) == 4
    assert Image.open(out / "00000-grid.png").size == (128, 128)  # 2 prompts x 2 images
    params = json.loads((out / "00000.json").read_text())
    assert params["scheduler"] == "dpm++" and params["scheduler_overrides"] == {"use_karras_sigmas": True}
    assert params["negative_prompt"] == ["blurry", "blurry"] and params["seed"] == 4
    assert params["scheduler_config"]["use_karras_sigmas"] is True
    # Image i has seed 4 + i, in the JSON and in the A1111 text inside each PNG.
    assert [image["seed"] for image in params["images"]] == [4, 5, 6, 7]
    assert (
        "Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 5, Size: 64x64"
        in (Image.open(out / "00000-01.png").text["parameters"])
    )


def test_generate_reports_bad_input_without_traceback(tiny_model_dir, tmp_path, capsys):
    code = main(
        [
            "generate",
            "--model",
            str(tiny_model_dir),
            "--prompt",
            "x",
            "--height",
            "30",
            "--steps",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 2
    assert (
        "`height` (--height) must be a positive multiple of 4 (the VAE scale factor), got 30."
        in capsys.readouterr().err
    )
    code = main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x", "--out", str(tmp_path)])
    assert code == 2 and "does not exist" in capsys.readouterr().err


def test_console_script_init_model_and_generate(tmp_path):
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    model = tmp_path / "model"
    subprocess.run(
        [bin_dir / "ldm-tune", "init-model", "--preset", "tiny", "--out", model, "--seed", "3"],
        check=True,
        env=env,
        capture_output=True,
    )
    result = subprocess.run(
        [
            bin_dir / "ldm-tune",
            "generate",
            "--model",
            model,
            "--prompt",
            "a red circle",
            "--steps",
            "2",
            "--seed",
            "0",
            "--out",
            tmp_path / "images",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "images" / "00000-00.png").exists()
    again = subprocess.run(
        [bin_dir / "ldm-tune", "init-model", "--preset", "tiny", "--out", model],
        env=env,
        capture_output=True,
        text=True,
    )
    assert again.returncode == 2 and "already exists" in again.stderr
