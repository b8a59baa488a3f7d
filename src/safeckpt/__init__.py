"""safeckpt: save and restore PyTorch training state without pickle, and read the checkpoints
people already have (torch ``.pt``, Lightning ``.ckpt``, safetensors, sharded and DCP
directories) without executing a byte of pickle.

Example:
    >>> import safeckpt
    >>> safeckpt.save("run.safeckpt", {"model": model, "optimizer": opt, "step": 7})
    >>> remainder = safeckpt.load("run.safeckpt", {"model": model, "optimizer": opt})
    >>> safeckpt.load_raw("friend.pt", model)   # read through the restricted unpickler
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .api import convert, load, load_raw, save
    from .api import open as open  # safeckpt.open, kept out of __all__
    from .codec import register_type
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
    from .hub import pull_from_hub, push_to_hub
    from .manager import CheckpointManager
    from .tree import AttributeDict, Checkpoint, TensorRef

__version__ = "0.1.0"

# Imported on first use (PEP 562): `import safeckpt` and `safeckpt --version`/`--help` do not pay
# for torch (about 2 s); the first `safeckpt.save`, `safeckpt.open`, ... does.
_LAZY = {
    **dict.fromkeys(("convert", "load", "load_raw", "open", "save"), ".api"),
    **dict.fromkeys(
        (
            "CheckpointError",
            "CorruptCheckpointError",
            "HubAuthError",
            "HubError",
            "HubNotFoundError",
            "UnknownFormatError",
            "UnsafeCheckpointError",
        ),
        ".errors",
    ),
    **dict.fromkeys(("Format", "register_format"), ".formats"),
    **dict.fromkeys(("pull_from_hub", "push_to_hub"), ".hub"),  # huggingface_hub itself is imported on first use
    "CheckpointManager": ".manager",
    **dict.fromkeys(("AttributeDict", "Checkpoint", "TensorRef"), ".tree"),
    "register_type": ".codec",
}

# `open` is left out of the star-import: `from safeckpt import *` must not shadow the builtin
# (`safeckpt.open` stays the way to call it).
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
    "pull_from_hub",
    "push_to_hub",
    "register_format",
    "register_type",
    "save",
]


# submodules reached as attributes (`safeckpt.formats.names()` after `import safeckpt`), as when the
# package imported them eagerly
_SUBMODULES = frozenset(
    ("api", "cli", "codec", "compare", "distributed", "errors", "formats", "hub", "lightning", "manager", "state")
    + ("tree", "user_types")
)


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'safeckpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
