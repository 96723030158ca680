"""Necks: between a backbone's sparse BEV and a dense head (scatter to a dense map, 2D blocks)."""
