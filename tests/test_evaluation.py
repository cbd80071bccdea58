"""The shapes oracle against the generator's own labels, the generator's determinism, and `evaluate` end to end."""

import argparse
import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from ldm_tune.data.shapes import COLORS, NEW_COLORS, make_shapes_dataset
from ldm_tune.evaluation import (
    add_evaluate_parser,
    classify,
    default_prompts,
    evaluate,
    format_table,
    parse_prompt,
    run_evaluate,
    score,
)
from ldm_tune.inference import LDMInference


def _records(root):
    """(image path, metadata record) of every item of both splits."""
    for split in ("train", "validation"):
        for line in (root / split / "metadata.jsonl").read_text().splitlines():
            record = json.loads(line)
            yield root / split / record["file_name"], record


def _accuracies(root, degrade=None):
    hits = []
    for path, record in _records(root):
        image = Image.open(path).convert("RGB")
        color, shape = classify(degrade(image) if degrade else image)
        expected = record["color"], record["shape"]
        hits.append((color == expected[0], shape == expected[1], (color, shape) == expected))
    return np.mean(hits, axis=0), len(hits)


ORACLE_SETS = {
    "64px": dict(n=480, size=64, seed=3),
    "32px": dict(n=240, size=32, seed=4),
    "new-color-64px": dict(n=240, size=64, seed=5, colors=["cyan", "red", "blue"]),
    "new-color-32px": dict(n=120, size=32, seed=6, colors=["cyan", "red", "blue"]),
}


@pytest.mark.parametrize("name", list(ORACLE_SETS))
def test_oracle_reads_the_dataset_labels(name, tmp_path):
    kwargs = ORACLE_SETS[name]
    root = make_shapes_dataset(tmp_path / name, **kwargs)
    colors = {record["color"] for _, record in _records(root)}
    assert colors == set(kwargs.get("colors", COLORS))  # every colour asked for is in the set, cyan included
    (color, shape, joint), count = _accuracies(root)
    assert count == kwargs["n"]
    assert color >= 0.98 and shape >= 0.98 and joint >= 0.98, (color, shape, joint)


def test_oracle_tolerates_blur_and_noise(tmp_path):
    """Generated images are softer than the drawn ones: blur (sigma 0.5-1.2) and noise (std 8) must not matter much."""
    rng = np.random.default_rng(0)

    def degrade(image):
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.2)))
        noisy = np.asarray(image, dtype=np.float64) + rng.normal(0, 8, (*image.size[::-1], 3))
        return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))

    for size, seed in ((64, 7), (32, 8)):
        root = make_shapes_dataset(tmp_path / f"{size}", n=240, size=size, seed=seed, colors=list(COLORS) + ["cyan"])
        (color, shape, joint), _ = _accuracies(root, degrade)
        assert color >= 0.95 and shape >= 0.95 and joint >= 0.95, (size, color, shape, joint)


def _dataset_digest(root):
    """Metadata of both splits and the decoded pixels of every image, hashed."""
    digest = hashlib.sha256()
    for path, record in _records(root):
        digest.update(json.dumps(record, sort_keys=True).encode())
        digest.update(np.asarray(Image.open(path)).tobytes())
    return digest.hexdigest()


