"""Merging: pure tensor operators (``ops``), adapter-level combination, out-of-core checkpoint merges,
LoRA extraction and adapter compression. See docs/DESIGN.md, "Merging: one operator, three levels"."""

from .combine import combine, negate
from .compress import compress_adapter
from .executor import merge
from .extract import extract_lora
from .ops import apply, available, get, op
from .recipe import Recipe, load_recipe

__all__ = ["Recipe", "apply", "available", "combine", "compress_adapter", "extract_lora", "get", "load_recipe",
           "merge", "negate", "op"]
