"""DreamBooth: instance and class sources, repeats, per-item loss weights, and generated class images."""

import json
import os
from collections import Counter
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from PIL import Image, ImageOps

from ldm_tune.components import load_components
from ldm_tune.data.buckets import BucketBatchSampler
from ldm_tune.data.dataset import TextImageDataset, collate
from ldm_tune.data.pipeline import prepare_data
from ldm_tune.data.shapes import make_shapes_dataset
from ldm_tune.dreambooth import class_image_seed, ensure_class_images
from ldm_tune.losses import draw
from ldm_tune.presets import build_tokenizer
from ldm_tune.training import Trainer


PROMPT = "a photo of sks shape"
CLASS = ["dreambooth.with_prior_preservation=true", "dreambooth.class_prompt=a shape", "dreambooth.num_class_images=5",
         "dreambooth.sample_batch_size=2", "dreambooth.class_inference_steps=2", "dreambooth.class_guidance_scale=3"]  # fmt: skip


@pytest.fixture(scope="module")
def concept_dir(tmp_path_factory):
    """Three 32 px images of a colour the base data lacks, captioned in metadata.jsonl ("a cyan ...")."""
    out = tmp_path_factory.mktemp("concept") / "cyan"
    return make_shapes_dataset(out, n=3, size=32, seed=1, validation_fraction=0, colors=["cyan"]) / "train"


def image_folder(folder: Path, sources: list[Path], captions: list[str] | None = None, transform=None) -> Path:
    """Copy images into `folder` as user-<i>.png, with .txt captions when given (no metadata file)."""
    folder.mkdir(parents=True)
    for i, source in enumerate(sources):
        image = Image.open(source).convert("RGB")
        (transform(image) if transform else image).save(folder / f"user-{i}.png")
        if captions:
            (folder / f"user-{i}.txt").write_text(captions[i])
    return folder


def listing(*folders: Path) -> dict:
    """Every file with its bytes and modification time: what 'untouched' means."""
    files = [p for folder in folders for p in sorted(folder.rglob("*")) if p.is_file()]
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in files}


def prepare(config, tmp_path):
    return prepare_data(config.data, build_tokenizer(), config.seed, cache_dir=tmp_path / "cache", progress=False,
                        dreambooth=config.dreambooth)  # fmt: skip


def generate(model_dir, config, unet_training: bool = True) -> int:
    components = load_components(model_dir)
    components.unet.train(unet_training)
    written = ensure_class_images(config, Accelerator(cpu=True), components, torch.float32)
    # The modes it found are restored: the trainer goes on with a training UNet and frozen eval-mode parts.
    assert components.unet.training == unet_training and not components.vae.training
    assert not components.text_encoder.training
    return written


# ------------------------------------------------------------------------------------------- data sources
def test_repeats_lengthen_the_epoch_without_copying_files(make_config, shapes_dir, concept_dir, tmp_path):
    config = make_config("data.repeats=2", f"dreambooth.instance_data_dir={concept_dir}",
                         "dreambooth.instance_repeats=3")  # fmt: skip
    before = listing(shapes_dir, concept_dir)
    data = prepare(config, tmp_path)
    items = data.train.items
    assert len(items) == 12 * 2 + 3 * 3 == data.report.epoch_items
    assert data.report.sources["data"].kept == 12 and data.report.sources["instance"].repeats == 3
    # Repeats are positions of the same item: one file, one image hash (one cache entry), read once per position.
    assert all(items[p] == items[p + 12] for p in range(12))
    assert all(items[24 + i] == items[27 + i] == items[30 + i] for i in range(3))
    assert len({item.index for item in items}) == 15
    assert listing(shapes_dir, concept_dir) == before
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.suffix == ".png"]
    sampler = BucketBatchSampler(data.train.buckets, 4, seed=0)
    assert len(sampler) == 9 and sorted(p for batch in sampler for _, p in batch) == list(range(33))
    # Each repeat has its own keyed draws: flip, crop, caption dropout, noise and timestep differ.
    pairs = [(p, p + 12) for p in range(12)] + [(24 + i, 24 + i + 3 * r) for i in range(3) for r in (1, 2)]
    dataset = TextImageDataset(data.train.source, items, data.train.sizes, build_tokenizer(), random_flip=True,
                               caption_dropout=0.3)  # fmt: skip
    assert any(not torch.equal(dataset[(0, a)]["pixel_values"], dataset[(0, b)]["pixel_values"]) for a, b in pairs)
    assert any(dataset.choices(0, a, ["x"])[0] != dataset.choices(0, b, ["x"])[0] for a, b in pairs)
    draws = draw(torch.tensor([[0, p] for pair in pairs for p in pair]), (4, 4, 4), 1000, seed=0)
    assert all(not torch.equal(draws.noise[2 * i], draws.noise[2 * i + 1]) for i in range(len(pairs)))
    assert not torch.equal(draws.timesteps[0::2], draws.timesteps[1::2])


