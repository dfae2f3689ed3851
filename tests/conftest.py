from __future__ import annotations

import gc
import warnings
from pathlib import Path

import pytest

from tests.models import make_hf_model


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory):
    """Every test session converts the default model into its own cache, as a new user would."""
    mp = pytest.MonkeyPatch()
    mp.setenv("STREAMER_CACHE", str(tmp_path_factory.mktemp("streamer-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def hf_model(tmp_path_factory: pytest.TempPathFactory):
    """hf_model(name) -> a random HF model directory of that family, made once per session."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = make_hf_model(name, tmp_path_factory.mktemp(name))
        return made[name]

    return get


@pytest.fixture(autouse=True)
def _every_socket_closed():
    """A ZeroMQ socket a test leaves open fails that test, by name, instead of a later test
    whose garbage collection happens to find it (its ResourceWarning is an error here)."""
    yield
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        gc.collect()
    leaked = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert leaked == [], "left unclosed"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `bench` compare timings: they run only when asked for (`-m bench`)."""
    if "bench" in (config.option.markexpr or ""):
        return
    bench = [item for item in items if item.get_closest_marker("bench")]
    if bench:
        config.hook.pytest_deselected(items=bench)
        items[:] = [item for item in items if not item.get_closest_marker("bench")]
