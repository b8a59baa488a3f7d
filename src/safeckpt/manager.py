"""`CheckpointManager`: a directory of step-numbered checkpoints, rotated by a retention policy.

Example:
    >>> manager = safeckpt.CheckpointManager("run", keep_last=3, keep_every=10_000)
    >>> state = {"model": model, "optimizer": opt, "step": 0}
    >>> if manager.latest():                       # resume, if there is anything to resume from
    ...     remainder = manager.restore(state)
    >>> for step in range(state["step"] + 1, 100_001):
    ...     train_step(model, opt)
    ...     if step % 1000 == 0:
    ...         state["step"] = step
    ...         manager.save(step, state)
"""

from __future__ import annotations

import contextlib
import copy
import numbers
import operator
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import torch

from . import _remote, _runtime, api
from ._storage import Template, fsync_dir, remove
from .errors import CheckpointError
from .formats.safeckpt_sharded import INDEX, LAYOUT  # the index's presence commits a sharded directory
from .tree import TensorRef, alias_key, map_leaves

__all__ = ["Best", "CheckpointManager"]

# nine digits sort by name up to a billion steps; more still parse and sort numerically
STEP_FILE = Template("step-{step:09d}.safeckpt", step=r"\d+")
STEP_DIR = Template("step-{step:09d}", step=r"\d+")
_TEMP = STEP_FILE.temporary()  # what `_storage.atomic_write` leaves if killed


@dataclass(frozen=True)
class Best:
    """Keep the ``k`` checkpoints with the best value of metric ``name`` (``mode`` "min" or "max").

    Example:
        >>> Best("val_loss", "min", 3)     # the same as best=("val_loss", "min", 3)
    """

    name: str
    mode: Literal["min", "max"] = "min"
    k: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"best: the metric name must be a non-empty str, got {self.name!r}")
        if self.mode not in ("min", "max"):
            raise ValueError(f"best: mode must be 'min' or 'max', got {self.mode!r}")
        _positive(self.k, "best's k")


