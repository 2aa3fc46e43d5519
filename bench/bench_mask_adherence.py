"""Does a bundle's ControlNet put the right tissue where the label map says?
Mask adherence (`evaluation.adherence`) of volumes generated from phantom
label maps, beside the phantoms themselves (the ceiling: real texture, noise
and partial volume) and beside the same requests without the mask (the
floor: the model draws some anatomy, not this one).

    .venv/bin/python bench/bench_mask_adherence.py [--bundle DIR] [--n 16]

Each case is phantom `seed` (findings at the phantom world's prevalence): its
label map, its labels and its report; generated with mask + labels + report,
with mask + labels only, and with labels + report and no mask. A fourth row
passes the phantoms through the bundle's VAE (encode, decode): what its
decoder, which draws every generated volume, makes of the truth itself.
Prints the adherence table and RATIO lines (generated / phantom, generated /
VAE reconstruction).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from evaluation.adherence import mask_adherence, through_vae
from phantom.world import make_phantom
from report2ct.bundle import load_bundle
from report2ct.pipeline import VolumeRequest, generate


def _num(value: float | None) -> str:
    return f"{value:9.3f}" if value is not None else f"{'-':>9s}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", default="report2ct/bundles/demo")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    model = load_bundle(args.bundle)
    config = model.config
    if config.control is None:
        raise SystemExit(f"{args.bundle}: this bundle has no ControlNet (mask condition)")
    classes = dict(config.control.legend)
    shape, spacing = config.default_shape, config.default_spacing_mm
    phantoms = [
        make_phantom(seed, shape=shape, spacing_mm=spacing) for seed in range(9000, 9000 + args.n)
    ]

    def run(*, text: bool, mask: bool) -> np.ndarray:
        out = []
        for start in range(0, len(phantoms), args.batch):
            chunk = phantoms[start : start + args.batch]
            out.append(
                generate(
                    model,
                    [
                        VolumeRequest(
                            seed=p.seed,
                            findings=p.findings if text else None,
                            impression=p.impression if text else None,
                            labels=p.labels,
                            spacing_mm=spacing,
                            mask=p.mask if mask else None,
                        )
                        for p in chunk
                    ],
                    num_steps=args.steps,
                ).volumes_hu
            )
        return np.concatenate(out)

    variants = {
        "phantom (ceiling)": np.stack([p.volume_hu for p in phantoms]),
        "phantom through the VAE": through_vae(model.codec, [p.volume_hu for p in phantoms]),
        "mask + labels + report": run(text=True, mask=True),
        "mask + labels": run(text=False, mask=True),
        "labels + report, no mask": run(text=True, mask=False),
    }
    results = {
        name: mask_adherence((v, p.mask, classes) for v, p in zip(volumes, phantoms, strict=True))
        for name, volumes in variants.items()
    }
    tissues = sorted(results["phantom (ceiling)"]["per_tissue"])
    print(
        f"{'variant':26s} {'overall':>8s} {'in body':>8s} {'interior':>9s}  "
        + " ".join(f"{t[:9]:>9s}" for t in tissues)
    )
    for name, result in results.items():
        per = result["per_tissue"]
        print(
            f"{name:26s} {result['overall']:8.3f} {result['in_body']:8.3f} "
            f"{result['in_body_interior']:9.3f}  "
            + " ".join(f"{_num(per.get(t, {}).get('fraction'))}" for t in tissues)
        )
    ceiling, codec = results["phantom (ceiling)"], results["phantom through the VAE"]
    for name in ("mask + labels + report", "mask + labels", "labels + report, no mask"):
        key = name.replace(" + ", "_").replace(", ", "_").replace(" ", "_")
        print(f"RATIO adherence_{key} {results[name]['overall']:.3f}")
        print(f"RATIO in_body_{key}_vs_phantom {results[name]['in_body'] / ceiling['in_body']:.3f}")
        print(f"RATIO in_body_{key}_vs_vae {results[name]['in_body'] / codec['in_body']:.3f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