def test_dataset_is_deterministic_and_default_unchanged(tmp_path):
    def make(name, **kwargs):
        return make_shapes_dataset(tmp_path / name, n=24, size=32, **kwargs)

    first, again, other = make("a", seed=1), make("b", seed=1), make("c", seed=2)
    for name in ("00000.png", "00005.png", "00011.png"):
        assert (first / "train" / name).read_bytes() == (again / "train" / name).read_bytes()
    for split in ("train", "validation"):
        assert (first / split / "metadata.jsonl").read_text() == (again / split / "metadata.jsonl").read_text()
    assert _dataset_digest(first) != _dataset_digest(other)
    # The default colours are COLORS alone: adding NEW_COLORS changed neither the draws nor the images of a seed.
    assert _dataset_digest(make("explicit", seed=1, colors=list(COLORS))) == _dataset_digest(first)
    assert "cyan" in NEW_COLORS and "cyan" not in COLORS
    default = make_shapes_dataset(tmp_path / "default", n=240, size=16, seed=0)
    assert "cyan" not in {record["color"] for _, record in _records(default)}
    # Pinned from the generator before NEW_COLORS existed: the draws of seed 0 stay those of every earlier run.
    # (Captions only: they depend on numpy's generator alone, while PNG bytes could change with a Pillow upgrade.)
    captions = [record["text"] for _, record in _records(make_shapes_dataset(tmp_path / "pin", n=40, size=16))]
    assert hashlib.sha256("\n".join(captions).encode()).hexdigest() == PINNED_CAPTIONS_SHA256
    asked = make("cyan", seed=1, colors=["cyan", "red"])
    assert {record["color"] for _, record in _records(asked)} == {"cyan", "red"}
    with pytest.raises(ValueError, match="magenta"):
        make("bad", seed=1, colors=["magenta"])


PINNED_CAPTIONS_SHA256 = "698fba07ec59b797d6548ba7771df2b079727e625c51667b76fde41a1c96744f"


@pytest.mark.parametrize("size", [32, 64])
def test_oracle_abstains_on_blank_and_grey_noise(size):
    rng = np.random.default_rng(size)
    for level in (0, 128, 205, 250):
        assert classify(Image.new("RGB", (size, size), (level,) * 3)) == (None, None)
    for _ in range(5):
        uniform = rng.integers(0, 256, (size, size), dtype=np.uint8)
        gaussian = np.clip(rng.normal(128, 40, (size, size)), 0, 255).astype(np.uint8)
        for grey in (uniform, gaussian):
            assert classify(Image.fromarray(np.stack([grey] * 3, axis=-1))) == (None, None)
    # A grey object is found (its shape is named) but has no palette colour.
    image = Image.new("RGB", (size, size), (250, 250, 250))
    ImageDraw.Draw(image).rectangle((size // 4, size // 4, size // 2, size // 2), fill=(90, 90, 90))
    assert classify(image) == (None, "square")


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("a red triangle on a white background", ("red", "triangle")),
        ("a cyan circle", ("cyan", "circle")),
        ("A photo of two Blue Squares.", ("blue", "square")),
        ("a cyan cross on a blue background", ("cyan", "cross")),
        ("a triangle on a purple background", (None, "triangle")),
        ("an orange blob", ("orange", None)),
        ("a yellow and green circle", ("green", "circle")),
        ("a dog on a beige background", (None, None)),
    ],
)
def test_parse_prompt(prompt, expected):
    assert parse_prompt(prompt) == expected


def test_default_prompts_and_score(tmp_path):
    prompts = default_prompts()
    assert len(prompts) == len(COLORS) * 4 and len(set(prompts)) == len(prompts)
    assert [parse_prompt(p) for p in default_prompts(["cyan"], ["cross"], "beige")] == [("cyan", "cross")]
    root = make_shapes_dataset(tmp_path / "data", n=8, size=64, seed=0)
    items = list(_records(root))
    path_a, a = items[0]  # and an item differing from it in both colour and shape:
    path_b, b = next((path, r) for path, r in items if r["color"] != a["color"] and r["shape"] != a["shape"])
    image_a, image_b = Image.open(path_a), Image.open(path_b)
    right = score([image_a, image_a, image_b, image_b], [a["text"], b["text"]], per_prompt=2)
    assert (right["color"], right["shape"], right["joint"], right["images"]) == (1.0, 1.0, 1.0, 4)
    assert right["per_prompt"][1]["predictions"] == [[b["color"], b["shape"]]] * 2
    swapped = score([image_a, image_b, image_b, image_a], [a["text"], b["text"]], per_prompt=2)
    assert (swapped["color"], swapped["shape"], swapped["joint"]) == (0.5, 0.5, 0.5)
    assert swapped["per_prompt"][0]["joint_accuracy"] == 0.5
    with pytest.raises(ValueError, match="must name a colour"):
        score([image_a], ["a dog"], per_prompt=1)
    with pytest.raises(ValueError, match="images"):
        score([image_a], [a["text"]], per_prompt=2)


