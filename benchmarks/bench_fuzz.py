"""Fuzzing at volume: the strategies of tests/test_fuzz.py for `--cases` cases per target (default 10,000).

Targets: `decode_image` (mutated images of every allowed format), `open_pair_list` (hostile JSONL / CSV / parquet
lists) and `ShardSamples` (random, damaged tar shards). Every case is run to the end: an uncaught exception (or a
broken invariant: a lost row, an entry of the wrong form) is a crash, recorded with its traceback, and the run goes
on. Cases are derandomized: the same `--cases` give the same cases on every machine. Prints the machine and a table
(target | cases | crashes | rejections by reason | seconds), writes JSON with the first tracebacks of each target.
Usage: python benchmarks/bench_fuzz.py [--cases 10000] [--targets decode_image,open_pair_list,ShardSamples]
       [--out outputs/bench/fuzz.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

from bench_inference import describe_machine, work_folder


sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the strategies live with the tests
KEPT_TRACEBACKS = 5  # per target, distinct by their last line


def run_target(name: str, cases: int, folder: Path) -> dict:
    """Run `cases` generated cases of one target; returns counts, rejections by reason and crash tracebacks."""
    from hypothesis import Phase, given, settings
    from test_fuzz import SETTINGS, TARGETS

    strategy, outcome = TARGETS[name]
    run = {"target": name, "cases": 0, "crashes": 0, "rejections": Counter(), "tracebacks": {}}

    @settings(max_examples=cases, phases=[Phase.generate], **SETTINGS)  # no shrinking: every case counts once
    @given(strategy)
    def one(case):
        run["cases"] += 1
        try:
            run["rejections"].update(outcome(case, folder))
        except Exception:  # a crash of the code under test (or of a broken invariant): recorded, never raised
            run["crashes"] += 1
            text = traceback.format_exc()
            last = text.strip().splitlines()[-1]
            if last not in run["tracebacks"] and len(run["tracebacks"]) < KEPT_TRACEBACKS:
                run["tracebacks"][last] = {"case": repr(case)[:2000], "traceback": text[-4000:]}

    started = time.perf_counter()
    one()
    run["seconds"] = time.perf_counter() - started
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000, help="generated cases per target")
    parser.add_argument("--targets", default="decode_image,open_pair_list,ShardSamples")
    parser.add_argument("--out", default="outputs/bench/fuzz.json")
    args = parser.parse_args()

    import logging
    import warnings

    from test_fuzz import TARGETS

    logging.disable(logging.WARNING)  # one warning per hostile case is noise here
    warnings.simplefilter("ignore")  # PIL's notes on broken tags
    machine = describe_machine()
    folder = work_folder("ldm-bench-fuzz-")
    runs = []
    for name in args.targets.split(","):
        if name not in TARGETS:
            raise ValueError(f"`--targets` must name targets from {sorted(TARGETS)}, got {name!r}.")
        runs.append(run_target(name, args.cases, folder))
        print(f"  {name}: {runs[-1]['cases']} cases, {runs[-1]['crashes']} crashes, "
              f"{runs[-1]['seconds']:.1f} s", flush=True)  # fmt: skip
    print(f"\n{args.cases} generated cases per target (derandomized); crashes: uncaught exceptions or broken "
          "invariants; rejections: BadItem reasons (lists: rows left out, file_refused: a ValueError naming "
          "the file)")  # fmt: skip
    print("| target | cases | crashes (uncaught) | rejections by reason | seconds |")
    print("|---|---:|---:|---|---:|")
    for run in runs:
        reasons = ", ".join(f"{reason} {count}" for reason, count in run["rejections"].most_common())
        print(f"| {run['target']} | {run['cases']} | {run['crashes']} | {reasons or '-'} | {run['seconds']:.1f} |")
    for run in runs:
        for last, crash in run["tracebacks"].items():
            print(f"\n{run['target']} crash: {last}\n  case: {crash['case'][:300]}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "cases_per_target": args.cases,
                               "runs": [{**r, "rejections": dict(r["rejections"])} for r in runs]}, indent=2))  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
