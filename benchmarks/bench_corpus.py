"""Start-up at corpus scale: a pair list of `--rows` rows (default 1 M) of local tiny images, to the first step.

Writes `--distinct` small PNGs and a JSONL list of `--rows` rows that cycle over them (the list, not the pixels,
is what grows with a corpus), then, each in its own process: the list's on-disk index is built (timed); a Trainer
on the tiny preset is built from the list and trains one update, with `data.verify` lazy and upfront (the index
exists by then), and once more on a 1,000-row list as the baseline. Reports seconds to the end of set-up (data
read, checked), seconds to the end of the first update, and peak RSS (memory-mapped index pages included), with
the growth over the baseline. Targets (issue 15): first step within 60 s of start-up once the index exists, RSS
growth <= 200 MB per process for 1 M rows. Prints the machine and a table, writes JSON.
Usage: python benchmarks/bench_corpus.py [--rows 1000000] [--out outputs/bench/corpus.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench_inference import describe_machine, in_child, work_folder

from ldm_tune.machine import peak_rss_mib


def write_list(folder: Path, rows: int, distinct: int) -> Path:
    from PIL import Image

    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    for i in range(distinct):
        Image.new("RGB", (32, 32), (i % 256, (7 * i) % 256, 128)).save(images / f"{i:05d}.png")
    path = folder / f"pairs-{rows}.jsonl"
    with open(path, "w") as handle:
        for row in range(rows):
            handle.write(json.dumps({"image": f"images/{row % distinct:05d}.png", "text": f"item {row}"}) + "\n")
    return path


def build_index(pairs: str, cache: str) -> dict:
    """Build the list's index (in a child process)."""
    start = time.perf_counter()
    from ldm_tune.data.index import open_pair_list

    rows, facts = open_pair_list(pairs, Path(cache))
    return {"set_up_s": time.perf_counter() - start, "rows": len(rows),
            "peak_rss_mib": peak_rss_mib()}  # fmt: skip


def run_one(model: str, pairs: str, verify: str, out: str, cache: str, index_only: bool = False) -> dict:
    """Build a Trainer from `pairs` and train one update (in a child process)."""
    if index_only:
        return build_index(pairs, cache)
    start = time.perf_counter()
    from ldm_tune.config import load_config
    from ldm_tune.training import Trainer

    config = load_config(None, [
        f"model.pretrained_model_name_or_path={model}", f"data.train_data_file={pairs}", "data.resolution=32",
        f"data.verify={verify}", "training.train_batch_size=16", "training.max_train_steps=1",
        "checkpointing.checkpointing_steps=1000", "validation.validation_steps=0", f"output_dir={out}",
        f"data.cache_dir={cache}",
    ])  # fmt: skip
    trainer = Trainer(config)
    ready, stepped = time.perf_counter() - start, []
    original = trainer._after_update

    def first_update_done(*args):  # before its checkpoint and the export, which do not grow with the corpus
        stepped.append(time.perf_counter() - start)
        original(*args)

    trainer._after_update = first_update_done
    trainer.train()
    return {"set_up_s": ready, "first_step_s": stepped[0],
            "peak_rss_mib": peak_rss_mib()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--distinct", type=int, default=1000, help="distinct image files the rows cycle over")
    parser.add_argument("--out", default="outputs/bench/corpus.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_one(**json.loads(args.child))))
        return

    from ldm_tune.presets import init_model

    machine = describe_machine()
    work = work_folder("ldm-bench-corpus-")
    model = init_model("tiny", work / "tiny")
    started = time.perf_counter()
    big = write_list(work, args.rows, args.distinct)
    baseline = write_list(work, 1000, args.distinct)
    print(f"wrote {args.rows:,} rows over {args.distinct} images in {time.perf_counter() - started:.1f} s", flush=True)
    rows, cache = [], work / "cache"
    runs = [("baseline 1,000 rows", baseline, "lazy"), (f"{args.rows:,} rows", big, "index"),
            (f"{args.rows:,} rows", big, "lazy"), (f"{args.rows:,} rows", big, "upfront")]  # fmt: skip
    for name, pairs, verify in runs:
        child = {"model": str(model), "pairs": str(pairs), "verify": verify, "out": str(work / f"run-{len(rows)}"),
                 "cache": str(cache), "index_only": verify == "index"}  # fmt: skip
        rows.append({"list": name, "verify": verify, **in_child(__file__, child, f"{name} ({verify})")})
        print(f"  {name}, verify {verify}: {rows[-1]}", flush=True)
    base = rows[0]["peak_rss_mib"]
    print(f"\ntiny preset, 32 px, batch 16, one update; {args.distinct} distinct local images; 'index': building "
          "the list's index alone; the training runs find it built")  # fmt: skip
    print("| list | verify | set-up s | first step s | peak RSS MiB | RSS growth over 1,000 rows MiB |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        first = f"{r['first_step_s']:.1f}" if "first_step_s" in r else "-"
        print(f"| {r['list']} | {r['verify']} | {r['set_up_s']:.1f} | {first} | "
              f"{r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] - base:+.0f} |")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "rows_in_list": args.rows, "distinct": args.distinct,
                               "runs": rows}, indent=2))  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
