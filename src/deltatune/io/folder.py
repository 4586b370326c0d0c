"""What an adapter folder is: its file names, and the error for one that cannot be read."""

from __future__ import annotations

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")


class AdapterFileError(ValueError):
    """An adapter folder that cannot be loaded: missing, corrupt, or not matching the model."""
