import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_tune.config import load_config
from ldm_tune.data.buckets import BucketBatchSampler, assign_bucket, make_buckets
from ldm_tune.data.images import BadItem, decode_image
from ldm_tune.data.pipeline import prepare_data
from ldm_tune.presets import build_tokenizer


def png(path: Path, size=(48, 48), color=(200, 30, 30), mode="RGB") -> Path:
    Image.new(mode, size, color).save(path)
    return path


def make_bad_corpus(root: Path, good: int = 20) -> dict:
    """An image folder with one file of every bad kind; returns the expected counts per reason."""
    root.mkdir(parents=True)
    rows = [{"file_name": f"good{i}.png", "text": f"a red square {i}"} for i in range(good)]
    for i in range(good):
        png(root / f"good{i}.png")
    rows.append({"file_name": "missing.png", "text": "gone"})
    (root / "empty.png").write_bytes(b"")
    rows.append({"file_name": "empty.png", "text": "zero bytes"})
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "full.png")
    (root / "truncated.png").write_bytes((root / "full.png").read_bytes()[:6000])
    rows.append({"file_name": "truncated.png", "text": "cut short"})
    (root / "corrupt.png").write_bytes(b"\x00" + os.urandom(500))  # \x00: no format's signature
    rows.append({"file_name": "corrupt.png", "text": "noise bytes"})
    png(root / "bomb.png", (300, 300))  # over the test's max_image_pixels of 200 x 200
    rows.append({"file_name": "bomb.png", "text": "bomb"})
    png(root / "small.png", (16, 16))
    rows.append({"file_name": "small.png", "text": "tiny"})
    png(root / "wide.png", (300, 40))
    rows.append({"file_name": "wide.png", "text": "a banner"})
    png(root / "nocap.png")
    rows.append({"file_name": "nocap.png"})
    png(root / "emptycap.png")
    rows.append({"file_name": "emptycap.png", "text": "   "})
    png(root.parent / "outside.png")
    rows.append({"file_name": "../outside.png", "text": "escape"})
    os.symlink(root.parent / "outside.png", root / "link.png")
    rows.append({"file_name": "link.png", "text": "symlink escape"})
    # Repaired, not skipped:
    Image.new("CMYK", (48, 48), (0, 255, 255, 0)).save(root / "cmyk.jpg")
    rgba = Image.new("RGBA", (48, 48), (0, 0, 255, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 24, 48))
    rgba.save(root / "rgba.png")
    Image.new("P", (48, 48), 3).save(root / "palette.png")
    Image.new("LA", (48, 48), (100, 0)).save(root / "la.png")
    Image.fromarray(np.full((48, 48), 30000, dtype=np.uint16)).save(root / "grey16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.new("RGB", (64, 40), (0, 200, 0)).save(root / "rotated.jpg", exif=exif)
    frames = [Image.new("RGB", (48, 48), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:])
    for name in ("cmyk.jpg", "rgba.png", "palette.png", "la.png", "grey16.png", "rotated.jpg", "anim.gif"):
        rows.append({"file_name": name, "text": f"repaired {name}"})
    rows.append({"file_name": "good0.png", "text": " ".join(["long"] * 100)})  # truncated caption: kept
    lines = [json.dumps(r) for r in rows] + ["{not json", json.dumps({"text": "no file name"})]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    expected_bad = {"missing_file": 1, "empty_file": 1, "truncated": 1, "corrupt": 1, "decompression_bomb": 1,
                    "too_small": 1, "extreme_aspect_ratio": 1, "missing_caption": 1, "empty_caption": 1,
                    "path_outside_folder": 2, "malformed_metadata": 2}  # fmt: skip
    return {"bad": expected_bad, "kept": good + 8, "total": len(rows) + 2}


def data_config(*overrides):
    return load_config(None, ["model.pretrained_model_name_or_path=m", *overrides]).data


def test_bad_corpus_report_counts_every_reason(tmp_path):
    expected = make_bad_corpus(tmp_path / "corpus")
    cfg = data_config(f"data.train_data_dir={tmp_path / 'corpus'}", "data.min_image_size=32",
                      "data.max_image_pixels=40000", "data.max_bad_fraction=0.5", "data.resolution=32")  # fmt: skip
    data = prepare_data(cfg, build_tokenizer(), progress=False, cache_dir=tmp_path / "cache")
    report = data.report
    assert dict(report.bad) == expected["bad"]
    assert report.kept == expected["kept"] == len(data.train.items)
    assert report.total == expected["total"]
    for fix in ("converted_cmyk", "transparency_on_white", "converted_p", "sixteen_bit", "exif_rotated",
                "animated_first_frame", "caption_truncated"):  # fmt: skip
        assert report.fixes[fix] >= 1, fix
    text = report.format()
    assert "decompression_bomb" in text and "path_outside_folder" in text and "missing.png" not in text
    # The second scan reads the decode results from the cache and reports the same.
    again = prepare_data(cfg, build_tokenizer(), progress=False, cache_dir=tmp_path / "cache")
    assert dict(again.report.bad) == expected["bad"] and again.report.kept == report.kept


def test_too_many_bad_items_stop_the_run_with_the_report(tmp_path):
    make_bad_corpus(tmp_path / "corpus", good=5)
    cfg = data_config(f"data.train_data_dir={tmp_path / 'corpus'}", "data.max_bad_fraction=0.05")
    with pytest.raises(
        ValueError, match=r"(?s)of the training items are bad, more than `data.max_bad_fraction`.*corrupt"
    ):
        prepare_data(cfg, progress=False, cache_dir=tmp_path / "cache")


def test_repairs_give_the_right_pixels(tmp_path):
    make_bad_corpus(tmp_path / "c", good=1)
    root = tmp_path / "c"
    rgba = np.asarray(decode_image(root / "rgba.png", 10**8))
    assert tuple(rgba[10, 40]) == (255, 255, 255) and tuple(rgba[10, 5]) == (0, 0, 255)  # transparent -> white
    grey = np.asarray(decode_image(root / "grey16.png", 10**8))
    assert abs(int(grey[0, 0, 0]) - round(30000 / 65535 * 255)) <= 1  # scaled, not clipped to 255
    assert decode_image(root / "rotated.jpg", 10**8).size == (40, 64)  # EXIF orientation applied
    fixes = []
    assert np.asarray(decode_image(root / "anim.gif", 10**8, fixes))[0, 0, 0] > 200 and "animated_first_frame" in fixes
    with pytest.raises(BadItem, match="truncated"):
        decode_image(root / "truncated.png", 10**8)


def test_sidecar_captions_and_non_utf8(tmp_path):
    root = tmp_path / "side"
    root.mkdir()
    for name, caption in (("a", b"a red circle"), ("b", b"a blue square"), ("c", b"\xff\xfe bad")):
        png(root / f"{name}.png")
        (root / f"{name}.txt").write_bytes(caption)
    png(root / "d.png")
    (root / "d.caption").write_text("a green cross")
    png(root / "e.png")  # no caption at all
    data = prepare_data(data_config(f"data.train_data_dir={root}", "data.max_bad_fraction=0.5"), progress=False,
                        cache_dir=tmp_path / "cache")  # fmt: skip
    assert sorted(c for item in data.train.items for c in item.captions) == ["a blue square", "a green cross",
                                                                             "a red circle"]  # fmt: skip
    assert dict(data.report.bad) == {"non_utf8_caption": 1, "missing_caption": 1}


def test_pair_list_with_local_paths_csv_and_bad_urls(tmp_path):
    png(tmp_path / "one.png")
    png(tmp_path / "two.png", color=(0, 0, 255))
    rows = [{"image": "one.png", "text": "red"}, {"image_url": str(tmp_path / "two.png"), "text": "blue"},
            {"image": "ftp://example.com/x.png", "text": "ftp"}, {"text": "no image"}]  # fmt: skip
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = prepare_data(data_config(f"data.train_data_file={tmp_path / 'pairs.jsonl'}", "data.max_bad_fraction=0.6"),
                        progress=False, cache_dir=tmp_path / "cache")  # fmt: skip
    assert [i.captions for i in data.train.items] == [["red"], ["blue"]]
    assert dict(data.report.bad) == {"invalid_url": 1, "malformed_metadata": 1}
    (tmp_path / "pairs.csv").write_text("image,text\none.png,red\ntwo.png,blue\n")
    data = prepare_data(data_config(f"data.train_data_file={tmp_path / 'pairs.csv'}"), progress=False,
                        cache_dir=tmp_path / "cache")  # fmt: skip
    assert len(data.train.items) == 2


def test_buckets_cover_the_aspect_range_at_constant_area():
    buckets = make_buckets(512, 64, max_aspect=4.0)
    assert buckets[0] == (512, 512)
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 and max(w, h) / min(w, h) <= 4.0
    assert (768, 320) in buckets and (320, 768) in buckets
    assert buckets[assign_bucket(1600, 900, buckets)] == (640, 384)  # 16:9 -> closest ratio 1.67
    assert buckets[assign_bucket(1000, 1000, buckets)] == (512, 512)


@pytest.mark.parametrize("processes", [1, 2, 3])
def test_bucket_sampler_sees_every_item_once_with_one_bucket_per_batch(processes):
    item_buckets = [i % 3 for i in range(50)]
    sampler = BucketBatchSampler(item_buckets, batch_size=4, seed=1, num_processes=processes)
    epochs = []
    for epoch in range(2):
        sampler.start_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) and len(batches) % processes == 0
        keys = [i for b in batches for _, i in b]
        assert sorted(keys) == list(range(50))  # each item exactly once, no padding
        assert all(len({item_buckets[i] for _, i in b}) == 1 for b in batches)
        assert all(e == epoch for b in batches for e, _ in b)
        epochs.append(keys)
    assert epochs[0] != epochs[1]
    sampler.start_epoch(0)
    assert [i for b in sampler for _, i in b] == epochs[0]  # deterministic given seed and epoch


