"""Window, set and pooling partitions of DSVT (Wang et al., "DSVT: Dynamic Sparse Voxel Transformer
with Rotated Sets", CVPR 2023), built with vectorised torch ops only.

DSVT groups the voxels of a stage into windows, orders each window's voxels along an axis and cuts
that order into *sets* of at most ``set_size`` voxels; every set is then attended in parallel as one
row of a padded ``(num_sets, set_size)`` batch. The number of sets of a window follows its voxel
count (``ceil(n / set_size)``), so dense windows get many sets and sparse windows one.

Here the sets are a true partition: every voxel lies in exactly one set. A window of ``n`` voxels
gets ``s = ceil(n / set_size)`` sets of balanced sizes (``floor(n/s)`` or ``ceil(n/s)``, never more
than ``set_size``); set ``j`` holds the window's voxels of rank ``ceil(j n / s) <= r < ceil((j+1) n / s)``
in the chosen axis order. The unused slots of a set are padding, masked in attention. (The
reference implementation instead repeats voxels to fill every set and masks the repeats.)

Rotated sets: an x-major order (x, then y, then z) gives sets that are slabs across y, a y-major
order slabs across x; consecutive attention layers alternate the two. Shifted / hybrid windows:
a stage has two window partitions, the plain one and a shifted one (by default larger by a hybrid
factor, as in the paper's hybrid window partition); consecutive blocks alternate them.

:func:`reference_stage_partition` builds the sets exactly as the reference implementation does
(OpenPCDet's ``DSVTInputLayer.get_set_single_shift``), for
:class:`~voxsparse.models.backbones.dsvt.DSVTReferenceBackbone`: a window of ``n`` voxels gets ``s = ceil(n / set_size)`` sets of exactly
``set_size`` slots; slot ``t`` (``0 <= t < s * set_size``, over the window's sets in order) holds
the voxel of rank ``floor(t n / (s set_size))``, so voxels repeat to fill the slots and a voxel can
lie in two consecutive sets. A repeat inside a set is masked as a key; each voxel's output is read
from its first slot. The y-major sets come first (the reference's first attention layer uses them).

Every partition is computed once per stage and reused by all of its blocks. Building one stage
costs one host-device synchronisation (the set counts of both window partitions, read together);
the attention blocks themselves never synchronise. Pooling costs one more (the number of pooled
voxels).

Conventions: sparse coordinates are (batch, z, y, x); shapes, strides, windows and shifts given as
(x, y, z) triples, as in the paper and its configs, are named so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from voxsparse.ops.scatter import group_counts, run_starts
from voxsparse.ops.sparse_utils import linear_keys

Triple = tuple[int, int, int]

AXES = ("x", "y")  # the two set orders: x-major and y-major


def _triple(value: Sequence[int], name: str) -> Triple:
    values = tuple(int(v) for v in value)
    if len(values) != 3:
        raise ValueError(f"{name}: expected 3 values (x, y, z), got {tuple(value)}")
    return values  # type: ignore[return-value]


@dataclass(frozen=True)
class WindowPartition:
    """Voxels grouped into windows of ``window_shape`` after shifting the grid by ``shift``.

    A voxel at (x, y, z) lies in window ``((x + sx) // wx, (y + sy) // wy, (z + sz) // wz)`` of its
    frame, at in-window offset ``((x + sx) % wx, ...)``.

    Attributes:
        window_shape: (wx, wy, wz) voxels.
        shift: (sx, sy, sz) voxels.
        window_key: (M,) int64, equal for the voxels of one window (batch included), else different.
        offsets: (M, 3) int64 in-window offsets (x, y, z), each in ``[0, w)``.
    """

    window_shape: Triple
    shift: Triple
    window_key: torch.Tensor
    offsets: torch.Tensor

    def relative_position(self, dims: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(M, dims) in-window position of each voxel centre scaled to [-1, 1]: (x, y[, z])."""
        size = torch.tensor(self.window_shape[:dims], dtype=dtype, device=self.offsets.device)
        return (self.offsets[:, :dims].to(dtype) + 0.5) / size * 2 - 1

    def positions(self, dims: int, dtype: torch.dtype = torch.float32) -> WindowPositions:
        """The voxels' in-window positions as a table of the window's distinct positions (when there
        are fewer of them than voxels) and each voxel's row in it: a position embedding then runs on
        the table only and is gathered, exactly as if it ran per voxel (it has no batch statistics)."""
        shape = self.window_shape[:dims]
        volume = math.prod(shape)
        # A traced graph (torch.export) takes the table whatever the voxel count: the same values.
        if not torch.compiler.is_compiling() and volume >= self.offsets.shape[0]:
            return WindowPositions(self.relative_position(dims, dtype), None)
        axes = [torch.arange(w, device=self.offsets.device) for w in shape]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, dims)
        size = torch.tensor(shape, dtype=dtype, device=self.offsets.device)
        table = (grid.to(dtype) + 0.5) / size * 2 - 1
        return WindowPositions(table, linear_keys(self.offsets[:, :dims], shape))


