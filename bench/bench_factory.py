"""The factory's overheads on the demo preset, measured side by side in one run.

    e2e_vs_pure            seconds per volume through `run_generate` (validate,
                           Ray Data actor pool, OME-Zarr write, commit) divided
                           by seconds per volume of the bare `generate()` call
                           at the same torch thread count (target <= 1.05)
    two_workers_vs_one     volumes per hour with 2 workers / with 1 (target >= 1.8
                           on 2 cores)
    manifest_memory_1m_vs_1k  the driver's peak RSS while validating a
                           1,000,000-record manifest / a 1,000-record one
                           (target <= 1.1); mostly fixed import overhead, so
    manifest_memory_growth_1m_mb  is printed too: the 1M-record validation's
                           peak RSS over its own one-record baseline, in MB

Per-volume times are steady state, per worker: each worker's commits minus
one over the time from its first to its last commit marker (`committed_at`;
the marker names the worker), and the pool's rate is the sum of its workers'
rates. Ray start-up and the bundle load, paid once per job, are left out
(printed separately), and a larger pool is not charged for its workers
starting together (one window over the job's first to last commit holds only
n/W - 1 periods per worker, not n - 1). Each worker is an actor with one CPU
share and one torch thread, as in production on CPU nodes.

    .venv/bin/python bench/bench_factory.py [--volumes 8] [--records 1000000]
        [--bundle DIR] [--gpus-per-worker 1]   # on a GPU node: the rate to cost
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUNDLE = "report2ct/bundles/demo"
REPORT = {
    "findings": "Moderate right pleural effusion with compressive atelectasis of the right lower lobe.",
    "impression": "Right pleural effusion.",
}

VALIDATE = """
import json, resource, sys, tempfile
from factory.job import plan_generate
from factory.options import GenerateOptions

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

manifest, bundle, one_record = sys.argv[1:4]
with tempfile.TemporaryDirectory() as out:
    # The baseline: imports, the bundle's config and checksums, one record.
    plan_generate(GenerateOptions(manifest=one_record, output=out, bundle=bundle))
    baseline = peak_mb()
    plan = plan_generate(GenerateOptions(manifest=manifest, output=out, bundle=bundle))
print(json.dumps({"volumes": plan.volumes, "rejected": plan.rejected,
                  "baseline_rss_mb": baseline, "peak_rss_mb": peak_mb()}))