def test_bucketed_training_batches_have_one_shape(make_config, tmp_path):
    root = tmp_path / "mixed"
    root.mkdir()
    rows = []
    for i, size in enumerate([(64, 64), (96, 48), (48, 96), (64, 64), (100, 50), (50, 100)] * 2):
        png(root / f"{i}.png", size, color=(40 * (i % 6), 100, 50))
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"image {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(rows))
    from ldm_tune.training import Trainer

    config = make_config(f"data.train_data_dir={root}", "data.bucketing=true", "data.bucket_step=16",
                         "data.resolution=32", "training.train_batch_size=2", "training.max_train_steps=6")  # fmt: skip
    trainer = Trainer(config)
    shapes = Counter(tuple(b["pixel_values"].shape[2:]) for b in trainer.train_loader)
    assert len(shapes) == 3 and sum(shapes.values()) == 6  # square, landscape and portrait buckets
    assert trainer.train()["global_step"] == 6


def count_vae_encodes(monkeypatch):
    from diffusers import AutoencoderKL

    calls = Counter()
    original = AutoencoderKL.encode

    def counting(self, x, *args, **kwargs):
        calls["images"] += x.shape[0]
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", counting)
    return calls


def test_caches_encode_once_and_train_like_no_cache(make_config, shapes_dir, tmp_path, monkeypatch):
    import shutil

    from ldm_tune.tracking import read_metrics
    from ldm_tune.training import Trainer

    data = tmp_path / "data"
    shutil.copytree(shapes_dir / "train", data)
    common = [f"data.train_data_dir={data}", "data.center_crop=true", "data.random_flip=true",
              "training.max_train_steps=3", "logging.logging_steps=1", f"data.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    cached = [*common, "data.cache_latents=true", "data.cache_text_embeddings=true"]
    calls = count_vae_encodes(monkeypatch)
    first = Trainer(make_config(*cached, output_dir=tmp_path / "a"))
    assert first.loaders.latents_encoded == 12 and calls["images"] == 24  # 12 images and their flips, once
    assert first.text_encoder is None and first.vae.encoder is None  # not kept in memory while training
    first.train()
    calls.clear()
    second = Trainer(make_config(*cached, output_dir=tmp_path / "b"))
    assert second.loaders.latents_encoded == 0 and second.loaders.texts_encoded == 0 and calls["images"] == 0
    # Same keyed choices and noise: training from the caches gives the losses of training from pixels.
    Trainer(make_config(*common, output_dir=tmp_path / "pixels")).train()
    losses = [
        [r["loss"] for r in read_metrics(tmp_path / run / "metrics.jsonl") if "loss" in r] for run in ("a", "pixels")
    ]
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-4, atol=1e-5)
    png(data / "00003.png", (32, 32), color=(10, 200, 10))  # change one image: exactly it is encoded again
    third = Trainer(make_config(*cached, output_dir=tmp_path / "c"))
    assert third.loaders.latents_encoded == 1


