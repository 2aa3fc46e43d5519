"""The paired finding response: the metric is checked on phantoms (where the
truth is drawn), then the committed demo bundle must show its findings."""

import numpy as np
import pytest

from evaluation.response import FINDINGS, NONE, metric, paired_response, regions
from phantom.world import make_phantom


@pytest.mark.parametrize("finding", FINDINGS)
def test_each_metric_sees_its_finding_on_real_phantoms(finding):
    # The phantom world draws the truth: same seed, same anatomy, finding on vs off.
    more = []
    for seed in range(4):
        normal = make_phantom(seed, requested=NONE)
        sick = make_phantom(seed, requested={**NONE, finding: 1})
        region = regions(normal.volume_hu)
        ml = float(np.prod(normal.spacing_mm)) / 1000
        more.append(
            metric(finding, sick.volume_hu, region, ml)
            > metric(finding, normal.volume_hu, region, ml)
        )
    assert all(more), (finding, more)


def test_unknown_finding_has_no_metric():
    volume = np.zeros((8, 8, 8))
    with pytest.raises(ValueError, match="no image response metric"):
        metric("Bronchiectasis", volume, regions(volume), 1.0)


@pytest.mark.slow
def test_committed_demo_bundle_draws_what_its_reports_say():
    """Measured with bench/bench_demo_response.py over 8 seeds: effusion
    +281 mL (sem 57) of fluid in the pleural region, cardiomegaly +1108 mL
    (sem 161) of soft tissue between the lungs, both in 8/8 seeds. Here 3
    seeds the bench never draws (it takes 7000 + k), so the test is not the
    bench's own sample: most seeds and the mean must show each finding."""
    from report2ct.bundle import load_bundle

    model = load_bundle("report2ct/bundles/demo")
    seeds = [8100, 8101, 8102]
    effusion, normal = paired_response(model, "Pleural effusion", seeds)
    heart, _ = paired_response(model, "Cardiomegaly", seeds, normal=normal)
    assert (effusion > 0).sum() >= 2 and effusion.mean() > 100, effusion
    assert (heart > 0).all() and heart.mean() > 200, heart


@pytest.mark.slow
def test_demo_control_bundle_draws_findings_asked_by_labels_alone():
    """Measured with bench/bench_demo_response.py --bundle
    report2ct/bundles/demo-control --by text labels over 8 seeds: by labels
    alone cardiomegaly +88 mL (sem 18, 8/8 seeds), effusion +40 mL (sem 12,
    7/8); see docs/masks.md. Here 3 seeds the bench never draws, cardiomegaly
    by labels alone."""
    from report2ct.bundle import load_bundle

    model = load_bundle("report2ct/bundles/demo-control")
    heart, _ = paired_response(model, "Cardiomegaly", [8100, 8101, 8102], by="labels")
    assert (heart > 0).all() and heart.mean() > 40, heart
