"""safeckpt: save and restore PyTorch training state without pickle, and read the checkpoints
people already have (torch ``.pt``, Lightning ``.ckpt``, safetensors, sharded and DCP
directories) without executing a byte of pickle.

Example:
    >>> import safeckpt
    >>> safeckpt.save("run.safeckpt", {"model": model, "optimizer": opt, "step": 7})
    >>> remainder = safeckpt.load("run.safeckpt", {"model": model, "optimizer": opt})
    >>> safeckpt.load_raw("friend.pt", model)   # read through the restricted unpickler
"""

from .api import convert, load, load_raw, open, save
from .errors import (
    CheckpointError,
    CorruptCheckpointError,
    HubAuthError,
    HubError,
    HubNotFoundError,
    UnknownFormatError,
    UnsafeCheckpointError,
)
from .formats import Format, register_format
from .hub import pull_from_hub, push_to_hub  # huggingface_hub itself is imported on first use
from .manager import CheckpointManager
from .tree import AttributeDict, Checkpoint, TensorRef
from .user_types import register_type

__version__ = "0.1.0"

__all__ = [
    "AttributeDict",
    "Checkpoint",
    "CheckpointError",
    "CheckpointManager",
    "CorruptCheckpointError",
    "Format",
    "HubAuthError",
    "HubError",
    "HubNotFoundError",
    "TensorRef",
    "UnknownFormatError",
    "UnsafeCheckpointError",
    "__version__",
    "convert",
    "load",
    "load_raw",
    "open",
    "pull_from_hub",
    "push_to_hub",
    "register_format",
    "register_type",
    "save",
]
