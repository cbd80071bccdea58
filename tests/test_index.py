"""Pair lists as a memory-mapped Arrow index: built once, checked row by row, never held as Python objects."""

import csv
import json
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ldm_tune.config import load_config
from ldm_tune.data import index as index_module
from ldm_tune.data.pipeline import prepare_data


def data_config(*overrides):
    return load_config(None, ["model.pretrained_model_name_or_path=m", *overrides]).data


def write_images(folder, count: int = 4):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(folder / f"{i}.png")


def write_jsonl(path, rows: int, distinct: int = 4):
    with open(path, "w") as handle:
        for row in range(rows):
            handle.write(json.dumps({"image": f"images/{row % distinct}.png", "text": f"item {row}"}) + "\n")


def hostile_rows():
    """Rows of every kind a list can hold, with the reason each is skipped (None: kept)."""
    return [({"image": "images/0.png", "text": "kept"}, None),
            ({"image": "images/1.png", "text": ["first", "  ", "second"]}, None),
            ({"image": "images/2.png"}, "missing_caption"),
            ({"image": "images/2.png", "text": "   "}, "empty_caption"),
            ({"image": "images/3.png", "text": 7}, "malformed_caption"),
            ({"text": "no image"}, "malformed_metadata"),
            ({"image": "file:///etc/passwd", "text": "x"}, "invalid_url"),
            ({"image": "s3://bucket/key.png", "text": "x"}, "invalid_url")]  # fmt: skip


def test_index_is_built_once_checks_every_row_and_is_memory_mapped(tmp_path, monkeypatch):
    write_images(tmp_path / "images")
    rows = hostile_rows()
    with open(tmp_path / "pairs.jsonl", "w") as handle:
        for row, _ in rows:
            handle.write(json.dumps(row) + "\n")
        handle.write("{not json\n")
    cfg = data_config(f"data.train_data_file={tmp_path / 'pairs.jsonl'}", "data.verify=lazy",
                      "data.max_bad_fraction=0.9")  # fmt: skip
    data = prepare_data(cfg, progress=False, cache_dir=tmp_path / "cache")
    expected = {reason: sum(1 for _, r in rows if r == reason) for _, reason in rows if reason}
    assert dict(data.report.bad) == {**expected, "malformed_metadata": 2}
    assert data.report.examples["malformed_metadata"] == ["pairs.jsonl:6", "pairs.jsonl:9"]
    assert [item.captions for item in data.train.items] == [["kept"], ["first", "second"]]
    rows_of_source = data.train.source.rows
    assert rows_of_source.cache_files and rows_of_source.cache_files[0]["filename"].endswith(".arrow")

    parsed = []
    original = index_module.jsonl_rows
    monkeypatch.setattr(index_module, "jsonl_rows", lambda path: parsed.append(path) or original(path))
    again = prepare_data(cfg, progress=False, cache_dir=tmp_path / "cache")
    assert parsed == [] and again.report.to_dict() == data.report.to_dict()  # the index, not the list, was read
    with open(tmp_path / "pairs.jsonl", "a") as handle:  # a changed list is indexed anew
        handle.write(json.dumps({"image": "images/3.png", "text": "added"}) + "\n")
    changed = prepare_data(cfg, progress=False, cache_dir=tmp_path / "cache")
    assert len(parsed) == 1 and [i.captions for i in changed.train.items][-1] == ["added"]


