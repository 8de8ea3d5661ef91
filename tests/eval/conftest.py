from __future__ import annotations

from pathlib import Path

import pytest

from tests.eval.engines import built


@pytest.fixture(scope="session")
def eval_models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("eval-models")


@pytest.fixture(scope="session")
def llama_engine(eval_models_root: Path) -> Path:
    return built(eval_models_root, "llama")


@pytest.fixture(scope="session")
def llama_logits_engine(eval_models_root: Path) -> Path:
    return built(eval_models_root, "llama-logits")


@pytest.fixture(scope="session")
def llama_twin_engine(eval_models_root: Path) -> Path:
    return built(eval_models_root, "llama-twin")


@pytest.fixture(scope="session")
def gpt2_engine(eval_models_root: Path) -> Path:
    return built(eval_models_root, "gpt2")
