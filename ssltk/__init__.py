"""ssltk: a reproducibility-first toolkit for self-supervised visual representation learning."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ssltk")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
