import pytest


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """A randomly initialised `tiny` bundle, built once per session."""
    from report2ct.bundle import build_random_bundle

    path = tmp_path_factory.mktemp("bundles") / "tiny"
    build_random_bundle(path, preset_name="tiny", seed=0)
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_bundle):
    from report2ct.bundle import load_bundle

    return load_bundle(tiny_bundle)
