"""Pareto membership in pure code: both coordinates minimised (latency, Δppl)."""

from __future__ import annotations

import math

import pytest

from quantkit.report.pareto import dominates, pareto_front


def test_dominates_needs_one_strictly_better_coordinate():
    assert dominates((1.0, 1.0), (2.0, 2.0))
    assert dominates((1.0, 2.0), (2.0, 2.0))
    assert dominates((2.0, 1.0), (2.0, 2.0))
    assert not dominates((2.0, 2.0), (2.0, 2.0))
    assert not dominates((1.0, 3.0), (2.0, 2.0))


def test_front_of_a_trade_off_curve_and_dominated_points():
    points = {
        "fp32": (6.10, 0.0),
        "fp16": (3.02, 0.014),
        "mixed": (2.48, 0.88),
        "int8": (2.21, 3.90),
        "int8-minmax": (2.30, 7.50),  # slower and less accurate than int8
        "cpu-fp32": (151.0, 0.0),  # as accurate as fp32, slower
    }
    assert pareto_front(points) == ["int8", "mixed", "fp16", "fp32"]


def test_negative_delta_removes_the_reference_from_the_front():
    points = {"fp32": (6.1, 0.0), "fp16": (3.0, -0.02), "int8": (2.2, 3.9)}
    assert pareto_front(points) == ["int8", "fp16"]


def test_exact_ties_are_all_on_the_front_and_order_is_by_latency():
    points = {"b": (2.0, 1.0), "a": (2.0, 1.0), "c": (1.0, 5.0)}
    assert pareto_front(points) == ["c", "a", "b"]


def test_single_point_and_empty_input():
    assert pareto_front({"only": (1.0, 0.0)}) == ["only"]
    assert pareto_front({}) == []


def test_same_latency_lower_delta_wins():
    assert pareto_front({"x": (2.0, 1.0), "y": (2.0, 0.5)}) == ["y"]


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_coordinates_are_rejected(bad):
    with pytest.raises(ValueError, match="non-finite"):
        pareto_front({"a": (1.0, 1.0), "b": (bad, 0.0)})


def test_brute_force_agreement_on_random_points():
    import random

    rng = random.Random(0)
    for _ in range(200):
        pts = {f"e{i}": (float(rng.randint(1, 6)), float(rng.randint(-2, 4))) for i in range(8)}
        expected = {
            n for n, p in pts.items()
            if not any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in pts.values())
        }
        assert set(pareto_front(pts)) == expected
