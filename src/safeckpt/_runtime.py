"""What the public API shares with the distributed path, the manager and the CLI: a path argument
made local, a checkpoint opened through the registry, a format's own checks run, and whether a
state is saved and loaded across ranks. It sits below `api` (orchestration) and above `formats`,
so no module but the edges imports `api`, and nothing imports back up.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from . import _remote, formats
from .errors import CorruptCheckpointError
from .tree import Checkpoint, iter_leaves

__all__ = ["across_ranks", "holds_dtensors", "local", "open_local", "verify"]


def local(path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None) -> Path:
    """A local path for ``path``; ``hf://`` URIs are fetched through the Hub client (extra ``hub``),
    other fsspec URLs (``s3://``, ...) are read through a view of ranged reads (`_remote.view`)
    with ``storage_options``.

    Example:
        >>> local("runs/step-7.safeckpt")
        PosixPath('runs/step-7.safeckpt')
    """
    text = os.fspath(path)
    if text.startswith("hf://"):
        from . import hub

        return hub.resolve(text)
    if _remote.is_url(text):
        return _remote.view(text, storage_options)
    return Path(_remote.local_path(text))


def open_local(path: Path, allow: Iterable[str] = ()) -> Checkpoint:
    """The checkpoint at the local ``path``, its format found by content; headers only.

    Example:
        >>> open_local(Path("friend.pt")).format
        'torch'
    """
    with _remote.urls_in_errors(path):
        fmt = formats.detect(path)
        with _gc_paused():  # reading builds many objects and no cycles: collections would be wasted work
            return fmt.read(path, allow=tuple(allow))


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def verify(ckpt: Checkpoint | Path) -> None:
    """Raise `CorruptCheckpointError` listing every problem the format's own checks find (checksums).

    Example:
        >>> verify(Path("run.safeckpt"))   # silent when every checksum matches
    """
    fmt = formats.get(ckpt.format) if isinstance(ckpt, Checkpoint) else formats.detect(ckpt)
    path = Path(ckpt.path) if isinstance(ckpt, Checkpoint) else ckpt
    with _remote.urls_in_errors(path):
        problems = fmt.verify(path) if fmt.verify is not None else []
        if problems:
            raise CorruptCheckpointError("; ".join(problems), path=path, hint="restore the file from a copy or re-save it")


def across_ranks(state: Any, format: str | None = None) -> bool:
    """In a process group, DTensor state (or an explicit ``format="safeckpt-sharded"`` on several
    ranks) is saved and loaded collectively by `safeckpt.distributed`; anything else stays local,
    so a rank-0-only save of replicated state keeps working.

    Example:
        >>> across_ranks({"model": model})   # no process group
        False
    """
    import torch  # the state holds torch objects: torch is imported
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    several = torch.distributed.get_world_size() > 1
    return (format == "safeckpt-sharded" and several) or holds_dtensors(state)


def holds_dtensors(state: Any) -> bool:
    """Whether ``state`` (a module, or a dict of modules, optimizers and values) holds a DTensor.

    Example:
        >>> holds_dtensors({"model": fully_shard(model)})
        True
    """
    import torch
    from torch import nn
    from torch.distributed.tensor import DTensor

    from . import state as st

    objs = state.values() if isinstance(state, Mapping) else [state]
    for obj in map(st.unwrap, objs):
        if isinstance(obj, nn.Module):
            tensors: Iterable[Any] = [*obj.parameters(), *obj.buffers()]
        elif isinstance(obj, torch.optim.Optimizer):
            tensors = [p for g in obj.param_groups for p in g["params"]]
        else:
            tensors = (x for _, x in iter_leaves(obj) if isinstance(x, torch.Tensor))
        if any(isinstance(t, DTensor) for t in tensors):
            return True
    return False
