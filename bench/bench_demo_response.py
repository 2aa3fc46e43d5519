"""Does the demo bundle draw what it is asked for? For each finding, the
paired response of `evaluation.response` (same seed, request with vs without
the finding; see that module for the metrics) over --seeds seeds, asked by
the report's text and, side by side, by the CT-RATE labels alone and by
both (as a CT-RATE record asks); `--by findings impression` states the
finding in one text field only (the other the normal report's), to see which
context token carries its response.

    .venv/bin/python bench/bench_demo_response.py [--bundle DIR] [--seeds 8] [--by text labels both]
        [--findings Emphysema ...]

Prints, per finding and way of asking, the mean paired difference, its
standard error and the fraction of seeds whose difference is positive
(RATIO lines), then labels-vs-text ratios of those fractions.
"""

from __future__ import annotations

import argparse

import numpy as np

from evaluation.response import ASKED_BY, FINDINGS, WAYS, paired_response
from report2ct.bundle import load_bundle


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", default="report2ct/bundles/demo")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--by", nargs="+", choices=WAYS, default=None)
    parser.add_argument("--findings", nargs="+", choices=FINDINGS, default=FINDINGS)
    args = parser.parse_args()
    model = load_bundle(args.bundle)
    by = args.by or (ASKED_BY if model.config.label_condition else ("text",))
    seeds = list(range(7000, 7000 + args.seeds))
    fractions = {}
    for way in by:
        normal = None
        for name in args.findings:
            diffs, normal = paired_response(
                model, name, seeds, num_steps=args.steps, normal=normal, by=way
            )
            more = fractions[way, name] = float(np.mean(diffs > 0))
            sem = diffs.std(ddof=1) / np.sqrt(len(diffs))
            print(
                f"by {way:6s} {name:17s} {diffs.mean():+8.1f} mL (sem {sem:.1f}); "
                f"more in {more:.0%} of {len(seeds)} seeds"
            )
            print(f"RATIO {way}_{name.lower().replace(' ', '_')}_more_fraction {more:.2f}")
    if {"text", "labels"} <= set(by):
        text = np.mean([fractions["text", n] for n in args.findings])
        labels = np.mean([fractions["labels", n] for n in args.findings])
        print(f"RATIO labels_vs_text_more_fraction {labels / max(text, 1e-9):.2f}")


if __name__ == "__main__":
    main()