class CheckpointManager:
    """Save numbered checkpoints into ``directory``, keep the ones a policy asks for, restore the newest.

    Each `save` writes ``step-000000100.safeckpt`` (a sharded ``step-000000100/`` directory with
    ``max_shard_size=`` or for DTensor state in a process group) through `safeckpt.save`:
    atomically, with its semantics (``filter=`` passed through). Only once that checkpoint is
    committed are older ones deleted; a crash in between leaves extra checkpoints, never missing
    ones, and the next save finishes the job. The policies combine: a checkpoint stays if any
    asks for it, and the newest always stays (so a run can always resume). With no policy
    everything is kept.

    - ``keep_last=N``: the N newest.
    - ``keep_every=K``: also every step divisible by K, forever.
    - ``best=("val_loss", "min", 3)`` (or `Best`): also the 3 with the lowest ``val_loss``; ties
      keep the older. The value is ``state["val_loss"]`` (a number or one-element tensor), or
      ``save(step, state, metric=...)``, which stores it in the checkpoint under that name (so
      `restore` returns it in the remainder). Checkpoints already in the directory are ranked by
      the value stored in them; one without it is kept or dropped by the other policies only.

    The manager owns the names ``step-<digits>.safeckpt`` and ``step-<digits>/`` (and the
    temporaries ``.step-<digits>.safeckpt.*.tmp`` a killed save leaves, which it removes); any
    other file or directory is never touched. Steps only go forward: saving a step below the
    newest in the directory is a ``ValueError`` (delete the newer ones, or use a new directory);
    saving the newest step again replaces it atomically.

    **torch.distributed.** With DTensor state (FSDP2, tensor parallel) in a process group, call
    `save` and `restore` on every rank: `safeckpt.save` writes the sharded directory collectively,
    then after a barrier rank 0 alone deletes old checkpoints, and a failure on any rank is raised
    on every rank. `restore` loads what rank 0 sees as the newest. Other state (DDP: replicated)
    is written by rank 0 alone, as Fabric does: `save` on another rank checks its arguments and
    returns without writing, so calling it on every rank or on rank 0 only both work (there is
    no barrier: a rank that reads the checkpoint right away should wait for rank 0 first).

    **async_save=True.** `save` copies every tensor of the state to CPU memory (one copy of the
    state's tensors, and of its other values; a tied tensor is copied once), checks that
    everything can be stored, and returns while a background thread writes the copy and applies
    the policy, so training can go on changing the model. `wait` blocks until the write is done
    and raises its error, if any; the next `save` and `restore` wait first, and a failed write
    is raised there instead of starting a new one. The copy is freed when its write finishes. A
    program exiting normally waits for the write, but only `wait` tells whether it succeeded: call
    it after the last save. Not for DTensor state: its save is a
    collective that must not run beside training's own.

    Args:
        directory: where the checkpoints go (created on the first save).
        keep_last: keep the N newest checkpoints (N >= 1).
        keep_every: also keep every step divisible by K.
        best: ``(name, mode, k)`` or a `Best`: also keep the k best by metric ``name``.
        async_save: write in a background thread from a CPU copy (see above).

    Example:
        >>> manager = safeckpt.CheckpointManager("run", keep_last=2, best=("val_loss", "min", 1))
        >>> manager.save(100, {"model": model, "optimizer": opt, "step": 100}, metric=0.31)
        PosixPath('run/step-000000100.safeckpt')
        >>> manager.steps(), manager.latest()
        ([100], PosixPath('run/step-000000100.safeckpt'))
        >>> remainder = manager.restore({"model": model, "optimizer": opt, "step": 0})
        >>> remainder
        {'val_loss': 0.31}
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        keep_last: int | None = None,
        keep_every: int | None = None,
        best: Best | tuple[Any, ...] | None = None,
        async_save: bool = False,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        # a URL (s3://...) is listed, written and rotated on its store; UrlPath has the Path methods used here
        self.storage_options = storage_options
        self.directory = (
            cast(Path, _remote.UrlPath(os.fspath(directory), storage_options))
            if _remote.is_url(directory)
            else Path(_remote.local_path(directory))
        )
        self.keep_last = None if keep_last is None else _positive(keep_last, "keep_last")
        self.keep_every = None if keep_every is None else _positive(keep_every, "keep_every")
        if best is not None and not isinstance(best, Best):
            if not isinstance(best, tuple):
                raise TypeError(f"best must be a (name, mode, k) tuple or a safeckpt.manager.Best, got {best!r}")
            best = Best(*best)
        self.best: Best | None = best
        self.async_save = bool(async_save)
        self._metrics: dict[str, float | None] = {}  # by entry name: a stored metric, read once
        self._pending: threading.Thread | None = None
        self._error: BaseException | None = None

    def __repr__(self) -> str:
        policy = {"keep_last": self.keep_last, "keep_every": self.keep_every, "best": self.best}
        opts = ", ".join(f"{k}={v!r}" for k, v in policy.items() if v is not None)
        return f"CheckpointManager({str(self.directory)!r}{', ' + opts if opts else ''})"

    # -- what is there ---------------------------------------------------------------------------

    def steps(self) -> list[int]:
        """The steps of the complete checkpoints in the directory, oldest first.

        Example:
            >>> manager.steps()
            [1000, 2000, 3000]
        """
        return sorted(self._entries())

    def latest(self) -> Path | None:
        """The newest complete checkpoint (file or sharded directory), or None if there is none.
        A save still in progress (its temporary file, or a directory without its index) does
        not count.

        Example:
            >>> manager.latest()
            PosixPath('run/step-000003000.safeckpt')
        """
        entries = self._entries()
        return entries[max(entries)] if entries else None

    def path(self, step: int) -> Path | None:
        """The complete checkpoint of ``step``, or None.

        Example:
            >>> manager.path(1000)
            PosixPath('run/step-000001000.safeckpt')
        """
        return self._entries().get(_step(step))

    def _entries(self) -> dict[int, Path]:
        found: dict[int, Path] = {}
        try:
            scan = list(_remote.scandir(self.directory))
        except FileNotFoundError:
            return found
        for entry in scan:
            m = STEP_FILE.match(entry.name) or STEP_DIR.match(entry.name)
            if m is None:
                continue
            step, path = int(m["step"]), self.directory / entry.name
            if m.re is STEP_FILE.pattern:
                complete = entry.is_file(follow_symlinks=False)
            else:
                complete = entry.is_dir(follow_symlinks=False) and (path / INDEX).is_file()
            # the same step as a file and a directory happens only if a re-save in the other
            # layout was cut short before removing the old one: the newer is the one written last
            if complete and (step not in found or _mtime(path) > _mtime(found[step])):
                found[step] = path
        return found

    # -- saving ----------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        state: Mapping[str, Any],
        *,
        metric: float | torch.Tensor | None = None,
        filter: Mapping[str, Callable[[str, Any], bool]] | None = None,
        max_shard_size: int | str | None = None,
    ) -> Path:
        """Save ``state`` as checkpoint ``step``, then delete the checkpoints the policy no longer keeps.

        Args:
            step: a non-negative int, not below the newest step in the directory.
            state: what `safeckpt.save` takes (``{"model": model, "optimizer": opt, ...}``).
            metric: the value ``best=`` ranks this checkpoint by, if ``state`` does not hold it.
            filter: as in `safeckpt.save`.
            max_shard_size: write a sharded directory, as in `safeckpt.save`.

        Returns:
            The checkpoint's path (with ``async_save``, where it is being written).

        Example:
            >>> manager.save(100, {"model": model, "optimizer": opt, "step": 100})
            PosixPath('run/step-000000100.safeckpt')
        """
        self.wait()
        collective = _runtime.across_ranks(state)
        error, tree, value = None, state, None
        try:
            step = _step(step)
            # replicated state on a rank > 0: rank 0 alone writes, and may already be a step ahead
            newest = max(self._entries(), default=None) if collective or _rank() == 0 else None
            if newest is not None and step < newest:
                raise ValueError(
                    f"{self.directory} already holds step {newest}, newer than step {step}: steps only go "
                    "forward, so the newest checkpoint is always the one to resume from. Delete the newer "
                    "checkpoints, or save into a new directory"
                )
            if collective and self.async_save:
                raise ValueError(
                    "async_save does not apply to DTensor state in a process group (its save is a collective); "
                    "use CheckpointManager(..., async_save=False)"
                )
            tree, value = self._with_metric(state, metric)
        except Exception as e:
            error = e
        if collective:
            from .distributed import agree

            agree(error, "CheckpointManager.save")  # every rank raises, none enters the save alone
        elif error is not None:
            raise error
        path = self.directory / _name(step, collective or max_shard_size is not None)
        if not collective and _rank() > 0:
            return path  # replicated state: rank 0 writes it (Fabric's rule), no two ranks race on one file
        if not self.async_save:
            self._commit(step, path, tree, filter, max_shard_size, value, collective)
            return path
        snapshot = _snapshot(_saveable(tree, filter))
        worker = threading.Thread(
            target=self._background,
            args=(step, path, snapshot, max_shard_size, value),
            name=f"safeckpt-save-{step}",
        )
        self._pending = worker
        worker.start()
        return path

    def wait(self) -> None:
        """Block until the background save (``async_save``) is written and cleaned up; raise its
        error if it failed. Returns at once when none is running.

        Example:
            >>> manager.save(100, state); train_more(); manager.wait()
        """
        if self._pending is not None:
            self._pending.join()
            self._pending = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _background(self, step: int, path: Path, snapshot: Any, max_shard_size: int | str | None, value: Any) -> None:
        try:
            self._commit(step, path, snapshot, None, max_shard_size, value, False)
        except BaseException as e:  # handed to wait(); a thread has nowhere else to raise
            self._error = e

    def _commit(
        self,
        step: int,
        path: Path,
        tree: Mapping[str, Any],
        filter: Mapping[str, Callable[[str, Any], bool]] | None,
        max_shard_size: int | str | None,
        value: float | None,
        collective: bool,
    ) -> None:
        api.save(path, tree, filter=filter, max_shard_size=max_shard_size, storage_options=self.storage_options)
        self._metrics[path.name] = value
        if not collective:
            self._clean(step, path)
            return
        torch.distributed.barrier()  # every rank's save returned: the checkpoint is whole
        error = None
        if torch.distributed.get_rank() == 0:
            try:
                self._clean(step, path)
            except Exception as e:
                error = e
        from .distributed import agree

        agree(error, "CheckpointManager cleanup")

    def _with_metric(self, state: Mapping[str, Any], metric: Any) -> tuple[Mapping[str, Any], float | None]:
        if not isinstance(state, Mapping):
            raise TypeError(
                f"CheckpointManager.save takes a dict of objects ({{'model': model, ...}}), got {type(state).__name__}"
            )
        if self.best is None:
            if metric is not None:
                raise ValueError(
                    "save(metric=...) ranks checkpoints for best=; construct the manager with best=(name, mode, k)"
                )
            return state, None
        name = self.best.name
        if metric is None:
            if name not in state:
                raise ValueError(
                    f"best= ranks checkpoints by {name!r}, which the state does not hold; put it in the state "
                    "or pass save(step, state, metric=value)"
                )
            return state, _number(state[name], f"state[{name!r}]")
        if name in state:
            raise ValueError(f"the state already holds {name!r}: pass the metric either there or as metric=, not both")
        value = _number(metric, "metric")
        return {**state, name: value}, value

    # -- cleaning up -----------------------------------------------------------------------------

    def _clean(self, step: int, path: Path) -> None:
        """Apply the policy after ``step`` was committed at ``path``: only our names, newest kept."""
        removed = []
        other = self.directory / _name(step, path.name.endswith(".safeckpt"))
        if other.is_file() or other.is_dir():  # a re-save of this step in the other layout replaced it
            self._delete(other)
            removed.append(other)
        entries = self._entries()
        keep = self._retained(entries)
        for s in sorted(entries):
            if s not in keep:
                self._delete(entries[s])
                removed.append(entries[s])
        removed += self._leftovers(step)
        if removed:
            fsync_dir(self.directory)

    def _retained(self, entries: dict[int, Path]) -> set[int]:
        steps = sorted(entries)
        if not steps or (self.keep_last is None and self.keep_every is None and self.best is None):
            return set(steps)
        keep = {steps[-1]}
        if self.keep_last is not None:
            keep.update(steps[-self.keep_last :])
        if self.keep_every is not None:
            keep.update(s for s in steps if s % self.keep_every == 0)
        if self.best is not None:
            sign = 1.0 if self.best.mode == "min" else -1.0
            scored = []
            for s in steps:
                v = self._metric(entries[s])
                if v is not None:
                    scored.append((float("inf") if v != v else sign * v, s))  # NaN ranks last
            keep.update(s for _, s in sorted(scored)[: self.best.k])
        return keep

    def _metric(self, path: Path) -> float | None:
        """The metric stored in checkpoint ``path`` (read from its skeleton once), or None."""
        assert self.best is not None
        if path.name not in self._metrics:
            value = None
            with contextlib.suppress(CheckpointError, OSError, TypeError, ValueError):
                tree = api.open(path, storage_options=self.storage_options).tree
                if isinstance(tree, Mapping) and self.best.name in tree:
                    raw = tree[self.best.name]
                    value = _number(raw.load() if isinstance(raw, TensorRef) else raw, self.best.name)
            self._metrics[path.name] = value
        return self._metrics[path.name]

    def _delete(self, path: Path) -> None:
        """Remove one of our checkpoints. A directory loses its index first (so it is no longer a
        checkpoint), then its shards; files the format does not name stay, and so does the
        directory then."""
        self._metrics.pop(path.name, None)
        if isinstance(path, _remote.UrlPath):  # on a store: its index first, then its shards
            _remote.remove_url(path, self.storage_options)
        elif path.is_dir() and not path.is_symlink():
            LAYOUT.delete(path)
        else:
            remove(path)

    def _leftovers(self, step: int) -> list[Path]:
        """What killed saves of steps up to ``step`` left: temporaries and uncommitted directories.
        This manager's own saves up to ``step`` are all done, so nothing here is being written."""
        removed = []
        for entry in _remote.scandir(self.directory):
            m, path = _TEMP.match(entry.name), self.directory / entry.name
            if m and int(m["step"]) <= step and entry.is_file(follow_symlinks=False):
                if remove(path):
                    removed.append(path)
                continue
            m = STEP_DIR.match(entry.name)
            uncommitted = m and entry.is_dir(follow_symlinks=False) and not (path / INDEX).exists()
            if uncommitted and int(m["step"]) <= step:  # type: ignore[index]
                self._delete(path)
                removed.append(path)
        return removed

    # -- restoring -------------------------------------------------------------------------------

    def restore(
        self,
        state: Mapping[str, Any] | None = None,
        step: int | None = None,
        *,
        strict: bool = True,
        device: str | torch.device | None = None,
        assign: bool = False,
    ) -> dict[Any, Any]:
        """`safeckpt.load` the newest checkpoint (or ``step``'s) into ``state``; return the remainder.

        Waits for a background save first. With DTensor state in a process group, call it on every
        rank: all load what rank 0 sees. Nothing to restore is a ``FileNotFoundError`` naming the
        directory (on every rank). ``device`` and ``assign`` are `safeckpt.load`'s (e.g. restore
        a model built on the meta device with ``assign=True, device="cuda"``).

        Example:
            >>> state = {"model": model, "optimizer": opt, "step": 0}
            >>> manager.restore(state)          # the newest; manager.restore(state, step=2000) for another
            {}
            >>> state["step"]
            3000
        """
        self.wait()
        path = self.latest() if step is None else self.path(step)
        if state and _runtime.across_ranks(state):
            box = [None if path is None else str(path)]
            torch.distributed.broadcast_object_list(box, src=0)
            path = None if box[0] is None else Path(box[0])
        if path is None:
            steps = self.steps()
            if step is None or not steps:
                raise FileNotFoundError(
                    f"{self.directory}: no checkpoint to restore (no complete step-<N>.safeckpt file or step-<N>/ "
                    "directory); save one with manager.save(step, state) first, or check the directory"
                )
            shown = ", ".join(map(str, steps[-20:]))
            raise FileNotFoundError(
                f"{self.directory}: no checkpoint of step {step}; the steps there are {shown}"
                + (f" (the newest 20 of {len(steps)})" if len(steps) > 20 else "")
            )
        return api.load(path, state, strict=strict, device=device, assign=assign, storage_options=self.storage_options)


