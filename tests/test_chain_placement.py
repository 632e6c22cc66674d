"""Placement (specfx.chains.placement) on plain data, no fx: the min-cut's value is the
cost of the labelling it returns, and no other labelling is cheaper."""

from __future__ import annotations

import itertools

import pytest

from chain_fixtures import chain, conv, pointwise
from specfx import cost_model as cm
from specfx.chains import placement
from specfx.chains.recognize import OpKind


def _residual():
    """conv -> relu -> conv, + the first conv's output -> affine -> conv (a residual block)."""
    return chain([conv("a", "x"), pointwise("r", OpKind.ACTIVATION, "a"), conv("b", "r"),
                  pointwise("s", OpKind.ADD, "b", "a"), pointwise("g", OpKind.AFFINE, "s"), conv("c", "g")],
                 outputs=("c",))


@pytest.mark.parametrize("grid", [(16,), (32,)])
def test_min_cut_value_is_the_cost_of_its_labelling_and_the_least(grid):
    c = _residual()
    place = placement.Placement(c, 4, cm.DEFAULT_PROFILE)
    labels, modes, value = place.min_cut(grid)
    assert value == pytest.approx(place.evaluate(labels, modes, grid)[0])
    free = [n for n in c.comp if place.forced(n) is None]
    for choice in itertools.product("FS", repeat=len(free)):
        other = {n: place.forced(n) or "F" for n in c.comp} | dict(zip(free, choice))
        assert value <= place.evaluate(other, modes, grid)[0] + 1e-12


def test_nodes_forced_spatial_stay_spatial():
    c = _residual()
    labels, _, _ = placement.Placement(c, 4, cm.DEFAULT_PROFILE).min_cut((16,), frozenset({"r"}))
    assert labels["r"] == "S" and labels["a"] == "F"


def test_always_makes_every_op_spectral_and_masks_what_needs_it():
    c = chain([conv("a", "x"), pointwise("g", OpKind.AFFINE, "a"), conv("b", "g")], outputs=("b",))
    best = placement.Placement(c, 4, cm.DEFAULT_PROFILE, policy="always").solve((16,), always=True)
    assert best.ok and best.labels == {"a": "F", "g": "F", "b": "F"}
    assert best.masks == [("b", "g")]


def test_grids_offer_one_that_no_support_wraps_on():
    c = chain([conv("a", "x", size=10, left=2), pointwise("k", OpKind.CROP, "a"), conv("b", "k", size=10, left=2)],
              inputs={"x": 8})
    assert placement.grids(c, circular=False) == [(16,)]
    wide = chain([conv("a", "x", size=14, k=7, left=6), conv("b", "a", size=14, k=7, left=6)], inputs={"x": 14})
    assert placement.grids(wide, circular=False) == [(16,), (30,)]  # even and 5-smooth, ≥ 14 + 2·6
