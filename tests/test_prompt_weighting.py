"""Prompt emphasis, prompts past 77 tokens and clip_skip (issue 18 item 4): A1111's parser, diffusers parity."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_tune.cli import main
from ldm_tune.png_info import clip_skip_from_a1111, infotext_fields
from ldm_tune.prompt_weighting import (
    _chunk_tokens,
    encode_weighted_prompts,
    is_plain,
    parse_prompt_attention,
)
from ldm_tune.schedulers import make_scheduler


FAST = dict(num_inference_steps=3, height=32, width=32, output_type="np", progress=False)
# ~200 tokens and no comma: the tiny tokenizer knows no words, so each character is one token.
LONG = "a red circle on a blue square " * 7


@pytest.fixture
def pipe(tiny_pipe):
    tiny_pipe.set_scheduler("ddim")
    yield tiny_pipe
    tiny_pipe.set_scheduler("dpm++")


@pytest.fixture
def diffusers_clip_skip(sd_pipeline):
    """diffusers 0.42 reads `text_encoder.text_model.final_layer_norm` for clip_skip; transformers 5 moved it onto
    CLIPTextModel itself. A plain attribute (not a registered submodule, so no module cycle) bridges the two."""
    encoder = sd_pipeline.text_encoder
    object.__setattr__(encoder, "text_model", encoder)
    yield sd_pipeline
    del encoder.__dict__["text_model"]


def generators(seed: int, count: int) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(count)]


def reference(sd_pipeline, pipe, seed: int, **kwargs) -> np.ndarray:
    sd_pipeline.scheduler = make_scheduler("ddim", pipe.base_scheduler_config)
    return sd_pipeline(generator=generators(seed, 1), **kwargs, **FAST).images


# 1. The parser: A1111's own documented examples (modules/prompt_parser.py, parse_prompt_attention doctests).
@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.5730000000000004),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641000000000006),
                (".", 1.1),
            ],
        ),  # fmt: skip
        # Beyond the doctests: nesting, [..], a spaced weight, a stray closer, BREAK.
        ("((a))", [("a", 1.1 * 1.1)]),
        ("[a] b", [("a", 1 / 1.1), (" b", 1.0)]),
        ("(a: 1.5 )", [("a", 1.5)]),
        ("a) b", [("a) b", 1.0)]),
        ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
        ("", [("", 1.0)]),
    ],
)
def test_parser_matches_a1111(prompt, expected):
    assert parse_prompt_attention(prompt) == expected


def test_parentheses_are_emphasis_unless_escaped():
    assert not is_plain("a (red) car") and not is_plain("a \\(red\\) car") and is_plain("a red car, 8k: sharp")
    assert parse_prompt_attention("a \\(red\\) car") == [("a (red) car", 1.0)]
    with pytest.raises(ValueError, match=r"`prompt` has the weight '1\.2\.3', which is not a number"):
        parse_prompt_attention("(a:1.2.3)")


# 2. Parity: a plain prompt of one chunk gives diffusers' exact embeddings and images.
def test_plain_prompt_embeddings_and_images_equal_diffusers(pipe, sd_pipeline):
    ours = pipe.encode_prompt(["a red circle"], ["blurry"], 1, True)
    positive, negative = sd_pipeline.encode_prompt("a red circle", "cpu", 1, True, "blurry")
    assert torch.equal(ours, torch.cat([negative, positive]))
    kwargs = dict(prompt="a red circle", negative_prompt="blurry", guidance_scale=7.5)
    image = pipe.generate(seed=3, **kwargs, **FAST)
    assert np.abs(image - reference(sd_pipeline, pipe, 3, **kwargs)).max() <= 1e-6


def test_emphasis_changes_the_image_and_weight_one_does_not(pipe):
    plain = pipe.generate("a red circle", seed=1, **FAST)
    assert np.array_equal(pipe.generate("a (red:1.0) circle", seed=1, **FAST), plain)
    for emphasised in ("a (red) circle", "a (red:1.5) circle", "a [red] circle"):
        assert np.abs(pipe.generate(emphasised, seed=1, **FAST) - plain).max() > 1e-3, emphasised


def test_weights_scale_tokens_and_keep_the_mean(pipe):
    plain = encode_weighted_prompts(pipe.tokenizer, pipe.text_encoder, ["a red circle"])
    weighted = encode_weighted_prompts(pipe.tokenizer, pipe.text_encoder, ["a (red circle:2)"])
    # Chunk path, weighted then its mean restored: the mean is the plain one's, the hidden states are not.
    torch.testing.assert_close(weighted.mean(), plain.mean())
    assert (weighted - plain).abs().max() > 1e-2


# 3. Long prompts: chunks of 75, nothing truncated; prompts and negatives padded to one chunk count.
def test_long_prompt_is_chunked_not_truncated(pipe, caplog):
    count = len(pipe.tokenizer(LONG, add_special_tokens=False).input_ids)
    assert 150 < count <= 225  # three chunks of 75
    embeds = pipe.encode_prompt([LONG], [""], 1, True)
    assert embeds.shape == (2, 3 * 77, pipe.text_encoder.config.hidden_size)
    base = pipe.generate(LONG, seed=2, **FAST)
    # Tokens past 77 (the old truncation point) change the image.
    assert np.abs(pipe.generate(LONG + "green", seed=2, **FAST) - base).max() > 1e-3
    assert "truncated" not in caplog.text


def test_chunks_break_and_comma_backtrack(pipe):
    tokenizer = pipe.tokenizer
    sizes = [len(ids) for ids, _ in _chunk_tokens(tokenizer, LONG.strip(), 75)]
    assert sizes == [75, 75, len(tokenizer(LONG.strip(), add_special_tokens=False).input_ids) - 150]
    assert [len(ids) for ids, _ in _chunk_tokens(tokenizer, "ab BREAK cd", 75)] == [2, 2]
    # A chunk that fills up within 20 tokens of a comma ends at the comma: "x" * 70 + "," then 10 more.
    chunks = _chunk_tokens(tokenizer, "x" * 70 + ", " + "y" * 10, 75)
    assert [len(ids) for ids, _ in chunks] == [71, 10]
    weights = _chunk_tokens(tokenizer, "a (b:2) [c]", 75)[0][1]
    assert weights == [1.0, 2.0, pytest.approx(1 / 1.1)]  # a, b, c (CLIP drops the spaces)


def test_negative_longer_than_positive_pads_with_the_empty_chunk(pipe):
    embeds = pipe.encode_prompt(["a red circle"], [LONG], 1, True)
    assert embeds.shape[:2] == (2, 3 * 77)
    plain = pipe.encode_prompt(["a red circle"], [""], 1, False)
    empty = pipe.encode_prompt([""], [""], 1, False)
    torch.testing.assert_close(embeds[1, :77], plain[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(embeds[1, 77:154], empty[0], atol=1e-6, rtol=0)
    image = pipe.generate("a red circle", negative_prompt=LONG, seed=0, **FAST)
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()


# 4. clip_skip: diffusers' numbering and parity; negatives skip the same layers (as A1111).
def test_clip_skip_parity_with_diffusers(pipe, diffusers_clip_skip):
    ours = pipe.encode_prompt(["a red circle"], ["blurry"], 1, True, clip_skip=1)
    positive, _ = diffusers_clip_skip.encode_prompt("a red circle", "cpu", 1, True, "blurry", clip_skip=1)
    negative_skipped, _ = diffusers_clip_skip.encode_prompt("blurry", "cpu", 1, False, clip_skip=1)
    assert torch.equal(ours[1:], positive) and torch.equal(ours[:1], negative_skipped)
    kwargs = dict(prompt="a red circle", guidance_scale=1.0)  # no negative: diffusers skips none for it
    image = pipe.generate(seed=4, clip_skip=1, **kwargs, **FAST)
    assert np.abs(image - reference(diffusers_clip_skip, pipe, 4, clip_skip=1, **kwargs)).max() <= 1e-6
    assert np.abs(image - pipe.generate(seed=4, **kwargs, **FAST)).max() > 1e-3
    assert np.array_equal(
        pipe.generate(seed=4, clip_skip=0, **kwargs, **FAST), pipe.generate(seed=4, **kwargs, **FAST)
    )


@pytest.mark.parametrize("value", [-1, True, 1.0, "1", 2])
def test_bad_clip_skip_names_the_argument(pipe, value):
    with pytest.raises(ValueError, match=re.escape("`clip_skip` must be")):
        pipe.generate("a red circle", clip_skip=value, **FAST)


def test_from_png_repeats_clip_skip_and_emphasis(tiny_model_dir, tmp_path):
    common = ("--steps", "3", "--height", "32", "--width", "32", "--seed", "5")
    prompt = "a (red:1.4) circle, [blue] " + LONG
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", prompt, "--clip-skip", "1", *common,
                 "--out", str(tmp_path / "a")]) == 0  # fmt: skip
    original = tmp_path / "a" / "00000-00.png"
    text = Image.open(original).text["parameters"]
    assert clip_skip_from_a1111(infotext_fields(text)["Clip skip"]) == 1  # A1111's "Clip skip: 2"
    assert json.loads((tmp_path / "a" / "00000.json").read_text())["clip_skip"] == 1
    assert main(["generate", "--from-png", str(original), "--out", str(tmp_path / "b")]) == 0
    again = np.asarray(Image.open(tmp_path / "b" / "00000-00.png"))
    assert np.array_equal(again, np.asarray(Image.open(original)))
    assert json.loads((tmp_path / "b" / "00000.json").read_text())["clip_skip"] == 1
    # Without the clip skip the image differs: the round trip did carry it.
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", prompt, *common,
                 "--out", str(tmp_path / "c")]) == 0  # fmt: skip
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "c" / "00000-00.png")), again)
