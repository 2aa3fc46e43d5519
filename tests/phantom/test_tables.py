"""The phantom world's per-finding tables: every rendered finding is painted
and worded exactly once, and the anatomy's landmarks are typed."""

import dataclasses

import pytest

from phantom.findings import PAINTERS
from phantom.legend import RENDERED_FINDINGS
from phantom.report import LUNGS, MEDIASTINUM, PLEURA, WORDING
from phantom.world import draw


def test_every_rendered_finding_has_a_painter_and_a_wording():
    assert set(PAINTERS) == set(RENDERED_FINDINGS)
    assert set(WORDING) == set(RENDERED_FINDINGS)
    stated = [*MEDIASTINUM, *LUNGS, *PLEURA]  # the order FINDINGS walks them in
    assert sorted(stated) == sorted(RENDERED_FINDINGS)


def test_anatomy_is_a_frozen_record_of_typed_landmarks():
    anatomy, _ = draw(0, shape=(48, 48, 32), spacing_mm=(8.0, 8.0, 10.0))
    with pytest.raises(dataclasses.FrozenInstanceError):
        anatomy.scale = 2.0
    assert anatomy.carina.shape == (3,) and anatomy.heart.centre.shape == (3,)
    right, left = anatomy.domes
    assert right > left  # the right dome is higher
    assert anatomy.aorta.points.shape[1] == 3 and anatomy.aorta.radius > 0
