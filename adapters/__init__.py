"""Adapter methods.  Importing this package registers every built-in method."""

from adapters import lora  # noqa: F401

__all__ = ["lora"]
