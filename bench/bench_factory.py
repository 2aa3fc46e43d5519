"""The factory's overheads on the demo preset, measured side by side in one run.

    e2e_vs_pure            seconds per volume through `run_generate` (validate,
                           Ray Data actor pool, OME-Zarr write, commit) divided
                           by seconds per volume of the bare `generate()` call
                           at the same torch thread count (target <= 1.05)
    two_workers_vs_one     volumes per hour with 2 workers / with 1 (target >= 1.8
                           on 2 cores)
    manifest_memory_1m_vs_1k  the driver's peak RSS while validating a
                           1,000,000-record manifest / a 1,000-record one
                           (target <= 1.1)

Per-volume times are steady state: from the first to the last commit marker
(`committed_at`), so Ray start-up and the bundle load, paid once per job, are
left out (they are printed separately). Each worker is an actor with one CPU
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
from pathlib import Path
from factory.job import GenerateOptions, _validate
from factory.storage import open_storage
from report2ct.bundle import read_config
config = read_config(sys.argv[2])
with tempfile.TemporaryDirectory() as out, tempfile.TemporaryDirectory() as scratch:
    options = GenerateOptions(manifest=sys.argv[1], output=out)
    parts, rejections, volumes = _validate(options, config, open_storage(out + "/run"), Path(scratch))
print(json.dumps({"volumes": volumes, "rejected": len(rejections),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_manifest(path: Path, n: int, prefix: str = "r") -> str:
    with path.open("w") as handle:
        for i in range(n):
            handle.write(json.dumps({"id": f"{prefix}{i:07d}", **REPORT}) + "\n")
    return str(path)


def steady_seconds_per_volume(run_dir: Path) -> float:
    stamps = sorted(
        json.loads(p.read_text())["committed_at"] for p in (run_dir / "commits").glob("*.json")
    )
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


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


def e2e(tmp: Path, n: int, workers: int, bundle: str, gpus: float) -> tuple[float, float]:
    """(steady seconds per volume, whole-job wall seconds)."""
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
    return steady_seconds_per_volume(tmp / "out" / f"w{workers}"), wall


def validation_peak_mb(tmp: Path, n: int, bundle: str) -> dict:
    manifest = write_manifest(tmp / f"m{n}.jsonl", n)
    out = subprocess.run(
        [sys.executable, "-c", VALIDATE, manifest, bundle],
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
        print(
            f"validate {1000:>9,} records: peak RSS {small['peak_rss_mb']:.0f} MB; "
            f"{args.records:,}: {large['peak_rss_mb']:.0f} MB"
        )
        pure = pure_seconds_per_volume(args.volumes, bundle, gpus)
        one, wall_one = e2e(tmp, args.volumes, 1, bundle, gpus)
        two, wall_two = e2e(tmp, args.volumes, 2, bundle, gpus)
    print(f"pure generate(): {pure:.2f} s/volume (1 torch thread, {bundle})")
    print(
        f"1 worker: {one:.2f} s/volume steady ({3600 / one:.0f} vol/h), job wall {wall_one:.1f} s "
        f"for {args.volumes} incl. Ray start-up and bundle load"
    )
    print(
        f"2 workers: {two:.2f} s/volume steady ({3600 / two:.0f} vol/h), job wall {wall_two:.1f} s"
    )
    print(f"RATIO e2e_vs_pure {one / pure:.3f} (target <= 1.05)")
    print(f"RATIO two_workers_vs_one {one / two:.2f} (target >= 1.8)")
    print(
        f"RATIO manifest_memory_1m_vs_1k {large['peak_rss_mb'] / small['peak_rss_mb']:.3f} (target <= 1.1)"
    )


if __name__ == "__main__":
    main()
