"""bluesky-xrdml: live analysis of synchrotron diffraction data for Bluesky, filed in Tiled."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("bluesky-xrdml")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
