"""Does the demo bundle draw what its reports say? For each finding, the
paired response of `evaluation.response` (same seed, report with vs without
the finding; see that module for the metrics) over --seeds seeds.

    .venv/bin/python bench/bench_demo_response.py [--bundle DIR] [--seeds 8]

Prints, per finding, the mean paired difference, its standard error and the
fraction of seeds whose difference is positive (RATIO lines).
"""

from __future__ import annotations

import argparse

import numpy as np

from evaluation.response import FINDINGS, paired_response
from report2ct.bundle import load_bundle


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", default="report2ct/bundles/demo")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    model = load_bundle(args.bundle)
    seeds = list(range(7000, 7000 + args.seeds))
    normal = None
    for name in FINDINGS:
        diffs, normal = paired_response(model, name, seeds, num_steps=args.steps, normal=normal)
        more = float(np.mean(diffs > 0))
        print(
            f"{name:17s} {diffs.mean():+8.1f} mL (sem {diffs.std(ddof=1) / np.sqrt(len(diffs)):.1f}); "
            f"more in {more:.0%} of {len(seeds)} seeds"
        )
        print(f"RATIO {name.lower().replace(' ', '_')}_more_fraction {more:.2f}")


if __name__ == "__main__":
    main()
