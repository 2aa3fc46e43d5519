"""`ctfactory evaluate`: every metric of one generated set against a real
reference, written as `metrics.json` and a Markdown report with PNG montages.

    metrics = evaluate(generated, reference_train, reference_held_out, out_dir=out)

The evaluation networks (classifier, slice feature net, CLIP pair) are loaded
from bundles when given, otherwise trained here on the reference's training
split and saved under `out_dir/models/` so a run can be repeated and audited.
Generated volumes are compared against the reference's *held-out* split,
which none of the evaluation networks saw.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evaluation.adherence import mask_adherence
from evaluation.classifier import (
    FINE_GRID,
    LabelClassifier,
    auroc_table,
    choose_thresholds,
    label_fidelity,
    train_classifier,
)
from evaluation.clip import ClipModel, clip_scores, train_clip
from evaluation.data import Case, stack_grid, to_grid
from evaluation.fid25d import (
    PLANES,
    features_2p5d,
    fid_2p5d,
    load_feature_net,
    train_slice_net,
)
from report2ct.labels import CTRATE_LABELS


@dataclass(frozen=True)
class EvalSettings:
    """The common grid and how much to train evaluation networks that are not
    given as bundles. Defaults suit phantom sets of a few hundred volumes."""

    spacing_mm: tuple[float, float, float] = (8.0, 8.0, 10.0)
    shape: tuple[int, int, int] = (48, 48, 32)
    classifier_epochs: int = 20
    clip_epochs: int = 20
    slice_net_epochs: int = 3
    center_slices_ratio: float = 0.8  # MAISI's option: leave out the mostly-air end slices
    seed: int = 0
    # The label classifier's own grid: "fine" (evaluation.classifier.FINE_GRID,
    # 4 x 4 x 5 mm, where a nodule spans several voxels) or "common" (the
    # grid above, as before; cheap, but an 8 mm nodule is one voxel or less).
    classifier_grid: str = "fine"

    def classifier_grid_kwargs(self) -> dict[str, Any]:
        if self.classifier_grid == "fine":
            return dict(FINE_GRID)
        if self.classifier_grid == "common":
            return {"spacing_mm": self.spacing_mm, "shape": self.shape, "conv1_stride": 1}
        raise ValueError(
            f"classifier_grid must be 'fine' or 'common', got {self.classifier_grid!r}"
        )


def evaluation_models(
    train: Sequence[Case],
    settings: EvalSettings,
    out_dir: Path,
    *,
    classifier: str | None,
    clip: str | None,
    feature_net: str | None,
    held_out: Sequence[Case] = (),
) -> tuple[LabelClassifier, ClipModel, Any, dict[str, str]]:
    """The evaluation networks: loaded from bundles, or trained on `train`
    and saved under out_dir/models/. A classifier trained here is saved with
    per-label thresholds chosen on `held_out` (when given): a verifier
    bundle `ctfactory generate --verify` takes."""
    grid = {"spacing_mm": settings.spacing_mm, "shape": settings.shape}
    sources = {}
    if classifier:
        cls, sources["classifier"] = LabelClassifier.load(classifier), classifier
    else:
        cls = train_classifier(
            train,
            epochs=settings.classifier_epochs,
            seed=settings.seed,
            **settings.classifier_grid_kwargs(),
        )
        metadata: dict[str, Any] = {"trained_on": len(train), "epochs": settings.classifier_epochs}
        if held_out:
            labels = np.stack([c.labels for c in held_out])
            scores = cls.predict(held_out)
            metadata |= choose_thresholds(scores, labels)
            metadata["held_out"] = len(held_out)
            metadata["held_out_macro_auroc"] = auroc_table(scores, labels)["macro"]
        cls.save(out_dir / "models" / "classifier", metadata=metadata)
        sources["classifier"] = f"trained here on {len(train)} reference volumes"
    if clip:
        clip_model, sources["clip"] = ClipModel.load(clip), clip
    else:
        clip_model = train_clip(train, epochs=settings.clip_epochs, seed=settings.seed, **grid)
        clip_model.save(out_dir / "models" / "clip", metadata={"trained_on": len(train)})
        sources["clip"] = f"trained here on {len(train)} reference volumes"
    if feature_net:
        net, sources["feature_net"] = load_feature_net(feature_net), feature_net
    else:
        volumes = stack_grid(train, **grid)
        labels = torch.from_numpy(np.stack([c.labels for c in train]))
        net = train_slice_net(volumes, labels, epochs=settings.slice_net_epochs, seed=settings.seed)
        net.save(out_dir / "models" / "slice-net", metadata={"trained_on": len(train)})
        sources["feature_net"] = f"{net.name}, trained here on {len(train)} reference volumes"
    return cls, clip_model, net, sources


def score(
    generated: Sequence[Case],
    held_out: Sequence[Case],
    *,
    classifier: LabelClassifier,
    clip_model: ClipModel,
    feature_net: Any,
    settings: EvalSettings,
) -> dict[str, Any]:
    """Fidelity, 2.5D FID and CLIP scores of `generated` against `held_out`."""
    grid = {"spacing_mm": settings.spacing_mm, "shape": settings.shape}
    ratio = settings.center_slices_ratio
    fid = fid_2p5d(
        features_2p5d(stack_grid(generated, **grid), feature_net, center_slices_ratio=ratio),
        features_2p5d(stack_grid(held_out, **grid), feature_net, center_slices_ratio=ratio),
    )
    return {
        "label_fidelity": label_fidelity(classifier, generated, held_out),
        "fid_2p5d": fid,
        "clip": clip_scores(clip_model, generated, held_out),
    }


def evaluate(
    generated: Sequence[Case],
    reference_train: Sequence[Case],
    reference_held_out: Sequence[Case],
    *,
    out_dir: str | Path,
    settings: EvalSettings | None = None,
    classifier: str | None = None,
    clip: str | None = None,
    feature_net: str | None = None,
) -> dict[str, Any]:
    """Score, then write `metrics.json`, `report.md` and `montages/*.png`."""
    settings = settings or EvalSettings()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cls, clip_model, net, sources = evaluation_models(
        reference_train,
        settings,
        out,
        classifier=classifier,
        clip=clip,
        feature_net=feature_net,
        held_out=reference_held_out,
    )
    metrics = score(
        generated,
        reference_held_out,
        classifier=cls,
        clip_model=clip_model,
        feature_net=net,
        settings=settings,
    )
    masked = [c for c in generated if c.mask is not None]
    if masked:  # volumes generated from label maps: does each follow its map?
        metrics["mask_adherence"] = mask_adherence(
            (c.volume_hu, c.mask, c.mask_classes or {}) for c in masked
        )
    metrics["fid_2p5d"]["feature_net"] = getattr(net, "name", type(net).__name__)
    metrics["counts"] = {
        "generated": len(generated),
        "reference_train": len(reference_train),
        "reference_held_out": len(reference_held_out),
    }
    metrics["models"] = sources
    metrics["settings"] = asdict(settings)
    metrics["settings"]["classifier"] = cls.config  # the grid it sees
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    montages = write_montages(generated, reference_held_out, out / "montages", settings=settings)
    (out / "report.md").write_text(markdown(metrics, montages))
    return metrics


# --- presentation -------------------------------------------------------------


def _fmt(value: float | None, digits: int = 3) -> str:
    return (
        "n/a"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{value:.{digits}f}"
    )


def _grid(metrics: dict[str, Any]) -> str:
    config = metrics.get("settings", {}).get("classifier")
    if not config:
        return "n/a"
    spacing = " x ".join(f"{v:g}" for v in config["spacing_mm"])
    shape = "x".join(str(v) for v in config["shape"])
    return f"{shape} voxels at {spacing} mm"


def markdown(metrics: dict[str, Any], montages: dict[str, str]) -> str:
    fidelity, fid, clip = metrics["label_fidelity"], metrics["fid_2p5d"], metrics["clip"]
    counts = metrics["counts"]
    lines = [
        "# Evaluation report",
        "",
        f"{counts['generated']} generated volumes against {counts['reference_held_out']} held-out "
        f"real volumes; evaluation networks: {', '.join(f'{k}: {v}' for k, v in metrics['models'].items())}.",
        "",
        "## Headline",
        "",
        "| metric | value |",
        "|---|---|",
        f"| label fidelity ratio (macro AUROC generated / real) | {_fmt(fidelity['ratio'])} |",
        f"| label fidelity, macro AUROC generated (held-out real: the classifier's own "
        f"AUROC) | {_fmt(fidelity['generated']['macro'])} ({_fmt(fidelity['real']['macro'])}) |",
        f"| 2.5D FID, mean of planes ({fid['feature_net']}) | {_fmt(fid['mean'], 4)} |",
        f"| CLIP text-to-image, generated (real) | {_fmt(clip['text_to_image'], 1)} "
        f"({_fmt(clip['real_text_to_image'], 1)}) |",
        f"| CLIP image-to-image | {_fmt(clip['image_to_image'], 1)} |",
        "",
        "## Label fidelity (AUROC of the classifier)",
        "",
        f"Classifier grid: {_grid(metrics)}. The held-out real column is the classifier's "
        "own AUROC per label: a generated figure can only be read against it.",
        "n/a: the label has a single class in that set (no AUROC; left out of the macro).",
        "",
        "| label | generated | real (held out) |",
        "|---|---|---|",
    ]
    for name in CTRATE_LABELS:
        gen, real = fidelity["generated"]["per_label"][name], fidelity["real"]["per_label"][name]
        lines.append(f"| {name} | {_fmt(gen)} | {_fmt(real)} |")
    lines.append(
        f"| **macro** | **{_fmt(fidelity['generated']['macro'])}** | **{_fmt(fidelity['real']['macro'])}** |"
    )
    if "mask_adherence" in metrics:
        adherence = metrics["mask_adherence"]
        lines += [
            "",
            f"## Mask adherence ({adherence['volumes']} volumes generated from label maps)",
            "",
            "Fraction of voxels whose HU lies in the range of the tissue the map asks for "
            "(interior: each class eroded by one voxel).",
            "",
            "| tissue | all voxels | interior | voxels |",
            "|---|---|---|---|",
            f"| **overall** | **{_fmt(adherence['overall'])}** | "
            f"**{_fmt(adherence['overall_interior'])}** | |",
            f"| in the body | {_fmt(adherence['in_body'])} | "
            f"{_fmt(adherence['in_body_interior'])} | |",
        ]
        lines += [
            f"| {tissue} | {_fmt(row['fraction'])} | {_fmt(row['fraction_interior'])} | "
            f"{row['voxels']} |"
            for tissue, row in adherence["per_tissue"].items()
        ]
    lines += ["", "## 2.5D FID", "", "| plane | FID |", "|---|---|"]
    lines += [f"| {plane} | {_fmt(fid[plane], 4)} |" for plane in (*PLANES, "mean")]
    lines += ["", "## Real vs generated, per finding", ""]
    for name, path in montages.items():
        lines += [f"### {name}", "", f"![{name}]({path})", ""]
    return "\n".join(lines) + "\n"


def write_montages(
    generated: Sequence[Case], real: Sequence[Case], out_dir: Path, *, settings: EvalSettings
) -> dict[str, str]:
    """One PNG per finding present in both sets: central axial, coronal and
    sagittal slices of a real volume with the finding (top) and of a generated
    volume whose report asked for it (bottom). Returns {finding: relative path}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for index, name in enumerate(CTRATE_LABELS):
        pair = [next((c for c in cases if c.labels[index]), None) for cases in (real, generated)]
        if None in pair:
            continue
        figure, axes = plt.subplots(2, 3, figsize=(7.5, 5), squeeze=False)
        for row, (title, case) in enumerate(zip(("real", "generated"), pair, strict=True)):
            volume = to_grid(case, spacing_mm=settings.spacing_mm, shape=settings.shape)[0].numpy()
            x, y, z = (n // 2 for n in volume.shape)
            # Radiological display from RAS+ [x, y, z]: the patient's left
            # (+x) on the image's right, anterior (+y) and superior (+z) up.
            views = {
                "axial": volume[:, :, z].T[::-1, :],
                "coronal": volume[:, y, :].T[::-1, :],
                "sagittal": volume[x, :, :].T[::-1, :],
            }
            for col, (plane, image) in enumerate(views.items()):
                axes[row, col].imshow(image, cmap="gray", vmin=0.0, vmax=1.0)
                axes[row, col].set_title(f"{title} {case.id}: {plane}", fontsize=7)
                axes[row, col].axis("off")
        figure.suptitle(name)
        figure.tight_layout()
        file = f"{index:02d}_{name.lower().replace(' ', '_')}.png"
        figure.savefig(out_dir / file, dpi=80)
        plt.close(figure)
        written[name] = f"{out_dir.name}/{file}"
    return written
