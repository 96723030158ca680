"""The linear group RNN blocks LION runs over each group of voxels: bidirectional Mamba, RetNet, RWKV-6.

All map (G, L, C) sequences to (G, L, C) with residual connections. Parameter names are the LION
reference's (``mamba.in_proj``, ``multi_scale_retention.q_proj``, ``att.time_maa_w1``, ...), so its
checkpoints load with equal keys; the recurrences are :mod:`voxsparse.ops.linear_rnn`'s.

- :class:`MambaBlock`: ``x + drop_path(LayerNorm(BiMamba(x)))``. BiMamba projects to an inner width,
  then runs two selective scans with their own causal depthwise conv, projections, ``A`` and ``D``:
  one over the sequence, one over it reversed (its output reversed back), adds the two gated outputs
  and projects back.
- :class:`RetNetBlock`: pre-norm retention (multi-head, LION's chunk-bidirectional variant) and a GELU
  MLP, each with a residual connection.
- :class:`RWKVBlock`: Vision-RWKV's block with RWKV-6 mixing (LION's ``rwkv_cls.Block``): a spatial mix
  (token shift by one step, data-dependent interpolation, the causal WKV recurrence with a decay per
  step and channel, GroupNorm, SiLU gate) and a channel mix (squared-ReLU MLP gated by a sigmoid), each
  pre-normed, scaled by a learned per-channel ``gamma`` and added back. Its initialisation depends on
  the block's index among all of the backbone's blocks (``layer_id`` of ``n_layer``); the very first
  block also normalises its input (``ln0``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from voxsparse.ops.linear_rnn import retention, selective_scan, wkv6


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


def _token_shift(x: torch.Tensor) -> torch.Tensor:
    """(G, L, C) -> the previous step's features at every step, zeros at the first."""
    return F.pad(x, (0, 0, 1, -1))


def _channel_ramp(channels: int) -> torch.Tensor:
    """(1, 1, C) ``i / C`` for channel i: the profile of RWKV's initial interpolation weights."""
    return (torch.arange(channels, dtype=torch.float32) / channels).view(1, 1, channels)


