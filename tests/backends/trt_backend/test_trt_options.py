"""Build options (dict round trip, validation) and optimization-profile shapes."""

from __future__ import annotations

import json

import pytest

from quantkit.backends.tensorrt.options import (
    DEFAULT_PROFILE,
    CalibratorKind,
    Constraints,
    InputSpec,
    ShapeRange,
    TensorRTBuildOptions,
    calibration_profile_shapes,
    profile_shapes,
)
from quantkit.backends.tensorrt.version import BuildMode
from quantkit.errors import QuantkitError

TOKENS = [InputSpec("input_ids", "INT64", (-1, -1)), InputSpec("attention_mask", "INT64", (-1, -1))]


def test_defaults_round_trip_through_json():
    options = TensorRTBuildOptions()
    data = json.loads(json.dumps(options.to_dict()))
    assert TensorRTBuildOptions.from_dict(data) == options
    assert options.mode is BuildMode.AUTO
    assert options.constraints is Constraints.OBEY
    assert options.profiles == (DEFAULT_PROFILE,)


def test_every_field_round_trips():
    options = TensorRTBuildOptions(
        mode="implicit",
        profiles=(
            {"min": [1, 1], "opt": [1, 256], "max": [4, 512]},
            ShapeRange((8, 128), (8, 128), (8, 128)),
        ),
        calibration_shape=(4, 512),
        calibrator="minmax",
        constraints="prefer",
        timing_cache="/tmp/timing.cache",
        workspace_mib=2048,
        qdq_onnx="/tmp/model.qdq.onnx",
        calibration_cache="/tmp/calib.cache",
        accept_cache_version_mismatch=True,
        tf32=False,
        optimization_level=5,
    )
    data = json.loads(json.dumps(options.to_dict()))
    back = TensorRTBuildOptions.from_dict(data)
    assert back == options
    assert back.profiles[1] == ShapeRange.fixed((8, 128))
    assert back.calibrator is CalibratorKind.MINMAX
    assert back.constraints is Constraints.PREFER
    assert back.calibration_shape == (4, 512)


def test_from_dict_accepts_one_profile_mapping_and_paths():
    from pathlib import Path

    options = TensorRTBuildOptions.from_dict(
        {"profiles": {"min": [1, 8], "opt": [2, 64], "max": [2, 64]},
         "timing_cache": Path("/x/t.cache")}
    )
    assert options.profiles == (ShapeRange((1, 8), (2, 64), (2, 64)),)
    assert options.timing_cache == "/x/t.cache"
    assert TensorRTBuildOptions.from_dict(None) == TensorRTBuildOptions()


def test_unknown_option_names_the_known_ones():
    with pytest.raises(QuantkitError, match="unknown TensorRT option\\(s\\): max_workspace_size") \
            as info:
        TensorRTBuildOptions.from_dict({"max_workspace_size": 1 << 30})
    assert "workspace_mib" in str(info.value)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"constraints": "strict"}, "unknown precision constraints 'strict'"),
        ({"mode": "calibrate"}, "unknown TensorRT build mode"),
        ({"workspace_mib": 0}, "workspace_mib must be at least 1"),
        ({"optimization_level": 7}, "optimization_level must be 0..5"),
        ({"tf32": "no"}, "tf32 must be true or false"),
        ({"profiles": []}, "at least one optimization profile"),
        ({"calibration_shape": [0, 512]}, "calibration_shape must be positive"),
        ({"calibration_shape": [4]}, "calibration_shape must be \\[batch, seq\\]"),
    ],
)
def test_invalid_options(data, match):
    with pytest.raises(QuantkitError, match=match):
        TensorRTBuildOptions.from_dict(data)


def test_tensorrt_has_no_percentile_calibrator():
    with pytest.raises(QuantkitError, match="TensorRT has no 'percentile' calibrator") as info:
        TensorRTBuildOptions.from_dict({"calibrator": "percentile"})
    assert "explicit" in str(info.value)


@pytest.mark.parametrize(
    ("profile", "match"),
    [
        ({"min": [1, 1], "opt": [4, 64], "max": [2, 128]}, "batch must satisfy min <= opt <= max"),
        ({"min": [1, 128], "opt": [1, 64], "max": [1, 256]}, "seq must satisfy"),
        ({"min": [1, 1], "opt": [1, 1]}, "a profile is"),
        ({"min": [0, 1], "opt": [1, 1], "max": [1, 1]}, "must be positive"),
    ],
)
def test_invalid_profiles(profile, match):
    with pytest.raises(QuantkitError, match=match):
        ShapeRange.from_dict(profile)


def test_profile_shapes_for_dynamic_token_inputs():
    shapes = profile_shapes(TOKENS, ShapeRange((1, 16), (4, 256), (8, 512)))
    assert shapes == {
        "input_ids": ((1, 16), (4, 256), (8, 512)),
        "attention_mask": ((1, 16), (4, 256), (8, 512)),
    }


def test_static_dimension_must_match_the_profile():
    static_batch = [InputSpec("input_ids", "INT64", (1, -1))]
    assert profile_shapes(static_batch, ShapeRange((1, 8), (1, 64), (1, 128))) == {
        "input_ids": ((1, 8), (1, 64), (1, 128))
    }
    with pytest.raises(QuantkitError, match="static batch of 1, the profile asks for 8 at max"):
        profile_shapes(static_batch, ShapeRange((1, 8), (1, 64), (8, 128)))


def test_inputs_other_than_batch_by_seq_are_refused():
    past = [*TOKENS, InputSpec("past_key_values.0.key", "FLOAT", (-1, 4, -1, 16))]
    with pytest.raises(QuantkitError, match="past_key_values.0.key' has shape"):
        profile_shapes(past, DEFAULT_PROFILE)


def test_calibration_profile_is_fixed_at_the_calibration_shape():
    shapes = calibration_profile_shapes(TOKENS, (4, 512))
    assert shapes["input_ids"] == ((4, 512), (4, 512), (4, 512))
    assert shapes["attention_mask"] == ((4, 512), (4, 512), (4, 512))


def test_shape_range_contains():
    r = ShapeRange((1, 8), (2, 64), (4, 128))
    assert r.contains((1, 8)) and r.contains((4, 128)) and r.contains((3, 100))
    assert not r.contains((5, 64)) and not r.contains((1, 7))
