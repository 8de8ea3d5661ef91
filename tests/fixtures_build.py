"""Fixtures for the plan / Q/DQ / engine-build tests.

A test module loads them with ``pytest_plugins = ("tests.fixtures_build",)``; the tiny models come
from ``tests/conftest.py``, the helpers from ``tests/build_helpers.py``.
"""

from __future__ import annotations

import pytest

from tests.build_helpers import make_table, token_feeds
from tests.conftest import loaded, make_tiny_gpt2


@pytest.fixture(scope="session")
def tiny_gpt2_bias(tiny_tokenizer):
    """Tiny GPT-2 whose biases are non-zero (as in trained GPT-2), so its Gemms have a C input;
    with the default zero init the exporter drops the bias altogether."""
    import torch

    model = make_tiny_gpt2(seed=1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.02)
    return loaded(model, tiny_tokenizer, "tiny-gpt2-bias")


@pytest.fixture(scope="session")
def tiny_gpt2_bias_export(tiny_gpt2_bias, tmp_path_factory):
    from quantkit.export import export_model

    return export_model(tiny_gpt2_bias, tmp_path_factory.mktemp("export") / "tiny-gpt2-bias",
                        with_nll=True)


@pytest.fixture(scope="session")
def calib_feeds():
    return token_feeds(3, batch=2, seq=32, seed=0)


@pytest.fixture(scope="session")
def eval_feed():
    return token_feeds(1, batch=2, seq=48, seed=123)[0]


@pytest.fixture(scope="session")
def llama_table(tiny_llama_export, calib_feeds):
    return make_table(tiny_llama_export.onnx_path, calib_feeds)


@pytest.fixture(scope="session")
def gpt2_table(tiny_gpt2_bias_export, calib_feeds):
    return make_table(tiny_gpt2_bias_export.onnx_path, calib_feeds)


@pytest.fixture(scope="session")
def llama_model(tiny_llama_export):
    import onnx

    return onnx.load(str(tiny_llama_export.onnx_path))


@pytest.fixture(scope="session")
def gpt2_model(tiny_gpt2_bias_export):
    import onnx

    return onnx.load(str(tiny_gpt2_bias_export.onnx_path))