def test_evaluate_end_to_end_and_cli(tiny_model_dir, tmp_path, capsys):
    prompts = ["a red circle on a white background", "a cyan square"]
    result = evaluate(tiny_model_dir, prompts, guidance_scales=(1, 5), steps=3, images_per_prompt=2, seed=0)
    assert [row["guidance"] for row in result["rows"]] == [1.0, 5.0]
    for row in result["rows"]:
        assert row["images"] == 4 and all(0.0 <= row[key] <= 1.0 for key in ("color", "shape", "joint"))
        assert [len(p["predictions"]) for p in row["per_prompt"]] == [2, 2]
    assert (result["scheduler"], result["steps"], result["prompts"]) == ("ddim", 3, prompts)

    parser = argparse.ArgumentParser()
    add_evaluate_parser(parser.add_subparsers(dest="command"))
    prompt_file, out = tmp_path / "prompts.txt", tmp_path / "eval" / "result.json"
    prompt_file.write_text("# the prompts of this test\n" + "\n".join(prompts) + "\n\n")
    argv = ["evaluate", "--model", str(tiny_model_dir), "--prompts", str(prompt_file), "--guidance", "1", "5",
            "--steps", "3", "--images-per-prompt", "2", "--device", "cpu", "--out", str(out)]  # fmt: skip
    args = parser.parse_args(argv)
    assert (args.suite, args.scheduler, args.seed) == ("shapes", "ddim", 0)
    run_evaluate(args)
    written = json.loads(out.read_text())
    # Same seed, same images: the command reproduces the direct call's predictions exactly.
    assert written["rows"] == result["rows"] and written["prompts"] == prompts
    printed = capsys.readouterr().out
    assert format_table(result) in printed
    assert printed.count("\n| 1 |") + printed.count("\n| 5 |") == 2
    with pytest.raises(FileExistsError):
        run_evaluate(args)  # never overwrites a result


def test_batched_sampling_keeps_each_prompts_noise(tiny_model_dir):
    """`evaluate` samples prompts together with one generator per prompt: a prompt's images must not depend on the
    batch (a DDPM sampler also draws noise at every step)."""
    pipe = LDMInference.from_pretrained(tiny_model_dir, device="cpu", scheduler="ddpm")
    prompts = ["a red circle on a white background", "a blue square on a black background"]

    def sample(numbers):
        generators = [torch.Generator().manual_seed(100 + i) for i in numbers]
        return pipe.generate([prompts[i] for i in numbers], num_inference_steps=4, guidance_scale=5.0,
                             num_images_per_prompt=2, generator=[g for g in generators for _ in range(2)],
                             output_type="np", progress=False)  # fmt: skip

    together = sample([0, 1])
    apart = np.concatenate([sample([0]), sample([1])])
    np.testing.assert_allclose(together, apart, atol=1e-5)
    assert np.abs(together[0] - together[2]).max() > 1e-3  # different prompts and noise give different images
    with pytest.raises(ValueError, match="one generator per image"):
        pipe.generate(prompts, generator=[torch.Generator()] * 3, num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(tiny_model_dir, prompts, steps=2, batch_size=0)


def test_any_colour_dataset_names_no_colour_and_varies_hue(tmp_path):
    root = make_shapes_dataset(tmp_path / "any", n=40, size=32, seed=3, colors=["any"])
    records = list(_records(root))
    assert all(parse_prompt(r["text"])[0] is None and r["shape"] in r["text"] for _, r in records)
    hues = set()
    for path, _ in records:
        pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
        hues.add(tuple(max(map(tuple, pixels), key=lambda rgb: max(rgb) - min(rgb))))  # the most saturated pixel
    assert len(hues) > 30  # a new colour per image
    again = make_shapes_dataset(tmp_path / "again", n=40, size=32, seed=3, colors=["any"])
    assert (root / "train" / "00000.png").read_bytes() == (again / "train" / "00000.png").read_bytes()
    with pytest.raises(ValueError, match="Unknown colors"):
        make_shapes_dataset(tmp_path / "bad", n=4, colors=["teal"])
