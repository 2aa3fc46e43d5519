"""Ablations the paper reports, on the phantom world: one text encoder vs
several, and guidance off vs on at two scales; and, for a bundle with the
label condition, asking by the report, by the labels alone, or by both.

A variant is (bundle, guidance_scale); one encoder vs several needs two
bundles trained alike but for their encoders (the demo recipe run twice).
Each variant generates the same records with the same seeds, and is scored by
the same evaluation networks against the same held-out real set, so rows
differ only by the variant.

    rows = run_ablation(guidance_variants(bundle), records, held_out, ...)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from evaluation.classifier import LabelClassifier
from evaluation.clip import ClipModel
from evaluation.data import Case, report_text
from evaluation.report import EvalSettings, score
from factory.manifest import ManifestRecord
from report2ct.labels import CTRATE_LABELS

# Guidance as report2ct applies it: v_uncond + s (v_cond - v_uncond); s = 1 is
# the plain conditional model ("off"), ARCHITECTURE.md's operating point is ~5.
GUIDANCE_OFF = 1.0
GUIDANCE_ON = (3.0, 5.0)
ASK_BY = ("text", "labels", "text+labels")


@dataclass(frozen=True)
class Variant:
    name: str
    bundle: str
    guidance_scale: float
    ask_by: str = "text"  # what of each record conditions generation: ASK_BY


def condition_variants(
    bundle: str, ask_by: Sequence[str], *, guidance_scale: float = GUIDANCE_ON[-1], prefix=""
) -> list[Variant]:
    """One variant per way of asking (labels alone, text + labels, ...)."""
    unknown = sorted(set(ask_by) - set(ASK_BY))
    if unknown:
        raise ValueError(f"ask_by {unknown}: choose from {', '.join(ASK_BY)}")
    return [Variant(f"{prefix}by {way}", bundle, guidance_scale, way) for way in ask_by]


def guidance_variants(
    bundle: str, *, scales_on: Sequence[float] = GUIDANCE_ON, prefix: str = ""
) -> list[Variant]:
    """Guidance off, then on at each of `scales_on`, for one bundle; a scale
    given twice, or the off scale itself, adds no second identical row."""
    rows = [Variant(f"{prefix}guidance off (s={GUIDANCE_OFF:g})", bundle, GUIDANCE_OFF)]
    on = [s for s in dict.fromkeys(scales_on) if s != GUIDANCE_OFF]
    return rows + [Variant(f"{prefix}guidance s={s:g}", bundle, s) for s in on]


def generate_cases(
    model: Any,
    guidance_scale: float,
    records: Sequence[Mapping[str, Any]],
    *,
    num_steps: int | None = None,
    shape: tuple[int, int, int] | None = None,
    batch_size: int = 4,
    ask_by: str = "text",
) -> list[Case]:
    """Generate one volume per manifest record (the `ctfactory generate` input
    format, validated by the factory's own model) with a loaded `Report2CT`,
    conditioned on the records' text, labels or both (`ask_by`)."""
    from report2ct.pipeline import VolumeRequest, generate
    from report2ct.rng import volume_seed

    if ask_by not in ASK_BY:
        raise ValueError(f"ask_by {ask_by!r}: choose from {', '.join(ASK_BY)}")
    text, labels = "text" in ask_by, "labels" in ask_by
    parsed = [ManifestRecord.model_validate(dict(r)) for r in records]
    cases = []
    for start in range(0, len(parsed), batch_size):
        chunk = parsed[start : start + batch_size]
        requests = [
            VolumeRequest(
                # The factory's seed rule: the same record gives the same
                # volume here, in every variant and in a generate job.
                seed=volume_seed(r.id, r.seed),
                findings=r.findings if text else None,
                impression=r.impression if text else None,
                labels=r.labels if labels else None,
                spacing_mm=r.spacing_mm,
            )
            for r in chunk
        ]
        result = generate(
            model,
            requests,
            shape=shape,
            guidance_scale=guidance_scale,
            num_steps=num_steps,
            precision="fp32",
        )
        for record, volume, spacing in zip(
            chunk, result.volumes_hu, result.spacings_mm, strict=True
        ):
            cases.append(
                Case(
                    id=record.id,
                    volume_hu=volume.astype(np.float32),
                    spacing_mm=tuple(float(s) for s in spacing),
                    labels=np.array(
                        [record.labels.get(n, 0) for n in CTRATE_LABELS], dtype=np.int64
                    ),
                    report=report_text(record.findings, record.impression),
                )
            )
    return cases


def run_ablation(
    variants: Sequence[Variant],
    records: Sequence[Mapping[str, Any]],
    held_out: Sequence[Case],
    *,
    classifier: LabelClassifier,
    clip_model: ClipModel,
    feature_net: Any,
    settings: EvalSettings,
    num_steps: int | None = None,
    shape: tuple[int, int, int] | None = None,
) -> list[dict[str, Any]]:
    """One row per variant: fidelity (macro AUROC and ratio), 2.5D FID, CLIP."""
    from report2ct.bundle import load_bundle

    rows, models = [], {}
    for variant in variants:
        if variant.bundle not in models:  # guidance variants share one loaded bundle
            models[variant.bundle] = load_bundle(variant.bundle)
        cases = generate_cases(
            models[variant.bundle],
            variant.guidance_scale,
            records,
            num_steps=num_steps,
            shape=shape,
            ask_by=variant.ask_by,
        )
        metrics = score(
            cases,
            held_out,
            classifier=classifier,
            clip_model=clip_model,
            feature_net=feature_net,
            settings=settings,
        )
        rows.append(
            {
                "variant": variant.name,
                "bundle": variant.bundle,
                "guidance_scale": variant.guidance_scale,
                "ask_by": variant.ask_by,
                "fidelity_macro_auroc": metrics["label_fidelity"]["generated"]["macro"],
                "fidelity_ratio": metrics["label_fidelity"]["ratio"],
                "fid_2p5d_mean": metrics["fid_2p5d"]["mean"],
                "clip_text_to_image": metrics["clip"]["text_to_image"],
            }
        )
    return rows


def ablation_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    def fmt(value, digits):
        return "n/a" if value is None else f"{value:.{digits}f}"

    lines = [
        "| variant | guidance | fidelity (macro AUROC) | fidelity ratio | 2.5D FID | CLIP text-to-image |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['guidance_scale']:g} | {fmt(r['fidelity_macro_auroc'], 3)} | "
            f"{fmt(r['fidelity_ratio'], 3)} | {fmt(r['fid_2p5d_mean'], 4)} | {fmt(r['clip_text_to_image'], 1)} |"
        )
    return "\n".join(lines) + "\n"


def phantom_records(
    seeds: Sequence[int], *, spacing_mm: Sequence[float], prevalence: float = 0.3
) -> list[dict[str, Any]]:
    """Manifest records (report, labels, spacing, seed) of phantoms: what the
    generator is asked for; their volumes are not needed here."""
    from phantom.world import make_phantom

    records = []
    for seed in seeds:
        # Only the report and labels are used; a small grid keeps drawing cheap.
        p = make_phantom(
            seed, shape=(24, 24, 16), spacing_mm=tuple(spacing_mm), prevalence=prevalence
        )
        records.append(
            {
                "id": f"phantom_{seed}",
                "findings": p.findings,
                "impression": p.impression,
                "labels": p.labels,
                "spacing_mm": tuple(spacing_mm),
                "seed": seed,
            }
        )
    return records
