"""Which spconv version wrote a checkpoint's sparse-convolution weights, and those weights in ours.

spconv stored a convolution weight of ``Cin`` inputs, ``Cout`` outputs and kernel ``k`` differently
over its history (``SPCONV_SAVED_WEIGHT_LAYOUT`` names the orders RSCK, RSKC, KRSC):

- 1.x: ``(*k, Cin, Cout)`` (RSCK);
- 2.0, and 2.1 with its native algorithm (CPU-only builds): ``(*k, Cout, Cin)`` (RSKC);
- 2.1 on CUDA: ``(Cout, *k, Cin)`` (KRSC) where it chose implicit GEMM, its default for kernels of
  at most 32 cells, and RSKC above (a 5x5x5 kernel), so one file mixes both;
- 2.2 and later: ``(Cout, *k, Cin)`` (KRSC) everywhere; voxsparse holds this (spconv 2.3.8).

A file does not say which: :func:`infer_layout` finds the one layout under which every weight has
its target's shape, and refuses a file no layout explains (weights of different versions) or one
two layouts explain differently (only square layers, ``Cin == Cout``, distinguish nothing).

What a layer computed is what must survive, not what its shape suggests. spconv runs a kernel of one
cell as a plain product ``features @ W.view(Cin, Cout)``, a reshape of the stored data in every
version. Under 1.x that reshape is the true matrix; under 2.x it is not the transpose of the
``(Cout, Cin)`` the shape suggests (spconv issue #450). Either way a one-cell kernel converts by
keeping its data in order (:func:`to_ours`), and an ``nn.Linear`` standing in for it takes the
transpose of that reshape (:func:`to_linear`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import torch

#: Kernels with more cells than this ran spconv 2.1's native algorithm (RSKC) on CUDA builds.
SPCONV21_IMPLICIT_GEMM_MAX_CELLS = 32


class SpconvLayout(str, Enum):
    """The spconv version family that wrote a file's sparse-convolution weights (module docstring)."""

    V1 = "1.x"
    V2_0 = "2.0"
    V2_1 = "2.1"
    V2_2 = "2.2"


class LayoutError(ValueError):
    """A file's sparse-convolution weights fit no spconv layout, or several that compute differently."""


@dataclass(frozen=True)
class ConvWeight:
    """One sparse-convolution weight of a source file beside the shape voxsparse holds it in.

    Attributes:
        key: the weight's name in the source file.
        shape: its shape there.
        cout, kernel, cin: the convolution's output channels, kernel cells per axis and input channels
            (from the target: ``(Cout, *kernel, Cin)`` for a sparse conv, ``(Cout, Cin)`` with a one-cell
            kernel of the source's rank for an ``nn.Linear``).
    """

    key: str
    shape: tuple[int, ...]
    cout: int
    kernel: tuple[int, ...]
    cin: int

    @property
    def one_cell(self) -> bool:
        return math.prod(self.kernel) == 1


def _order(layout: SpconvLayout, kernel: Sequence[int]) -> str:
    """RSCK, RSKC or KRSC: how ``layout`` stored a weight of this kernel."""
    if layout is SpconvLayout.V1:
        return "RSCK"
    if layout is SpconvLayout.V2_0:
        return "RSKC"
    if layout is SpconvLayout.V2_1 and math.prod(kernel) > SPCONV21_IMPLICIT_GEMM_MAX_CELLS:
        return "RSKC"
    return "KRSC"


def stored_shape(layout: SpconvLayout, cout: int, kernel: Sequence[int], cin: int) -> tuple[int, ...]:
    """The shape ``layout`` stored a ``(Cout, *kernel, Cin)`` convolution weight in."""
    order = _order(layout, kernel)
    if order == "RSCK":
        return (*kernel, cin, cout)
    if order == "RSKC":
        return (*kernel, cout, cin)
    return (cout, *kernel, cin)


def matching_layouts(weight: ConvWeight) -> set[SpconvLayout]:
    """The layouts under which ``weight`` has the shape its file holds."""
    return {lay for lay in SpconvLayout if stored_shape(lay, weight.cout, weight.kernel, weight.cin) == weight.shape}


