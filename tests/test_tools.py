"""tools/prepare_tensorrt_stubs.py: the patches that make the generated TensorRT stubs parse.

The download itself needs the package index and runs in ``make typecheck``; here the patching
is checked on lines of the shape the 10.13 stubs have."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "prepare_tensorrt_stubs.py"


def _script():
    spec = importlib.util.spec_from_file_location("prepare_tensorrt_stubs", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# the real stub line is 163 characters; SCALE is filled in below to keep this file within 100
STUB = '''class INetworkDefinition:
    def add_scale_nd(self, input: ITensor, mode: ScaleMode, shift: Weights = None, SCALE
        """
        :returns: The new scale layer, or :class:`None` if it could not be created.
        """
    def set_input(self, in: int, tensor: ITensor) -> None: ...
    def mark(self, x: int, in: int) -> None: ...
'''.replace("SCALE\n", "scale: Weights = None, power: Weights = None, channel_axis: int) -> "
              "IScaleLayer:\n")


def test_patch_makes_the_stub_parse_and_leaves_prose_alone():
    patch = _script().patch
    try:
        ast.parse(STUB)
        raise AssertionError("the sample should not parse unpatched")
    except SyntaxError:
        pass
    fixed = patch(STUB)
    ast.parse(fixed)
    assert "power: Weights = None, channel_axis: int = ...)" in fixed
    assert "def set_input(self, in_: int, tensor: ITensor)" in fixed
    assert "def mark(self, x: int, in_: int)" in fixed
    assert "or :class:`None` if it could not be created" in fixed  # docstrings untouched
    assert patch(fixed) == fixed
