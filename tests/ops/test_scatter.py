"""scatter_max's int32-key path (what CUDA float32 inputs take) and segment_max against torch's
scatter_reduce (values) and a brute-force even split of each group's gradient among its tied rows.
(scatter_reduce's own gradient also counts its initial value as a tie where a group's maximum is
exactly 0, so the groups' shares do not add up to their gradient there.)"""

import pytest
import torch

from voxsparse.ops import scatter


def _even_split(src: torch.Tensor, index: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(src)
    for g in range(len(grad)):
        rows = src[index == g]
        if len(rows):
            holds = rows == rows.max(dim=0).values
            out[index == g] = holds * grad[g] / holds.sum(dim=0)
    return out


def _reference(src: torch.Tensor, index: torch.Tensor, groups: int) -> torch.Tensor:
    out = src.new_zeros((groups, *src.shape[1:]))
    return out.scatter_reduce(0, scatter._expand(index, src), src, reduce="amax", include_self=False)


@pytest.mark.parametrize("shape", [(600,), (600, 5)])
def test_int_key_max_equals_scatter_reduce_values_and_gradients(shape):
    gen = torch.Generator().manual_seed(0)
    # Small integers: many ties within a group; negatives, zeros of both signs, an empty group (7).
    src = torch.randint(-4, 5, shape, generator=gen).float()
    src[::11] = -0.0
    src[1::13] = torch.tensor([float("inf"), -float("inf"), 3.25e-39])[torch.arange(len(src[1::13])) % 3].view(-1, *([1] * (len(shape) - 1))).expand_as(src[1::13])
    index = torch.randint(0, 30, (shape[0],), generator=gen)
    index[index == 7] = 8
    ours = src.clone().requires_grad_()
    got = scatter._IntKeyMax.apply(ours, index, 30)
    assert torch.equal(got, _reference(src, index, 30))
    grad = torch.randn(got.shape, generator=gen)
    got.backward(grad)
    torch.testing.assert_close(ours.grad, _even_split(src, index, grad), rtol=0, atol=1e-6)


def test_ordered_keys_sort_like_the_floats():
    values = torch.tensor([-float("inf"), -2.5, -1.0, -1e-40, -0.0, 0.0, 1e-40, 1.0, 2.5, float("inf")])
    keys = scatter._ordered_int32(values)
    assert torch.all(keys[1:] >= keys[:-1]) and torch.equal(scatter._ordered_int32(keys).view(torch.float32), values)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_float32_takes_the_int_key_path_and_matches():
    src = torch.randn(10_000, 16, device="cuda")
    index = torch.randint(0, 500, (10_000,), device="cuda")
    torch.testing.assert_close(scatter.scatter_max(src, index, 500), _reference(src, index, 500), rtol=0, atol=0)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_segment_max_equals_scatter_max_on_sorted_rows(device):
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 9, (50,), generator=gen)
    index = torch.repeat_interleave(torch.arange(50), lengths)
    src = torch.randint(-3, 4, (len(index), 4), generator=gen).float()  # ties in most groups
    ours = src.clone().to(device).requires_grad_()
    got = scatter.segment_max(ours, lengths.to(device))
    assert torch.equal(got.cpu(), _reference(src, index, 50))
    grad = torch.randn(got.shape, generator=gen)
    got.backward(grad.to(device))
    torch.testing.assert_close(ours.grad.cpu(), _even_split(src, index, grad), rtol=0, atol=1e-6)