@dataclass(frozen=True)
class WindowPositions:
    """In-window positions of M voxels: ``table[index]`` (or ``table`` itself when ``index`` is None).

    Attributes:
        table: (V, dims) positions in [-1, 1], (x, y[, z]).
        index: (M,) int64 row of each voxel in ``table``, or None when the table has one row per voxel.
    """

    table: torch.Tensor
    index: torch.Tensor | None

    def embed(self, fn) -> torch.Tensor:
        """``fn`` applied to every voxel's position: (M, C) from a row-wise ``fn: (V, dims) -> (V, C)``."""
        out = fn(self.table)
        if self.index is None:
            return out
        # gather, not out[index]: its backward (scatter_add) sums each place's rows in a fixed order on
        # the CPU, where indexing's backward adds them with atomics, in whichever order threads run.
        return out.gather(0, self.index[:, None].expand(-1, out.shape[1]))


@dataclass(frozen=True)
class SetPartition:
    """Voxels of each window cut into sets of at most ``set_size``, as a padded batch of sets.

    Attributes:
        index: (num_sets, set_size) int64 voxel row of each slot; padding slots hold 0 (safe to gather).
        valid: (num_sets, set_size) bool, False at padding slots.
        position: (M,) int64 flat slot (``set * set_size + slot``) of each voxel, so that
            ``set_values.reshape(-1, C)[position]`` maps per-slot results back to voxel rows.
        set_size: maximum voxels per set.
        axis: ``"x"`` (x-major order) or ``"y"`` (y-major order).
    """

    index: torch.Tensor
    valid: torch.Tensor
    position: torch.Tensor
    set_size: int
    axis: str

    @property
    def num_sets(self) -> int:
        return self.index.shape[0]

    def members(self) -> list[list[int]]:
        """Voxel rows of each set in slot order (a host-side view for tests and debugging)."""
        index, valid = self.index.tolist(), self.valid.tolist()
        return [[i for i, ok in zip(row, mask) if ok] for row, mask in zip(index, valid)]


@dataclass(frozen=True)
class StagePartition:
    """Everything the attention blocks of one stage need: its window partitions (usually two, plain
    and shifted; one when all its blocks use the same) and, for each, the x-major and y-major sets.

    Attributes:
        windows: the window partitions.
        sets: ``sets[w][a]``: set partition of ``windows[w]`` in order ``AXES[a]``.
    """

    windows: tuple[WindowPartition, ...]
    sets: tuple[tuple[SetPartition, SetPartition], ...]


@dataclass(frozen=True)
class PoolingPartition:
    """Voxels grouped into pooling regions of ``stride`` voxels (x, y, z); a region becomes one voxel.

    Attributes:
        coords: (P, 4) int32 (batch, z, y, x) of the pooled voxels, ``coord // stride``, sorted.
        region: (M,) int64 pooled row of each input voxel.
        slot: (M,) int64 place of each input voxel inside its region, in ``[0, volume)``
            (x-major: ``(x % sx) * sy * sz + (y % sy) * sz + z % sz``).
        stride: (sx, sy, sz).
        sparse_shape: (Z, Y, X) of the pooled grid, ``ceil(shape / stride)``.
    """

    coords: torch.Tensor
    region: torch.Tensor
    slot: torch.Tensor
    stride: Triple
    sparse_shape: Triple

    @property
    def volume(self) -> int:
        sx, sy, sz = self.stride
        return sx * sy * sz

    @property
    def num_regions(self) -> int:
        return self.coords.shape[0]


