import pytest


@pytest.fixture(scope="session")
def tiny_model(tiny_bundle):
    from report2ct.bundle import load_bundle

    return load_bundle(tiny_bundle)