def test_instance_prompt_replaces_the_folder_captions(make_config, concept_dir, tmp_path):
    data = prepare(make_config(f"dreambooth.instance_data_dir={concept_dir}", f"dreambooth.instance_prompt={PROMPT}"),
                   tmp_path)  # fmt: skip
    assert [item.captions for item in data.train.items[12:]] == [[PROMPT]] * 3
    assert not any("cyan" in item.captions[0] for item in data.train.items[:12])  # the main source keeps its own
    own = prepare(make_config(f"dreambooth.instance_data_dir={concept_dir}"), tmp_path)
    assert all("cyan" in item.captions[0] for item in own.train.items[12:])
    # A folder of bare images needs the prompt: without it every instance item is bad, and the error says which.
    plain = image_folder(tmp_path / "plain", sorted(concept_dir.glob("*.png")))
    only = ["data.train_data_dir=null", f"dreambooth.instance_data_dir={plain}"]
    with pytest.raises(ValueError, match=r"(?s)100.0% of the instance items are bad.*missing_caption"):
        prepare(make_config(*only), tmp_path)
    data = prepare(make_config(*only, f"dreambooth.instance_prompt={PROMPT}"), tmp_path)
    assert len(data.train.items) == 3 and list(data.report.sources) == ["instance"]
    with pytest.raises(ValueError, match=r"`data.validation_split`.*set `data.validation_data_dir`"):
        prepare(make_config(*only, f"dreambooth.instance_prompt={PROMPT}", "data.validation_split=0.3"), tmp_path)
    # A bad instance file is skipped and counted under its source.
    (plain / "zz-broken.png").write_bytes(os.urandom(500))
    data = prepare(make_config(f"dreambooth.instance_data_dir={plain}", f"dreambooth.instance_prompt={PROMPT}",
                               "data.max_bad_fraction=0.3"), tmp_path)  # fmt: skip
    assert dict(data.report.bad) == {"corrupt": 1} and data.report.examples["corrupt"] == ["instance:zz-broken.png"]
    assert dict(data.report.sources["instance"].bad) == {"corrupt": 1} and len(data.train.items) == 15
    assert "source   instance" in data.report.format()


