"""Does the demo bundle draw what it is asked for? For each finding, the
paired response of `evaluation.response` (same seed, request with vs without
the finding; see that module for the metrics) over --seeds seeds, asked by
the report's text and, side by side, by the CT-RATE labels alone and by
both (as a CT-RATE record asks); `--by findings impression` states the
finding in one text field only (the other the normal report's), to see which
context token carries its response.

    .venv/bin/python bench/bench_demo_response.py [--bundle DIR] [--seeds 8] [--by text labels both]
        [--findings Emphysema ...]

Prints first, per finding, the phantom world's own effect on the same
metric (phantoms drawn with the finding minus normal ones, --phantom-seeds
of each): the size a response should approach, since more is not better.
Then, per finding and way of asking, the mean paired difference, its
standard error, its multiple of the phantoms' effect and the fraction of
seeds whose difference is positive (RATIO lines), then labels-vs-text
ratios of those fractions.
"""

from __future__ import annotations

import argparse

import numpy as np

from evaluation.response import ASKED_BY, FINDINGS, WAYS, paired_response, phantom_response
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
    parser.add_argument("--phantom-seeds", type=int, default=24)
    args = parser.parse_args()
    model = load_bundle(args.bundle)
    by = args.by or (ASKED_BY if model.config.label_condition else ("text",))
    seeds = list(range(7000, 7000 + args.seeds))
    shape, spacing = model.config.default_shape, model.config.default_spacing_mm
    truth = {}
    for name in args.findings:
        truth[name], sem = phantom_response(
            name, range(7000, 7000 + args.phantom_seeds), shape=shape, spacing_mm=spacing
        )
        print(f"phantoms  {name:17s} {truth[name]:+8.1f} mL (sem {sem:.1f}): the size to approach")
    fractions = {}
    for way in by:
        normal = None
        for name in args.findings:
            diffs, normal = paired_response(
                model, name, seeds, num_steps=args.steps, normal=normal, by=way
            )
            more = fractions[way, name] = float(np.mean(diffs > 0))
            sem = diffs.std(ddof=1) / np.sqrt(len(diffs))
            size = diffs.mean() / truth[name]
            print(
                f"by {way:6s} {name:17s} {diffs.mean():+8.1f} mL (sem {sem:.1f}, "
                f"{size:.2f}x the phantoms'); more in {more:.0%} of {len(seeds)} seeds"
            )
            key = name.lower().replace(" ", "_")
            print(f"RATIO {way}_{key}_more_fraction {more:.2f}")
            print(f"RATIO {way}_{key}_vs_phantoms {size:.2f}")
    if {"text", "labels"} <= set(by):
        text = np.mean([fractions["text", n] for n in args.findings])
        labels = np.mean([fractions["labels", n] for n in args.findings])
        print(f"RATIO labels_vs_text_more_fraction {labels / max(text, 1e-9):.2f}")


if __name__ == "__main__":
    main()
