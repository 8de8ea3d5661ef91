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
    pick_profile,
    profile_shapes,
    resolve_cache_profiles,
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
    odd = [*TOKENS, InputSpec("pixel_values", "FLOAT", (-1, 3, 224, 224))]
    with pytest.raises(QuantkitError, match="pixel_values' has shape"):
        profile_shapes(odd, DEFAULT_PROFILE)


CACHE_INPUTS = [*TOKENS, InputSpec("position_ids", "INT64", (-1, -1)),
                InputSpec("past_key_values.0.key", "FLOAT", (-1, 4, -1, 16)),
                InputSpec("past_key_values.0.value", "FLOAT", (-1, 4, -1, 16))]


def test_cache_profile_shapes_add_the_past_to_the_mask_and_the_cache_inputs():
    decode = ShapeRange((1, 1), (2, 1), (8, 1), past=(1, 512, 2047))
    shapes = profile_shapes(CACHE_INPUTS, decode)
    assert shapes["input_ids"] == shapes["position_ids"] == ((1, 1), (2, 1), (8, 1))
    assert shapes["attention_mask"] == ((1, 2), (2, 513), (8, 2048))  # past + new tokens
    assert shapes["past_key_values.0.key"] == ((1, 4, 1, 16), (2, 4, 512, 16), (8, 4, 2047, 16))
    assert shapes["past_key_values.0.value"] == shapes["past_key_values.0.key"]
    prefill = profile_shapes(CACHE_INPUTS, ShapeRange((1, 1), (1, 64), (4, 64), past=(0, 0, 0)))
    assert prefill["past_key_values.0.key"][2] == (4, 4, 0, 16)  # an empty past
    assert prefill["attention_mask"][2] == (4, 64)


def test_cache_inputs_need_a_past_length_and_static_heads():
    with pytest.raises(QuantkitError, match="KV-cache input and the profile has no past"):
        profile_shapes(CACHE_INPUTS, DEFAULT_PROFILE)
    dynamic_heads = [InputSpec("past_key_values.0.key", "FLOAT", (-1, -1, -1, 16))]
    with pytest.raises(QuantkitError, match="needs static heads and head size"):
        profile_shapes(dynamic_heads, ShapeRange((1, 1), (1, 1), (1, 1), past=(1, 1, 1)))
    assert calibration_profile_shapes(CACHE_INPUTS, (4, 64))["past_key_values.0.key"] == (
        (4, 4, 0, 16),) * 3  # calibrated on prefills with an empty past


@pytest.mark.parametrize(("past", "match"), [((3, 2, 4), "0 <= min <= opt <= max"),
                                             ((-1, 0, 4), "0 <= min"),
                                             ((1, 2), "past must be")])
def test_invalid_past_lengths(past, match):
    with pytest.raises(QuantkitError, match=match):
        ShapeRange((1, 1), (1, 1), (1, 1), past=past)


def test_cache_profiles_round_trip_and_defaults_follow_the_model():
    options = TensorRTBuildOptions.from_dict(
        {"profiles": [{"min": [1, 1], "opt": [1, 1], "max": [8, 1], "past": [1, 512, 2047]}]})
    assert TensorRTBuildOptions.from_dict(json.loads(json.dumps(options.to_dict()))) == options
    # a cache graph left at the default profile gets prefill + decode, within its positions
    prefill, decode = resolve_cache_profiles(TensorRTBuildOptions(), True, 8192).profiles
    assert (prefill.max, prefill.past) == ((8, 512), (0, 0, 0))
    assert (decode.max, decode.past) == ((8, 1), (1, 512, 2047))
    small = resolve_cache_profiles(TensorRTBuildOptions(), True, 64).profiles
    assert small[0].max == (8, 64) and small[1].past == (1, 63, 63)
    # a plain graph keeps its profile; given profiles are checked against the graph's kind
    assert resolve_cache_profiles(TensorRTBuildOptions(), False, 8192).profiles == (
        DEFAULT_PROFILE,)
    assert resolve_cache_profiles(TensorRTBuildOptions(), False, 256).profiles == (
        ShapeRange((1, 1), (1, 256), (8, 256)),)  # the default within a short model
    plain = TensorRTBuildOptions(profiles=(ShapeRange((1, 1), (1, 64), (2, 128)),))
    with pytest.raises(QuantkitError, match="has no past length, and this is a KV-cache"):
        resolve_cache_profiles(plain, True, 8192)
    with pytest.raises(QuantkitError, match="has a past length, and this graph has no KV"):
        resolve_cache_profiles(options, False, 8192)
    with pytest.raises(QuantkitError, match="reaches 2048 positions; the model has 1024"):
        resolve_cache_profiles(options, True, 1024)


def test_pick_profile_keeps_the_active_one_and_switches_to_the_one_that_fits():
    # as the engine reports them: per input, per profile, [min, opt, max]
    profiles = {"input_ids": [[[1, 1], [1, 512], [8, 512]], [[1, 1], [1, 1], [8, 1]]],
                "past_key_values.0.key": [[[1, 4, 0, 16]] * 3,
                                          [[1, 4, 1, 16], [1, 4, 512, 16], [8, 4, 2047, 16]]]}
    prefill = {"input_ids": (1, 1), "past_key_values.0.key": (1, 4, 0, 16)}
    decode = {"input_ids": (1, 1), "past_key_values.0.key": (1, 4, 30, 16)}
    assert pick_profile(prefill, profiles, current=0) == 0
    assert pick_profile(decode, profiles, current=0) == 1
    assert pick_profile(decode, profiles, current=1) == 1
    assert pick_profile({"input_ids": (1, 1), "past_key_values.0.key": (1, 4, 0, 16)},
                        profiles, current=1) == 0  # a new prompt: back to the prefill profile
    assert pick_profile({"input_ids": (9, 1)}, profiles) is None  # no profile: the caller says


def test_calibration_profile_is_fixed_at_the_calibration_shape():
    shapes = calibration_profile_shapes(TOKENS, (4, 512))
    assert shapes["input_ids"] == ((4, 512), (4, 512), (4, 512))
    assert shapes["attention_mask"] == ((4, 512), (4, 512), (4, 512))


def test_shape_range_contains():
    r = ShapeRange((1, 8), (2, 64), (4, 128))
    assert r.contains((1, 8)) and r.contains((4, 128)) and r.contains((3, 100))
    assert not r.contains((5, 64)) and not r.contains((1, 7))
