"""What per-volume label verification buys, and what it costs: the same
phantom-report records generated twice by the factory (`ctfactory generate`,
a local Ray), without and with `--verify default --resample K`, then both
runs scored by `ctfactory evaluate` with one classifier (trained on a
reference phantom set drawn from other seeds than the verifier's, so the
selection is not graded by the network that made it).

    .venv/bin/python bench/bench_verify.py [--bundle DIR] [--n 32] [--resample 3] [--work DIR]

Prints the label fidelity (macro AUROC of the evaluation classifier on the
delivered volumes against the labels asked for, and its ratio to held-out
real phantoms) of each run, the AUROC of the labels the verifier judges,
the verified run's pass rate and draws, and RATIO lines: fidelity with /
without, and the extra compute per delivered volume (the runs' summed
sample + decode + verify seconds, verified / plain). A rerun with the same
--work reuses its reference, runs and scores, only for the same bundle,
verifier and settings (asked.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "jobs.cli"]
RECORD_SEEDS = 600_000  # far from the verifier's (0.., 500000..) and the reference's


def ctfactory(*args: str) -> None:
    print("+ ctfactory", " ".join(args), flush=True)
    subprocess.run([*CLI, *args], cwd=ROOT, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def run_rows(run: Path) -> list[dict]:
    from factory.index import read_index
    from factory.storage import open_storage

    return [entry.to_json() for entry in read_index(open_storage(str(run)))]


def compute_s(rows: list[dict]) -> float:
    return sum(
        sum(row["timings_s"].get(k, 0.0) for k in ("sample", "decode", "verify")) for row in rows
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", default="report2ct/bundles/demo")
    parser.add_argument("--verifier", default="default")
    parser.add_argument("--n", type=int, default=32, help="records (phantom reports with labels)")
    parser.add_argument("--resample", type=int, default=3)
    parser.add_argument("--reference-n", type=int, default=240)
    parser.add_argument("--work", type=Path, default=Path("runs/bench-verify"))
    args = parser.parse_args()

    from evaluation.ablation import phantom_records
    from factory.verify import Verifier
    from report2ct.bundle import read_config, verify_bundle
    from report2ct.labels import CTRATE_LABELS

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    # A rerun reuses the work folder's runs only for the same bundle and settings.
    asked = {
        "bundle_sha256": verify_bundle(args.bundle),
        "verifier_sha256": Verifier.load(args.verifier).sha256,
        **{k: v for k, v in vars(args).items() if k not in ("work", "bundle", "verifier")},
    }
    record = work / "asked.json"
    if record.exists() and json.loads(record.read_text()) != asked:
        raise SystemExit(f"{work} holds runs of another bundle or settings: give another --work")
    record.write_text(json.dumps(asked, indent=1))
    reference = work / "reference"
    if not (reference / "metadata").exists():
        ctfactory(
            "phantoms", "--n", str(args.reference_n), "--seed", "90000", "--out", str(reference)
        )
    config = read_config(args.bundle)
    manifest = work / "records.jsonl"
    records = phantom_records(
        range(RECORD_SEEDS, RECORD_SEEDS + args.n), spacing_mm=config.default_spacing_mm
    )
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))

    runs = {"plain": [], "verified": ["--verify", args.verifier, "--resample", str(args.resample)]}
    results = {}
    for run, extra in runs.items():
        if not (work / "gen" / run / "summary.json").exists():
            ctfactory(
                "generate", "-m", str(manifest), "-o", str(work / "gen"), "--run", run,
                "--bundle", args.bundle, "--workers", "1", *extra,
            )  # fmt: skip
        shared = []
        models = work / "eval-plain" / "models"
        if run != "plain":
            shared = ["--classifier", str(models / "classifier"), "--clip", str(models / "clip"),
                      "--feature-net", str(models / "slice-net")]  # fmt: skip
        out = work / f"eval-{run}"
        if not (out / "metrics.json").exists():
            ctfactory(
                "evaluate",
                "-g",
                str(work / "gen" / run),
                "-r",
                str(reference),
                "-o",
                str(out),
                *shared,
            )
        results[run] = json.loads((out / "metrics.json").read_text())["label_fidelity"]

    rows = {run: run_rows(work / "gen" / run) for run in runs}
    checks = [row["verification"] for row in rows["verified"]]
    thresholds = Verifier.load(args.verifier).thresholds  # the labels it judges
    judged = [name for name in CTRATE_LABELS if thresholds.get(name) is not None]
    passed = [c["passed"] for c in checks if c["passed"] is not None]
    draws = sum(c["tries"] for c in checks)
    print(
        f"records {args.n}, delivered plain {len(rows['plain'])}, verified {len(rows['verified'])}"
    )
    print(
        f"verified: {sum(passed)}/{len(passed)} judged volumes passed, {draws} draws for "
        f"{len(checks)} volumes ({draws / max(len(checks), 1):.2f} per volume)"
    )
    for run, fidelity in results.items():
        per = fidelity["generated"]["per_label"]
        shown = ", ".join(f"{n} {per[n]:.3f}" for n in judged if per.get(n) is not None)
        print(
            f"{run:9s} fidelity macro AUROC {fidelity['generated']['macro']:.3f} "
            f"(ratio {fidelity['ratio']:.3f} to held-out real {fidelity['real']['macro']:.3f}); {shown}"
        )
    plain, verified = (
        results["plain"]["generated"]["macro"],
        results["verified"]["generated"]["macro"],
    )
    print(f"RATIO verified_vs_plain_fidelity {verified / plain:.3f}")
    print(f"RATIO verified_fidelity_ratio {results['verified']['ratio']:.3f}")
    print(f"RATIO plain_fidelity_ratio {results['plain']['ratio']:.3f}")
    per_volume = {run: compute_s(rows[run]) / max(len(rows[run]), 1) for run in runs}
    print(
        f"compute per delivered volume: plain {per_volume['plain']:.2f} s, "
        f"verified {per_volume['verified']:.2f} s"
    )
    print(f"RATIO verified_vs_plain_compute {per_volume['verified'] / per_volume['plain']:.2f}")


if __name__ == "__main__":
    main()
