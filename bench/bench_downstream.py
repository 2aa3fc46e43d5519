"""What are generated volumes worth downstream? Two tasks, each trained with
and without generated data and scored on the same held-out real phantoms
(`evaluation.downstream`):

- TSTR: the label classifier (evaluation/classifier.py) trained on N volumes
  the factory generated from N phantom reports, against one trained on the N
  real phantoms of those reports, and one on both (2N, the same number of
  optimizer steps); macro AUROC on T held-out real phantoms, mean over the
  classifier seeds. `RATIO tstr` = synthetic-trained / real-trained.
- Segmentation: a small MONAI 3D UNet trained on M real (image, mask) pairs,
  against the same M plus k*M generated pairs (a generated volume and the
  label map the factory conditioned it on, from its control manifest), used
  two ways with the same optimizer steps as their real-only arm: mixed into
  the M (against the M alone), and as a first phase before the M (against
  a first phase on the M too). MONAI Dice on S held-out real phantoms
  (classes: lung, heart, aorta, liver, spine, pleural effusion), mean over
  the seeds. `DICE_GAIN_mixed` and `DICE_GAIN` (the pretrained way) = with -
  without.

Generation is the real factory path: a `ctfactory generate` job (Ray, one
worker, the bundle's sampler) over a JSONL manifest whose records carry each
phantom's report, all 18 labels, its seed and `mask_source: "phantom"`, read
back with `factory.reader.GeneratedVolumes`. Each generated volume is checked
to carry its real phantom's labels and label map before anything trains.

    .venv/bin/python bench/bench_downstream.py --quick      # N=40 T=60 M=4 k=2 S=16
    .venv/bin/python bench/bench_downstream.py              # N=160 T=120 M=8 k=4 S=24

Sizes: --quick is N=40 records (40 generated volumes), T=60 classifier test
phantoms, classifier seeds 0 1 2 at 20 epochs; M=4 real + k*M=8 generated
segmentation pairs, S=16 test phantoms, segmenter seeds 0 1 at 200 steps of
batch 4 per phase (about 17 min on an idle 2-core CPU; under heavy load far
longer: report `uptime` with the figures). Both
networks work on the evaluation's common grid, 48x48x32 at 8x8x10 mm. The
full default is N=160, T=120, M=8, k=4, S=24, 400 segmenter steps, 3 seeds.
Every size is also a flag. Last lines: `RATIO tstr <value>`,
`DICE_GAIN_mixed <value>` and `DICE_GAIN <value>`.
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

import torch

from evaluation.data import generated_cases
from evaluation.downstream import (
    SEG_CLASSES,
    WAYS,
    arm_rows,
    check_pairs,
    report_phantoms,
    seg_tensors,
    segmentation_gain,
    tstr,
)
from report2ct.labels import CTRATE_LABELS

ROOT = Path(__file__).resolve().parents[1]
DEMO_BUNDLE = ROOT / "report2ct/bundles/demo"  # text, labels and a ControlNet
GRID = {"spacing_mm": (8.0, 8.0, 10.0), "shape": (48, 48, 32)}  # evaluation.report.EvalSettings
QUICK = {
    "n": 40,
    "test": 60,
    "m": 4,
    "k": 2,
    "seg_test": 16,
    "seg_steps": 200,
    "cls_seeds": [0, 1, 2],
    "seg_seeds": [0, 1],
}
FULL = {
    "n": 160,
    "test": 120,
    "m": 8,
    "k": 4,
    "seg_test": 24,
    "seg_steps": 400,
    "cls_seeds": [0, 1, 2],
    "seg_seeds": [0, 1, 2],
}
RECORD_SEED, TEST_SEED = 20_000, 30_000  # phantom seeds: records, held-out test


def resolve_bundle(given: str | None) -> Path:
    """The given bundle (default: the demo bundle), which must have a ControlNet."""
    from report2ct.bundle import read_config

    path = Path(given) if given else DEMO_BUNDLE
    if read_config(path).control is None:
        raise SystemExit(f"{path}: no ControlNet (mask condition) to draw the label maps with")
    return path


def load() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return f"load average {os.getloadavg()}"


def generate(records, *, bundle: Path, out: str, num_steps: int | None) -> tuple[str, dict]:
    """Run the factory on `records`; (run URI, summary)."""
    import ray

    from factory.job import run_generate
    from factory.options import GenerateOptions
    from report2ct.bundle import verify_bundle

    sha = verify_bundle(bundle)
    manifest = Path(out) / f"downstream-{len(records)}.jsonl"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    options = GenerateOptions(
        manifest=str(manifest),
        output=out,
        bundle=str(bundle),
        run=f"downstream-{sha[:12]}-n{len(records)}-s{records[0]['seed']}-steps{num_steps or 'b'}",
        num_steps=num_steps,
    )
    started_ray = not ray.is_initialized()
    try:
        result = run_generate(options)
    finally:
        if started_ray and ray.is_initialized():
            ray.shutdown()
    if result.exit_code != 0:
        raise SystemExit(
            f"generate job {result.run_uri} ended with exit code {result.exit_code}: "
            f"{result.counts}; see its errors/ parts"
        )
    return result.run_uri, result.summary


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="the quick sizes (see above)")
    parser.add_argument("--bundle", default=None, help="default: report2ct/bundles/demo")
    parser.add_argument("--n", type=int, help="TSTR: records generated (and real phantoms)")
    parser.add_argument("--test", type=int, help="TSTR: held-out real test phantoms")
    parser.add_argument("--m", type=int, help="segmentation: real training pairs")
    parser.add_argument("--k", type=int, help="segmentation: generated pairs per real pair")
    parser.add_argument("--seg-test", type=int, help="segmentation: held-out test phantoms")
    parser.add_argument(
        "--seg-steps", type=int, help="segmenter optimizer steps (each phase of each arm)"
    )
    parser.add_argument("--cls-epochs", type=int, default=20, help="classifier epochs over N")
    parser.add_argument("--cls-seeds", type=int, nargs="+")
    parser.add_argument("--seg-seeds", type=int, nargs="+")
    parser.add_argument("--num-steps", type=int, default=None, help="sampling steps (bundle's)")
    parser.add_argument(
        "--out", default=None, help="factory output root, kept (a rerun reuses its volumes)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for training (1: on a shared 2-core CPU one thread ran "
        "these networks ~3x faster than two)",
    )
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    sizes = dict(QUICK if args.quick else FULL)
    for key in sizes:
        if getattr(args, key, None) is not None:
            sizes[key] = getattr(args, key)
    n, m, k = sizes["n"], sizes["m"], sizes["k"]
    if m + k * m > n:
        raise SystemExit(f"segmentation needs M + k*M <= N records: M={m}, k={k}, N={n}")

    started = time.time()
    bundle = resolve_bundle(args.bundle)
    from report2ct.bundle import read_config

    config = read_config(bundle)
    shape, spacing = tuple(config.default_shape), tuple(config.default_spacing_mm)
    print(f"bundle {bundle.relative_to(ROOT) if bundle.is_relative_to(ROOT) else bundle}")
    print(f"load at start: {load()}")
    print(
        f"sizes: N={n} records (seeds {RECORD_SEED}..{RECORD_SEED + n - 1}), "
        f"T={sizes['test']} classifier test phantoms (seeds {TEST_SEED}..), "
        f"M={m} real + k*M={k * m} generated segmentation pairs, "
        f"S={sizes['seg_test']} segmentation test phantoms (the first S test seeds); "
        f"volumes {shape} at {spacing} mm, networks on {GRID['shape']} at {GRID['spacing_mm']} mm"
    )
    print(
        f"seeds: classifier {sizes['cls_seeds']} ({args.cls_epochs} epochs over N), "
        f"segmenter {sizes['seg_seeds']} ({sizes['seg_steps']} steps of 4); threads {args.threads}"
    )

    t = time.time()
    pool = report_phantoms(range(RECORD_SEED, RECORD_SEED + n), shape=shape, spacing_mm=spacing)
    test = [
        p.case
        for p in report_phantoms(
            range(TEST_SEED, TEST_SEED + max(sizes["test"], sizes["seg_test"])),
            shape=shape,
            spacing_mm=spacing,
            id_prefix="test-",
        )
    ]
    print(f"phantoms drawn in {time.time() - t:.0f} s")

    t = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-downstream-") as scratch:
        run_uri, summary = generate(
            [p.record for p in pool],
            bundle=bundle,
            out=args.out or scratch,
            num_steps=args.num_steps,
        )
        real = [p.case for p in pool]
        synthetic = check_pairs(real, generated_cases(run_uri))
    print(
        f"generated {len(synthetic)} volumes in {time.time() - t:.0f} s "
        f"(factory: {summary.get('counts')}, seconds {summary.get('seconds', {}).get('time_split')})"
    )

    torch.set_num_threads(args.threads)
    t = time.time()
    result = tstr(
        real,
        synthetic,
        test[: sizes["test"]],
        seeds=sizes["cls_seeds"],
        epochs=args.cls_epochs,
        **GRID,
    )
    print(
        f"\nTSTR (macro AUROC on {sizes['test']} held-out real phantoms; {time.time() - t:.0f} s)"
    )
    for row in arm_rows(result["arms"]):
        print("  " + row)
    arms = result["arms"]
    print(f"  {'label':36s} " + " ".join(f"{name:>15s}" for name in arms))
    for label in CTRATE_LABELS:
        values = [arms[a].per_label[label] for a in arms]
        print(
            f"  {label:36s} "
            + " ".join(f"{v:15.3f}" if v is not None else f"{'-':>15s}" for v in values)
        )

    t = time.time()
    seg_real = seg_tensors(real[:m], **GRID)
    seg_gen = seg_tensors(synthetic[m : m + k * m], **GRID)
    seg_test = seg_tensors(test[: sizes["seg_test"]], **GRID)
    seg = segmentation_gain(
        seg_real, seg_gen, seg_test, seeds=sizes["seg_seeds"], steps=sizes["seg_steps"]
    )
    print(
        f"\nSegmentation (MONAI Dice on {sizes['seg_test']} held-out real phantoms; "
        f"{time.time() - t:.0f} s)"
    )
    for row in arm_rows(seg["arms"]):
        print("  " + row)
    for way, (with_, without) in WAYS.items():
        print(
            f"  gain {way:10s} ({with_} - {without}) per seed "
            + " ".join(f"{d:+.3f}" for d in seg["gains_per_seed"][way])
            + f"  mean {seg['gains'][way]:+.3f}"
        )
    print(f"  {'class':36s} " + " ".join(f"{name:>15s}" for name in seg["arms"]))
    for name in SEG_CLASSES:
        values = [a.per_label[name] for a in seg["arms"].values()]
        print(
            f"  {name:36s} "
            + " ".join(f"{v:15.3f}" if v is not None else f"{'-':>15s}" for v in values)
        )

    wall = time.time() - started
    print(f"\nwall {wall / 60:.1f} min; load at end: {load()}")
    if args.json:
        figures = {
            "sizes": sizes,
            "bundle": str(bundle),
            "wall_s": wall,
            "tstr": {"ratio": result["ratio"], "arms": {a: vars(v) for a, v in arms.items()}},
            "segmentation": {
                "gains": seg["gains"],
                "arms": {a: vars(v) for a, v in seg["arms"].items()},
            },
        }
        Path(args.json).write_text(json.dumps(figures, indent=2))
    seg_arms = seg["arms"]
    print(
        f"macro AUROC synthetic-trained {arms['synthetic'].mean:.3f} / real-trained "
        f"{arms['real'].mean:.3f}; Dice real+generated {seg_arms['real+generated'].mean:.3f} - "
        f"real {seg_arms['real'].mean:.3f}; generated, real {seg_arms['generated, real'].mean:.3f}"
        f" - real, real {seg_arms['real, real'].mean:.3f}"
    )
    print(f"RATIO tstr {result['ratio']:.3f}")
    print(f"DICE_GAIN_mixed {seg['gains']['mixed']:+.3f}")
    print(f"DICE_GAIN {seg['gain']:+.3f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
