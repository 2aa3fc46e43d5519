"""Phantom generation speed: phantoms per second at 1 and 2 workers, and the
projected time for 1,000 default-size phantoms (target: at most 10 minutes).

    .venv/bin/python bench/bench_phantoms.py [--n 40]
"""

from __future__ import annotations

import argparse
import tempfile
import time

from phantom.ctrate_layout import DatasetSpec, write_dataset


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=40)
    args = parser.parse_args()
    spec = DatasetSpec(n=args.n, seed=0)  # the same phantoms for both worker counts
    warm = DatasetSpec(n=min(args.n, 4), seed=1)

    def seconds(spec: DatasetSpec, workers: int) -> float:
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            write_dataset(out, spec, workers=workers)
            return time.perf_counter() - start

    # Warm both first (imports, first-touch allocations, the file system), so
    # neither timed run pays a cost the other does not.
    for workers in (1, 2):
        seconds(warm, workers)
    rates = {}
    for workers in (1, 2):
        rates[workers] = args.n / seconds(spec, workers)
        print(
            f"{workers} worker(s): {rates[workers]:.1f} phantoms/s "
            "(96x96x64, written as NIfTI + masks + CSVs; same seed, warm)"
        )
    best = max(rates.values())
    print(f"projected 1,000 phantoms: {1000 / best / 60:.1f} min (target <= 10 min)")
    print(f"RATIO two_workers_vs_one {rates[2] / rates[1]:.2f}")


if __name__ == "__main__":
    main()