def test_class_items_carry_prior_loss_weight_in_batches(make_config, shapes_dir, concept_dir, tmp_path):
    user = sorted((shapes_dir / "validation").glob("*.png"))
    class_dir = image_folder(tmp_path / "class", user, captions=[f"a shape number {i}" for i in range(4)])
    before = listing(class_dir)
    config = make_config("data.train_data_dir=null", f"dreambooth.instance_data_dir={concept_dir}",
                         "dreambooth.instance_repeats=2", "dreambooth.with_prior_preservation=true",
                         f"dreambooth.class_data_dir={class_dir}", "dreambooth.num_class_images=3",
                         "dreambooth.prior_loss_weight=0.25", "data.cache_latents=true", "data.center_crop=true",
                         "data.cache_text_embeddings=true", f"data.cache_dir={tmp_path / 'cache'}",
                         "training.train_batch_size=3")  # fmt: skip
    trainer = Trainer(config)  # 4 class images >= 3: nothing is generated
    assert listing(class_dir) == before
    data = trainer.loaders.data
    class_items = data.train.items[6:]  # the first 3 of the 4 images, in sorted order, with their own captions
    assert [data.train.source.file(item.index).name for item in class_items] == [f"user-{i}.png" for i in range(3)]
    assert [item.captions for item in class_items] == [[f"a shape number {i}"] for i in range(3)]
    expected = {p: 1.0 if p < 6 else 0.25 for p in range(9)}
    seen = {}
    trainer.sampler.start_epoch(0)
    for batch in trainer.train_loader:  # the latent- and text-cache path
        assert "latent_mean" in batch and "encoder_hidden_states" in batch
        seen.update(zip(batch["keys"][:, 1].tolist(), batch["loss_weights"].tolist(), strict=True))
    assert seen == expected
    pixels = TextImageDataset(data.train.source, data.train.items, data.train.sizes, trainer.tokenizer)
    batch = collate([pixels[(0, p)] for p in range(9)])  # the pixel path
    assert "pixel_values" in batch and batch["loss_weights"].tolist() == [expected[p] for p in range(9)]


def test_zero_prior_loss_weight_class_items_do_not_change_the_update(make_config, shapes_dir, concept_dir, tmp_path):
    user = sorted((shapes_dir / "validation").glob("*.png"))[:3]
    class_a = image_folder(tmp_path / "class-a", user, captions=["a shape"] * 3)
    class_b = image_folder(tmp_path / "class-b", user, captions=["a shape"] * 3, transform=ImageOps.invert)

    def trainer(class_dir: Path, name: str) -> Trainer:
        return Trainer(make_config("data.train_data_dir=null", f"dreambooth.instance_data_dir={concept_dir}",
                                   "dreambooth.with_prior_preservation=true", f"dreambooth.class_data_dir={class_dir}",
                                   "dreambooth.num_class_images=3", "dreambooth.prior_loss_weight=0",
                                   "training.train_batch_size=6", "training.max_train_steps=1",
                                   output_dir=tmp_path / name))  # fmt: skip

    # Two runs whose class images differ in every pixel train the same UNet when the class weight is 0.
    a, b = trainer(class_a, "a"), trainer(class_b, "b")
    a.train()
    b.train()
    assert all(torch.equal(x, y) for x, y in zip(a.model.parameters(), b.model.parameters(), strict=True))

    def gradients(batch: dict) -> torch.Tensor:
        b.optimizer.zero_grad(set_to_none=True)
        b.forward_backward(batch)
        return torch.cat([p.grad.flatten() for p in b.model.parameters() if p.grad is not None])

    # The control: with weight 1 the same change of the class pixels does change the gradients.
    batch = next(iter(b.train_loader))
    is_class = batch["loss_weights"] == 0
    assert int(is_class.sum()) == 3 and len(is_class) == 6
    other = {**batch, "pixel_values": batch["pixel_values"].clone()}
    other["pixel_values"][is_class] *= -1
    assert torch.equal(gradients(batch), gradients(other))
    ones = torch.ones_like(batch["loss_weights"])
    assert not torch.equal(gradients({**batch, "loss_weights": ones}), gradients({**other, "loss_weights": ones}))


