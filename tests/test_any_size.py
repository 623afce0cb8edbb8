"""Any size and aspect ratio: the Interactive-lambda table resampling, and the student on
non-square and below-native latents."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moebius_jax.layers.cross_lambda import resample_position_table

# A 2x2 table of known values, one row per cell in raster order: [[1, 3], [5, 13]].
TABLE_2X2 = jnp.array([1.0, 3.0, 5.0, 13.0])


def _grid(table: jnp.ndarray, hw: tuple[int, int]) -> np.ndarray:
    return np.asarray(table).reshape(*hw, *table.shape[1:])


def test_native_size_returns_the_table_itself():
    table = jax.random.normal(jax.random.key(0), (16 * 16, 10, 8))
    out = resample_position_table(table, 16, (16, 16))
    assert out is table  # not even a copy: the trained size is bit-identical to the reference


def test_upsampling_uses_half_pixel_centres():
    # 2 -> 4 per axis: output centre i sits at (i + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25 in
    # input cells, so a row [a, b] becomes [a, .75a + .25b, .25a + .75b, b] (the outer samples
    # fall within half a cell of the edge and take the edge value).
    out = resample_position_table(TABLE_2X2, 2, (4, 4))
    np.testing.assert_array_equal(_grid(out, (4, 4)), [
        [1.0, 1.5, 2.5, 3.0],
        [2.0, 2.875, 4.625, 5.5],
        [4.0, 5.625, 8.875, 10.5],
        [5.0, 7.0, 11.0, 13.0],
    ])


def test_non_square_target():
    # 2 -> 3 rows: centres at -1/6, 0.5, 7/6 -> [a, (a + b) / 2, b].
    # 2 -> 5 columns: centres at -0.3, 0.1, 0.5, 0.9, 1.3 -> [a, .9a + .1b, .5a + .5b, .1a + .9b, b].
    out = resample_position_table(TABLE_2X2, 2, (3, 5))
    np.testing.assert_allclose(_grid(out, (3, 5)), [
        [1.0, 1.2, 2.0, 2.8, 3.0],
        [3.0, 3.5, 5.5, 7.5, 8.0],
        [5.0, 5.8, 9.0, 12.2, 13.0],
    ], rtol=1e-6)


def test_an_axis_at_its_native_length_is_left_exactly_as_it_is():
    out = resample_position_table(TABLE_2X2, 2, (2, 4))
    np.testing.assert_array_equal(_grid(out, (2, 4)), [[1.0, 1.5, 2.5, 3.0], [5.0, 7.0, 11.0, 13.0]])


def test_shrinking_is_antialiased():
    # 4 -> 2 per axis on t[r, c] = 4r + c. Output centres at 0.5 and 2.5; antialiasing widens the
    # triangle kernel to +-2 cells, so the taps at distances 0.5, 0.5, 1.5 weigh .75, .75, .25,
    # renormalised to 3/7, 3/7, 1/7 (the fourth tap is outside the grid):
    # columns [(3*c0 + 3*c1 + c2) / 7, (c1 + 3*c2 + 3*c3) / 7] = 4r + [5/7, 16/7], and the same
    # weights over rows give 4 * [5/7, 16/7] = [20/7, 64/7]. Plain bilinear would give
    # [[2.5, 4.5], [10.5, 12.5]], reading 2 of the 4 cells per axis.
    out = resample_position_table(jnp.arange(16.0), 4, (2, 2))
    np.testing.assert_allclose(_grid(out, (2, 2)), np.array([[25, 36], [69, 80]]) / 7, rtol=1e-6)


def test_trailing_axes_and_raster_order_are_kept():
    # (side^2, m, k) with two channels, the second 10x the first: each resamples on its own.
    table = jnp.stack([TABLE_2X2, 10 * TABLE_2X2], axis=-1)[:, None, :]  # (4, 1, 2)
    out = resample_position_table(table, 2, (2, 4))
    assert out.shape == (8, 1, 2)
    expected = np.array([1.0, 1.5, 2.5, 3.0, 5.0, 7.0, 11.0, 13.0])
    np.testing.assert_array_equal(out[:, 0, 0], expected)
    np.testing.assert_array_equal(out[:, 0, 1], 10 * expected)


@pytest.mark.parametrize("hw", [(16, 24), (24, 16), (8, 12)])
def test_student_runs_on_non_square_and_smaller_latents(tiny_student, tiny_student_apply, hw):
    # The tiny config's native latent is 16x16: 16x24 and 24x16 stretch one axis of every
    # level's table and keep the other, 8x12 shrinks both (the antialiased path).
    _, variables = tiny_student
    x = jnp.ones((1, *hw, 9)) * 0.1
    out = tiny_student_apply(variables, x, np.array([500]), np.arange(10)[None])
    assert out.sample.shape == (1, *hw, 4)
    assert bool(jnp.all(jnp.isfinite(out.sample)))