def window_partition(
    coords: torch.Tensor, sparse_shape: Sequence[int], batch_size: int, window_shape: Sequence[int],
    shift: Sequence[int] = (0, 0, 0),
) -> WindowPartition:
    """Assign voxels to windows.

    Args:
        coords: (M, 4) integer (batch, z, y, x).
        sparse_shape: (Z, Y, X) grid extent.
        batch_size: frames in the batch.
        window_shape: (wx, wy, wz).
        shift: (sx, sy, sz), each in ``[0, w)``; the grid moves by ``+shift`` before windowing.
    """
    wx, wy, wz = _triple(window_shape, "window_shape")
    sx, sy, sz = _triple(shift, "shift")
    if min(wx, wy, wz) < 1 or not (0 <= sx < wx and 0 <= sy < wy and 0 <= sz < wz):
        raise ValueError(f"window {(wx, wy, wz)} must be positive, shift {(sx, sy, sz)} lie in [0, window)")
    depth, height, width = (int(v) for v in sparse_shape)
    c = coords.long()
    shifted = torch.stack([c[:, 3] + sx, c[:, 2] + sy, c[:, 1] + sz], dim=1)  # (M, 3) x, y, z
    size = torch.tensor([wx, wy, wz], device=c.device)
    window = torch.div(shifted, size, rounding_mode="floor")
    offsets = shifted - window * size
    # Windows per axis, counting the partial windows the shift creates at both ends.
    nwx, nwy, nwz = ((width - 1 + sx) // wx + 1, (height - 1 + sy) // wy + 1, (depth - 1 + sz) // wz + 1)
    key = linear_keys(torch.stack([c[:, 0], window[:, 2], window[:, 1], window[:, 0]], dim=1),
                      (batch_size, nwz, nwy, nwx))
    return WindowPartition((wx, wy, wz), (sx, sy, sz), key, offsets)


def _rank_key(windows: WindowPartition, axis: str) -> torch.Tensor:
    """(M,) int64 key ordering voxels by window, then by in-window offset in ``axis``-major order."""
    wx, wy, wz = windows.window_shape
    ox, oy, oz = windows.offsets.unbind(1)
    if axis == "x":
        inner = linear_keys(torch.stack([ox, oy, oz], 1), (wx, wy, wz))
    elif axis == "y":
        inner = linear_keys(torch.stack([oy, ox, oz], 1), (wy, wx, wz))
    else:
        raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
    return windows.window_key * (wx * wy * wz) + inner


def _window_runs(sorted_window_key: torch.Tensor, set_size: int):
    """Per sorted voxel: rank in its window, window voxel count and set count, and the window's
    first set id; plus the total number of sets as a 0-dim tensor (not read on the host here)."""
    m = sorted_window_key.shape[0]
    device = sorted_window_key.device
    starts = run_starts(sorted_window_key)
    window_id = torch.cumsum(starts.long(), 0) - 1  # contiguous window index, (M,)
    position = torch.arange(m, device=device)
    # At most M windows: per-window tensors are sized M so that nothing depends on a host read.
    count = group_counts(window_id, m)
    rank = position - _window_starts(starts, position, window_id, count, traced=torch.compiler.is_compiling())
    sets = (count + set_size - 1) // set_size
    set_start = torch.cumsum(sets, 0) - sets
    return rank, count[window_id], sets[window_id], set_start[window_id], sets.sum()


def _window_starts(starts: torch.Tensor, position: torch.Tensor, window_id: torch.Tensor, count: torch.Tensor,
                   traced: bool) -> torch.Tensor:
    """(M,) sorted position of each voxel's window's first voxel.

    Eagerly a running maximum of the run starts; in a traced graph (``traced``: torch.export, ONNX,
    which has no ``cummax``) the exclusive prefix sum of the window counts, gathered per voxel. The
    two are equal integers.

    Args:
        starts: (M,) bool, True where a window's run begins in sorted order.
        position: (M,) int64 ``arange(M)``.
        window_id: (M,) int64 contiguous window index of each voxel.
        count: (M,) int64 voxels per window index (zero past the last window).
    """
    if traced:
        return (torch.cumsum(count, 0) - count)[window_id]
    return torch.where(starts, position, torch.zeros_like(position)).cummax(0).values


def _set_slots(rank, n, s, set_start):
    """Set id and slot of a voxel of rank ``rank`` in a window of ``n`` voxels cut into ``s`` sets."""
    j = torch.div(rank * s, n, rounding_mode="floor")
    first_rank = torch.div(j * n + s - 1, s, rounding_mode="floor")  # ceil(j n / s)
    return set_start + j, rank - first_rank


def stage_partition(
    coords: torch.Tensor, sparse_shape: Sequence[int], batch_size: int,
    window_shapes: Sequence[Sequence[int]], shifts: Sequence[Sequence[int]], set_size: int,
) -> StagePartition:
    """Window and rotated set partitions of one stage, with a single host read.

    Args:
        coords: (M, 4) integer (batch, z, y, x) unique voxel coordinates, M >= 1.
        sparse_shape: (Z, Y, X).
        batch_size: frames.
        window_shapes: (wx, wy, wz) of each window partition, e.g. the plain and the shifted (hybrid) one.
        shifts: (sx, sy, sz) of each, e.g. (0, 0, 0) and half a plain window.
        set_size: maximum voxels per set.
    """
    if set_size < 1:
        raise ValueError(f"set_size must be >= 1, got {set_size}")
    windows = tuple(
        window_partition(coords, sparse_shape, batch_size, w, s) for w, s in zip(window_shapes, shifts)
    )
    if not windows or len(window_shapes) != len(shifts):
        raise ValueError("expected one shift per window shape, and at least one window partition")
    pending, totals = [], []
    for win in windows:
        # Both orders sort window-major, so the sorted window keys, hence every voxel's rank, set
        # and slot by sorted position, are the same for the two axes: only the permutation differs.
        orders = [torch.argsort(_rank_key(win, axis)) for axis in AXES]
        rank, n, s, set_start, total = _window_runs(win.window_key[orders[0]], set_size)
        set_id, slot = _set_slots(rank, n, s, set_start)
        pending.append((orders, set_id * set_size + slot))
        totals.append(total)
    num_sets = torch.stack(totals).tolist()  # the one synchronisation of the stage
    sets = []
    for (orders, flat), count in zip(pending, num_sets):
        device = flat.device
        valid = torch.zeros(count * set_size, dtype=torch.bool, device=device).index_fill_(0, flat, True)
        built = []
        for axis, order in zip(AXES, orders):
            index = torch.zeros(count * set_size, dtype=torch.long, device=device).index_copy_(0, flat, order)
            position = torch.empty_like(flat).index_copy_(0, order, flat)
            built.append(SetPartition(index.view(count, set_size), valid.view(count, set_size), position,
                                      set_size, axis))
        sets.append(tuple(built))
    return StagePartition(windows, tuple(sets))  # type: ignore[arg-type]


def pooling_partition(
    coords: torch.Tensor, sparse_shape: Sequence[int], batch_size: int, stride: Sequence[int]
) -> PoolingPartition:
    """Group voxels into ``stride`` (x, y, z) regions; region coordinates are ``coord // stride``.

    Args:
        coords: (M, 4) integer (batch, z, y, x).
        sparse_shape: (Z, Y, X) of the input grid.
        batch_size: frames.
        stride: (sx, sy, sz) >= 1.
    """
    sx, sy, sz = _triple(stride, "stride")
    if min(sx, sy, sz) < 1:
        raise ValueError(f"pooling stride must be >= 1, got {(sx, sy, sz)}")
    depth, height, width = (int(v) for v in sparse_shape)
    out_shape = (-(-depth // sz), -(-height // sy), -(-width // sx))
    c = coords.long()
    step = torch.tensor([1, sz, sy, sx], device=c.device)
    pooled = torch.div(c, step, rounding_mode="floor")
    inner = c - pooled * step  # (M, 4): 0, z % sz, y % sy, x % sx
    slot = linear_keys(inner[:, [3, 2, 1]], (sx, sy, sz))
    keys = linear_keys(pooled, (batch_size, *out_shape))
    unique_keys, region = torch.unique(keys, return_inverse=True)  # host read: number of regions
    out = torch.empty(unique_keys.shape[0], 4, dtype=torch.int32, device=c.device)
    out[region] = pooled.to(torch.int32)
    return PoolingPartition(out, region, slot, (sx, sy, sz), out_shape)


def reference_positions(
    windows: WindowPartition, dims: int, normalize: bool = False, dtype: torch.dtype = torch.float32,
    table: bool = True,
) -> WindowPositions:
    """In-window positions as the reference's position embedding takes them: ``offset - window / 2``
    per axis (x, y[, z]), with ``normalize`` scaled by ``2 * 3.1415 / window`` (the reference's
    constant), i.e. into about [-pi, pi).

    With ``table`` the positions come as the table of the window's distinct positions and each
    voxel's row (when the window has fewer places than voxels): an embedding without batch
    statistics then runs on the table only. Without it, one row per voxel (an embedding with
    batch statistics, e.g. BatchNorm in training, must see every voxel).
    """
    shape = windows.window_shape[:dims]
    device = windows.offsets.device
    size = torch.tensor(shape, dtype=dtype, device=device)

    def scale(offsets: torch.Tensor) -> torch.Tensor:
        location = offsets.to(dtype) - size / 2
        return location / size * 2 * 3.1415 if normalize else location

    if not table or (not torch.compiler.is_compiling() and math.prod(shape) >= windows.offsets.shape[0]):
        return WindowPositions(scale(windows.offsets[:, :dims]), None)
    axes = [torch.arange(w, device=device) for w in shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, dims)
    return WindowPositions(scale(grid), linear_keys(windows.offsets[:, :dims], shape))


REFERENCE_AXES = ("y", "x")  # the reference's set order within a window partition


def reference_stage_partition(
    coords: torch.Tensor, sparse_shape: Sequence[int], batch_size: int,
    window_shapes: Sequence[Sequence[int]], shifts: Sequence[Sequence[int]], set_size: int,
) -> StagePartition:
    """Window partitions and the reference's sets (see the module docstring), one host read.

    Args: as :func:`stage_partition`; a z shift is ignored where the window spans the grid's whole
    z extent (as in the reference).

    Returns:
        ``sets[w]`` = (y-major, x-major) :class:`SetPartition` of ``windows[w]``: ``index`` (S, set_size)
        with every slot filled (repeats included), ``valid`` False at a repeat of the slot before it,
        ``position`` the first slot of each voxel.
    """
    if set_size < 1:
        raise ValueError(f"set_size must be >= 1, got {set_size}")
    if not window_shapes or len(window_shapes) != len(shifts):
        raise ValueError("expected one shift per window shape, and at least one window partition")
    depth = int(sparse_shape[0])
    shifts = [(s[0], s[1], 0 if int(w[2]) == depth else s[2]) for w, s in zip(window_shapes, shifts)]
    windows = tuple(
        window_partition(coords, sparse_shape, batch_size, w, s) for w, s in zip(window_shapes, shifts)
    )
    m = coords.shape[0]
    device = coords.device
    pending, totals = [], []
    for win in windows:
        orders = [torch.argsort(_rank_key(win, axis)) for axis in REFERENCE_AXES]
        key = win.window_key[orders[0]]  # both orders sort window-major: same sorted window keys
        window_id = torch.cumsum(run_starts(key).long(), 0) - 1
        count = group_counts(window_id, m)
        first = torch.cumsum(count, 0) - count  # sorted position of each window's first voxel
        sets = (count + set_size - 1) // set_size
        set_start = torch.cumsum(sets, 0) - sets
        pending.append((orders, window_id, count, first, sets, set_start))
        totals.append(sets.sum())
    num_sets = torch.stack(totals).tolist()  # the one synchronisation of the stage
    slots = torch.arange(set_size, device=device)
    built = []
    for (orders, window_id, count, first, sets, set_start), total in zip(pending, num_sets):
        set_window = torch.repeat_interleave(torch.arange(m, device=device), sets, output_size=total)
        t = (torch.arange(total, device=device) - set_start[set_window])[:, None] * set_size + slots  # (S, set_size)
        n, s = count[set_window][:, None], sets[set_window][:, None]
        rank = torch.div(t * n, s * set_size, rounding_mode="floor")
        sorted_pos = first[set_window][:, None] + rank
        valid = torch.ones_like(rank, dtype=torch.bool)
        valid[:, 1:] = rank[:, 1:] != rank[:, :-1]
        # The first slot of the voxel of window rank r: ceil(r s set_size / n).
        r = torch.arange(m, device=device) - first[window_id]
        n_v, s_v = count[window_id], sets[window_id]
        first_slot = set_start[window_id] * set_size + torch.div(r * s_v * set_size + n_v - 1, n_v, rounding_mode="floor")
        pair = []
        for axis, order in zip(REFERENCE_AXES, orders):
            position = torch.empty_like(first_slot).index_copy_(0, order, first_slot)
            pair.append(SetPartition(order[sorted_pos], valid, position, set_size, axis))
        built.append(tuple(pair))
    return StagePartition(windows, tuple(built))  # type: ignore[arg-type]