# ---------------------------------------------------------------------------------------- class images
def test_class_images_are_deterministic_and_resumable(tiny_model_dir, make_config, concept_dir, tmp_path):
    def config(folder: Path):
        instance = f"dreambooth.instance_data_dir={concept_dir}"
        return make_config(instance, *CLASS, f"dreambooth.class_data_dir={folder}")

    first = tmp_path / "first"
    assert generate(tiny_model_dir, config(first)) == 5
    names = [f"class-{i:05d}" for i in range(5)]
    assert sorted(p.name for p in first.iterdir()) == sorted(f"{n}.{s}" for n in names for s in ("json", "png", "txt"))
    images = [(first / f"{n}.png").read_bytes() for n in names]
    assert len(set(images)) == 5  # one seed per image
    params = json.loads((first / "class-00003.json").read_text())
    assert params["seed"] == class_image_seed(0, 3) and params["prompt"] == "a shape" and params["height"] == 32
    assert params["num_inference_steps"] == 2 and params["scheduler"] and params["versions"]["torch"]
    assert (first / "class-00003.txt").read_text() == "a shape"
    # A fresh folder gives the same bytes.
    assert generate(tiny_model_dir, config(tmp_path / "second"), unet_training=False) == 5
    assert [(tmp_path / "second" / f"{n}.png").read_bytes() for n in names] == images
    # After a kill (here: one image and its parameters gone), a rerun writes only it, identical to before.
    (first / "class-00002.png").unlink()
    (first / "class-00002.json").unlink()
    kept = {k: v for k, v in listing(first).items() if "class-00002" not in k}
    assert generate(tiny_model_dir, config(first)) == 1
    assert (first / "class-00002.png").read_bytes() == images[2]
    assert {k: v for k, v in listing(first).items() if "class-00002" not in k} == kept
    assert generate(tiny_model_dir, config(first)) == 0


def test_user_class_images_count_and_stay_untouched(tiny_model_dir, make_config, shapes_dir, concept_dir, tmp_path):
    folder = image_folder(tmp_path / "class", sorted((shapes_dir / "validation").glob("*.png"))[:2], ["mine"] * 2)
    before = listing(folder)
    config = make_config(f"dreambooth.instance_data_dir={concept_dir}", *CLASS, f"dreambooth.class_data_dir={folder}",
                         "dreambooth.num_class_images=4")  # fmt: skip
    assert generate(tiny_model_dir, config) == 2
    assert {k: v for k, v in listing(folder).items() if k in before} == before
    assert sorted(p.name for p in folder.glob("*.png")) == ["class-00000.png", "class-00001.png", "user-0.png",
                                                           "user-1.png"]  # fmt: skip
    data = prepare(config, tmp_path)
    assert data.report.sources["class"].kept == 4


def test_class_image_errors_name_the_key(tiny_model_dir, make_config, shapes_dir, concept_dir, tmp_path):
    user = sorted((shapes_dir / "validation").glob("*.png"))[:2]
    base = [f"dreambooth.instance_data_dir={concept_dir}", "dreambooth.with_prior_preservation=true",
            "dreambooth.num_class_images=3", "dreambooth.class_inference_steps=2"]  # fmt: skip
    short = image_folder(tmp_path / "short", user, ["mine"] * 2)
    before = listing(short)
    with pytest.raises(ValueError, match=r"`dreambooth.class_prompt` must be set to generate the 1 missing class "
                                         r"images, got None.*holds 2 of the 3"):  # fmt: skip
        generate(tiny_model_dir, make_config(*base, f"dreambooth.class_data_dir={short}"))
    assert listing(short) == before
    listed = image_folder(tmp_path / "listed", user)
    rows = [json.dumps({"file_name": f"user-{i}.png", "text": "a shape"}) for i in range(2)]
    (listed / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=r"(?s)`dreambooth.class_data_dir` .* metadata.jsonl and holds 2 of the 3.*"
                                         r"lower `dreambooth.num_class_images` to 2"):  # fmt: skip
        generate(tiny_model_dir, make_config(*base, f"dreambooth.class_data_dir={listed}", "dreambooth.class_prompt=x"))  # fmt: skip
    enough = make_config(*base, f"dreambooth.class_data_dir={listed}", "dreambooth.num_class_images=2")
    assert generate(tiny_model_dir, enough) == 0 and len(prepare(enough, tmp_path).train.items) == 12 + 3 + 2
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "class-00000.txt").write_text("my notes")
    with pytest.raises(FileExistsError, match="class-00000.txt"):
        generate(tiny_model_dir, make_config(*base, f"dreambooth.class_data_dir={foreign}",
                                             "dreambooth.num_class_images=1", "dreambooth.class_prompt=a shape"))  # fmt: skip
    assert [p.name for p in foreign.iterdir()] == ["class-00000.txt"]
    assert (foreign / "class-00000.txt").read_text() == "my notes"


