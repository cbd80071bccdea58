import io
import itertools
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from ldm_tune.config import load_config
from ldm_tune.data.dataset import TextImageDataset
from ldm_tune.data.streaming import StreamingDataset, expand_shards, webdataset_samples
from ldm_tune.data.tar_reader import safe_member_name
from ldm_tune.presets import build_tokenizer


def image_bytes(size=(40, 40), color=(200, 40, 40), fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def add(tar, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_shards(folder: Path, shards: int = 3, per_shard: int = 5) -> dict:
    """Tar shards of good samples (png+txt or jpg+json, some landscape) plus one of each bad kind in shard 0."""
    folder.mkdir(parents=True, exist_ok=True)
    good = 0
    for s in range(shards):
        with tarfile.open(folder / f"shard-{s:03d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"s{s}/{i:04d}"
                if i % 2:
                    add(tar, f"{key}.jpg", image_bytes((64, 32), fmt="JPEG"))
                    add(tar, f"{key}.json", json.dumps({"caption": f"wide {s} {i}"}).encode())
                else:
                    add(tar, f"{key}.png", image_bytes())
                    add(tar, f"{key}.txt", f"square {s} {i}".encode())
                good += 1
            if s == 0:
                add(tar, "../escape.png", image_bytes())
                add(tar, "../escape.txt", b"escape")
                add(tar, "/abs/x.png", image_bytes())
                add(tar, "/abs/x.txt", b"absolute")
                add(tar, "broken.png", b"not a png")
                add(tar, "broken.txt", b"broken")
                add(tar, "nocap.png", image_bytes())
    return {"good": good, "bad": {"unsafe_tar_member": 2, "corrupt": 1, "missing_caption": 1}}


def data_cfg(*overrides):
    return load_config(None, ["model.pretrained_model_name_or_path=m", "training.max_train_steps=1", *overrides]).data


def test_member_names_that_leave_the_archive_are_unsafe():
    assert safe_member_name("a/b/0001") and safe_member_name("0001")
    for name in ("../x", "a/../../x", "/etc/passwd", "C:/x", "a\\..\\x"):
        assert not safe_member_name(name), name


def test_shards_stream_every_good_sample_once_and_count_the_bad(tmp_path):
    expected = make_shards(tmp_path / "shards")
    shards = expand_shards(str(tmp_path / "shards" / "shard-{000..002}.tar"))
    assert len(shards) == 3
    cfg = data_cfg(
        f"data.train_shards={shards[0]}", "data.resolution=32", "data.bucketing=true", "data.bucket_step=16"
    )
    transforms = TextImageDataset(None, [], [], build_tokenizer(), center_crop=True)
    stream = StreamingDataset(lambda e: webdataset_samples(shards, "text", 0, e), transforms, cfg, batch_size=4)
    for epoch in (0, 1):
        stream.start_epoch(epoch)
        batches = list(stream)
        keys = [int(k) for b in batches for k in b["keys"][:, 1]]
        assert len(keys) == len(set(keys)) == expected["good"]
        assert dict(Counter(r for b in batches for r in b["skipped"])) == expected["bad"]
        filled = [b for b in batches if len(b["keys"])]  # a batch's worth of bad samples comes as an empty batch
        shapes = {tuple(b["pixel_values"].shape[2:]) for b in filled}
        assert len(shapes) == 2 and all(b["pixel_values"].shape[0] <= 4 for b in filled)  # one bucket per batch
        assert all(e == epoch for b in batches for e in b["keys"][:, 0].tolist())


def test_shard_specs_are_checked(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        expand_shards(str(tmp_path / "none-{0..1}.tar"))
    with pytest.raises(ValueError, match="private_address"):
        expand_shards("http://127.0.0.1:9/shard-{0..1}.tar")
    with pytest.raises(ValueError, match="invalid_url"):
        expand_shards("ftp://example.com/a.tar")


def test_training_from_shards_counts_skipped_samples(make_config, tmp_path):
    from ldm_tune.tracking import read_metrics
    from ldm_tune.training import Trainer

    make_shards(tmp_path / "shards")
    config = make_config("data.train_data_dir=null", f"data.train_shards={tmp_path / 'shards'}/shard-{{000..002}}.tar",
                         "training.train_batch_size=4", "training.max_train_steps=5", "logging.logging_steps=1",
                         "checkpointing.checkpointing_steps=2")  # fmt: skip
    summary = Trainer(config).train()
    assert summary["global_step"] == 5
    last = [r for r in read_metrics(Path(config.output_dir) / "metrics.jsonl") if "loss" in r][-1]
    assert last["skipped_by_reason"]["unsafe_tar_member"] >= 2
    # resume mid-epoch from the step-4 checkpoint reads past the consumed batches and ends at the same step
    resumed = Trainer(make_config(*[f"{k}" for k in ()], "data.train_data_dir=null",
                                  f"data.train_shards={tmp_path / 'shards'}/shard-{{000..002}}.tar",
                                  "training.train_batch_size=4", "training.max_train_steps=6",
                                  "checkpointing.resume_from_checkpoint=latest"))  # fmt: skip
    assert resumed.train()["global_step"] == 6


def test_hf_streaming_dataset(make_config, shapes_dir, tmp_path):
    import datasets

    from ldm_tune.training import Trainer

    records = [json.loads(line) for line in (shapes_dir / "train" / "metadata.jsonl").read_text().splitlines()]
    dataset = datasets.Dataset.from_dict(
        {"image": [str(shapes_dir / "train" / r["file_name"]) for r in records], "text": [r["text"] for r in records]}
    ).cast_column("image", datasets.Image())
    (tmp_path / "hf").mkdir()
    dataset.to_parquet(str(tmp_path / "hf" / "train.parquet"))
    config = make_config("data.train_data_dir=null", f"data.dataset_name={tmp_path / 'hf'}", "data.streaming=true",
                         "training.train_batch_size=4", "training.max_train_steps=4")  # fmt: skip
    trainer = Trainer(config)
    trainer.sampler.start_epoch(0)
    seen = [int(k) for b in trainer.train_loader for k in b["keys"][:, 1]]
    assert len(seen) == len(set(seen)) == len(records)
    assert trainer.train()["global_step"] == 4


def test_two_processes_share_a_stream_without_duplicates(tiny_model_dir, tmp_path, run_two_processes):
    expected = make_shards(tmp_path / "shards", shards=4, per_shard=5)
    overrides = [f"model.pretrained_model_name_or_path={tiny_model_dir}",
                 f"data.train_shards={tmp_path / 'shards'}/shard-{{000..003}}.tar", "data.resolution=32",
                 "training.train_batch_size=3", "training.max_train_steps=2", f"output_dir={tmp_path / 'run'}"]  # fmt: skip
    ranks = run_two_processes("two_process_worker.py", overrides)
    for epoch in ("0", "1"):
        seen = ranks[0]["seen"][epoch] + ranks[1]["seen"][epoch]
        assert len(seen) == len(set(seen)) == expected["good"]  # 20 samples over 2 ranks: each once
        assert ranks[0]["seen"][epoch] and ranks[1]["seen"][epoch]
    assert all(r["steps"] == 2 and r["processes"] == 2 for r in ranks)


def test_inspect_data_reads_a_stream(tiny_model_dir, tmp_path, capsys):
    from ldm_tune.cli import main

    expected = make_shards(tmp_path / "shards")
    code = main(["inspect-data", f"model.pretrained_model_name_or_path={tiny_model_dir}", "training.max_train_steps=1",
                 f"data.train_shards={tmp_path / 'shards'}/shard-{{000..002}}.tar", "data.resolution=32"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert f"{expected['good'] + 4} samples, {expected['good']} kept, 4 skipped" in out and "unsafe_tar_member" in out


def test_a_stream_of_bad_samples_stops_with_the_reasons(make_config, tmp_path):
    """Every sample bad: the run stops after `max_empty_batches` empty micro-batches, naming why, not loops forever."""
    from ldm_tune.training import Trainer

    (tmp_path / "bad").mkdir()
    with tarfile.open(tmp_path / "bad" / "shard-000.tar", "w") as tar:
        for i in range(40):
            add(tar, f"{i:04d}.png", b"not a png")
            add(tar, f"{i:04d}.txt", b"a caption")
    config = make_config("data.train_data_dir=null", f"data.train_shards={tmp_path / 'bad' / 'shard-000.tar'}",
                         "training.train_batch_size=4", "training.max_train_steps=3", "data.max_empty_batches=5")  # fmt: skip
    with pytest.raises(ValueError, match=r"5 micro-batches in a row held no usable item.*step 0.*corrupt: 20"):
        Trainer(config).train()


# ------------------------------------------------------------------------------------- resuming a stream exactly
def shard_stream(shards: list[str], batch_size: int = 3) -> StreamingDataset:
    """A bucketed stream over the shards with keyed flips and caption dropout, as the trainer builds it."""
    cfg = data_cfg(
        f"data.train_shards={shards[0]}", "data.resolution=32", "data.bucketing=true", "data.bucket_step=16"
    )
    transforms = TextImageDataset(None, [], [], build_tokenizer(), random_flip=True, caption_dropout=0.3)

    def samples(epoch, start=None):
        return webdataset_samples(shards, "text", 0, epoch, start)

    return StreamingDataset(samples, transforms, cfg, batch_size=batch_size, positions=True)


def assert_same_batches(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert a.keys() == b.keys() and a["skipped"] == b["skipped"]
        assert all(torch.equal(a[k], b[k]) for k in a if k != "skipped"), a["keys"]


def test_a_stream_resumes_at_its_position_without_reading_consumed_samples(tmp_path, monkeypatch):
    """Cut after every batch: the resumed stream yields the rest exactly, opens no earlier shard and builds (decodes)
    only the samples still pending in the bucket buffers and those after the position, never a consumed one."""
    import ldm_tune.data.streaming as streaming

    make_shards(tmp_path / "shards", shards=4)
    shards = expand_shards(str(tmp_path / "shards" / "shard-{000..003}.tar"))
    opened, built = [], []
    read_shard, item = streaming.read_shard, StreamingDataset._item
    monkeypatch.setattr(streaming, "read_shard", lambda url, *a: opened.append(url) or read_shard(url, *a))
    monkeypatch.setattr(StreamingDataset, "_item", lambda self, key, *a: built.append(key) or item(self, key, *a))
    straight = shard_stream(shards)
    straight.start_epoch(1)
    expected, every_read = list(straight), list(built)
    order, pending_seen, mid_shard_seen = streaming.shard_order(shards, 0, 1), 0, 0
    for cut in range(1, len(expected) + 1):
        first = shard_stream(shards)
        first.start_epoch(1)
        built.clear()
        head = list(itertools.islice(iter(first), cut))
        state, read_before = first.state_dict(), len(built)
        assert (state["epoch"], state["batches"]) == (1, cut)
        pending = [raw[0] for _, raws in state["buffers"] for raw in raws]
        pending_seen, mid_shard_seen = pending_seen + len(pending), mid_shard_seen + (state["source"]["offset"] > 0)
        opened.clear(), built.clear()
        resumed = shard_stream(shards)
        resumed.load_state_dict(state)
        assert_same_batches(head + list(resumed), expected)
        assert opened == order[state["source"]["shard"] :], cut  # earlier shards are not opened
        assert built == pending + every_read[read_before:], cut  # consumed samples are not read into images again
    assert pending_seen and mid_shard_seen  # the cuts did fall with samples pending and inside a shard


def make_hf_parquet(folder: Path, files: int = 3, rows: int = 7) -> None:
    """A Hugging Face dataset of `files` parquet files (one stream part each): square and wide images, and one
    corrupt image and one missing caption in the first file."""
    import datasets

    folder.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        images = [image_bytes((64, 32) if i % 2 else (40, 40), (30 * i, 20 * f, 90)) for i in range(rows)]
        captions = [f"file {f} row {i}" for i in range(rows)]
        if f == 0:
            images[2], captions[4] = b"not an image", None
        table = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in images], "text": captions},
                                           features=datasets.Features({"image": datasets.Image(),
                                                                       "text": datasets.Value("string")}))  # fmt: skip
        table.to_parquet(str(folder / f"train-{f:05d}-of-{files:05d}.parquet"))


def test_a_hugging_face_stream_resumes_at_its_position_without_decoding_consumed_rows(tmp_path, monkeypatch):
    """As for shards: cut after every batch, the resumed stream yields the rest exactly; rows before the position
    are read past as bytes, never built (decoded) again, and earlier data files are not opened."""
    import datasets

    from ldm_tune.data import streaming

    make_hf_parquet(tmp_path / "hf")
    monkeypatch.setattr(streaming.HFStreamSamples, "SHUFFLE_BLOCK", 4)  # several blocks per file
    cfg = data_cfg(f"data.dataset_name={tmp_path / 'hf'}", "data.streaming=true", "data.resolution=32",
                   "data.bucketing=true", "data.bucket_step=16")  # fmt: skip
    transforms = TextImageDataset(None, [], [], build_tokenizer(), random_flip=True, caption_dropout=0.3)
    opened, built = [], []
    shard, item = datasets.IterableDataset.shard, StreamingDataset._item
    monkeypatch.setattr(
        datasets.IterableDataset, "shard", lambda self, **k: opened.append(k["index"]) or shard(self, **k)
    )
    monkeypatch.setattr(StreamingDataset, "_item", lambda self, key, *a: built.append(key) or item(self, key, *a))

    def stream():
        return StreamingDataset(lambda epoch, start=None: streaming.hf_streaming_samples(cfg, 0, epoch, start),
                                transforms, cfg, batch_size=3, positions=True)  # fmt: skip

    straight = stream()
    straight.start_epoch(1)
    expected, every_read = list(straight), list(built)
    assert sum(len(b["keys"]) for b in expected) == 19 and sum(len(b["skipped"]) for b in expected) == 2
    assert [k for k in every_read if k.startswith("part0:")] != [f"part0:{i}" for i in range(7)]  # shuffled
    order = streaming.shard_order([0, 1, 2], 0, 1)
    for cut in range(1, len(expected) + 1):
        first = stream()
        first.start_epoch(1)
        built.clear()
        head = list(itertools.islice(iter(first), cut))
        state, read_before = first.state_dict(), len(built)
        pending = [raw[0] for _, raws in state["buffers"] for raw in raws]
        opened.clear(), built.clear()
        resumed = stream()
        resumed.load_state_dict(state)
        assert_same_batches(head + list(resumed), expected)
        assert opened == order[state["source"]["shard"] :], cut
        assert built == pending + every_read[read_before:], cut


def test_a_killed_streamed_run_resumes_exactly(straight_and_resumed, tmp_path):
    """Killed mid-epoch with samples pending in the bucket buffers, resumed: the same losses and the same UNet."""
    import torch
    from safetensors.torch import load_file

    from ldm_tune.tracking import read_metrics

    make_shards(tmp_path / "shards")
    overrides = ["data.train_data_dir=null", f"data.train_shards={tmp_path / 'shards'}/shard-{{000..002}}.tar",
                 "data.bucketing=true", "data.bucket_step=16", "data.random_flip=true", "training.train_batch_size=3",
                 "training.max_train_steps=8", "checkpointing.checkpointing_steps=3", "logging.logging_steps=1"]  # fmt: skip
    full, split = straight_and_resumed(overrides, kill_after=3)
    stream = torch.load(split / "checkpoint-3" / "custom_checkpoint_0.pkl", weights_only=False)["stream"]
    assert stream["source"]["offset"] > 0 and any(raws for _, raws in stream["buffers"]), stream["source"]

    def losses(folder):
        return {r["step"]: r["loss"] for r in read_metrics(folder / "metrics.jsonl") if "loss" in r}

    assert losses(split) == pytest.approx(losses(full), rel=1e-6, abs=1e-9) and len(losses(full)) == 8
    name = "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(full / name), load_file(split / name)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_two_processes_resume_a_killed_stream_exactly(tiny_model_dir, tmp_path, run_two_processes):
    """Under 2 processes the main process's stream position is what the checkpoint records: same losses, same UNet."""
    from safetensors.torch import load_file

    from ldm_tune.tracking import read_metrics

    make_shards(tmp_path / "shards", shards=4)
    overrides = [f"model.pretrained_model_name_or_path={tiny_model_dir}", "data.resolution=32",
                 f"data.train_shards={tmp_path / 'shards'}/shard-{{000..003}}.tar", "data.bucketing=true",
                 "data.bucket_step=16", "training.train_batch_size=2", "training.max_train_steps=5",
                 "training.lr_warmup_steps=0", "checkpointing.checkpointing_steps=2", "logging.logging_steps=1"]  # fmt: skip
    full, split = tmp_path / "full", tmp_path / "split"
    run_two_processes("stream_resume_worker.py", [*overrides, f"output_dir={full}"], out=tmp_path / "a")
    run_two_processes("stream_resume_worker.py", [*overrides, f"output_dir={split}", "--kill-after=2"],
                      out=tmp_path / "b", fails=True)  # fmt: skip
    stream = torch.load(split / "checkpoint-2" / "custom_checkpoint_0.pkl", weights_only=False)["stream"]
    assert stream["source"]["offset"] > 0 and any(raws for _, raws in stream["buffers"]), stream["source"]
    ranks = run_two_processes("stream_resume_worker.py", [*overrides, f"output_dir={split}",
                              "checkpointing.resume_from_checkpoint=latest"], out=tmp_path / "c")  # fmt: skip
    assert [r["steps"] for r in ranks] == [5, 5]

    def losses(folder):
        return {r["step"]: r["loss"] for r in read_metrics(folder / "metrics.jsonl") if "loss" in r}

    assert losses(split) == pytest.approx(losses(full), rel=1e-6, abs=1e-9) and len(losses(full)) == 5
    name = "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(full / name), load_file(split / name)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_resuming_shards_mid_epoch_with_loader_workers_is_refused(tmp_path):
    """Each loader worker keeps its shards' position to itself: such a resume would repeat or drop samples."""
    from ldm_tune.data.streaming import MainProcessStream

    make_shards(tmp_path / "shards", shards=2)
    shards = expand_shards(str(tmp_path / "shards" / "shard-{000..001}.tar"))
    stream = MainProcessStream(shard_stream(shards), accelerator=None, num_workers=2)
    assert stream.state_dict() == {"workers": 2}
    with pytest.raises(
        ValueError, match=r"`data.dataloader_num_workers` must be 0 .*got 2 now and 2 in the checkpoint"
    ):
        stream.load_state_dict(stream.state_dict(), epoch=0, batches=3)
    with pytest.raises(ValueError, match="got 0 now and 2 in the checkpoint"):
        MainProcessStream(shard_stream(shards), accelerator=None).load_state_dict({"workers": 2}, epoch=0, batches=3)
