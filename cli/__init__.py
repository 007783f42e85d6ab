"""Pollinate: volunteers serve and fine-tune transformer language models together."""

from importlib.metadata import PackageNotFoundError, version

try:  # the one version string is pyproject.toml's
    __version__ = version("pollinate")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
