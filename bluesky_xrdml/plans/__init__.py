"""Bluesky plans: diffraction maps, XRD-CT, and the replay of archived runs."""

from .replay import replay
from .scans import xrd_map, xrdct

__all__ = ["replay", "xrd_map", "xrdct"]