# -- helpers -----------------------------------------------------------------------------------------


def _positive(n: Any, what: str) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"{what} must be an int >= 1, got {n!r}")
    return int(n)


def _step(step: Any) -> int:
    if isinstance(step, bool):
        raise TypeError(f"step must be an int >= 0, got {step!r}")
    try:
        n = operator.index(step)
    except TypeError:
        raise TypeError(f"step must be an int >= 0, got {type(step).__name__} {step!r}") from None
    if n < 0:
        raise ValueError(f"step must be an int >= 0, got {n}")
    return n


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _name(step: int, directory: bool) -> str:
    return (STEP_DIR if directory else STEP_FILE).format(step=step)


def _number(x: Any, what: str) -> float:
    if isinstance(x, torch.Tensor) and x.numel() == 1 and not (x.is_complex() or x.dtype == torch.bool):
        return float(x.detach().cpu().reshape(()).item())
    if isinstance(x, numbers.Real) and not isinstance(x, bool):
        return float(x)
    raise TypeError(f"best=: {what} must be a real number or a one-element tensor to rank by, got {x!r}")


def _mtime(path: Path) -> int:
    index = path / INDEX
    return (index if path.is_dir() else path).stat().st_mtime_ns


def _saveable(state: Mapping[str, Any], filter: Mapping[str, Callable[[str, Any], bool]] | None) -> dict[Any, Any]:
    """What `safeckpt.save` would write, checked now: an unstorable value raises here, in the caller."""
    from . import codec
    from . import state as st
    from .formats.safeckpt import tensor_leaf_encoder

    tree = st.to_saveable(state, filter)
    codec.encode(tree, tensor_leaf_encoder(lambda name, x: None))
    return tree


def _snapshot(tree: Any) -> Any:
    """A copy of ``tree`` that training cannot change: every tensor copied to CPU memory (tensors
    that are the same tensor, like tied weights, share one copy), every other value deep-copied.
    Lazy `TensorRef`s stay lazy: they read from a file, which training does not touch."""
    copies: dict[Any, torch.Tensor] = {}

    def leaf(_: tuple[Any, ...], x: Any) -> Any:
        if isinstance(x, TensorRef):
            return x
        if not isinstance(x, torch.Tensor):
            return copy.deepcopy(x)
        key = alias_key(x)
        if key not in copies:
            data = x.detach().to("cpu", copy=True)
            if isinstance(x, torch.nn.Parameter):
                data = torch.nn.Parameter(data, requires_grad=x.requires_grad)
            elif x.requires_grad:
                data.requires_grad_()
            copies[key] = data
        return copies[key]

    return map_leaves(tree, leaf)
