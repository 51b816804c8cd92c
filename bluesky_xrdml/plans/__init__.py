"""Bluesky plans: diffraction maps and XRD-CT."""

from .scans import xrd_map, xrdct

__all__ = ["xrd_map", "xrdct"]
