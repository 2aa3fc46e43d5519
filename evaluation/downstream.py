"""What generated volumes are worth to the people who train on them.

Two downstream tasks, each run as two or more *arms* that differ only in
their training data (same seeds, same held-out real test set, same number of
optimizer steps), so every figure can come out either way:

- TSTR (train on synthetic, test on real): the label classifier of
  `evaluation.classifier` trained on generated volumes against one trained on
  the real phantoms of the same reports (and on both), scored by macro AUROC
  on held-out real phantoms. `tstr(...)["ratio"]` is synthetic / real.
- Segmentation: a small MONAI 3D UNet trained on real (image, mask) pairs
  against the same pairs plus generated ones (a generated volume paired with
  the label map it was conditioned on), mixed, or first on the generated
  pairs and then on the real ones; scored by MONAI's Dice on held-out real
  phantoms. `segmentation_gain(...)["gains"]` is with - without, each way.

The phantom side: `report_phantoms` draws phantoms whose label map is exactly
the one the factory draws for their manifest record (`phantom_record`:
`mask_source: "phantom"`, the record's labels all given, the phantom's seed),
so a generated volume and its real counterpart share report, labels and map.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.nets import UNet
from monai.networks.utils import one_hot
from monai.transforms import ResizeWithPadOrCrop, Spacing

from evaluation.classifier import auroc_table, train_classifier
from evaluation.data import Case, report_text, to_grid
from phantom.legend import LABELS
from report2ct.labels import CTRATE_LABELS

# What the segmenter learns: anatomy any chest CT shows, and one finding.
SEG_CLASSES: tuple[str, ...] = ("lung", "heart", "aorta", "liver", "spine", "pleural_effusion")
PHANTOM_CLASSES: dict[int, str] = {label.value: label.name for label in LABELS}


# --- the phantom side -------------------------------------------------------


@dataclass(frozen=True)
class ReportPhantom:
    """A real phantom and the manifest record that asks the factory for it."""

    case: Case  # the real volume, its labels, report and label map
    record: dict[str, Any]  # a `ctfactory generate` manifest record


def report_phantoms(
    seeds: Sequence[int],
    *,
    shape: Sequence[int],
    spacing_mm: Sequence[float],
    prevalence: float = 0.25,
    id_prefix: str = "ds-",
) -> list[ReportPhantom]:
    """One phantom per seed, findings drawn at `prevalence`, then drawn again
    with those labels all requested: the map the factory draws for the
    record (`factory.masks.resolve_mask`: prevalence 0, the record's labels
    requested, the record's seed). The two draws differ only where a large
    effusion's compressive atelectasis becomes a requested one."""
    from phantom.world import labels_of, make_mask, make_phantom

    out = []
    for seed in seeds:
        _, drawn = make_mask(
            seed, shape=tuple(shape), spacing_mm=tuple(spacing_mm), prevalence=prevalence
        )
        p = make_phantom(
            seed,
            shape=tuple(shape),
            spacing_mm=tuple(spacing_mm),
            prevalence=0.0,
            requested=labels_of(drawn),
        )
        case = Case(
            id=f"{id_prefix}{seed}",
            volume_hu=p.volume_hu.astype(np.float32),
            spacing_mm=p.spacing_mm,
            labels=np.array([p.labels[n] for n in CTRATE_LABELS], dtype=np.int64),
            report=report_text(p.findings, p.impression),
            mask=p.mask,
            mask_classes=PHANTOM_CLASSES,
        )
        record = {
            "id": case.id,
            "findings": p.findings,
            "impression": p.impression,
            "labels": dict(p.labels),
            "seed": int(seed),
            "shape": list(shape),
            "spacing_mm": list(spacing_mm),
            "mask_source": "phantom",
        }
        out.append(ReportPhantom(case, record))
    return out


def check_pairs(real: Sequence[Case], generated: Sequence[Case]) -> list[Case]:
    """`generated` in the order of `real` (matched by id), each checked to
    carry its real counterpart's labels and label map: a pairing error would
    otherwise pass silently as a poor figure."""
    by_id = {case.id: case for case in generated}
    missing = [case.id for case in real if case.id not in by_id]
    if missing:
        raise ValueError(f"generated set lacks records {missing[:5]} ({len(missing)} in all)")
    ordered = []
    for case in real:
        gen = by_id[case.id]
        if not np.array_equal(gen.labels, case.labels):
            raise ValueError(
                f"record {case.id}: generated labels {gen.labels.tolist()} differ from the "
                f"real phantom's {case.labels.tolist()}"
            )
        if case.mask is not None:
            if gen.mask is None:
                raise ValueError(f"record {case.id}: the generated volume has no mask")
            if not np.array_equal(gen.mask, case.mask):
                raise ValueError(
                    f"record {case.id}: the generated volume's mask is not its real phantom's "
                    f"({float((gen.mask != case.mask).mean()):.3f} of voxels differ)"
                )
        ordered.append(gen)
    return ordered


# --- TSTR -------------------------------------------------------------------


@dataclass
class Arm:
    """One training set's scores over the training seeds."""

    name: str
    n_train: int
    epochs: int
    steps: int
    per_seed: list[float] = field(default_factory=list)  # headline figure per seed
    per_label: dict[str, float | None] = field(default_factory=dict)  # mean over seeds

    @property
    def mean(self) -> float:
        finite = [v for v in self.per_seed if v is not None and math.isfinite(v)]
        return float(np.mean(finite)) if finite else math.nan


def steps_for(n: int, epochs: int, batch_size: int) -> int:
    return epochs * -(-n // batch_size)


def epochs_for_steps(n: int, steps: int, batch_size: int) -> int:
    """Epochs over `n` cases that come closest to `steps` optimizer steps (>= 1)."""
    return max(1, round(steps / -(-n // batch_size)))


def classifier_arm(
    name: str,
    train: Sequence[Case],
    test: Sequence[Case],
    *,
    seeds: Sequence[int],
    epochs: int,
    spacing_mm: Sequence[float],
    shape: Sequence[int],
    batch_size: int = 8,
    width: int = 8,
) -> Arm:
    """Train the label classifier on `train` once per seed; macro and
    per-label AUROC on `test` (per label: mean over seeds, None where a
    label has one class in `test`)."""
    test_labels = np.stack([c.labels for c in test])
    arm = Arm(name, len(train), epochs, steps_for(len(train), epochs, batch_size))
    tables = []
    for seed in seeds:
        model = train_classifier(
            train,
            spacing_mm=spacing_mm,
            shape=shape,
            epochs=epochs,
            batch_size=batch_size,
            width=width,
            seed=seed,
        )
        table = auroc_table(model.predict(test), test_labels)
        tables.append(table)
        arm.per_seed.append(table["macro"] if table["macro"] is not None else math.nan)
    for label in CTRATE_LABELS:
        values = [t["per_label"][label] for t in tables if t["per_label"][label] is not None]
        arm.per_label[label] = float(np.mean(values)) if values else None
    return arm


def tstr(
    real: Sequence[Case],
    synthetic: Sequence[Case],
    test: Sequence[Case],
    *,
    seeds: Sequence[int] = (0, 1, 2),
    epochs: int = 20,
    spacing_mm: Sequence[float],
    shape: Sequence[int],
    batch_size: int = 8,
    width: int = 8,
    mixed: bool = True,
) -> dict[str, Any]:
    """Arms "real", "synthetic" (and "real+synthetic": both sets, trained for
    the same number of steps as the others) scored on `test`; `ratio` =
    synthetic / real mean macro AUROC. `real` and `synthetic` must be the
    same size: the comparison is per volume."""
    if len(real) != len(synthetic):
        raise ValueError(
            f"TSTR compares equal training sets: {len(real)} real, {len(synthetic)} synthetic"
        )
    common = dict(
        seeds=seeds,
        spacing_mm=spacing_mm,
        shape=shape,
        batch_size=batch_size,
        width=width,
    )
    arms = {
        "real": classifier_arm("real", real, test, epochs=epochs, **common),
        "synthetic": classifier_arm("synthetic", synthetic, test, epochs=epochs, **common),
    }
    if mixed:
        both = [*real, *synthetic]
        steps = steps_for(len(real), epochs, batch_size)
        arms["real+synthetic"] = classifier_arm(
            "real+synthetic",
            both,
            test,
            epochs=epochs_for_steps(len(both), steps, batch_size),
            **common,
        )
    real_mean, synth_mean = arms["real"].mean, arms["synthetic"].mean
    ratio = synth_mean / real_mean if math.isfinite(real_mean) and real_mean > 0 else math.nan
    return {"arms": arms, "ratio": ratio}


# --- segmentation -----------------------------------------------------------


def mask_to_grid(
    case: Case,
    *,
    spacing_mm: Sequence[float],
    shape: Sequence[int],
    classes: Sequence[str] = SEG_CLASSES,
) -> torch.Tensor:
    """`case.mask` as (1, X, Y, Z) int64 class indices (0 background, i + 1
    for `classes[i]`) on the grid `to_grid` puts its image on (nearest
    neighbour; padding is background)."""
    if case.mask is None or case.mask_classes is None:
        raise ValueError(f"case {case.id}: no label map (mask and mask_classes) to segment")
    if case.mask.shape != case.volume_hu.shape:
        raise ValueError(
            f"case {case.id}: mask {case.mask.shape} and volume {case.volume_hu.shape} differ"
        )
    lookup = np.zeros(max(256, int(case.mask.max()) + 1), dtype=np.int64)
    names = {name: i + 1 for i, name in enumerate(classes)}
    for value, name in case.mask_classes.items():
        lookup[int(value)] = names.get(name, 0)
    index = MetaTensor(
        torch.from_numpy(lookup[case.mask].astype(np.float32))[None],
        affine=torch.diag(torch.tensor([*case.spacing_mm, 1.0], dtype=torch.float64)),
    )
    index = Spacing(pixdim=tuple(spacing_mm), mode="nearest", padding_mode="zeros")(index)
    index = ResizeWithPadOrCrop(tuple(shape), mode="constant", value=0)(index)
    return index.as_tensor().round().long()


def seg_tensors(
    cases: Sequence[Case],
    *,
    spacing_mm: Sequence[float],
    shape: Sequence[int],
    classes: Sequence[str] = SEG_CLASSES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 1, X, Y, Z) in [0, 1], labels (N, 1, X, Y, Z) int64)."""
    grid = {"spacing_mm": spacing_mm, "shape": shape}
    images = torch.stack([to_grid(c, **grid) for c in cases])
    labels = torch.stack([mask_to_grid(c, classes=classes, **grid) for c in cases])
    return images, labels


def make_segmenter(num_classes: int, channels: Sequence[int] = (8, 16, 32, 64)) -> UNet:
    """A small MONAI 3D UNet: 1 channel in, background + `num_classes` out."""
    return UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=num_classes + 1,
        channels=tuple(channels),
        strides=(2,) * (len(channels) - 1),
        num_res_units=1,
        norm="batch",
    )


def train_segmenter(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_classes: int,
    steps: int,
    batch_size: int = 4,
    lr: float = 3e-3,
    seed: int = 0,
    channels: Sequence[int] = (8, 16, 32, 64),
    model: UNet | None = None,
) -> UNet:
    """`steps` AdamW steps of Dice + cross-entropy on random batches (drawn
    with `seed`), each volume flipped left/right at random (the phantom
    world's anatomy classes are the same on either side). From a fresh
    network, or on from `model` (a second phase: a fresh optimizer and
    schedule, the weights carried over)."""
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"{len(images)} images and {len(labels)} label maps: need equal, > 0")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = make_segmenter(num_classes, channels) if model is None else model
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    model.train()
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < batch_size:  # epochs of a random order, a batch never repeating a volume
            order = torch.cat([order, torch.randperm(len(images), generator=generator)])
        batch, order = order[:batch_size], order[batch_size:]
        x, y = images[batch], labels[batch]
        flip = (torch.rand(len(batch), generator=generator) < 0.5).view(-1, 1, 1, 1, 1)
        x, y = torch.where(flip, x.flip(2), x), torch.where(flip, y.flip(2), y)
        loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


@torch.no_grad()
def predict_labels(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 4):
    """(N, 1, X, Y, Z) argmax class indices."""
    model.eval()
    return torch.cat(
        [
            model(images[i : i + batch_size]).argmax(1, keepdim=True)
            for i in range(0, len(images), batch_size)
        ]
    )


def dice_per_class(pred: torch.Tensor, truth: torch.Tensor, num_classes: int) -> np.ndarray:
    """MONAI DiceMetric of (N, 1, ...) class-index maps, per foreground class
    (mean over the cases whose truth has that class; NaN where none has)."""
    metric = DiceMetric(
        include_background=False, reduction="mean_batch", ignore_empty=True, get_not_nans=True
    )
    metric(one_hot(pred, num_classes + 1), one_hot(truth, num_classes + 1))
    dice, counted = metric.aggregate()
    # MONAI reports 0 for a class no case shows; that is "not measurable", not a miss.
    return np.where(counted.numpy() > 0, dice.numpy(), np.nan).astype(np.float64)


def macro_dice(per_class: np.ndarray) -> float:
    finite = per_class[np.isfinite(per_class)]
    return float(finite.mean()) if finite.size else math.nan


@dataclass(frozen=True)
class Phase:
    """One training phase of a segmentation arm: its data, steps and peak
    learning rate."""

    data: tuple[torch.Tensor, torch.Tensor]
    steps: int
    lr: float = 3e-3


def segmentation_arm(
    name: str,
    phases: Sequence[Phase],
    test: tuple[torch.Tensor, torch.Tensor],
    *,
    classes: Sequence[str] = SEG_CLASSES,
    seeds: Sequence[int],
    batch_size: int = 4,
    channels: Sequence[int] = (8, 16, 32, 64),
) -> Arm:
    """Train a segmenter through `phases` (each on from the last) once per
    seed; macro Dice on `test` per seed and per class (mean over seeds)."""
    steps = sum(phase.steps for phase in phases)
    distinct = {id(phase.data): len(phase.data[0]) for phase in phases}
    arm = Arm(name, sum(distinct.values()), epochs=0, steps=steps)
    tables = []
    for seed in seeds:
        model = None
        for phase in phases:
            model = train_segmenter(
                *phase.data,
                num_classes=len(classes),
                steps=phase.steps,
                batch_size=batch_size,
                lr=phase.lr,
                seed=seed,
                channels=channels,
                model=model,
            )
        per_class = dice_per_class(predict_labels(model, test[0]), test[1], len(classes))
        tables.append(per_class)
        arm.per_seed.append(macro_dice(per_class))
    stacked = np.stack(tables)
    for i, name_ in enumerate(classes):
        column = stacked[:, i][np.isfinite(stacked[:, i])]
        arm.per_label[name_] = float(column.mean()) if column.size else None
    return arm


FINE_TUNE_LR = 1e-3  # the second phase's peak learning rate (the first's is 3e-3)
# Each way of using generated pairs: (the arm with them, the arm without).
WAYS: dict[str, tuple[str, str]] = {
    "mixed": ("real+generated", "real"),
    "pretrained": ("generated, real", "real, real"),
}


def segmentation_gain(
    real: tuple[torch.Tensor, torch.Tensor],
    generated: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    *,
    steps: int,
    **arm_args: Any,
) -> dict[str, Any]:
    """Two ways to use generated pairs, each against real pairs alone with
    the same seeds, test set and optimizer steps:

    - mixed: `steps` on real + generated together, against `steps` on real
      ("real", "real+generated");
    - pretrained: `steps` on generated, then `steps` on real (a fresh
      schedule at FINE_TUNE_LR), against the same two phases both on real
      ("real, real", "generated, real").

    `gains` = Dice with generated - without, per way (`gains_per_seed`:
    seed by seed); `gain` is the pretrained one. Every arm and both gains are reported."""
    both = tuple(torch.cat([a, b]) for a, b in zip(real, generated, strict=True))
    arms = {
        "real": [Phase(real, steps)],
        "real+generated": [Phase(both, steps)],
        "real, real": [Phase(real, steps), Phase(real, steps, FINE_TUNE_LR)],
        "generated, real": [Phase(generated, steps), Phase(real, steps, FINE_TUNE_LR)],
    }
    arms = {name: segmentation_arm(name, phases, test, **arm_args) for name, phases in arms.items()}
    gains = {way: arms[with_].mean - arms[without].mean for way, (with_, without) in WAYS.items()}
    per_seed = {
        way: [a - b for a, b in zip(arms[with_].per_seed, arms[without].per_seed, strict=True)]
        for way, (with_, without) in WAYS.items()
    }
    return {"arms": arms, "gains": gains, "gains_per_seed": per_seed, "gain": gains["pretrained"]}


def arm_rows(arms: Mapping[str, Arm]) -> list[str]:
    """Text table: one row per arm (size, steps, per-seed and mean figure)."""
    return [
        f"{a.name:16s} n={a.n_train:<4d} steps={a.steps:<5d} "
        f"per-seed {' '.join(f'{v:.3f}' for v in a.per_seed)}  mean {a.mean:.3f}"
        for a in arms.values()
    ]
