"""The exceptions safeckpt raises.

```
CheckpointError(Exception)
├── UnknownFormatError(CheckpointError, ValueError)     no registered format recognises the file
├── CorruptCheckpointError(CheckpointError, ValueError)  truncated, bad header, bad offsets, bad sizes
├── UnsafeCheckpointError(CheckpointError)              a pickle names a global that is not allowed,
│                                                       or a file a type this process has not registered
└── HubError(CheckpointError)                           a Hugging Face Hub request failed
    ├── HubNotFoundError(HubError, FileNotFoundError)   no such repo, revision or file (or not cached offline)
    └── HubAuthError(HubError, PermissionError)         the token cannot read (or write) the repo
```

Key mismatches on load keep the types PyTorch users already catch: ``KeyError`` for a missing
top-level key and ``RuntimeError`` (torch's wording) for a module's missing, unexpected or
mis-shaped keys. Every message names the file and, where it applies, the key and the fix.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "CorruptCheckpointError",
    "HubAuthError",
    "HubError",
    "HubNotFoundError",
    "UnknownFormatError",
    "UnsafeCheckpointError",
]


class CheckpointError(Exception):
    """Base class of every error safeckpt raises about a checkpoint."""


class UnknownFormatError(CheckpointError, ValueError):
    """No registered format recognises the file; the message lists the formats tried."""


class CorruptCheckpointError(CheckpointError, ValueError):
    """The file is damaged or malformed: truncated, a bad header, offsets or sizes that do not add up."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle-based file refers to a global outside the allow-list, or a native file to a type this
    process has not registered (`safeckpt.register_type`); nothing was imported or run."""


class HubError(CheckpointError):
    """A Hugging Face Hub request failed; the message is one line naming the repo and the fix."""


class HubNotFoundError(HubError, FileNotFoundError):
    """No such repo, revision or file on the Hub, or (offline) not in the local cache."""


class HubAuthError(HubError, PermissionError):
    """The Hub refused the request: no token, or one without access to the repo."""
