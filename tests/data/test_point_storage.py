"""Point storage: quantized columns within their stated bound (max abs error step / 2) and exact in
float32 for power-of-two steps, the in-memory rounding equal to what a file reads back, files of the
earlier layout (no quantized members) read as before, reproducible bytes, and refusals."""

from __future__ import annotations

import numpy as np
import pytest

from voxsparse.data.point_storage import _shuffle, decode_points, encode_points, stored_points, write_npz

HALF = [False, False, False, True, True]


def scan(n: int = 4000, seed: int = 0) -> np.ndarray:
    """(n, 5) a ring scan in scan order: x, y, z (m) up to 80 m, intensity, elongation."""
    rng = np.random.default_rng(seed)
    azimuth = np.linspace(-np.pi, np.pi, n)
    distance = 5 + 75 * rng.uniform(size=n) ** 2
    return np.stack(
        [distance * np.cos(azimuth), distance * np.sin(azimuth), rng.normal(0.0, 1.5, n),
         rng.lognormal(-1.7, 0.74, n), rng.uniform(0.0, 1.5, n)], axis=1,
    ).astype(np.float32)  # fmt: skip


@pytest.mark.parametrize("step", [2.0**-9, 2.0**-10, 0.005])
def test_quantized_columns_stay_within_half_a_step(step):
    points = scan()
    steps = [step] * 3 + [0.0, 0.0]
    back = decode_points(encode_points(points, HALF, steps))
    error = np.abs(back[:, :3].astype(np.float64) - points[:, :3])
    # float32's own rounding of k * step (no power of two) adds at most half an ulp of 80 m.
    assert error.max() <= step / 2 + (0 if step in (2.0**-9, 2.0**-10) else 2**-18)
    assert error.max() > 0.45 * step  # the bound is tight, not a loose tolerance
    np.testing.assert_array_equal(back[:, 3:], points[:, 3:].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(back, stored_points(points, HALF, steps))
    if step in (2.0**-9, 2.0**-10):  # power of two: every stored value is an exact multiple
        counts = back[:, :3].astype(np.float64) / step
        np.testing.assert_array_equal(counts, np.round(counts))
    # Storing what was read back changes nothing: the GT database re-encodes frame points.
    np.testing.assert_array_equal(decode_points(encode_points(back, HALF, steps)), back)


def test_quantized_scan_is_smaller_and_bytes_are_reproducible(tmp_path):
    points = scan(20000)
    lossless = write_npz(tmp_path / "a.npz", encode_points(points, [False] * 5)).stat().st_size
    quantized = write_npz(tmp_path / "b.npz", encode_points(points, HALF, [2.0**-9] * 3 + [0, 0])).read_bytes()
    assert len(quantized) < 0.6 * lossless
    assert write_npz(tmp_path / "c.npz", encode_points(points, HALF, [2.0**-9] * 3 + [0, 0])).read_bytes() == quantized


def earlier_layout(points: np.ndarray, half: list[bool]) -> dict[str, np.ndarray]:
    """The members of a version-2 file: byte planes (itemsize, N, columns), no quantized columns."""
    half = np.asarray(half)
    return {
        "points_f4": _shuffle(points[:, ~half]),
        "points_f2": _shuffle(points[:, half].astype(np.float16)),
        "points_half": half,
    }


def test_files_of_the_earlier_layout_read_as_before():
    points = scan(500)
    earlier = decode_points(earlier_layout(points, HALF))
    np.testing.assert_array_equal(earlier, decode_points(encode_points(points, HALF)))
    np.testing.assert_array_equal(earlier[:, :3], points[:, :3])


def test_empty_and_all_quantized_frames_round_trip():
    for shape in ((0, 4), (7, 3)):
        empty = np.zeros(shape, np.float32)
        np.testing.assert_array_equal(decode_points(encode_points(empty, [False] * shape[1], [0.01] * shape[1])), empty)
    points = scan(300)[:, :3]
    back = decode_points(encode_points(points, [False] * 3, [2.0**-9] * 3))
    assert back.shape == points.shape and np.abs(back - points).max() <= 2.0**-10


def test_bad_steps_and_values_are_refused():
    points = scan(100)
    with pytest.raises(ValueError, match="disagree"):
        encode_points(points, HALF, [0.01] * 4)
    with pytest.raises(ValueError, match="0 for the float16 columns"):
        encode_points(points, HALF, [0.01] * 4 + [0.01])
    with pytest.raises(ValueError, match="must be >= 0"):
        encode_points(points, HALF, [-0.01] * 3 + [0, 0])
    far = points.copy()
    far[3, 0] = 3e6  # beyond 2**30 steps of 2**-9 m
    with pytest.raises(ValueError, match="beyond"):
        encode_points(far, HALF, [2.0**-9] * 3 + [0, 0])
    members = encode_points(points, HALF, [2.0**-9] * 3 + [0, 0])
    members["points_step"] = members["points_step"][:4]
    with pytest.raises(ValueError, match="do not make"):
        decode_points(members)
