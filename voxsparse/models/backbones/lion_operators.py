"""The linear group RNN blocks LION runs over each group of voxels: bidirectional Mamba and RetNet.

Both map (G, L, C) sequences to (G, L, C) with a residual connection. Parameter names are the LION
reference's (``mamba.in_proj``, ``multi_scale_retention.q_proj``, ...), so its checkpoints load with
equal keys; the recurrences are :mod:`voxsparse.ops.linear_rnn`'s.

- :class:`MambaBlock`: ``x + drop_path(LayerNorm(BiMamba(x)))``. BiMamba projects to an inner width,
  then runs two selective scans with their own causal depthwise conv, projections, ``A`` and ``D``:
  one over the sequence, one over it reversed (its output reversed back), adds the two gated outputs
  and projects back.
- :class:`RetNetBlock`: pre-norm retention (multi-head, LION's chunk-bidirectional variant) and a GELU
  MLP, each with a residual connection.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from voxsparse.ops.linear_rnn import retention, selective_scan


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a whole sequence's branch with probability ``p`` (rescaled)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


class BiMamba(nn.Module):
    """Mamba's mixer with a second, reversed scan of its own parameters (LION's ``Mamba``).

    Args:
        channels: C of the sequences.
        state: N, the state size per inner channel.
        conv_kernel: width of the causal depthwise conv.
        expand: inner width ``expand * C``.
    """

    def __init__(self, channels: int, state: int = 16, conv_kernel: int = 4, expand: int = 2) -> None:
        super().__init__()
        inner = expand * channels
        self.rank = math.ceil(channels / 16)
        self.state = state
        self.in_proj = nn.Linear(channels, 2 * inner, bias=False)
        self.out_proj = nn.Linear(inner, channels, bias=False)
        for suffix in ("", "_b"):  # forward scan, backward scan
            setattr(self, "conv1d" + suffix, nn.Conv1d(inner, inner, conv_kernel, groups=inner, padding=conv_kernel - 1))
            setattr(self, "x_proj" + suffix, nn.Linear(inner, self.rank + 2 * state, bias=False))
            setattr(self, "dt_proj" + suffix, _dt_projection(self.rank, inner))
            self.register_parameter("D" + suffix, nn.Parameter(torch.ones(inner)))
        # A = -exp(A_log) = -(1, ..., N) for every channel at initialisation.
        self.A_log = nn.Parameter(torch.log(torch.arange(1, state + 1, dtype=torch.float32)).repeat(inner, 1))
        self.A_b_log = nn.Parameter(self.A_log.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(G, L, C) -> (G, L, C)."""
        xz = self.in_proj(x).transpose(1, 2)  # (G, 2 * inner, L)
        forward = self._scan(xz, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D)
        backward = self._scan(xz.flip(-1), self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b)
        return self.out_proj((forward + backward.flip(-1)).transpose(1, 2))

    def _scan(self, xz, conv: nn.Conv1d, x_proj: nn.Linear, dt_proj: nn.Linear, a_log, d) -> torch.Tensor:
        length = xz.shape[-1]
        x, z = xz.chunk(2, dim=1)
        x = F.silu(conv(x)[..., :length])  # causal: the conv pads both ends, keep the first L
        dt, b, c = x_proj(x.transpose(1, 2)).split([self.rank, self.state, self.state], dim=-1)
        delta = (dt @ dt_proj.weight.t()).transpose(1, 2)
        return selective_scan(
            x, delta, -torch.exp(a_log), b.transpose(1, 2), c.transpose(1, 2), d, z,
            delta_bias=dt_proj.bias, delta_softplus=True,
        )


def _dt_projection(rank: int, inner: int, dt_min: float = 1e-3, dt_max: float = 0.1) -> nn.Linear:
    """Mamba's step projection: uniform weights of scale rank^-0.5, a bias whose softplus is a step
    log-uniform in [dt_min, dt_max]."""
    proj = nn.Linear(rank, inner)
    nn.init.uniform_(proj.weight, -rank ** -0.5, rank ** -0.5)
    dt = torch.exp(torch.rand(inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=1e-4)
    with torch.no_grad():
        proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
    return proj


class MambaBlock(nn.Module):
    """``x + drop_path(LayerNorm(BiMamba(x)))`` over (G, L, C) groups (LION's Mamba ``Block``)."""

    def __init__(
        self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, drop_path: float = 0.0
    ) -> None:
        super().__init__()
        self.mamba = BiMamba(d_model, d_state, d_conv, expand)
        self.norm = nn.LayerNorm(d_model)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.norm(self.mamba(x)))


class MultiScaleRetention(nn.Module):
    """Multi-head retention with LION's chunk-bidirectional decay (64-step chunks), no gate."""

    def __init__(self, channels: int, num_heads: int, expand_k: float = 1.0, expand_v: float = 2.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        key, value = int(channels * expand_k), int(channels * expand_v)
        if key % num_heads or value % num_heads:
            raise ValueError(f"MultiScaleRetention: key {key} / value {value} widths must divide into {num_heads} heads")
        self.q_proj = nn.Linear(channels, key, bias=False)
        self.k_proj = nn.Linear(channels, key, bias=False)
        self.v_proj = nn.Linear(channels, value, bias=False)
        self.o_proj = nn.Linear(value, channels, bias=False)
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            nn.init.xavier_uniform_(proj.weight, gain=2 ** -2.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(G, L, C) -> (G, L, C)."""
        g, length, _ = x.shape
        q, k, v = (p(x).view(g, length, self.num_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        o = retention(q, k, v, bidirectional_chunks=True)
        return self.o_proj(o.transpose(1, 2).reshape(g, length, -1))


class FeedForward(nn.Module):
    """``fc2(gelu(fc1(x)))``."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class RetNetBlock(nn.Module):
    """Pre-norm retention and MLP blocks with residuals (LION's RetNet ``Block``, ``used_MLP: True``).

    Args:
        d_model: C.
        n_head: retention heads.
        expand_k, expand_v: key / value widths over C.
        hidden_rate: MLP width over C.
        drop_path: stochastic depth of both branches.
    """

    def __init__(
        self, d_model: int, n_head: int, expand_k: float = 1.0, expand_v: float = 2.0, hidden_rate: int = 4,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.retention_layer_norm = nn.LayerNorm(d_model, eps=1e-6)
        self.multi_scale_retention = MultiScaleRetention(d_model, n_head, expand_k, expand_v)
        self.final_layer_norm = nn.LayerNorm(d_model, eps=1e-6)
        self.ffn = FeedForward(d_model, hidden_rate * d_model)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.multi_scale_retention(self.retention_layer_norm(x)))
        return x + self.drop_path(self.ffn(self.final_layer_norm(x)))


#: Operator names of LION's configs (``OPERATOR.NAME``) to blocks.
OPERATORS = {"Mamba": MambaBlock, "RetNet": RetNetBlock}