class SpatialMix(nn.Module):
    """RWKV-6's time mixing over (G, L, C) sequences, the WKV recurrence in ``n_head`` heads.

    Args:
        channels: C (the attention width is C too).
        n_head: heads; C / n_head channels each.
        layer_id, n_layer: the block's index among ``n_layer`` blocks (initial values only).
        key_norm: a LayerNorm over the WKV output.
    """

    #: Widths of the low-rank projections of the five interpolations and of the decay.
    MIX_RANK = 32
    DECAY_RANK = 64

    def __init__(self, channels: int, n_head: int, layer_id: int, n_layer: int, key_norm: bool = False) -> None:
        super().__init__()
        if channels % n_head:
            raise ValueError(f"RWKV: {channels} channels do not divide into {n_head} heads")
        self.n_head = n_head
        depth = layer_id / max(n_layer - 1, 1)  # 0 for the first block, 1 for the last
        remaining = 1.0 - layer_id / max(n_layer, 1)  # 1 for the first block, towards 0
        ramp = _channel_ramp(channels)
        for name in ("x", "w", "k"):
            self.register_parameter(f"time_maa_{name}", nn.Parameter(1.0 - ramp ** remaining))
        self.time_maa_v = nn.Parameter(1.0 - (ramp ** remaining + 0.3 * depth))
        self.time_maa_r = nn.Parameter(1.0 - ramp ** (0.5 * remaining))
        self.time_maa_g = nn.Parameter(1.0 - ramp ** (0.5 * remaining))
        self.time_maa_w1 = nn.Parameter(torch.empty(channels, 5 * self.MIX_RANK).uniform_(-1e-4, 1e-4))
        self.time_maa_w2 = nn.Parameter(torch.empty(5, self.MIX_RANK, channels).uniform_(-1e-4, 1e-4))
        position = torch.arange(channels, dtype=torch.float32) / (channels - 1)
        self.time_decay = nn.Parameter((-6 + 5 * position ** (0.7 + 1.3 * depth)).view(1, 1, channels))
        self.time_decay_w1 = nn.Parameter(torch.empty(channels, self.DECAY_RANK).uniform_(-1e-4, 1e-4))
        self.time_decay_w2 = nn.Parameter(torch.empty(self.DECAY_RANK, channels).uniform_(-1e-4, 1e-4))
        zigzag = ((torch.arange(channels) + 1) % 3 - 1) * 0.1
        self.time_faaaa = nn.Parameter((depth * (1 - position) + zigzag).view(n_head, channels // n_head))
        self.key = nn.Linear(channels, channels, bias=False)
        self.value = nn.Linear(channels, channels, bias=False)
        self.receptance = nn.Linear(channels, channels, bias=False)
        self.gate = nn.Linear(channels, channels, bias=False)
        self.key_norm = nn.LayerNorm(channels) if key_norm else None
        self.output = nn.Linear(channels, channels, bias=False)
        self.ln_x = nn.GroupNorm(n_head, channels, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(G, L, C) -> (G, L, C)."""
        g, length, c = x.shape
        delta = _token_shift(x) - x
        low_rank = torch.tanh((x + delta * self.time_maa_x) @ self.time_maa_w1).view(g * length, 5, -1).transpose(0, 1)
        mw, mk, mv, mr, mg = torch.bmm(low_rank, self.time_maa_w2).view(5, g, length, c).unbind(0)
        r = self.receptance(x + delta * (self.time_maa_r + mr))
        k = self.key(x + delta * (self.time_maa_k + mk))
        v = self.value(x + delta * (self.time_maa_v + mv))
        gate = F.silu(self.gate(x + delta * (self.time_maa_g + mg)))
        w = self.time_decay + torch.tanh((x + delta * (self.time_maa_w + mw)) @ self.time_decay_w1) @ self.time_decay_w2

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(g, length, self.n_head, -1).transpose(1, 2)

        y = wkv6(heads(r), heads(k), heads(v), heads(-torch.exp(w)), self.time_faaaa).transpose(1, 2).reshape(g, length, c)
        if self.key_norm is not None:
            y = self.key_norm(y)
        return self.output(self.ln_x(y.reshape(g * length, c)).view(g, length, c) * gate)


class ChannelMix(nn.Module):
    """RWKV's channel mixing: ``sigmoid(R x_r) * V relu(K x_k)^2`` with token-shift interpolations."""

    def __init__(self, channels: int, layer_id: int, n_layer: int, hidden_rate: int = 4, key_norm: bool = False) -> None:
        super().__init__()
        hidden = hidden_rate * channels
        start = _channel_ramp(channels) ** (1.0 - layer_id / max(n_layer, 1))
        self.spatial_mix_k = nn.Parameter(start.clone())
        self.spatial_mix_r = nn.Parameter(start.clone())
        self.key = nn.Linear(channels, hidden, bias=False)
        self.key_norm = nn.LayerNorm(hidden) if key_norm else None
        self.receptance = nn.Linear(channels, channels, bias=False)
        self.value = nn.Linear(hidden, channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(G, L, C) -> (G, L, C)."""
        delta = _token_shift(x) - x
        k = torch.relu(self.key(x * self.spatial_mix_k + delta * (1 - self.spatial_mix_k))) ** 2
        if self.key_norm is not None:
            k = self.key_norm(k)
        return torch.sigmoid(self.receptance(x * self.spatial_mix_r + delta * (1 - self.spatial_mix_r))) * self.value(k)


class RWKVBlock(nn.Module):
    """Vision-RWKV's block with RWKV-6 mixing over (G, L, C) groups (LION's ``rwkv_cls.Block``).

    Args:
        d_model: C.
        n_head: WKV heads.
        layer_id, n_layer: this block's index among the backbone's ``n_layer`` blocks; sets initial
            values, and the block with index 0 normalises its input first (``ln0``).
        hidden_rate: channel-mix width over C.
        drop_path: stochastic depth of both branches.
        init_values: initial ``gamma1`` / ``gamma2`` scales of the branches (None: no scales).
        post_norm: normalise each branch's output instead of its input.
        key_norm: LayerNorms inside both mixes.
        shift_mode: ``"time_shift"`` (the previous step of the sequence), the only mode a voxel
            sequence has (Vision-RWKV's ``q_shift`` needs an image grid).
        init_mode: ``"fancy"``, RWKV's layer-dependent initialisation (the only one).
        shift_pixel: unused by ``time_shift``.
    """

    def __init__(
        self, d_model: int, n_head: int, layer_id: int = 0, n_layer: int = 1, hidden_rate: int = 4,
        drop_path: float = 0.0, init_values: float | None = None, post_norm: bool = False, key_norm: bool = False,
        shift_mode: str = "time_shift", init_mode: str = "fancy", shift_pixel: int = 1, with_cls_token: bool = False,
    ) -> None:
        super().__init__()
        if shift_mode != "time_shift" or init_mode != "fancy" or with_cls_token:
            raise ValueError(f"RWKV: shift_mode 'time_shift', init_mode 'fancy' and no class token are supported, "
                             f"got {shift_mode!r}, {init_mode!r}, with_cls_token={with_cls_token}")
        self.layer_id = layer_id
        self.post_norm = post_norm
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(d_model)
        self.ln1 = nn.LayerNorm(d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.att = SpatialMix(d_model, n_head, layer_id, n_layer, key_norm)
        self.ffn = ChannelMix(d_model, layer_id, n_layer, hidden_rate, key_norm)
        self.drop_path = DropPath(drop_path)
        if init_values is not None:
            self.gamma1 = nn.Parameter(torch.full((d_model,), float(init_values)))
            self.gamma2 = nn.Parameter(torch.full((d_model,), float(init_values)))
        else:
            self.gamma1 = self.gamma2 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layer_id == 0:
            x = self.ln0(x)
        for mix, norm, gamma in ((self.att, self.ln1, self.gamma1), (self.ffn, self.ln2, self.gamma2)):
            branch = norm(mix(x)) if self.post_norm else mix(norm(x))
            x = x + self.drop_path(branch if gamma is None else gamma * branch)
        return x


#: Operator names of LION's configs (``OPERATOR.NAME``) to blocks.
OPERATORS = {"Mamba": MambaBlock, "RetNet": RetNetBlock, "RWKV": RWKVBlock}

#: Operators whose blocks take their index among all of the backbone's blocks (``layer_id`` of ``n_layer``).
NUMBERED = ("RWKV",)
