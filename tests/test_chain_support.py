"""The support lattice and exactness (specfx.chains.support) on plain data, no fx."""

from __future__ import annotations

import numpy as np

from chain_fixtures import chain, conv, pointwise
from specfx.chains import support
from specfx.chains.recognize import OpKind


def test_a_same_conv_of_a_clean_input_is_exact_when_the_grid_holds_its_padding():
    clean = support.AxisState.clean(8, 10)
    out = support.conv_axis(clean, kernel=3, dilation=1, left=1, stride=1, out=8, circular=False)
    assert out.valid == 8 and out.size == 8
    assert out.support[9]  # its wrap-around reaches the grid's last cell


def test_a_same_conv_of_a_dirty_input_reads_garbage_at_the_edge():
    dirty = support.AxisState(8, 8, np.ones(10, dtype=bool))
    out = support.conv_axis(dirty, kernel=3, dilation=1, left=1, stride=1, out=8, circular=False)
    assert out.valid == 0
    masked = support.conv_axis(support.masked([dirty])[0], 3, 1, 1, 1, 8, False)
    assert masked.valid == 8


def test_causal_convs_need_no_mask_on_a_grid_wide_enough():
    state = support.clean_state((8,), (12,))
    for _ in range(2):  # padding k-1 = 2 on the left, then the crop back to 8
        state = support.cropped(support.conv_state(state, (3,), (1,), (2,), (1,), (10,), False), (8,))
    assert support.fully_valid(state)


def test_circular_conv_is_exact_only_on_its_period():
    full = support.AxisState(8, 8, np.ones(8, dtype=bool))
    assert support.conv_axis(full, 3, 1, 1, 1, 8, circular=True).valid == 8
    assert support.conv_axis(support.AxisState.clean(6, 8), 3, 1, 1, 1, 6, circular=True).valid == 0


def test_union_and_crop():
    a, b = support.AxisState.clean(8, 12), support.AxisState(8, 5, np.ones(12, dtype=bool))
    (u,) = support.union([a], [b])
    assert u.valid == 5 and u.support.all()
    (c,) = support.cropped([a], (4,))
    assert c.size == 4 and c.valid == 4


def test_two_same_convs_need_a_mask_between_them():
    c = chain([conv("a", "x"), conv("b", "a")], outputs=("b",))
    result = support.check(c, {"a": "F", "b": "F"}, {}, (16,), {})
    assert result.ok and result.masks == [("b", "a")]


def test_an_exact_activation_between_same_convs_is_the_mask():
    c = chain([conv("a", "x"), pointwise("r", OpKind.ACTIVATION, "a"), conv("b", "r")], outputs=("b",))
    result = support.check(c, {"a": "F", "r": "F", "b": "F"}, {"r": "exact"}, (16,), {})
    assert result.ok and result.masks == []
    poly = support.check(c, {"a": "F", "r": "F", "b": "F"}, {"r": "poly"}, (16,), {"r": False})
    assert poly.masks == [("b", "r")]  # an unmasked poly activation keeps the garbage


def test_a_spatially_read_output_must_be_exact():
    c = chain([conv("a", "x"), conv("b", "a", left=0, k=9)], outputs=("b",))
    result = support.check(c, {"a": "F", "b": "F"}, {}, (8,), {})
    assert not result.ok and "grid (8,)" in result.reason
