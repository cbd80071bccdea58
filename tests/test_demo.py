import json

from ldm_tune.demo import DemoSettings, caption_words, run_demo


def test_quick_demo_writes_every_artefact_and_resumes(tmp_path, monkeypatch):
    out = tmp_path / "demo"
    results = run_demo(out, DemoSettings.quick())
    for name in ("grid.png", "samplers.md", "samplers.json", "forward.png", "trajectory.png", "loss-vae.png",
                 "loss-unet.png", "loss-finetune.png", "report.md", "results.json",
                 "vae/pipeline/model_index.json", "unet/pipeline/model_index.json",
                 "finetune/pytorch_lora_weights.safetensors", "finetune/lora_kohya.safetensors"):  # fmt: skip
        assert (out / name).exists(), name
    assert not (out / "data" / "finetune").exists()  # the new concept is repeated, not copied
    assert results["finetune_method"] == "lora-attn2" and "rank-16 LoRA" in (out / "report.md").read_text()
    samplers = json.loads((out / "samplers.json").read_text())
    seed_rows = ["ddpm", "ddim", "pndm"]  # the seed's table: DDPM 1000, DDIM 50, PLMS 100
    assert [r["sampler"].split()[0] for r in samplers] == [*seed_rows, "ddpm", "pndm", "dpm++", "euler", "lms"]
    assert all(r["seconds_per_image"] > 0 and 0 <= r["joint"] <= 1 for r in samplers)
    report = (out / "report.md").read_text()
    assert "VAE validation PSNR" in report and "new concept (cyan)" in report and "Wall time" in report
    # The new concept is scored on its own number of images per prompt (4 prompts: one per shape).
    assert results["new_concept_images"] == 4 * DemoSettings.quick().new_concept_eval_images_per_prompt
    assert f"after fine-tuning ({results['new_concept_images']} images)" in report
    assert "Machine: " in report and "GFLOP/s" in report and results["machine"]["fp32_matmul_gflops"] > 0
    assert "Estimated on the slow host type" in report
    assert {row["guidance"] for row in results["base"]} == {1.0, 3.0, 5.0, 7.5}
    # A second run finds every stage complete and only re-evaluates.
    from ldm_tune import training

    monkeypatch.setattr(training.Trainer, "run_loop", lambda self: (_ for _ in ()).throw(AssertionError("retrained")))
    run_demo(out, DemoSettings.quick())


def test_caption_words_cover_the_new_concept():
    words = caption_words()
    assert "cyan" in words and "triangle" in words and "gray" in words


def test_every_finetune_method_of_the_demo_is_a_valid_config(tmp_path):
    from ldm_tune.config import load_config
    from ldm_tune.demo import FINETUNE_METHODS, finetune_overrides

    data = {name: tmp_path / name for name in ("base", "new", "vae")}
    for method in FINETUNE_METHODS:
        config = load_config(None, finetune_overrides(tmp_path, data, DemoSettings(), method))
        assert config.dreambooth.instance_repeats == DemoSettings().new_concept_repeats


def test_slow_host_estimate_follows_the_measured_pair_of_hosts():
    from ldm_tune.machine import slow_host_estimate

    # The anchor: 7.7 min at a 190 GFLOP/s ceiling were 18.6 min on the 66 GFLOP/s host.
    assert abs(slow_host_estimate(7.7 * 60, {"fp32_matmul_gflops": 190.0}) - 18.6 * 60) < 1e-6
    assert slow_host_estimate(600.0, {"fp32_matmul_gflops": 66.0}) == 600.0
    assert slow_host_estimate(600.0, {"fp32_matmul_gflops": 30.0}) == 600.0  # never faster than measured
    assert slow_host_estimate(60.0, {"fp32_matmul_gflops": 400.0}) > slow_host_estimate(
        60.0, {"fp32_matmul_gflops": 200.0}
    )


def test_the_machine_line_names_the_kernels_torch_uses():
    """A run with its vector width lowered (as the demo's AVX2 run) says so, though /proc/cpuinfo lists AVX-512."""
    import os
    import subprocess
    import sys

    code = "from ldm_tune.machine import describe_machine, machine_line; print(machine_line(describe_machine()))"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    line = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert "(kernels DEFAULT)" in line and "GFLOP/s" in line
    from ldm_tune.machine import machine_line

    old = {
        "cpu": "x",
        "threads": 2,
        "avx512": False,
        "fp32_matmul_gflops": 66.0,
        "torch": "2",
    }  # JSON before "kernels"
    assert "kernels" not in machine_line(old)


def test_peak_rss_is_the_child_process_own_not_its_parents():
    """A benchmark's child reported its parent's 16 GiB as its own peak: ru_maxrss carries over fork and exec."""
    import subprocess
    import sys

    from ldm_tune.machine import peak_rss_mib

    held = bytearray(1024 * 2**20)
    for i in range(0, len(held), 4096):  # touch every page: 1 GiB resident in this (the parent) process
        held[i] = 1
    assert peak_rss_mib() >= 1024
    code = "from ldm_tune.machine import peak_rss_mib; print(peak_rss_mib())"
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 0 < child < 768, child  # importing torch costs a few hundred MiB, not the parent's GiB
    del held
