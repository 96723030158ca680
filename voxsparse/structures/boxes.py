"""Oriented 3D boxes in the LiDAR frame."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from voxsparse.structures._validation import check_tensor, checking_values


@dataclass
class Boxes3D:
    """A set of K oriented 3D boxes.

    ``tensor`` is (K, 7) ``(x, y, z, dx, dy, dz, heading)`` or (K, 9) with ``(vx, vy)`` appended:
    metres, radians and m/s in the LiDAR frame (x forward, y left, z up); ``(x, y, z)`` is the box
    centre, ``dx`` the extent along the heading, heading counter-clockwise from +x.
    """

    tensor: torch.Tensor

    def __post_init__(self) -> None:
        check_tensor("Boxes3D.tensor", self.tensor, ndim=2, last_dim=(7, 9), floating=True, finite=True)
        if checking_values() and self.tensor.numel() and bool((self.tensor[:, 3:6] < 0).any()):
            raise ValueError("Boxes3D.tensor: box sizes (columns 3:6, dx dy dz) must be non-negative")

    @classmethod
    def empty(cls, with_velocity: bool = False, device: torch.device | str = "cpu") -> Boxes3D:
        return cls(torch.zeros(0, 9 if with_velocity else 7, device=device))

    def __len__(self) -> int:
        return self.tensor.shape[0]

    def __getitem__(self, index: int | slice | torch.Tensor) -> Boxes3D:
        if isinstance(index, int):
            index = slice(index, index + 1)
        return Boxes3D(self.tensor[index])

    @property
    def has_velocity(self) -> bool:
        return self.tensor.shape[1] == 9

    @property
    def center(self) -> torch.Tensor:
        """(K, 3) box centres, metres."""
        return self.tensor[:, 0:3]

    @property
    def dims(self) -> torch.Tensor:
        """(K, 3) sizes (dx, dy, dz), metres."""
        return self.tensor[:, 3:6]

    @property
    def heading(self) -> torch.Tensor:
        """(K,) heading, radians."""
        return self.tensor[:, 6]

    @property
    def velocity(self) -> torch.Tensor:
        """(K, 2) velocity (vx, vy) in m/s; zeros when the boxes carry none."""
        if self.has_velocity:
            return self.tensor[:, 7:9]
        return self.tensor.new_zeros(len(self), 2)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Boxes3D:
        return Boxes3D(self.tensor.to(device=device, dtype=dtype))

    @staticmethod
    def cat(boxes: list[Boxes3D]) -> Boxes3D:
        return Boxes3D(torch.cat([b.tensor for b in boxes], dim=0))

