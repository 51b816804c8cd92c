"""Bluesky plans: diffraction maps, XRD-CT, operando cycling, and the replay of archived runs."""

from .operando import operando
from .replay import replay
from .scans import xrd_map, xrdct

__all__ = ["operando", "replay", "xrd_map", "xrdct"]
