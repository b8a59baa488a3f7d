"""The exceptions safeckpt raises.

```
CheckpointError(Exception)
├── UnknownFormatError(CheckpointError, ValueError)     no registered format recognises the file
├── CorruptCheckpointError(CheckpointError, ValueError)  truncated, bad header, bad offsets, bad sizes
│   └── TruncatedCheckpointError                         the data ends before its structure does
├── UnsafeCheckpointError(CheckpointError)              a pickle names a global that is not allowed,
│                                                       or a file a type this process has not registered
└── HubError(CheckpointError)                           a Hugging Face Hub request failed
    ├── HubNotFoundError(HubError, FileNotFoundError)   no such repo, revision or file (or not cached offline)
    └── HubAuthError(HubError, PermissionError)         the token cannot read (or write) the repo
```

Every `CheckpointError` carries, besides its message, the keyword fields ``path`` (the file or
directory it is about), ``key`` (the key or tree path inside it) and ``hint`` (the fix, when the
message already says one), each None where the raise site did not give it. Code decides on these
fields and on the type, never on the message text, which may change. They survive pickling, so
an error raised in a worker process keeps them.

Key mismatches on load keep the types PyTorch users already catch: ``KeyError`` for a missing
top-level key and ``RuntimeError`` (torch's wording) for a module's missing, unexpected or
mis-shaped keys. Every message names the file and, where it applies, the key and the fix.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = [
    "CheckpointError",
    "CorruptCheckpointError",
    "HubAuthError",
    "HubError",
    "HubNotFoundError",
    "TruncatedCheckpointError",
    "UnknownFormatError",
    "UnsafeCheckpointError",
]


class CheckpointError(Exception):
    """Base class of every error safeckpt raises about a checkpoint.

    Example:
        >>> e = CorruptCheckpointError("run.safeckpt: truncated", path="run.safeckpt", hint="save it again")
        >>> str(e), e.path, e.key, e.hint
        ('run.safeckpt: truncated', 'run.safeckpt', None, 'save it again')
    """

    path: str | None
    key: str | None
    hint: str | None

    def __init__(
        self,
        *args: Any,
        path: str | os.PathLike[str] | None = None,
        key: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(*args)
        self.path = None if path is None else os.fspath(path)
        self.key, self.hint = key, hint

    def __reduce__(self) -> tuple[Any, ...]:
        # the message positionally, the fields as state: unpickling calls cls(*args), then sets them
        return type(self), self.args, dict(self.__dict__)


class UnknownFormatError(CheckpointError, ValueError):
    """No registered format recognises the file; the message lists the formats tried."""


class CorruptCheckpointError(CheckpointError, ValueError):
    """The file is damaged or malformed: truncated, a bad header, offsets or sizes that do not add up."""


class TruncatedCheckpointError(CorruptCheckpointError):
    """The data ends before its structure does: a truncated file, or a length that points past the
    end (a reader given only a file's first bytes tells such a file from a malformed one by this)."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle-based file refers to a global outside the allow-list, or a native file to a type this
    process has not registered (`safeckpt.register_type`); nothing was imported or run."""


class HubError(CheckpointError):
    """A Hugging Face Hub request failed; the message is one line naming the repo and the fix."""


class HubNotFoundError(HubError, FileNotFoundError):
    """No such repo, revision or file on the Hub, or (offline) not in the local cache."""


class HubAuthError(HubError, PermissionError):
    """The Hub refused the request: no token, or one without access to the repo."""