def test_inspect_data_prints_the_report(tiny_model_dir, tmp_path, capsys):
    from ldm_tune.cli import main

    make_bad_corpus(tmp_path / "corpus")
    args = ["inspect-data", f"model.pretrained_model_name_or_path={tiny_model_dir}",
            f"data.train_data_dir={tmp_path / 'corpus'}", "data.max_bad_fraction=0.5", "data.min_image_size=32"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "training data: 41 items, 29 kept" in out and "truncated" in out and "crop sizes: 512x512" in out
    assert main([*args[:-2], "data.max_bad_fraction=0.01"]) == 2
    assert "more than `data.max_bad_fraction`" in capsys.readouterr().err


def test_two_processes_see_every_item_once(tiny_model_dir, shapes_dir, tmp_path, run_two_processes):
    overrides = [f"model.pretrained_model_name_or_path={tiny_model_dir}", f"data.train_data_dir={shapes_dir / 'train'}",
                 f"data.validation_data_dir={shapes_dir / 'validation'}", "data.resolution=32",
                 "training.train_batch_size=5", "training.max_train_steps=2", "validation.validation_steps=1",
                 "data.cache_latents=true", "data.center_crop=true", f"data.cache_dir={tmp_path / 'cache'}",
                 f"output_dir={tmp_path / 'run'}"]  # fmt: skip
    ranks = run_two_processes("two_process_worker.py", overrides)
    assert all(r["processes"] == 2 and r["steps"] == 2 for r in ranks)
    for epoch in ("0", "1"):
        seen = ranks[0]["seen"][epoch] + ranks[1]["seen"][epoch]
        assert sorted(seen) == list(range(ranks[0]["items"]))  # 12 items over 2 ranks: once each, none twice
        assert len(ranks[0]["seen"][epoch]) > 0 and len(ranks[1]["seen"][epoch]) > 0
    assert ranks[0]["best_val_loss"] == ranks[1]["best_val_loss"]  # validation loss gathered over both ranks
    # each rank cached its share of the 12 training + 4 validation latents, none twice
    assert len(list((tmp_path / "cache" / "latents").rglob("*.safetensors"))) == 16


@pytest.fixture
def image_server():
    """A local HTTP server: /red.png, /blue.png, /flaky-<color>.png (a 503 first), anything else 404; counts
    requests per path."""
    import io
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    hits = Counter()
    bodies = {}
    for name, color in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        buffer = io.BytesIO()
        Image.new("RGB", (40, 40), color).save(buffer, format="PNG")
        bodies[f"/{name}.png"] = buffer.getvalue()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            hits[self.path] += 1
            body = bodies.get(self.path.replace("/flaky-", "/"))
            if self.path.startswith("/flaky-") and hits[self.path] == 1:
                body = None  # a 503 on the first request, the image after
            self.send_response(200 if body else 503 if self.path.startswith("/flaky-") else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()


def test_url_list_downloads_once_and_counts_failures(image_server, tmp_path):
    base, hits = image_server
    rows = [{"image": f"{base}/red.png", "text": "red"}, {"image_url": f"{base}/blue.png", "text": "blue"},
            {"image": f"{base}/gone.png", "text": "404"}]  # fmt: skip
    (tmp_path / "urls.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    overrides = [f"data.train_data_file={tmp_path / 'urls.jsonl'}", "data.max_bad_fraction=0.5",
                 "data.download_retries=0"]  # fmt: skip
    with pytest.raises(ValueError, match="private_address"):  # 127.0.0.1 is refused unless allowed
        prepare_data(data_config(*overrides[:2]), progress=False, cache_dir=tmp_path / "cache")
    assert sum(hits.values()) == 0
    allowed = data_config(*overrides, "data.allowed_networks=[127.0.0.0/8]")
    data = prepare_data(allowed, progress=False, cache_dir=tmp_path / "cache")
    assert sorted(c for i in data.train.items for c in i.captions) == ["blue", "red"]
    assert dict(data.report.bad) == {"http_404": 1} and "downloaded 2" in data.report.downloads
    again = prepare_data(allowed, progress=False, cache_dir=tmp_path / "cache")
    assert hits["/red.png"] == hits["/blue.png"] == hits["/gone.png"] == 1  # cached; a 404 is not retried
    assert "reused 1" in again.report.downloads and len(again.train.items) == 2
    # Downloads land in tar shards, not one file per image, and items are read from inside them.
    assert [p.suffix for p in (tmp_path / "cache" / "shards").rglob("*.*") if p.suffix in (".tar", ".png")] == [".tar"]
    colors = {again.train.source.load(item.index)[0].getpixel((5, 5)): item.captions for item in again.train.items}
    assert colors == {(220, 30, 30): ["red"], (30, 30, 220): ["blue"]}


def test_only_the_main_process_retries_transient_failures(image_server, tmp_path):
    """A 503 is tried again by the next run's main process; the other processes take the main process's shards
    as they are (no request), so every process keeps the same items."""
    base, hits = image_server
    rows = [{"image": f"{base}/red.png", "text": "red"}, {"image": f"{base}/flaky-blue.png", "text": "blue"}]
    (tmp_path / "urls.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = data_config(f"data.train_data_file={tmp_path / 'urls.jsonl'}", "data.max_bad_fraction=0.5",
                      "data.download_retries=0", "data.allowed_networks=[127.0.0.0/8]")  # fmt: skip
    first = prepare_data(cfg, progress=False, cache_dir=tmp_path / "cache")
    assert dict(first.report.bad) == {"http_503": 1}
    other = prepare_data(cfg, progress=False, cache_dir=tmp_path / "cache", reuse_failures=True)
    assert hits["/flaky-blue.png"] == 1 and dict(other.report.bad) == {"http_503": 1}
    main = prepare_data(cfg, progress=False, cache_dir=tmp_path / "cache")
    assert hits["/flaky-blue.png"] == 2 and hits["/red.png"] == 1 and not main.report.bad
    assert sorted(c for i in main.train.items for c in i.captions) == ["blue", "red"]


def test_laion_style_parquet_url_list(image_server, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    base, hits = image_server
    table = pa.table({"URL": [f"{base}/red.png", f"{base}/blue.png", None], "TEXT": ["red", "blue", "none"],
                      "WIDTH": [40, 40, 0], "similarity": [0.3, 0.3, 0.1]})  # fmt: skip
    pq.write_table(table, tmp_path / "part-00000.parquet")
    config = data_config(f"data.train_data_file={tmp_path / 'part-00000.parquet'}", "data.image_column=URL",
                         "data.caption_column=TEXT", "data.allowed_networks=[127.0.0.0/8]", "data.max_bad_fraction=0.5")  # fmt: skip
    data = prepare_data(config, progress=False, cache_dir=tmp_path / "cache")
    assert sorted(c for i in data.train.items for c in i.captions) == ["blue", "red"]
    assert dict(data.report.bad) == {"malformed_metadata": 1} and data.report.examples["malformed_metadata"] == [
        "part-00000.parquet:3"
    ]
    assert hits["/red.png"] == hits["/blue.png"] == 1
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match="is not a readable parquet file"):
        prepare_data(data_config(f"data.train_data_file={tmp_path / 'broken.parquet'}"), progress=False,
                     cache_dir=tmp_path / "cache")  # fmt: skip


def test_bucketed_resume_continues_exactly(straight_and_resumed, tmp_path):
    from safetensors.torch import load_file

    root = tmp_path / "mixed"
    root.mkdir()
    rows = []
    for i, size in enumerate([(64, 64), (96, 48), (48, 96), (100, 50), (50, 100), (70, 70)] * 2):
        png(root / f"{i}.png", size, color=(20 * i, 100, 255 - 20 * i))
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"image {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(rows))
    common = [f"data.train_data_dir={root}", "data.bucketing=true", "data.bucket_step=16", "data.random_flip=true",
              "training.train_batch_size=2", "training.max_train_steps=7", "checkpointing.checkpointing_steps=4",
              "training.lr_scheduler=linear"]  # fmt: skip
    straight_and_resumed(common, kill_after=4)
    a, b = (load_file(tmp_path / run / "unet" / "diffusion_pytorch_model.safetensors") for run in ("full", "split"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_an_interrupted_cache_fill_is_reused(make_config, shapes_dir, tmp_path, monkeypatch):
    from ldm_tune.data import cache as cache_module
    from ldm_tune.training import Trainer

    overrides = [f"data.train_data_dir={shapes_dir / 'train'}", "data.center_crop=true", "data.cache_latents=true",
                 f"data.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    original, saved = cache_module.LatentCache.save, []

    def dies_after_five(self, *args):
        if len(saved) == 5:
            raise KeyboardInterrupt
        original(self, *args)
        saved.append(args[0])

    monkeypatch.setattr(cache_module.LatentCache, "save", dies_after_five)
    with pytest.raises(KeyboardInterrupt):
        Trainer(make_config(*overrides, output_dir=tmp_path / "a"))
    monkeypatch.setattr(cache_module.LatentCache, "save", original)
    files = list((tmp_path / "cache" / "latents").rglob("*.safetensors"))
    assert len(files) == 5 and not list((tmp_path / "cache").rglob("*.tmp"))  # complete files only
    trainer = Trainer(make_config(*overrides, output_dir=tmp_path / "b"))
    assert trainer.loaders.latents_encoded == 7  # only what the interrupted run had not written
    assert trainer.train()["global_step"] == 2


def test_cache_files_are_kept_in_memory_up_to_the_budget(tmp_path):
    from ldm_tune.data.cache import LatentCache, TextCache

    texts = TextCache(tmp_path, "f" * 64, memory_mib=1)
    texts.save("a red circle", torch.ones(16, 8))
    assert torch.equal(texts.load("a red circle"), torch.ones(16, 8))
    texts.path("a red circle").unlink()
    assert torch.equal(texts.load("a red circle"), torch.ones(16, 8))  # served from memory once read
    # Over budget, a file is read again every time (nothing of it is held).
    latents = LatentCache(tmp_path, "f" * 64, {"random_flip": False}, memory_mib=0.001)
    big = torch.zeros(4, 32, 32)  # 16 KiB > 1 KiB
    latents.save("ab" * 32, (32, 32), {"mean": big, "std": big.clone()})
    mean, _ = latents.load("ab" * 32, (32, 32), flip=False)
    assert torch.equal(mean, big) and latents.memory.used == 0
    latents.path("ab" * 32, (32, 32)).unlink()
    with pytest.raises(FileNotFoundError):
        latents.load("ab" * 32, (32, 32), flip=False)


def test_an_interrupted_scan_keeps_what_it_decoded(shapes_dir, tmp_path, monkeypatch):
    """The scan of a large corpus writes its cache as it goes: a retry after a failure (or a kill) resumes it."""
    from ldm_tune.config import DataConfig
    from ldm_tune.data import scan

    cfg = DataConfig(train_data_dir=str(shapes_dir / "train"), resolution=32)
    original, calls = scan._decode_facts, []

    def fails_at_the_fifth(source, index):
        calls.append(index)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return original(source, index)

    monkeypatch.setattr(scan, "_decode_facts", fails_at_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(cfg, cache_dir=tmp_path, progress=False, workers=1)
    calls.clear()
    monkeypatch.setattr(scan, "_decode_facts", lambda source, index: calls.append(index) or original(source, index))
    data = prepare_data(cfg, cache_dir=tmp_path, progress=False, workers=1)
    assert len(data.train.items) == 12 and len(calls) == 12 - 4  # the 4 decoded before the failure were kept


def test_lazy_verification_starts_without_decoding_and_skips_bad_images_when_loaded(make_config, shapes_dir,
                                                                                    tmp_path, monkeypatch):  # fmt: skip
    import shutil

    from ldm_tune.data import sources
    from ldm_tune.training import Trainer

    root = tmp_path / "lazy"
    shutil.copytree(shapes_dir / "train", root)
    (root / "broken.png").write_bytes(b"not a png")
    png(root / "tiny.png", (4, 4))
    with open(root / "metadata.jsonl", "a") as handle:
        handle.write("\n" + json.dumps({"file_name": "broken.png", "text": "broken"}))
        handle.write("\n" + json.dumps({"file_name": "tiny.png", "text": "tiny"}) + "\n")
    decodes = []
    original = sources.decode_image
    monkeypatch.setattr(sources, "decode_image", lambda *a, **k: decodes.append(a[0]) or original(*a, **k))
    config = make_config(f"data.train_data_dir={root}", "data.verify=lazy", "data.min_image_size=16",
                         "training.train_batch_size=14", "training.max_train_steps=1")  # fmt: skip
    trainer = Trainer(config)
    assert decodes == [] and len(trainer.train_loader.dataset) == 14  # no image opened before training
    batch = next(iter(trainer.train_loader))
    assert len(batch["keys"]) == 12 and sorted(batch["skipped"]) == ["corrupt", "too_small"]  # skipped, not replaced
    trainer.train()
    assert trainer.state.skipped_by_reason == {"corrupt": 1, "too_small": 1}
    with pytest.raises(ValueError, match="`data.verify: lazy` does not read image sizes"):
        make_config("data.verify=lazy", "data.bucketing=true")
