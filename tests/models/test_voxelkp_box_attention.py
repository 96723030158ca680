"""Box-attention without host round trips: the layout-based attention against the bucketed
implementation it replaced (kept here as the reference), outputs and gradients in float64, on
random groups and on the window tilings of a synthetic frame's voxels."""

import pytest
import torch
import torch.nn.functional as F

from voxsparse.models.voxelkp.box_attention import (
    BoxAttentionBlock,
    VoxelGroups,
    group_layouts,
    grouped_attention,
    window_groups,
)


def bucketed_attention(q, k, v, group, num_heads):
    """The former implementation: rows picked with ``nonzero``, groups bucketed by padded length on
    the host, padding gathered from row 0 and masked as keys."""
    m, c = q.shape
    d = c // num_heads
    out = q.new_zeros(m, c)
    rows = torch.nonzero(group >= 0).squeeze(1)
    if rows.numel() == 0:
        return out
    keys, order = torch.sort(group[rows], stable=True)
    rows = rows[order]
    _, counts = torch.unique_consecutive(keys, return_counts=True)
    group_of = torch.repeat_interleave(torch.arange(len(counts)), counts)
    slot = torch.arange(len(rows)) - (torch.cumsum(counts, 0) - counts)[group_of]
    padded = torch.pow(2, torch.ceil(torch.log2(counts.double()))).long()
    for length, n in torch.stack(torch.unique(padded, return_counts=True), dim=1).tolist():
        in_bucket = padded == length
        local = (torch.cumsum(in_bucket.long(), 0) - 1)[group_of]
        member = in_bucket[group_of]
        r, g, s = rows[member], local[member], slot[member]
        index = torch.zeros(n, length, dtype=torch.long)
        index[g, s] = r
        valid = torch.zeros(n, length, dtype=torch.bool)
        valid[g, s] = True
        q_b, k_b, v_b = (t[index].view(n, length, num_heads, d).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q_b, k_b, v_b, attn_mask=valid[:, None, None, :])
        out[r] = attended.transpose(1, 2)[g, s].reshape(-1, c)
    return out


def random_groups(seed: int, m: int = 700) -> torch.Tensor:
    """Group ids of random sizes 1..70 (every power-of-two bucket up to 128), shuffled, with rows in
    no group (-1) and sparse, non-contiguous ids."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 71, (40,), generator=g)
    ids = torch.randperm(10_000, generator=g)[: len(sizes)]
    group = torch.repeat_interleave(ids, sizes)[:m]
    group = torch.cat([group, torch.full((m - len(group),), -1)])
    return group[torch.randperm(m, generator=g)]


def grads(out, weight, inputs):
    """Gradients of ``(out * weight).sum()``; zeros where ``out`` is a constant (no group at all)."""
    if not out.requires_grad:
        return [torch.zeros_like(t) for t in inputs]
    return torch.autograd.grad((out * weight).sum(), inputs)


def compare(group: torch.Tensor, channels: int = 12, heads: int = 3, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    qkv = [torch.randn(len(group), channels, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    weight = torch.randn(len(group), channels, generator=g, dtype=torch.float64)
    new = grouped_attention(*qkv, group, heads)
    old = bucketed_attention(*qkv, group, heads)
    torch.testing.assert_close(new, old, rtol=0, atol=1e-12)
    for a, b in zip(grads(new, weight, qkv), grads(old, weight, qkv)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert bool((new[group < 0] == 0).all())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_layout_attention_equals_the_bucketed_one_on_random_groups(seed):
    compare(random_groups(seed), seed=seed)


def test_layout_attention_on_degenerate_groupings():
    compare(torch.full((5,), -1))  # no group at all
    compare(torch.zeros(9, dtype=torch.int64))  # one group
    compare(torch.arange(9))  # singletons
    compare(torch.zeros(0, dtype=torch.int64))  # no rows


def frame_voxels() -> tuple[torch.Tensor, list[int]]:
    """Voxel indices of one synthetic-like frame: clustered people-sized blobs on a 0.5 m grid."""
    g = torch.Generator().manual_seed(3)
    shape = [10, 160, 160]
    centres = torch.randint(0, 160, (60, 2), generator=g)
    offsets = torch.randint(-2, 3, (60, 40, 3), generator=g)
    zyx = torch.stack([offsets[..., 0] + 4, centres[:, None, 0] + offsets[..., 1], centres[:, None, 1] + offsets[..., 2]], -1)
    zyx = zyx.reshape(-1, 3).clamp(min=0) % torch.tensor(shape)
    batch = torch.randint(0, 2, (len(zyx), 1), generator=g)
    return torch.unique(torch.cat([batch, zyx], 1), dim=0).int(), shape


@pytest.mark.parametrize("shifted", [False, True])
def test_layout_attention_equals_the_bucketed_one_on_window_tilings(shifted):
    coords, shape = frame_voxels()
    groups = window_groups(coords, shape, (4, 4, 4), shifted)
    compare(groups.index, channels=16, heads=4)


def test_block_with_a_shared_layout_equals_the_block_alone():
    torch.manual_seed(0)
    coords, shape = frame_voxels()
    tilings = [window_groups(coords, shape, (4, 4, 2), shifted) for shifted in (False, True)]
    layouts = group_layouts([t.index for t in tilings])
    block = BoxAttentionBlock(16, num_heads=4).double()
    x = torch.randn(len(coords), 16, dtype=torch.float64)
    for groups, layout in zip(tilings, layouts):
        torch.testing.assert_close(block(x, groups, layout), block(x, groups), rtol=0, atol=0)
    # A voxel in no box keeps its features even where its position is not finite.
    groups = VoxelGroups(torch.where(tilings[0].index % 3 == 0, -1, tilings[0].index),
                         tilings[0].position.masked_fill((tilings[0].index % 3 == 0)[:, None], float("nan")))
    x.requires_grad_(True)
    out = block(x, groups)
    outside = groups.index < 0
    assert torch.equal(out[outside], x[outside])
    out.sum().backward()
    assert bool(torch.isfinite(x.grad).all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_block_runs_without_host_synchronisation_on_cuda():
    """Given its layout, a block's forward and backward never wait for the device."""
    coords, shape = frame_voxels()
    coords = coords.cuda()
    groups = window_groups(coords, shape, (4, 4, 4))
    (layout,) = group_layouts([groups.index])
    block = BoxAttentionBlock(32, num_heads=4).cuda()
    x = torch.randn(len(coords), 32, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        block(x, groups, layout).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
