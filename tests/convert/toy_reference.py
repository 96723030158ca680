"""A toy reference detector (spconv >= 2.2, OpenPCDet's key names) and its voxsparse twin, and
OpenPCDet checkpoint files of it as each spconv version would have written them."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from voxsparse.models.keys import KeyPair, TensorKind
from voxsparse.ops.sparse_backend import SparseConvTensor, spnn

SHAPE = [12, 12, 12]


class ToyReference(nn.Module):
    """Convs of every kind the converter meets: a 5x5x5 kernel (over spconv 2.1's 32-cell limit), a
    non-square and a square 3x3x3 (no biases: spconv's CPU path cannot add one in eval mode),
    a one-cell conv kept as a conv and one held as ``nn.Linear`` by
    voxsparse, and a BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone_3d = nn.ModuleDict({
            "conv_input": spnn.SubMConv3d(4, 8, 5, padding=2, bias=False, indice_key="k5"),
            "bn": nn.BatchNorm1d(8),
            "conv1": spnn.SubMConv3d(8, 16, 3, padding=1, bias=False, indice_key="a"),
            "conv2": spnn.SubMConv3d(16, 16, 3, padding=1, bias=False, indice_key="a"),
        })
        self.dense_head = nn.ModuleDict({
            "shared": spnn.SubMConv3d(16, 6, 1, bias=True, indice_key="one"),
            "out": spnn.SubMConv3d(6, 3, 1, bias=True, indice_key="one"),
        })
        self.register_buffer("global_step", torch.zeros(1, dtype=torch.int64))

    def forward(self, x: SparseConvTensor) -> torch.Tensor:
        b, h = self.backbone_3d, self.dense_head
        x = b["conv_input"](x)
        x = x.replace_feature(torch.relu(b["bn"](x.features)))
        x = b["conv2"](b["conv1"](x))
        return h["out"](h["shared"](x)).features


class ToyOurs(nn.Module):
    """The same computation under voxsparse's names; the last one-cell conv is an ``nn.Linear``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = spnn.SubMConv3d(4, 8, 5, padding=2, bias=False, indice_key="k5")
        self.norm = nn.BatchNorm1d(8)
        self.convs = spnn.SparseSequential(
            spnn.SubMConv3d(8, 16, 3, padding=1, bias=False, indice_key="a"),
            spnn.SubMConv3d(16, 16, 3, padding=1, bias=False, indice_key="a"),
        )
        self.shared = spnn.SubMConv3d(16, 6, 1, bias=True, indice_key="one")
        self.out = nn.Linear(6, 3)

    def forward(self, x: SparseConvTensor) -> torch.Tensor:
        x = self.stem(x)
        x = x.replace_feature(torch.relu(self.norm(x.features)))
        return self.out(self.shared(self.convs(x)).features)

    def openpcdet_keys(self) -> list[KeyPair]:
        conv, linear = TensorKind.SPARSE_CONV, TensorKind.SPARSE_CONV_AS_LINEAR
        pairs = [KeyPair("stem.weight", "backbone_3d.conv_input.weight", conv),
                 KeyPair("convs.0.weight", "backbone_3d.conv1.weight", conv),
                 KeyPair("convs.1.weight", "backbone_3d.conv2.weight", conv),
                 KeyPair("shared.weight", "dense_head.shared.weight", conv),
                 KeyPair("shared.bias", "dense_head.shared.bias"),
                 KeyPair("out.weight", "dense_head.out.weight", linear),
                 KeyPair("out.bias", "dense_head.out.bias")]
        pairs += [KeyPair(f"norm.{k}", f"backbone_3d.bn.{k}") for k in self.norm.state_dict()]
        return pairs


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and BatchNorm statistics, eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                value = torch.rand(tensor.shape, generator=gen) + 0.5 if name.endswith("running_var") \
                    else torch.randn(tensor.shape, generator=gen) * 0.3
                tensor.copy_(value)
    return model.eval()


def toy_input(seed: int = 1) -> SparseConvTensor:
    gen = torch.Generator().manual_seed(seed)
    flat = torch.randperm(12 ** 3, generator=gen)[:300]
    coords = torch.stack([torch.zeros_like(flat), flat // 144, flat // 12 % 12, flat % 12], dim=1).int()
    return SparseConvTensor(torch.randn(300, 4, generator=gen), coords, SHAPE, 1)


def as_written_by(state: dict[str, torch.Tensor], version: str, conv_keys=None) -> dict[str, torch.Tensor]:
    """A spconv 2.2 state dict as ``version`` ("1.x", "2.0", "2.1", "2.2") stored the same computation.

    A kernel of more than one cell is permuted (1.x: (*k, Cin, Cout); 2.0: (*k, Cout, Cin); 2.1: KRSC
    up to 32 cells, (*k, Cout, Cin) above). Every version multiplied a one-cell kernel by its data
    read as (Cin, Cout), so those keep their data and only change shape. ``conv_keys``: the sparse
    convolution weights (default: every 5-D tensor).
    """
    out = {}
    for key, w in state.items():
        if (w.ndim != 5) if conv_keys is None else (key not in conv_keys):
            out[key] = w.clone()
            continue
        cout, *kernel, cin = w.shape
        n = len(kernel)
        one_cell = torch.Size(kernel).numel() == 1
        rskc = version == "2.0" or (version == "2.1" and torch.Size(kernel).numel() > 32)
        if version == "1.x":
            out[key] = w.reshape(*kernel, cin, cout).clone() if one_cell else w.permute(*range(1, n + 1), n + 1, 0).contiguous()
        elif rskc:
            out[key] = w.reshape(*kernel, cout, cin).clone() if one_cell else w.permute(*range(1, n + 1), 0, n + 1).contiguous()
        else:
            out[key] = w.clone()
    return out


def write_openpcdet_checkpoint(path: Path, model_state: dict[str, torch.Tensor], **extra) -> Path:
    """``model_state`` saved as OpenPCDet's train_utils saves a checkpoint."""
    torch.save({"epoch": 7, "it": 1234, "model_state": model_state, "optimizer_state": None,
                "version": "pcdet+0.6.0", **extra}, path)
    return path
