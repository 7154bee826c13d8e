"""fetaliqa: frame-level quality assessment of blind-sweep fetal ultrasound on Ray."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fetaliqa")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
