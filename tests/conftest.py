"""Shared test fixtures: where llama.cpp's reference data lives (../shared/fixtures beside the repo)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# BLAS on one thread in the test process, as every rank of the engine runs it (core.cluster caps it at
# start-up): results then do not depend on whether an earlier test started a cluster in-process.
from core.cluster import limit_blas_threads  # noqa: E402

limit_blas_threads(1)
FIXTURES = REPO.parent / "shared" / "fixtures"


def fixtures_or_skip() -> Path:
    """The fixtures folder, or skip the test with the reason if it is not there."""
    if not (FIXTURES / "index.json").is_file():
        pytest.skip(f"llama.cpp reference fixtures not found at {FIXTURES}")
    return FIXTURES


@pytest.fixture(scope="session")
def fixtures() -> Path:
    return fixtures_or_skip()


@pytest.fixture(scope="session")
def fixture_index(fixtures: Path) -> dict:
    return json.loads((fixtures / "index.json").read_text())


def fixture_case_ids() -> list[str]:
    """Case ids of index.json for parametrizing (empty when the fixtures are absent)."""
    index = FIXTURES / "index.json"
    if not index.is_file():
        return []
    return [case["id"] for case in json.loads(index.read_text())["cases"]]


@pytest.fixture(scope="session")
def smollm2_model() -> Path:
    """SmolLM2-135M-Instruct from the PyPI wheel (the README's commands install it), or skip with the reason."""
    from chat.demo import INSTALL_HINT, demo_model_path
    path = demo_model_path()
    if path is None:
        pytest.skip(f"SmolLM2 demo model not installed ({INSTALL_HINT})")
    return path


@pytest.fixture(scope="session")
def smollm2_fixtures(fixtures: Path) -> Path:
    """../shared/fixtures/smollm2: references computed on SmolLM2 (README.md there)."""
    return fixtures / "smollm2"
