"""Checkpoints of reference implementations (OpenPCDet) converted to voxsparse's and back."""
