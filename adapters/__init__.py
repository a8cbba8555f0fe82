"""Adapter methods.  Importing this package registers every built-in method."""

import adapters.adaptertune  # noqa: F401
import adapters.salt  # noqa: F401
import adapters.tesla  # noqa: F401
from adapters import lora  # noqa: F401

__all__ = ["lora"]
