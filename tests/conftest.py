from __future__ import annotations

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