def test_two_processes_share_class_images_and_train_alike(
    tiny_model_dir, make_config, concept_dir, tmp_path, run_two_processes
):
    class_dir = tmp_path / "class"
    # 3 instance images x 2 repeats and 5 class images: 11 items over 2 ranks; 5 missing images in batches of 2.
    overrides = [f"model.pretrained_model_name_or_path={tiny_model_dir}", "data.resolution=32",
                 "training.train_batch_size=2", "training.max_train_steps=2", "training.lr_warmup_steps=0",
                 "checkpointing.checkpointing_steps=1000", "validation.validation_steps=0",
                 f"output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}",
                 f"dreambooth.instance_data_dir={concept_dir}", f"dreambooth.instance_prompt={PROMPT}",
                 "dreambooth.instance_repeats=2", *CLASS, f"dreambooth.class_data_dir={class_dir}",
                 "dreambooth.prior_loss_weight=0.5"]  # fmt: skip
    ranks = run_two_processes("dreambooth_worker.py", overrides)
    # Batches {0, 1} and {4} on rank 0, {2, 3} on rank 1: uneven shares, every image written once.
    assert [r["generated"] for r in ranks] == [[3], [2]]
    assert sorted(p.name for p in class_dir.glob("*.png")) == [f"class-{i:05d}.png" for i in range(5)]
    seen = ranks[0]["seen"] + ranks[1]["seen"]
    assert sorted(p for p, _ in seen) == list(range(11)) and all(r["seen"] for r in ranks)
    assert all(weight == (1.0 if p < 6 else 0.5) for p, weight in seen)
    assert all(r["processes"] == 2 and r["steps"] == 2 and r["items"] == 11 for r in ranks)
    assert ranks[0]["unet_sha256"] == ranks[1]["unet_sha256"] and ranks[0]["loss"] == ranks[1]["loss"]
    # One process makes the same images (same batches, one seeded generator per image).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = make_config(f"dreambooth.instance_data_dir={concept_dir}", *CLASS,
                             f"dreambooth.class_data_dir={tmp_path / 'single'}")  # fmt: skip
        assert generate(tiny_model_dir, single) == 5
    finally:
        torch.set_num_threads(threads)
    for name in (f"class-{i:05d}.png" for i in range(5)):
        assert (tmp_path / "single" / name).read_bytes() == (class_dir / name).read_bytes()


def test_dreambooth_lora_with_prior_preservation_end_to_end(make_config, concept_dir, tmp_path, tiny_model_dir):
    """The whole user path: class images from the base model, instance + class items, a LoRA on the UNet and the
    text encoder, the LoRA file loaded for sampling."""
    from ldm_tune.inference import LDMInference
    from ldm_tune.training import Trainer

    config = make_config("data.train_data_dir=null", f"dreambooth.instance_data_dir={concept_dir}",
                         f"dreambooth.instance_prompt={PROMPT}", "dreambooth.instance_repeats=2", *CLASS,
                         f"dreambooth.class_data_dir={tmp_path / 'class'}", "training.finetune_method=lora",
                         "training.train_text_encoder_lora=true", "training.max_train_steps=2",
                         "dreambooth.prior_loss_weight=0.5", "training.learning_rate=1e-2")  # fmt: skip
    trainer = Trainer(config)
    assert len(list((tmp_path / "class").glob("class-*.png"))) == 5
    weights = Counter(item.weight for item in trainer.train_loader.dataset.items)
    assert weights == {1.0: 3 * 2, 0.5: 5}  # instance items repeated twice, class items at prior_loss_weight
    trainer.train()
    out = Path(config.output_dir)
    pipe = LDMInference.from_pretrained(tiny_model_dir, device="cpu", lora=[out])
    kwargs = {"prompt": PROMPT, "seed": 0, "num_inference_steps": 2, "output_type": "np", "progress": False}
    tuned = pipe.generate(**kwargs)
    pipe.set_lora_scale(0.0)
    assert abs(tuned - pipe.generate(**kwargs)).max() > 0  # the trained LoRA (UNet + text encoder) changes images
