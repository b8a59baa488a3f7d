"""torch.distributed: per-rank sharded saves and resharding loads (format ``safeckpt-sharded``).

Built on ``torch.distributed.checkpoint`` (DCP): its planners decide which rank writes which
slice (a DTensor's local shards; a replicated tensor once, by the lowest rank holding it) and,
on load, which slices of which saved chunks each rank needs for its own sharding. Our
`StorageWriter`/`StorageReader` pair replaces DCP's storage: shards are safetensors files, the
index and every non-tensor value are msgpack, written by rank 0 after every rank's shards are on
disk. DCP only ever sees tensors, so nothing goes through its ``torch.save`` path; its plans
travel between ranks through its own collectives (in memory, never on disk).

``safeckpt.save``/``load``/``load_raw`` come here by themselves when a process group is
initialized and the state holds DTensors (or ``format="safeckpt-sharded"`` is asked for).

Example:
    >>> fully_shard(model); opt = torch.optim.AdamW(model.parameters())
    >>> safeckpt.save("run/step-100", {"model": model, "optimizer": opt, "step": 100})   # every rank
    >>> safeckpt.load("run/step-100", {"model": model, "optimizer": opt})                # any world size
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from . import _remote, _runtime, codec
from . import state as st
from ._runtime import holds_dtensors
from ._units import parse_size
from .errors import CorruptCheckpointError
from .formats import safeckpt_sharded as fmt
from .formats.safeckpt import tensor_leaf_encoder
from .tree import Checkpoint, TensorRef

__all__ = ["agree", "holds_dtensors", "load", "load_raw", "save"]


def _owner(optimizer: torch.optim.Optimizer, modules: Iterable[nn.Module]) -> nn.Module | None:
    """The module whose parameters include all the optimizer updates, if one is given."""
    wanted = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for m in modules:
        if wanted and wanted <= {id(p) for p in m.parameters()}:
            return m
    return None


class _OptimizerState:
    """An optimizer seen through its model: state keyed by parameter names (``get_optimizer_state_dict``)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, sd)


def agree(error: BaseException | None, what: str) -> None:
    """Raise on every rank if any rank failed, so no rank enters a collective the others skip."""
    results: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(results, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, e) for r, e in enumerate(results) if e is not None]
    if failed:
        rank, message = failed[0]
        raise RuntimeError(f"{what} failed on rank {rank} ({message}); nothing was written or changed")


@contextlib.contextmanager
def _failures_named(what: str) -> Iterator[None]:
    """DCP's `CheckpointException` (a `BaseException`, which ``except Exception`` would miss) as
    `agree` reports failures: this rank's own error re-raised, else a `RuntimeError` naming the rank."""
    try:
        yield
    except CheckpointException as e:
        mine = e.failures.get(torch.distributed.get_rank())
        if mine is not None:
            raise mine[0] from None
        rank, (error, _) = min(e.failures.items())
        raise RuntimeError(
            f"{what} failed on rank {rank} ({type(error).__name__}: {error}); nothing was committed, "
            "the previous checkpoint is untouched"
        ) from None


# -- saving ------------------------------------------------------------------------------------------


def save(
    path: str | os.PathLike[str],
    state: Mapping[str, Any] | nn.Module,
    *,
    filter: Mapping[str, Callable[[str, Any], bool]] | None = None,
    max_shard_size: int | str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Path | str:
    """Save ``state`` from every rank of the default process group as a sharded directory.

    Call it on every rank with the same ``path``. Each rank writes the slices it owns (a DTensor's
    local shards; a plain tensor counts as replicated and is written once, by the lowest rank) as
    safetensors files of at most ``max_shard_size`` bytes; rank 0 then writes the msgpack index,
    holding every non-tensor value (rank 0's), which commits the checkpoint. An optimizer whose
    parameters belong to a module saved alongside is stored keyed by parameter names.

    To an fsspec URL (``s3://bucket/run/step-100``, with ``storage_options``) each rank writes its
    shards to a local temporary and uploads them; once every rank's are up, rank 0 commits the
    index (conditionally on S3) and removes older generations (formats/safeckpt-sharded.md §5.1).
    A failure on any rank fails the save on every rank, removes its uploads and leaves the
    previous checkpoint at the URL; the URL is returned.

    Example:
        >>> safeckpt.distributed.save("run/step-100", {"model": model, "optimizer": opt, "step": 100})
        PosixPath('/abs/run/step-100')
    """
    flat: dict[str, torch.Tensor] = {}
    declared: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}

    def add(name: str, x: torch.Tensor | TensorRef) -> None:
        flat[name] = x.load() if isinstance(x, TensorRef) else x.detach()
        declared[name] = (x.dtype, tuple(x.shape))

    payload = tensor_leaf_encoder(add, tied=False)

    error, root, skeleton, limit = None, Path(os.fspath(path)), b"", None
    remote: _remote.RankUpload | None = None
    try:
        limit = None if max_shard_size is None else parse_size(max_shard_size)
        if isinstance(state, nn.Module):
            tree: Any = st.module_state_dict(st.unwrap(state))
        else:
            modules = [m for m in map(st.unwrap, state.values()) if isinstance(m, nn.Module)]
            views = {}
            for k, v in state.items():
                obj = st.unwrap(v)
                owner = _owner(obj, modules) if isinstance(obj, torch.optim.Optimizer) else None
                views[k] = v if owner is None else _OptimizerState(owner, obj)
            tree = st.to_saveable(views, filter)
        skeleton = codec.encode(tree, payload)
        if _remote.is_url(path):
            remote = _remote.RankUpload(os.fspath(path), storage_options, torch.distributed.get_rank() == 0, fmt.INDEX)
            root = remote.local
        else:
            root = fmt.target_dir(root)
    except Exception as e:
        error = e
    try:
        agree(error, "safeckpt.save")
        writer = _Writer(root, skeleton, declared, limit, remote)
        with _failures_named("safeckpt.save"):
            dcp_save(flat, storage_writer=writer, planner=DefaultSavePlanner(dedup_save_to_lowest_rank=True))
    except BaseException:
        if remote is not None:
            remote.abandon()
        raise
    finally:
        if remote is not None:
            remote.close()
    return root if remote is None else os.fspath(path)


