"""Pollinate: volunteers serve and fine-tune transformer language models together."""

__version__ = "0.1.0"
