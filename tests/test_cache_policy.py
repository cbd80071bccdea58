"""Latent and text caches left unset are on where valid, cheaper than encoding at every step, and fit on disk."""

import json

import pytest
import torch

from ldm_tune.data.cache_policy import latent_choice, samples_seen, text_choice


GIB = 2**30


def test_samples_seen_counts_every_process_and_accumulation_step(make_config):
    config = make_config("training.max_train_steps=10", "training.gradient_accumulation_steps=3")
    assert samples_seen(config, train_items=12, num_processes=2) == 10 * 4 * 3 * 2
    config.training.max_train_steps = None
    config.training.num_train_epochs = 5
    assert samples_seen(config, train_items=12, num_processes=2) == 60


@pytest.mark.parametrize(
    ("overrides", "why"),
    [
        ((), "random crop"),  # the default crop is random
        (("data.center_crop=true", "model.space=pixel", "model.prediction_type=epsilon"), "pixel space"),
        (("data.center_crop=true", "data.verify=lazy"), "verify: lazy"),
    ],
)
def test_an_unset_latent_cache_is_off_where_it_would_be_wrong(make_config, overrides, why):
    choice = latent_choice(make_config(*overrides), 12, 1000, seen=10**6, free=100 * GIB)
    assert not choice.on and why in choice.reason


def test_an_unset_latent_cache_is_on_where_it_pays_and_fits(make_config):
    config = make_config("data.center_crop=true")
    on = latent_choice(config, 12, 1000, seen=12, free=100 * GIB)
    assert on.on and "12 image encodings" in on.reason
    short = latent_choice(config, 12, 1000, seen=11, free=100 * GIB)  # one encode more than training would do
    assert not short.on and "11 samples" in short.reason
    full_disk = latent_choice(config, 12, 60 * GIB, seen=10**6, free=100 * GIB)
    assert not full_disk.on and "60.0 GiB" in full_disk.reason


def test_a_set_cache_is_what_the_config_says(make_config):
    assert latent_choice(make_config("data.cache_latents=true", "data.center_crop=true"), 12, 1, 0, 0).on
    assert not latent_choice(make_config("data.cache_latents=false", "data.center_crop=true"), 1, 1, 10**6, GIB).on
    assert text_choice(make_config("data.cache_text_embeddings=true"), 12, 1, 0, 0).on
    assert not text_choice(make_config("data.cache_text_embeddings=false"), 1, 1, 10**6, GIB).on


def test_an_unset_text_cache_follows_the_same_rules(make_config):
    assert text_choice(make_config(), 13, 1000, seen=13, free=GIB).on
    assert not text_choice(make_config(), 13, 1000, seen=12, free=GIB).on
    lora = make_config("training.finetune_method=lora", "training.train_text_encoder_lora=true")
    choice = text_choice(lora, 13, 1000, seen=10**6, free=GIB)
    assert not choice.on and "text encoder trains" in choice.reason


def _trained(trainer) -> torch.Tensor:
    trainer.train()
    return torch.cat([p.detach().flatten() for p in trainer.model.parameters()])


def test_a_run_with_defaults_caches_when_it_pays_and_trains_as_with_caches_set(make_config, tmp_path):
    from ldm_tune.training import Trainer

    common = ["data.center_crop=true", "training.max_train_steps=4", f"data.cache_dir={tmp_path / 'cache'}"]
    auto = Trainer(make_config(*common, output_dir=tmp_path / "auto"))
    assert auto.config.data.cache_latents is True and auto.config.data.cache_text_embeddings is True
    assert auto.text_encoder is None and auto.vae.encoder is None  # the encoders left the step
    report = json.loads((tmp_path / "auto" / "data_report.json").read_text())["caches"]
    assert report["latents"]["on"] and "12 image encodings" in report["latents"]["reason"]
    explicit = Trainer(make_config(*common, "data.cache_latents=true", "data.cache_text_embeddings=true",
                                   output_dir=tmp_path / "explicit"))  # fmt: skip
    assert torch.equal(_trained(auto), _trained(explicit))


def test_a_short_run_with_defaults_keeps_its_encoders(make_config, tmp_path):
    from ldm_tune.training import Trainer

    trainer = Trainer(make_config(f"data.cache_dir={tmp_path / 'cache'}"))  # 2 steps of 4 over 12 images
    assert trainer.config.data.cache_latents is False and trainer.config.data.cache_text_embeddings is False
    assert trainer.text_encoder is not None and trainer.vae.encoder is not None
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())["caches"]
    assert "random crop" in report["latents"]["reason"] and "8 samples" in report["text"]["reason"]
    assert not (tmp_path / "cache" / "latents").exists()


def test_two_processes_take_the_main_process_decision(tiny_model_dir, shapes_dir, tmp_path, run_two_processes,
                                                      monkeypatch):  # fmt: skip
    """Rank 1 alone would find no disk room and leave the caches off; both must follow rank 0 (uneven batches:
    12 items, batch 5 on 2 processes)."""
    monkeypatch.setenv("LDM_TUNE_TEST_NO_DISK_ON_RANK1", "1")
    overrides = [f"model.pretrained_model_name_or_path={tiny_model_dir}", f"data.train_data_dir={shapes_dir / 'train'}",
                 "data.resolution=32", "data.center_crop=true", "training.train_batch_size=5",
                 "training.max_train_steps=2", f"data.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'run'}"]  # fmt: skip
    ranks = run_two_processes("two_process_worker.py", overrides)
    assert [r["caches"] for r in ranks] == [[True, True], [True, True]]
    assert ranks[0]["trained_sum"] == ranks[1]["trained_sum"]
    assert len(list((tmp_path / "cache" / "latents").rglob("*.safetensors"))) == 12


def test_a_resumed_run_keeps_the_choice_it_started_with(make_config, tmp_path, monkeypatch):
    """Its own cache files now fill the disk the first choice counted as free: the cache must stay on."""
    import ldm_tune.data.loaders as loaders
    from ldm_tune.training import Trainer

    common = ["data.center_crop=true", "checkpointing.checkpointing_steps=2",
              "checkpointing.resume_from_checkpoint=latest", f"data.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    Trainer(make_config(*common, "training.max_train_steps=4")).train()
    monkeypatch.setattr(loaders, "free_bytes", lambda root: 0)
    fresh = Trainer(make_config(*common[:2], "training.max_train_steps=6", f"data.cache_dir={tmp_path / 'cache'}",
                                output_dir=tmp_path / "other"))  # fmt: skip
    assert fresh.config.data.cache_latents is False  # what the full disk decides for a new run
    resumed = Trainer(make_config(*common, "training.max_train_steps=6"))
    assert resumed.config.data.cache_latents is True and resumed.config.data.cache_text_embeddings is True
    assert resumed.text_encoder is None and resumed.train()["global_step"] == 6
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())["caches"]
    assert report["latents"]["reason"].startswith("as when this run started")
