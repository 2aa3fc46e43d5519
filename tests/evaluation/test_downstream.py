"""The downstream bench's metric code on cases with known answers: identical
training sets give a TSTR ratio of exactly 1, a segmenter that outputs the
true masks scores Dice 1 (one that outputs the wrong class 0), hand-counted
Dice, masks and images on one grid, phantom/record pairs whose map is the
one the factory draws, and segmentation arms that differ only in their data."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from evaluation.data import Case
from evaluation.downstream import (
    PHANTOM_CLASSES,
    SEG_CLASSES,
    check_pairs,
    dice_per_class,
    macro_dice,
    mask_to_grid,
    predict_labels,
    report_phantoms,
    seg_tensors,
    segmentation_gain,
    train_segmenter,
    tstr,
)
from factory.manifest import ManifestRecord
from factory.masks import resolve_mask
from phantom.legend import LABELS
from report2ct.config import ControlConfig

TINY = {"shape": (16, 16, 12), "spacing_mm": (16.0, 16.0, 20.0)}
CONTROL = ControlConfig(legend=tuple((label.value, label.name) for label in LABELS[1:]))


@pytest.fixture(scope="module")
def tiny_pool():
    return report_phantoms(range(40), **TINY)


def test_phantom_maps_are_the_ones_the_factory_draws(tiny_pool):
    for pair in tiny_pool:
        record = ManifestRecord.model_validate(pair.record)
        drawn = resolve_mask(record, record.seed, TINY["shape"], TINY["spacing_mm"], CONTROL)
        assert np.array_equal(drawn.values, pair.case.mask), pair.case.id
        labels = np.array([drawn.labels[n] for n in drawn.labels])
        assert np.array_equal(labels, pair.case.labels), pair.case.id


def test_identical_training_sets_give_ratio_one(tiny_pool):
    train = [p.case for p in tiny_pool[:12]]
    test = [p.case for p in tiny_pool[12:]]
    result = tstr(train, list(train), test, seeds=(0,), epochs=2, batch_size=4, width=4, **TINY)
    arms = result["arms"]
    assert arms["real"].per_seed == arms["synthetic"].per_seed
    assert math.isfinite(arms["real"].mean)
    assert result["ratio"] == 1.0
    # Real + synthetic: twice the cases, the same optimizer steps.
    assert arms["real+synthetic"].n_train == 24
    assert arms["real+synthetic"].steps == arms["real"].steps == 6


def test_tstr_refuses_unequal_sets(tiny_pool):
    cases = [p.case for p in tiny_pool]
    with pytest.raises(ValueError, match="3 real, 2 synthetic"):
        tstr(cases[:3], cases[:2], cases[3:], **TINY)


class Oracle(torch.nn.Module):
    """Logits from an image that encodes its class index as value / 10:
    what a perfect segmenter outputs (or, with `shift`, the wrong class)."""

    def __init__(self, num_classes: int, shift: int = 0) -> None:
        super().__init__()
        self.num_classes, self.shift = num_classes, shift

    def forward(self, x):
        index = ((x[:, 0] * 10).round().long() + self.shift) % (self.num_classes + 1)
        return torch.nn.functional.one_hot(index, self.num_classes + 1).movedim(-1, 1).float()


def test_a_segmenter_that_outputs_the_truth_scores_dice_one():
    generator = torch.Generator().manual_seed(0)
    truth = torch.randint(0, 4, (3, 1, 8, 8, 6), generator=generator)  # classes 1..3, no 4
    images = truth.float() / 10
    per_class = dice_per_class(predict_labels(Oracle(4), images), truth, 4)
    assert per_class[:3] == pytest.approx([1.0, 1.0, 1.0])
    assert math.isnan(per_class[3])  # no case shows class 4: not scored, not 0 or 1
    assert macro_dice(per_class) == pytest.approx(1.0)
    wrong = dice_per_class(predict_labels(Oracle(4, shift=1), images), truth, 4)
    assert macro_dice(wrong) == pytest.approx(0.0)


def test_dice_against_a_hand_count():
    truth = torch.zeros(1, 1, 10, 10, 10, dtype=torch.long)
    pred = torch.zeros_like(truth)
    truth[0, 0, :4] = 1  # 400 voxels
    pred[0, 0, 2:8] = 1  # 600 voxels, 200 shared
    assert dice_per_class(pred, truth, 1)[0] == pytest.approx(2 * 200 / (400 + 600))


def test_masks_and_images_share_the_grid():
    mask = np.zeros((32, 32, 20), dtype=np.uint8)
    mask[8:24, 6:20, 4:12] = 4  # heart
    mask[0:4, :, :] = 3  # lung
    case = Case(
        id="grid",
        volume_hu=np.where(mask == 4, 40.0, -1000.0).astype(np.float32),
        spacing_mm=(4.0, 4.0, 5.0),
        labels=np.zeros(18, dtype=np.int64),
        report="",
        mask=mask,
        mask_classes=PHANTOM_CLASSES,
    )
    grid = {"spacing_mm": (8.0, 8.0, 10.0), "shape": (20, 20, 12)}
    images, labels = seg_tensors([case], **grid)
    heart = SEG_CLASSES.index("heart") + 1
    assert labels.shape == images.shape == (1, 1, 20, 20, 12)
    assert int((labels == heart).sum()) == 8 * 7 * 4  # the cube at half resolution
    assert torch.equal(labels[0, 0] == heart, images[0, 0] > 0.5)
    assert int((labels == SEG_CLASSES.index("lung") + 1).sum()) == 2 * 16 * 10
    assert set(labels.unique().tolist()) == {0, heart, SEG_CLASSES.index("lung") + 1}
    with pytest.raises(ValueError, match="case nomask: no label map"):
        mask_to_grid(Case("nomask", case.volume_hu, case.spacing_mm, case.labels, ""), **grid)


def test_pairing_errors_name_the_record(tiny_pool):
    real = [p.case for p in tiny_pool[:3]]
    assert check_pairs(real, list(reversed(real))) == real  # matched by id, in real's order
    with pytest.raises(ValueError, match=r"lacks records \['ds-2'\]"):
        check_pairs(real, real[:2])
    flipped = real[1].labels.copy()
    flipped[0] = 1 - flipped[0]
    bad = dataclasses.replace(real[1], labels=flipped)
    with pytest.raises(ValueError, match="record ds-1: generated labels"):
        check_pairs(real, [real[0], bad, real[2]])
    moved = dataclasses.replace(real[2], mask=np.roll(real[2].mask, 2, axis=0))
    with pytest.raises(ValueError, match="record ds-2: the generated volume's mask"):
        check_pairs(real, [real[0], real[1], moved])


SEG_GRID = {"shape": (16, 16, 16), "spacing_mm": (16.0, 16.0, 20.0)}


def test_a_second_phase_trains_on_from_the_first(tiny_pool):
    images, labels = seg_tensors([p.case for p in tiny_pool[:4]], **SEG_GRID)
    small = {"num_classes": len(SEG_CLASSES), "channels": (4, 8), "seed": 0}
    first = train_segmenter(images, labels, steps=2, **small)
    before = {k: v.clone() for k, v in first.state_dict().items()}
    second = train_segmenter(images, labels, steps=1, model=first, **small)
    assert second is first
    assert any(not torch.equal(before[k], v) for k, v in second.state_dict().items())
    fresh = train_segmenter(images, labels, steps=1, **small)
    assert any(
        not torch.equal(a, b)
        for a, b in zip(fresh.state_dict().values(), second.state_dict().values(), strict=True)
    )


def test_pretraining_on_a_copy_of_the_real_pairs_gains_exactly_nothing(tiny_pool):
    """Arms differ only in their data: with "generated" pairs that are the
    real ones, the pretrained way's two arms train identically."""
    real = seg_tensors([p.case for p in tiny_pool[:4]], **SEG_GRID)
    test = seg_tensors([p.case for p in tiny_pool[4:8]], **SEG_GRID)
    copy = tuple(t.clone() for t in real)
    result = segmentation_gain(real, copy, test, steps=2, seeds=[0], channels=(4, 8))
    arms = result["arms"]
    assert result["gains"]["pretrained"] == 0.0 and result["gain"] == 0.0
    assert arms["generated, real"].per_seed == arms["real, real"].per_seed
    assert {name: arm.steps for name, arm in arms.items()} == {
        "real": 2,
        "real+generated": 2,
        "real, real": 4,
        "generated, real": 4,
    }
    assert arms["real+generated"].n_train == 8 and arms["real, real"].n_train == 4
    assert math.isfinite(result["gains"]["mixed"])
