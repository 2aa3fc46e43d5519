"""Small real phantoms shared by the evaluation tests (drawn in memory, ~10 ms each)."""

import pytest

from evaluation.data import phantom_cases
from tests.threads import torch_threads

# Coarse phantoms: big enough for every rendered finding class, small enough
# that a 3D network trains in seconds on one core.
SHAPE = (32, 32, 24)
SPACING_MM = (12.0, 12.0, 13.5)


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def phantom_grid():
    return {"shape": SHAPE, "spacing_mm": SPACING_MM}


@pytest.fixture(scope="session")
def phantoms_pool():
    return phantom_cases(range(480), shape=SHAPE, spacing_mm=SPACING_MM, prevalence=0.3)


@pytest.fixture(scope="session")
def phantoms_train(phantoms_pool):
    return phantoms_pool[:160]


@pytest.fixture(scope="session")
def phantoms_held_out():
    return phantom_cases(
        range(1000, 1080), shape=SHAPE, spacing_mm=SPACING_MM, prevalence=0.3, id_prefix="held"
    )
