import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from ldm_tune.config import load_config
from ldm_tune.data.dataset import TextImageDataset
from ldm_tune.data.streaming import StreamingDataset, expand_shards, safe_member_name, webdataset_samples
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
