"""The driver at scale: peak memory over a whole job, and a rerun of a
fully committed job.

A generate job's driver validates the manifest, lists what is committed,
schedules the rest and streams every outcome into the index and error parts.
Here the workers are a stand-in (in the driver's process, no model): for each
scheduled record it writes the commit marker a worker would and yields the
outcome, so everything the driver does runs for real, at 1,000 and at
100,000 records, each in a fresh process:

- peak RSS of the whole job (validate + generate + index) at both sizes,
  side by side, and its growth over the same process before the job started
  (fixed import overhead would hide growth in a plain ratio);
- the rerun of the 100,000-record job once everything is committed: it must
  schedule nothing (the stand-in refuses to be called) and list nothing
  twice; its seconds are printed.

    python bench/bench_driver.py [--large 100000] [--small 1000]

Last lines: RATIO driver_peak_rss_large_vs_small, RATIO driver_growth_large_vs_small.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FINDINGS = (
    "Trachea and both main bronchi are open. Mediastinal structures cannot be evaluated "
    "optimally because contrast material is not given. Heart contour and size are normal. "
    "Pleural effusion-thickening was not detected. When examined in the lung parenchyma "
    "window, a nodule of 6 mm is seen in the right lower lobe. "
) * 4  # a CT-RATE-sized report (~1.3 KB)


def write_manifest(path: Path, n: int) -> None:
    with path.open("w") as handle:
        for i in range(n):
            record = {"id": f"r{i:07d}", "findings": FINDINGS, "impression": f"Nodule {i}."}
            handle.write(json.dumps(record) + "\n")


def standin_workers(options, bundle_uri, run_uri, parts):
    """What the workers would report: each scheduled record committed (its
    marker written as a worker writes it), no model involved."""
    from factory import commit
    from factory.manifest import ManifestRecord
    from factory.records import IndexEntry, Outcome, VolumeTask
    from factory.storage import open_storage

    run = open_storage(run_uri)
    for part in parts:
        for line in run.iter_lines(part):
            item = json.loads(line)
            for task in VolumeTask.for_record(item["line"], ManifestRecord(**item["record"])):
                entry = IndexEntry(
                    id=task.record.id,
                    sample=task.sample,
                    key=task.key,
                    uri=run.uri(f"volumes/{task.key}/a/{task.key}.ome.zarr"),
                    labels={},
                    seed=task.seed,
                    spacing_mm=(4.0, 4.0, 5.0),
                    shape=(96, 96, 64),
                    findings=task.record.findings,
                    impression=task.record.impression,
                    timings_s={"sample": 1.0, "write": 0.1},
                )
                marker = {"key": task.key, "attempt": "a", "files": {}, "index": entry.to_json()}
                commit.try_commit(run, task.key, marker)
                yield Outcome.committed("generated", task.line, entry)


def no_workers(options, bundle_uri, run_uri, parts):
    raise AssertionError(f"a rerun of a committed job scheduled {len(parts)} parts")


def child(manifest: str, out: str, rerun: bool) -> None:
    """One job in this fresh process; prints a JSON line of its numbers."""
    import factory.job
    from factory.job import GenerateOptions, read_bundle_config, run_generate

    # What the job imports and reads first, so the baseline holds it.
    read_bundle_config(GenerateOptions(manifest=manifest, output=out))
    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    factory.job._generate = no_workers if rerun else standin_workers
    start = time.perf_counter()
    result = run_generate(GenerateOptions(manifest=manifest, output=out))
    seconds = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "baseline_mb": baseline_kb / 1024,
                "peak_mb": peak_kb / 1024,
                "seconds": seconds,
                "counts": result.counts,
                "exit_code": result.exit_code,
            }
        )
    )


def run_child(manifest: Path, out: Path, *, rerun: bool = False) -> dict:
    command = [sys.executable, __file__, "--child", str(manifest), str(out)]
    done = subprocess.run(
        [*command, *(["--rerun"] if rerun else [])], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--large", type=int, default=100_000)
    parser.add_argument("--small", type=int, default=1_000)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--rerun", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, rerun=args.rerun)
        return

    from factory.index import read_index
    from factory.storage import open_storage

    with tempfile.TemporaryDirectory() as scratch:
        results = {}
        for n in (args.small, args.large):
            manifest = Path(scratch) / f"m{n}.jsonl"
            write_manifest(manifest, n)
            results[n] = run_child(manifest, Path(scratch) / "out")
            assert results[n]["counts"]["generated"] == n, results[n]
        large_manifest = Path(scratch) / f"m{args.large}.jsonl"
        rerun = run_child(large_manifest, Path(scratch) / "out", rerun=True)
        listed = sum(1 for _ in read_index(open_storage(str(Path(scratch) / f"out/m{args.large}"))))
    small, large = results[args.small], results[args.large]
    growth = {n: r["peak_mb"] - r["baseline_mb"] for n, r in results.items()}
    for n, r in results.items():
        print(
            f"{n:>7} records: {r['seconds']:.1f} s, peak RSS {r['peak_mb']:.0f} MB "
            f"(+{growth[n]:.1f} MB over the process with the job's imports)"
        )
    print(
        f"rerun of the committed {args.large}-record job: {rerun['seconds']:.1f} s, "
        f"{rerun['counts']['skipped_already_committed']} skipped, none scheduled; "
        f"the index lists {listed} volumes (each once: {listed == args.large})"
    )
    print(f"RATIO driver_peak_rss_large_vs_small {large['peak_mb'] / small['peak_mb']:.3f}")
    print(
        f"RATIO driver_growth_large_vs_small {growth[args.large] / max(growth[args.small], 1):.3f}"
    )


if __name__ == "__main__":
    main()