"""


def write_manifest(path: Path, n: int, prefix: str = "r") -> str:
    with path.open("w") as handle:
        for i in range(n):
            handle.write(json.dumps({"id": f"{prefix}{i:07d}", **REPORT}) + "\n")
    return str(path)


def steady_seconds_per_volume(run_dir: Path) -> tuple[float, dict[str, int]]:
    """Seconds per volume of the whole pool in steady state, and the volumes
    each worker committed. Per worker (host and pid in its commit markers):
    its commits minus one over the time from its first to its last commit;
    the pool's rate is the sum of its workers' rates. (One window from the
    job's first to its last commit would hold only n/W - 1 periods of each
    of W workers that start together, not n - 1, and overstate the time per
    volume of a larger pool: 7/6 at 8 volumes on 2 workers.)"""
    stamps: dict[str, list[float]] = {}
    for path in (run_dir / "commits").glob("*.json"):
        marker = json.loads(path.read_text())
        worker = f"{marker['worker']['host']}:{marker['worker']['pid']}"
        stamps.setdefault(worker, []).append(marker["committed_at"])
    rate = 0.0
    for times in stamps.values():
        if len(times) >= 2:
            rate += (len(times) - 1) / (max(times) - min(times))
    if rate == 0.0:
        raise SystemExit(f"{run_dir}: no worker committed twice; raise --volumes")
    return 1.0 / rate, {worker: len(times) for worker, times in sorted(stamps.items())}


def pure_seconds_per_volume(n: int, bundle: str, gpus: float) -> float:
    import torch

    from report2ct.bundle import load_bundle
    from report2ct.pipeline import VolumeRequest, generate

    torch.set_num_threads(1)
    model = load_bundle(bundle, device="cuda" if gpus and torch.cuda.is_available() else "cpu")
    spacing = model.config.default_spacing_mm
    times = []
    for i in range(n + 1):  # the first call warms up
        start = time.perf_counter()
        request = VolumeRequest(
            seed=i, findings=REPORT["findings"], impression=REPORT["impression"], spacing_mm=spacing
        )
        generate(model, [request])
        times.append(time.perf_counter() - start)
    torch.set_num_threads(os.cpu_count() or 1)
    return sum(times[1:]) / n


def e2e(
    tmp: Path, n: int, workers: int, bundle: str, gpus: float
) -> tuple[float, float, dict[str, int]]:
    """(steady seconds per volume, whole-job wall seconds, volumes per worker)."""
    from factory.job import GenerateOptions, run_generate

    manifest = write_manifest(tmp / f"w{workers}.jsonl", n, prefix=f"w{workers}-")
    start = time.perf_counter()
    result = run_generate(
        GenerateOptions(
            manifest=manifest,
            output=str(tmp / "out"),
            bundle=bundle,
            workers=workers,
            gpus_per_worker=gpus,
        )
    )
    wall = time.perf_counter() - start
    assert result.counts["committed"] == n, result.counts
    per_volume, per_worker = steady_seconds_per_volume(tmp / "out" / f"w{workers}")
    return per_volume, wall, per_worker


def validation_peak_mb(tmp: Path, n: int, bundle: str) -> dict:
    manifest = write_manifest(tmp / f"m{n}.jsonl", n)
    one_record = write_manifest(tmp / "m1.jsonl", 1)
    out = subprocess.run(
        [sys.executable, "-c", VALIDATE, manifest, bundle, one_record],
        capture_output=True,
        text=True,
        check=True,
    )
    Path(manifest).unlink()
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--volumes", type=int, default=8, help="volumes per measured job")
    parser.add_argument("--records", type=int, default=1_000_000, help="large manifest size")
    parser.add_argument("--bundle", default=BUNDLE)
    parser.add_argument("--gpus-per-worker", type=float, default=0.0)
    args = parser.parse_args()
    bundle, gpus = args.bundle, args.gpus_per_worker
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        small, large = (validation_peak_mb(tmp, n, bundle) for n in (1000, args.records))
        for n, m in ((1000, small), (args.records, large)):
            print(
                f"validate {n:>9,} records: peak RSS {m['peak_rss_mb']:.0f} MB = baseline "
                f"{m['baseline_rss_mb']:.0f} MB (imports, bundle, 1 record) "
                f"+ {m['peak_rss_mb'] - m['baseline_rss_mb']:.1f} MB growth"
            )
        pure = pure_seconds_per_volume(args.volumes, bundle, gpus)
        one, wall_one, per_one = e2e(tmp, args.volumes, 1, bundle, gpus)
        two, wall_two, per_two = e2e(tmp, args.volumes, 2, bundle, gpus)
    print(f"pure generate(): {pure:.2f} s/volume (1 torch thread, {bundle})")
    print(
        "steady state per worker: (its commits - 1) / (its last - its first commit), "
        "the pool's rate the sum of its workers' rates"
    )
    print(
        f"1 worker: {one:.2f} s/volume steady ({3600 / one:.0f} vol/h), job wall {wall_one:.1f} s "
        f"for {args.volumes} incl. Ray start-up and bundle load; volumes per worker "
        f"{sorted(per_one.values())}"
    )
    print(
        f"2 workers: {two:.2f} s/volume steady ({3600 / two:.0f} vol/h), job wall {wall_two:.1f} s; "
        f"volumes per worker {sorted(per_two.values())}"
    )
    print(f"RATIO e2e_vs_pure {one / pure:.3f} (target <= 1.05)")
    print(f"RATIO two_workers_vs_one {one / two:.2f} (target >= 1.8)")
    # The total RSS ratio is mostly fixed import overhead; the growth over the
    # baseline is what a larger manifest costs the driver.
    print(
        f"RATIO manifest_memory_1m_vs_1k {large['peak_rss_mb'] / small['peak_rss_mb']:.3f} "
        "(total RSS; target <= 1.1)"
    )
    growth = {k: m["peak_rss_mb"] - m["baseline_rss_mb"] for k, m in (("1k", small), ("1m", large))}
    print(
        f"RATIO manifest_memory_growth_1m_mb {growth['1m']:.1f} "
        f"(1k: {growth['1k']:.1f} MB; over the baseline)"
    )


if __name__ == "__main__":
    main()