def _conversion(layout: SpconvLayout, weight: ConvWeight) -> str:
    """What converting ``weight`` from ``layout`` does: one-cell kernels keep their data in order."""
    return "reshape" if weight.one_cell else _order(layout, weight.kernel)


def _keys(weights: Sequence[ConvWeight], limit: int = 4) -> str:
    shown = ", ".join(f"{w.key} {list(w.shape)}" for w in weights[:limit])
    return shown + (f" and {len(weights) - limit} more" if len(weights) > limit else "")


def infer_layout(weights: Sequence[ConvWeight], where: str = "checkpoint") -> SpconvLayout:
    """The spconv layout of a file from its sparse-convolution weights.

    Args:
        weights: every sparse-convolution weight of the file, with the shape voxsparse expects.
        where: the file, for messages.

    Returns:
        the one layout every weight fits; of several that convert every weight alike, the newest.

    Raises:
        LayoutError: no layout fits every weight (names weights that fit different layouts), or
            several fit and convert some weight differently (names the weights that cannot tell
            them apart; the caller may then state the layout).
    """
    candidates = set(SpconvLayout)
    for weight in weights:
        fits = matching_layouts(weight)
        if not fits:
            raise LayoutError(
                f"{where}: {weight.key} has shape {list(weight.shape)}, which no spconv layout gives a "
                f"({weight.cout}, {', '.join(map(str, weight.kernel))}, {weight.cin}) sparse convolution"
            )
        candidates &= fits
    if not candidates:
        by_layout = {lay: [w for w in weights if lay in matching_layouts(w)] for lay in SpconvLayout}
        parts = [f"spconv {lay.value}: {_keys(ws, 2)}" for lay, ws in by_layout.items() if ws]
        raise LayoutError(f"{where}: its sparse convolutions are stored in different spconv layouts ({'; '.join(parts)})")
    ordered = sorted(candidates, key=lambda lay: list(SpconvLayout).index(lay), reverse=True)
    undecided = [w for w in weights if len({_conversion(lay, w) for lay in ordered}) > 1]
    if undecided:
        raise LayoutError(
            f"{where}: its sparse-convolution weights fit spconv {' and '.join(lay.value for lay in ordered)} "
            f"layouts, which compute differently, and no weight tells them apart (square ones: "
            f"{_keys(undecided)}); state the spconv version that wrote it"
        )
    return ordered[0]


def to_ours(tensor: torch.Tensor, layout: SpconvLayout, weight: ConvWeight) -> torch.Tensor:
    """A source weight as voxsparse's spconv holds it, ``(Cout, *kernel, Cin)``, computing the same.

    One-cell kernels keep their data in order (module docstring); others are permuted.
    """
    n = len(weight.kernel)
    order = "reshape" if weight.one_cell else _order(layout, weight.kernel)
    if order == "RSCK":
        tensor = tensor.permute(n + 1, *range(n), n)
    elif order == "RSKC":
        tensor = tensor.permute(n, *range(n), n + 1)
    return tensor.contiguous().reshape(weight.cout, *weight.kernel, weight.cin)


def to_linear(tensor: torch.Tensor, weight: ConvWeight) -> torch.Tensor:
    """A one-cell source weight as the ``(Cout, Cin)`` weight of an ``nn.Linear`` computing the same:
    spconv multiplied by ``W.view(Cin, Cout)`` in every version."""
    return tensor.contiguous().reshape(weight.cin, weight.cout).t().contiguous()


def linear_to_spconv(linear: torch.Tensor, kernel_rank: int) -> torch.Tensor:
    """An ``nn.Linear`` weight ``(Cout, Cin)`` as the one-cell spconv >= 2.2 weight
    ``(Cout, 1, ..., 1, Cin)`` (``kernel_rank`` ones) that computes the same."""
    cout, cin = linear.shape
    return linear.t().contiguous().reshape(cout, *([1] * kernel_rank), cin)
