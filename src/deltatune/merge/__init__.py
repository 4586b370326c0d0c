"""Merging: pure tensor operators (``ops``), adapter-level combination, out-of-core checkpoint merges."""

from .ops import apply, available, get, op

__all__ = ["apply", "available", "get", "op"]