def _done(value: Any) -> Future:
    fut: Future = Future()
    fut.set_result(value)
    return fut


class _Writer(StorageWriter):
    """Each rank's slices into safetensors shards; rank 0's `finish` commits the msgpack index."""

    def __init__(
        self,
        root: Path,
        skeleton: bytes,
        declared: dict[str, Any],
        limit: int | None,
        remote: _remote.RankUpload | None = None,
    ) -> None:
        super().__init__()
        self.root, self.skeleton, self.declared, self.limit = root, skeleton, declared, limit
        self.remote = remote  # a save to a URL: ``root`` is this rank's staging directory
        self.generation = ""

    def reset(self, checkpoint_id: Any = None) -> None:
        pass

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        pass

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        # The coordinator names this save, in progress until `finish`; every rank learns the name with its plan.
        self.live = fmt.Live(self.root)
        self.generation = self.live.generation
        return [dataclasses.replace(p, storage_data=(self.generation, rank)) for rank, p in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future:
        generation, rank = plan.storage_data
        pieces = []
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO or item.tensor_data is None:
                raise TypeError(
                    f"{self.root}: {item.index.fqn!r} is not a tensor; safeckpt keeps non-tensor values out of DCP"
                )
            td = item.tensor_data
            get = cast(Callable[[], torch.Tensor], functools.partial(planner.resolve_data, item))  # tensors only
            pieces.append(
                fmt.Piece(
                    item.index.fqn,
                    td.properties.dtype,
                    tuple(td.size),
                    tuple(td.chunk.offsets),
                    tuple(td.chunk.sizes),
                    get,
                )
            )
        out = []
        for piece, frec, crec in fmt.write_shards(self.root, generation, rank, pieces, self.limit):
            index = MetadataIndex(piece.name, piece.offsets)
            out.append(WriteResult(index=index, size_in_bytes=piece.nbytes, storage_data=(frec, crec)))
        if self.remote is not None:  # this rank's shards to the store, before DCP gathers the results
            self.remote.upload(sorted({r.storage_data[0]["name"] for r in out}))
        return _done(out)

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        written = [(r.index.fqn, *r.storage_data) for rank_results in results for r in rank_results]
        try:
            if self.remote is None:
                fmt.commit(self.root, self.generation, written, self.declared, self.skeleton, {}, len(results))
            else:  # every rank's shards are on the store (DCP gathered their results): commit the index
                packed, files = fmt.index_bytes(
                    self.generation, written, self.declared, self.skeleton, {}, len(results)
                )
                self.remote.commit_index(packed, sorted(files))
        finally:
            self.live.release()

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False


# -- loading -----------------------------------------------------------------------------------------


class _Whole:
    """A tensor of a non-sharded checkpoint as the one chunk covering it (loaded once, then sliced)."""

    def __init__(self, ref: TensorRef) -> None:
        self.ref, self.offsets, self.sizes = ref, (0,) * len(ref.shape), tuple(ref.shape)
        self._tensor: torch.Tensor | None = None

    def read(self, offsets: tuple[int, ...], lengths: tuple[int, ...]) -> torch.Tensor:
        if self._tensor is None:
            self._tensor = self.ref.load().detach()
        t = self._tensor
        for dim, (o, n) in enumerate(zip(offsets, lengths, strict=True)):
            t = t.narrow(dim, o, n)
        return t


class _Reader(StorageReader):
    """Slices of a `Checkpoint`'s tensors: chunks of a sharded one, whole tensors of any other."""

    def __init__(self, sources: dict[str, TensorRef]) -> None:
        super().__init__()
        self.sources = sources
        self.storage: dict[Any, Any] = {}

    def reset(self, checkpoint_id: Any = None) -> None:
        pass

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        md: dict[str, Any] = {}
        storage: dict[MetadataIndex, Any] = {}
        for key, ref in self.sources.items():
            chunks = getattr(ref, "chunks", ()) or (_Whole(ref),)
            boxes = [ChunkStorageMetadata(torch.Size(c.offsets), torch.Size(c.sizes)) for c in chunks]
            md[key] = TensorStorageMetadata(TensorProperties(dtype=ref.dtype), torch.Size(ref.shape), boxes)
            for c in chunks:
                storage[MetadataIndex(key, c.offsets)] = c
        return Metadata(state_dict_metadata=md, storage_data=storage)

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.storage = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future:
        for item in plan.items:
            src = self.storage[item.storage_index].read(tuple(item.storage_offsets), tuple(item.lengths))
            dst = planner.resolve_tensor(item).detach()
            if dst.shape != src.shape:
                raise CorruptCheckpointError(
                    f"{item.dest_index.fqn}: a slice of {list(src.shape)} read for a box of {list(dst.shape)}"
                )
            dst.copy_(src)
            planner.commit_tensor(item, dst)
        return _done(None)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False


class _Plan:
    """Fresh tensors shaped (and sharded) like the targets, filled in one DCP load, and their sources."""

    def __init__(self) -> None:
        self.dest: dict[str, torch.Tensor] = {}
        self.sources: dict[str, TensorRef] = {}

    def slot(self, ref: TensorRef, like: torch.Tensor) -> Callable[[], torch.Tensor]:
        key = f"t{len(self.dest)}"
        self.dest[key] = torch.empty_like(like.detach())
        self.sources[key] = ref
        return lambda: self.dest[key]

    def run(self) -> None:
        dcp_load(self.dest, storage_reader=_Reader(self.sources), planner=DefaultLoadPlanner(allow_partial_load=False))


def _materialize(ckpt: Checkpoint, v: Any) -> Callable[[], Any]:
    return lambda: v.load() if isinstance(v, TensorRef) else ckpt.to_python(v)


def _module_plan(
    ckpt: Checkpoint, module: nn.Module, sd: Any, strict: bool, where: str, plan: _Plan
) -> Callable[[], None]:
    """Check ``sd`` against ``module`` (keys unless not strict, shapes always) and plan its reads;
    returns the step that puts the values into the module."""
    own = module.state_dict(keep_vars=True)
    if isinstance(sd, Mapping):
        sd = st.strip_wrapper_prefix(sd, set(own))
    st.check_module(module, sd, strict, where)
    values: dict[str, Callable[[], Any]] = {}
    for k, target in own.items():
        if k in sd:
            v = sd[k]
            values[k] = (
                plan.slot(v, target)
                if isinstance(v, TensorRef) and isinstance(target, torch.Tensor)
                else _materialize(ckpt, v)
            )

    def apply() -> None:
        # the keys are the module's own state_dict() keys, as checked above (and as saved)
        module.load_state_dict({k: get() for k, get in values.items()}, strict=strict)

    return apply


def _optimizer_plan(
    ckpt: Checkpoint, optimizer: torch.optim.Optimizer, model: nn.Module | None, saved: Any, where: str, plan: _Plan
) -> Callable[[], None]:
    """Check a saved optimizer state (keyed by parameter names or by position) against ``optimizer``
    and plan its reads into fresh tensors sharded like the optimizer's own state."""
    st.check_optimizer(optimizer, saved, where)
    # Both initialize an empty state first (a zero-gradient step with lr 0), as DCP does, so there
    # is a sharded tensor to load each saved one into.
    template: dict[str, Any] = _initialized(optimizer) if model is None else get_optimizer_state_dict(model, optimizer)
    mine_ids = [p for g in template["param_groups"] for p in g["params"]]
    saved_ids = [p for g in saved["param_groups"] for p in g["params"]]
    rename = dict(zip(saved_ids, mine_ids, strict=True))  # torch's rule: parameters match by position in their groups
    state: dict[Any, dict[str, Callable[[], Any]]] = {}
    for pid, entry in saved["state"].items():
        if pid not in rename or not isinstance(entry, Mapping):
            raise CorruptCheckpointError(
                f"{where}: optimizer state for parameter {pid!r}, which no parameter group lists"
            )
        mine = template["state"].get(rename[pid], {})
        out: dict[str, Callable[[], Any]] = {}
        for name, v in entry.items():
            like = mine.get(name)
            if isinstance(v, TensorRef) and isinstance(like, torch.Tensor):
                if tuple(like.shape) != v.shape:
                    raise RuntimeError(
                        f"Error(s) in loading optimizer state from {where}: {name!r} of parameter {rename[pid]!r} has shape "
                        f"{list(v.shape)} in the checkpoint and {list(like.shape)} here; the optimizer is for a different model"
                    )
                out[name] = plan.slot(v, like)
            else:
                out[name] = _materialize(ckpt, v)
        state[rename[pid]] = out
    groups = saved["param_groups"]

    def apply() -> None:
        loaded_groups = [
            {**g, "params": list(mine["params"])}
            for g, mine in zip(ckpt.to_python(groups), template["param_groups"], strict=True)
        ]
        sd: dict[str, Any] = {
            "state": {pid: {k: get() for k, get in entry.items()} for pid, entry in state.items()},
            "param_groups": loaded_groups,
        }
        if model is None:
            optimizer.load_state_dict(sd)
        else:
            set_optimizer_state_dict(model, optimizer, sd)

    return apply


def _initialized(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    _init_optim_state(optimizer)
    return optimizer.state_dict()


def load(
    path: str | os.PathLike[str],
    state: Mapping[str, Any],
    *,
    strict: bool = True,
    verify: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> dict[Any, Any]:
    """Load into ``state``'s objects on every rank of the default process group, each rank reading
    only the slices its own sharding needs (any world size, any DTensor placements).

    Semantics are `safeckpt.load`'s: a requested key the checkpoint lacks is a ``KeyError`` unless
    ``strict=False``; a module's missing or unexpected keys are a ``RuntimeError`` unless
    ``strict=False``; a shape mismatch always is. Every module is checked before anything is read
    or changed, and if any rank finds a problem every rank raises. The checkpoint may be of any format; a sharded one is read slice by slice from
    its memory maps, a single file by slicing each tensor's map. From a URL (``storage_options``
    go to fsspec) each rank reads the index, the headers, and the byte ranges of the chunks it needs.

    Returns:
        The checkpoint's entries not in ``state``, as plain Python with full tensors.

    Example:
        >>> safeckpt.distributed.load("run/step-100", {"model": model, "optimizer": opt})
        {'step': 100}
    """
    plan, steps, tree, error = _Plan(), [], {}, None
    try:
        ckpt = _runtime.open_local(_runtime.local(path, storage_options))
        if verify:
            _runtime.verify(ckpt)
        tree = ckpt.tree
        targets = st.select(tree, state, strict, path)
        modules = [m for m in targets.values() if isinstance(m, nn.Module)]
        for key, obj in sorted(targets.items(), key=lambda kv: not isinstance(kv[1], nn.Module)):
            where = f"{path} (key {key!r})"
            if isinstance(obj, nn.Module):
                steps.append(_module_plan(ckpt, obj, tree[key], strict, where, plan))
            elif isinstance(obj, torch.optim.Optimizer):
                steps.append(_optimizer_plan(ckpt, obj, _owner(obj, modules), tree[key], where, plan))
            elif st.is_stateful(obj):
                steps.append(functools.partial(_load_stateful, obj, ckpt, tree[key]))
            else:
                steps.append(functools.partial(_assign, state, key, ckpt, tree[key]))
    except Exception as e:
        error = e
    agree(error, "safeckpt.load")
    plan.run()
    for step in steps:
        step()
    return {k: ckpt.to_python(v) for k, v in tree.items() if k not in state}


def _load_stateful(obj: Any, ckpt: Checkpoint, value: Any) -> None:
    obj.load_state_dict(ckpt.to_python(value))


def _assign(state: Any, key: Any, ckpt: Checkpoint, value: Any) -> None:
    state[key] = ckpt.to_python(value)


def load_raw(
    path: str | os.PathLike[str],
    obj: nn.Module,
    *,
    strict: bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> None:
    """Load a bare state dict (any format) into a module sharded across the default process group.

    Example:
        >>> safeckpt.distributed.load_raw("model.safetensors", fsdp_model)
    """
    plan, apply, error = _Plan(), None, None
    try:
        module = st.unwrap(obj)
        if not isinstance(module, nn.Module):
            raise TypeError(f"load_raw into sharded state takes a torch.nn.Module, got {type(obj).__name__}")
        ckpt = _runtime.open_local(_runtime.local(path, storage_options))
        apply = _module_plan(ckpt, module, ckpt.tree, strict, str(path), plan)
    except Exception as e:
        error = e
    agree(error, "safeckpt.load_raw")
    plan.run()
    assert apply is not None
    apply()
