"""run_starts against a loop over the rows. segment_max against torch's scatter_reduce (values) and a
brute-force even split of each group's gradient among its tied rows. (scatter_reduce's own gradient
also counts its initial value as a tie where a group's maximum is exactly 0, so the groups' shares do
not add up to their gradient there.)"""

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


@pytest.mark.parametrize("n", [0, 1, 2, 200])
def test_run_starts_marks_the_first_row_of_each_run(n):
    keys = torch.sort(torch.randint(0, 20, (n,), generator=torch.Generator().manual_seed(n))).values
    expected = [i == 0 or keys[i].item() != keys[i - 1].item() for i in range(n)]
    assert scatter.run_starts(keys).tolist() == expected