def test_jsonl_csv_and_parquet_lists_give_the_same_items(tmp_path):
    write_images(tmp_path / "images")
    pairs = [{"image": f"images/{i % 4}.png", "text": f"item {i}"} for i in range(10)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    with open(tmp_path / "pairs.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["image", "text"])
        writer.writeheader()
        writer.writerows(pairs)
    laion = {"URL": [p["image"] for p in pairs], "TEXT": [p["text"] for p in pairs]}
    pq.write_table(pa.table(laion), tmp_path / "pairs.parquet", row_group_size=3)
    seen = []
    for name, columns in (("pairs.jsonl", []), ("pairs.csv", []),
                          ("pairs.parquet", ["data.image_column=URL", "data.caption_column=TEXT"])):  # fmt: skip
        cfg = data_config(f"data.train_data_file={tmp_path / name}", *columns)
        data = prepare_data(cfg, progress=False, cache_dir=tmp_path / "cache")
        source = data.train.source
        seen.append([(str(source.file(i.index)), i.captions, i.width) for i in data.train.items])
    assert seen[0] == seen[1] == seen[2] and len(seen[0]) == 10 and seen[0][0][2] == 32


def test_an_interrupted_index_build_leaves_no_index(tmp_path, monkeypatch):
    write_images(tmp_path / "images")
    write_jsonl(tmp_path / "pairs.jsonl", 300)
    cfg = data_config(f"data.train_data_file={tmp_path / 'pairs.jsonl'}", "data.verify=lazy")
    monkeypatch.setattr(index_module, "BATCH_ROWS", 100)
    original = index_module.IndexBuilder.add

    def dies_at_row_250(self, origin, image, caption):
        if self.total == 250:
            raise KeyboardInterrupt
        original(self, origin, image, caption)

    monkeypatch.setattr(index_module.IndexBuilder, "add", dies_at_row_250)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(cfg, progress=False, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache" / "index").iterdir()) == []  # no partial index to be taken for a whole one
    monkeypatch.setattr(index_module.IndexBuilder, "add", original)
    assert len(prepare_data(cfg, progress=False, cache_dir=tmp_path / "cache").train.items) == 300


@pytest.mark.parametrize(("verify", "limit"), [("lazy", 150), ("upfront", 250)])
def test_items_of_a_large_list_cost_column_bytes_not_objects(tmp_path, verify, limit):
    """Once indexed (and, upfront, its files decoded), preparing a 50,000-row list allocates a few tens of bytes per
    row in columns, not Python objects per row (a record, an item info, a scan-cache entry: 600+ bytes)."""
    rows = 50_000
    write_images(tmp_path / "images")
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = data_config(f"data.train_data_file={tmp_path / 'pairs.jsonl'}", f"data.verify={verify}",
                      "data.validation_split=0.01", "data.repeats=2")  # fmt: skip
    prepare_data(cfg, progress=False, cache_dir=tmp_path / "cache")  # builds the index
    tracemalloc.start()
    data = prepare_data(cfg, progress=False, cache_dir=tmp_path / "cache")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(data.train.items) == 2 * (rows - 500) and len(data.validation.items) == 500
    # Columns: index 8 + width/height 8 + weight 4 + bucket id 8 (+ sha256 32 upfront) bytes per position, plus
    # the temporaries of the checks.
    assert peak / rows < limit, f"{peak / rows:.0f} bytes per row"
    item = data.train.items[len(data.train.items) - 1]
    assert item.captions == [f"item {item.index}"]


def test_paths_stay_in_the_image_root_and_urls_and_byte_order_marks_are_read(tmp_path):
    from ldm_tune.data.index import open_pair_list

    write_images(tmp_path / "lists" / "images")
    write_images(tmp_path / "elsewhere")
    secret = tmp_path / "elsewhere" / "0.png"
    rows = [{"image": "images/0.png", "text": "inside"}, {"image": str(secret), "text": "absolute, outside"},
            {"image": "../elsewhere/1.png", "text": "climbs out"}, {"image": "images/../images/2.png", "text": "in"},
            {"image": "HTTP://example.com/a.png", "text": "upper-case scheme"}]  # fmt: skip
    listing = tmp_path / "lists" / "pairs.csv"
    with open(listing, "w", newline="", encoding="utf-8-sig") as handle:  # with a byte-order mark, as Excel writes
        writer = csv.DictWriter(handle, ["image", "text"])
        writer.writeheader()
        writer.writerows(rows)
    got, facts = open_pair_list(listing, tmp_path / "cache")
    assert facts["bad"] == {"path_outside_folder": 2} and facts["examples"]["path_outside_folder"] == [
        "pairs.csv:3", "pairs.csv:4"]  # fmt: skip
    assert got["image"] == [str(tmp_path / "lists" / "images" / "0.png"), str(tmp_path / "lists" / "images" / "2.png"),
                            "HTTP://example.com/a.png"]  # fmt: skip
    # A list of absolute paths elsewhere is read when the user names their root (relative ones are then relative
    # to it: `../elsewhere` leaves it).
    got, facts = open_pair_list(listing, tmp_path / "cache", image_root=tmp_path)
    assert facts["bad"] == {"path_outside_folder": 1} and str(secret) in got["image"]
    jsonl = tmp_path / "lists" / "pairs.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows[0]).encode() + b"\n")
    assert len(open_pair_list(jsonl, tmp_path / "cache")[0]) == 1
    # A field the csv module will not read (over csv.field_size_limit()) stops with the file and line named.
    (tmp_path / "lists" / "huge.csv").write_text('image,text\nimages/0.png,a\nimages/1.png,"' + "x" * 200_000 + '"\n')
    with pytest.raises(ValueError, match=r"huge.csv.* after line 2: field larger"):
        open_pair_list(tmp_path / "lists" / "huge.csv", tmp_path / "cache")
