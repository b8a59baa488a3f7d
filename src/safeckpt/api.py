"""save / load / load_raw / open / convert: orchestration only.

Data flows one way: ``path -> formats.detect -> format.read -> Checkpoint -> state.apply -> objects``
and ``objects -> state.to_saveable -> Checkpoint -> format.write -> path``.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _remote, _runtime, _sources, codec, formats
from .tree import Checkpoint, TensorRef, is_tensor, iter_leaves, map_leaves, path_name

if TYPE_CHECKING:  # open, convert and a checkpoint's headers need no torch: what loads into objects imports it
    import torch
    from torch import nn

PathLike = str | os.PathLike[str]
StorageOptions = Mapping[str, Any] | None
TensorFilter = Callable[[str, TensorRef], bool]

__all__ = ["convert", "load", "load_raw", "open", "save"]


def open(path: PathLike, *, allow: Iterable[str] = (), storage_options: StorageOptions = None) -> Checkpoint:
    """Open any checkpoint the registry reads, reading headers only.

    Args:
        path: a file or directory (``.safeckpt``, ``.safetensors``, ``.pt``/``.pth``/``.bin``/``.ckpt``,
            a sharded or DCP directory) or an ``hf://repo/file`` URI.
        allow: extra pickle globals (``"module.Name"``) to admit as inert data when reading a
            pickle-based file; see ``formats/torch.md``.
        storage_options: passed to fsspec for a URL path (``s3://bucket/run.safeckpt``): its
            header is read with one or two ranged reads, each tensor's ``load()`` reads its bytes.

    Example:
        >>> ckpt = safeckpt.open("friend.pt")
        >>> ckpt.format, list(ckpt.tensors())[:2]
        ('torch', ['l1.weight', 'l1.bias'])
        >>> ckpt.tensors()["l1.weight"].load()   # reads just this tensor
    """
    return _runtime.open_local(_runtime.local(path, storage_options), allow)


def save(
    path: PathLike,
    state: Mapping[str, Any] | nn.Module,
    *,
    filter: Mapping[str, Callable[[str, Any], bool]] | None = None,
    format: str | None = None,
    max_shard_size: int | str | None = None,
    storage_options: StorageOptions = None,
) -> Path | str:
    """Save training state without pickle, atomically (Fabric's ``fabric.save``).

    Top-level modules (unwrapped from DDP, ``torch.compile`` and Fabric), optimizers and any
    object with ``state_dict``/``load_state_dict`` are saved as their state dicts; every other
    value is stored as itself. A value that cannot be stored without pickle raises ``TypeError``
    naming its path before a byte is written; a failed save leaves the previous file intact.

    Args:
        path: the file to write (parent directories are created).
        state: a dict of objects (``{"model": model, "optimizer": opt, "step": 7}``), or a module,
            which saves its bare state dict.
        filter: ``{key: fn(name, value) -> bool}`` keeps only the items of ``state[key]``'s state dict
            that ``fn`` accepts; a key whose filter keeps nothing is left out.
        format: ``"safeckpt"`` (the default), ``"safetensors"`` (tensors only), ``"torch"`` (export).
            Without it, a ``.safetensors`` path holding only tensors is written as plain safetensors,
            ``.safeckpt``, ``.ckpt`` or no extension natively; ``.pt``/``.pth``/``.bin`` or an
            extension of no format is refused (`check_name`): say ``format="torch"`` or ``"safeckpt"``.
        max_shard_size: write a sharded directory with shards of at most this size ("2GB" or bytes).
        storage_options: passed to fsspec when ``path`` is a URL (``s3://bucket/run/step-100.safeckpt``):
            the checkpoint is written to a local temporary, then uploaded all or nothing, and the
            URL is returned as a ``str``.

    Example:
        >>> safeckpt.save("run/step-100.safeckpt", {"model": model, "optimizer": opt, "step": 100})
        PosixPath('run/step-100.safeckpt')
    """
    from torch import nn

    from . import state as st

    if _runtime.across_ranks(state, format):
        from . import distributed

        return distributed.save(
            path, state, filter=filter, max_shard_size=max_shard_size, storage_options=storage_options
        )
    if isinstance(state, nn.Module):
        tree: Any = st.module_state_dict(st.unwrap(state))
    else:
        tree = st.to_saveable(state, filter)
    ckpt = Checkpoint(tree, format="memory", path="<memory>")
    write, opts = _writer(Path(os.fspath(path)), format, max_shard_size, tree)
    if _remote.is_url(path):
        with _remote.staged(os.fspath(path), storage_options) as staged:
            write(ckpt, staged, **opts)
        return os.fspath(path)
    return write(ckpt, Path(_remote.local_path(path)), **opts)


# Names the native format takes without format=: its own, Lightning's (.ckpt: Fabric writes any
# name, and the plugin's is .ckpt) and none at all. A torch extension would promise torch.load a
# file it cannot read, and an extension of no format says nothing: both need format=.
_NATIVE_SUFFIXES = ("", ".safeckpt", ".ckpt")
_TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def check_name(path: PathLike, format: str | None = None, max_shard_size: int | str | None = None) -> None:
    """Refuse a file name whose extension would misname the format written without ``format=``.

    ``.safeckpt``, ``.ckpt``, ``.safetensors`` and a name without extension are written natively (or
    as plain safetensors); ``.pt``/``.pth``/``.bin`` and any extension of no format need ``format=``
    (``"torch"`` to export a ``torch.save`` file, ``"safeckpt"`` for the native format under that
    name). A sharded save (``max_shard_size``) writes a directory: any name goes.

    Example:
        >>> check_name("model.pt")
        Traceback (most recent call last):
        ValueError: model.pt: the .pt extension is torch.save's, but without format= ...
    """
    suffix = Path(os.fspath(path)).suffix.lower()
    if format is not None or max_shard_size is not None or suffix in (*_NATIVE_SUFFIXES, ".safetensors"):
        return
    if _registered_for(suffix) is not None:
        return
    what = (
        f"the {suffix} extension is torch.save's, but without format= safeckpt writes its own format, which "
        "torch.load cannot read"
        if suffix in _TORCH_SUFFIXES
        else f"the {suffix} extension belongs to no checkpoint format, so the name would not say what the file is"
    )
    raise ValueError(
        f"{os.fspath(path)}: {what}; pass format=\"torch\" to export a torch.save file (pickle) that torch.load "
        f"reads, or format=\"safeckpt\" to write the native format under this name, or name the file "
        ".safeckpt (or .ckpt, .safetensors)"
    )


def _registered_for(suffix: str) -> str | None:
    """A format added with `register_format` that writes files of this extension (a plugin's own
    extension picks it, as ``.safetensors`` picks safetensors)."""
    for name in formats.names():
        fmt = formats.get(name) if name not in formats.BUILTIN else None
        if fmt is not None and fmt.write is not None and suffix and suffix in fmt.extensions:
            return name
    return None


def _writer(
    path: Path, format: str | None, max_shard_size: int | str | None, tree: Any
) -> tuple[Callable[..., Path], dict[str, Any]]:
    """The write function for ``path`` and the options to pass it (an option the format does not
    take is a ``TypeError``, never dropped); a name that would misname the format is refused."""
    check_name(path, format, max_shard_size)
    opts: dict[str, Any] = {}
    if max_shard_size is not None:
        opts["max_shard_size"] = max_shard_size
        format = format or "safeckpt-sharded"
    if format is None:
        suffix = path.suffix.lower()
        format = _registered_for(suffix) or (
            "safetensors" if suffix == ".safetensors" and _only_tensors(tree) else "safeckpt"
        )
    return formats.get(format).writer(opts), opts


def _only_tensors(tree: Any) -> bool:
    leaves = list(iter_leaves(tree))
    return isinstance(tree, dict) and bool(leaves) and all(isinstance(v, TensorRef) or is_tensor(v) for _, v in leaves)


def load(
    path: PathLike,
    state: Mapping[str, Any] | None = None,
    *,
    strict: bool = True,
    verify: bool = False,
    allow: Iterable[str] = (),
    device: str | torch.device | None = None,
    assign: bool = False,
    map_location: str | torch.device | None = None,
    storage_options: StorageOptions = None,
) -> dict[Any, Any]:
    """Load a checkpoint, into ``state``'s objects in place if given (Fabric's ``fabric.load``).

    Without ``state`` the whole checkpoint comes back as plain Python, its tensors on ``device``
    (default: the CPU, memory-mapped copy-on-write where the format allows). With it,
    modules get ``load_state_dict(sd, strict)``, optimizers and other stateful objects
    ``load_state_dict(sd)``, and plain values are replaced in ``state``. Everything is checked
    first (every requested key present unless ``strict=False``; every module's keys and shapes),
    so a failed load leaves every object untouched. ``allow`` admits extra pickle globals as
    inert data when reading a pickle-based file (see `open`). ``verify=True`` first runs the
    format's own checks (for safeckpt's formats, the header's and every tensor's CRC-32) and raises
    `CorruptCheckpointError` naming each damaged tensor and its place in the tree, before any object changes.

    Modules load in place (on whatever device their tensors are), or with ``assign=True`` are
    materialized from the file as by `load_raw` (``assign=True``): the way to load into a model
    built on the meta device. A key the file omits whose parameter the module ties to a key it
    has is filled from that key, not missing. Optimizers' state goes where
    ``optimizer.load_state_dict`` puts it (next to their parameters). ``device`` also places plain
    values and the remainder; ``map_location`` is an alias for it (a device or string only).

    A value of a registered type this process has not registered (see `safeckpt.register_type`)
    does not lock the file: it is read as an inert `Unregistered` record (name and data, nothing
    imported), so every other key loads; loading it into ``state`` raises naming its path and the fix,
    and in the remainder (or without ``state``) it stays a record whose use raises the same way.

    Returns:
        The remainder: the checkpoint's entries that ``state`` did not ask for (``{}`` if none).
        For an ``hf://`` path its tensors are lazy `TensorRef`s (``.load()`` downloads their shard).

    Example:
        >>> state = {"model": model, "optimizer": opt, "step": 0}
        >>> remainder = safeckpt.load("run/step-100.safeckpt", state)
        >>> state["step"]
        100
    """
    from torch import nn

    from . import _device
    from . import state as st

    _named_mistakes("load", path, state)
    dev = _device.merge_map_location(device, map_location)
    if assign and not state:
        raise ValueError("assign=True materializes the modules in state; pass them, e.g. load(path, {'model': model})")
    if state and _runtime.across_ranks(state):
        from . import distributed

        if assign or dev is not None:
            raise ValueError("device= and assign= are not supported for DTensor state loaded across ranks")
        return distributed.load(path, state, strict=strict, verify=verify, storage_options=storage_options)
    local = _runtime.local(path, storage_options)
    fetched = _sources.prefetch(local)  # noqa: F841 - from a URL: the whole checkpoint, in large ranged reads
    if verify:  # before parsing: a damaged header is reported as failing its checksum, not as what it now says
        _runtime.verify(local)
    ckpt = open(local, allow=allow)
    if not state:
        return ckpt.to_python(device=dev)
    tree = ckpt.tree
    targets = st.select(tree, state, strict, path)
    entries = {}
    for key, obj in targets.items():
        sd = tree[key]
        if isinstance(obj, nn.Module) and isinstance(sd, Mapping):
            own = set(obj.state_dict(keep_vars=True))
            sd = st.with_tied(obj, st.strip_wrapper_prefix(sd, own), own)
        st.check(obj, sd, strict, f"{path} (key {key!r})", assign)
        codec.refuse_unbuilt(sd, str(path), (key,))  # a value asked for must be built: name it and the fix
        entries[key] = sd
    for key, obj in targets.items():
        if isinstance(obj, nn.Module):
            st.load_module(obj, entries[key], strict, assign, dev)
            _warn_left_on_meta(obj, path, assign, dev)
        elif st.is_stateful(obj):
            st.apply(obj, _optimizer_state(ckpt, entries[key], obj), strict)
        else:
            state[key] = ckpt.to_python(entries[key], device=dev)  # type: ignore[index]
    rest = {k: v for k, v in tree.items() if k not in targets}
    # from the Hub the remainder's tensors stay lazy, so a partial load downloads only the shards it needs
    return rest if os.fspath(path).startswith("hf://") else ckpt.to_python(rest, device=dev)


def _optimizer_state(ckpt: Checkpoint, sd: Any, obj: Any) -> Any:
    """An optimizer's state, its tensors read straight onto the CUDA device that all its parameters
    are on (staged, where ``load_state_dict`` would copy each one from pageable memory), except each
    ``step``, which torch keeps on the CPU unless the optimizer is fused or capturable."""
    import torch

    from . import _device

    devices = (
        {p.device for g in obj.param_groups for p in g["params"]} if isinstance(obj, torch.optim.Optimizer) else set()
    )
    device = next(iter(devices)) if len(devices) == 1 else None
    if device is None or device.type != "cuda":
        return ckpt.to_python(sd)
    moving = {
        leaf.alias_key: leaf
        for p, leaf in iter_leaves(sd)
        if isinstance(leaf, TensorRef) and not (p and p[-1] == "step")
    }
    loaded = dict(zip(moving, _device.load_many(list(moving.values()), device), strict=True))

    def leaf(p: tuple[Any, ...], x: Any) -> Any:
        if not isinstance(x, TensorRef):
            return x
        if p and p[-1] == "step":
            return x.load()
        return _device.wrap(x, loaded[x.alias_key])

    return map_leaves(sd, leaf)


def _named_mistakes(fn: str, path: Any, obj: Any) -> None:
    """Calls written the torch/safetensors way, named with the right one."""
    import torch
    from torch import nn

    loadable = (nn.Module, torch.optim.Optimizer)
    if isinstance(path, loadable):
        if fn == "load_raw":
            raise TypeError(
                f"load_raw(path, obj): the arguments are swapped, got a {type(path).__name__} first; "
                "call safeckpt.load_raw(path, module)"
            )
        raise TypeError(
            f"load(path, state) takes the checkpoint's path first, got a {type(path).__name__}; "
            "call safeckpt.load(path, {'model': model}) or safeckpt.load_raw(path, model)"
        )
    if fn == "load" and isinstance(obj, loadable):
        kind = "module" if isinstance(obj, nn.Module) else "optimizer"
        raise TypeError(
            f"load(path, {kind}): state is a dict of objects. For a file holding a bare state dict use "
            f"safeckpt.load_raw(path, {kind}); for a checkpoint with entries use "
            f"safeckpt.load(path, {{'{'model' if kind == 'module' else 'optimizer'}': {kind}}})"
        )


def _same_device(module: nn.Module, device: torch.device, path: object) -> None:
    """An in-place load copies into the module's tensors where they are: a ``device`` they are not
    on would be silently ignored, so it is an error."""
    import torch

    elsewhere = {str(t.device) for t in module.state_dict(keep_vars=True).values() if isinstance(t, torch.Tensor)}
    want = device.type if device.index is None else str(device)
    if any(d.split(":")[0] != device.type or (device.index is not None and d != want) for d in elsewhere):
        raise ValueError(
            f"load_raw({path}, {type(module).__name__}, device={str(device)!r}) without assign=True loads in place, "
            f"into the module's tensors on {', '.join(sorted(elsewhere))}: move the module first "
            f"(module.to({str(device)!r})), or pass assign=True to replace its tensors with the file's on that device"
        )


def _warn_left_on_meta(module: nn.Module, path: object, assign: bool, device: torch.device | None) -> None:
    """After materializing: name what is still on meta (non-persistent buffers, keys left missing
    under ``strict=False``), which the file could not provide."""
    from . import state as st

    if not assign or (device is not None and device.type == "meta"):
        return
    left = st.still_on_meta(module)
    if left:
        shown = ", ".join(left[:8]) + (f" and {len(left) - 8} more" if len(left) > 8 else "")
        warnings.warn(
            f"after loading {path} with assign=True, {type(module).__name__} still has tensors on the meta device "
            f"that the file does not hold: {shown}; initialize them (e.g. non-persistent buffers) before use",
            stacklevel=3,
        )


def load_raw(
    path: PathLike,
    obj: nn.Module | torch.optim.Optimizer,
    *,
    strict: bool = True,
    assign: bool = False,
    device: str | torch.device | None = None,
    allow: Iterable[str] = (),
    map_location: str | torch.device | None = None,
    storage_options: StorageOptions = None,
) -> Any:
    """Load a bare state dict (a friend's ``torch.save(model.state_dict())``, a safetensors file,
    a sharded directory) into a module or optimizer (Fabric's ``fabric.load_raw``).

    A Lightning Trainer checkpoint contributes its ``state_dict`` entry. A wrapped checkpoint
    (``{"model": ..., "optimizer": ...}``) whose keys match nothing in the module is an error that
    names the keys found, never a silent no-op. ``allow`` admits extra pickle globals as inert
    data (an old Trainer checkpoint's callback objects; see `open`).

    A key the file omits whose parameter the module ties to a key the file has
    (``head.weight = emb.weight``; Hugging Face files store such a tensor once) is loaded from
    that key and is not missing. Without ``assign`` tensors are copied into the module's own,
    wherever they are (a CUDA model's through pinned staging buffers); a module with tensors on
    the meta device is an error that says to pass ``assign=True``.

    Args:
        assign: materialize the module from the file, as ``load_state_dict(assign=True)``: its
            parameters and buffers are replaced by the file's tensors (their dtype too). Tied
            parameters stay one ``Parameter``. On the CPU they stay memory-mapped from the file,
            copy-on-write: loading costs almost no memory, and a page is copied when first written
            (an optimizer step writes every parameter, so training pays the full size then).
        device: where assigned tensors go (``"cuda:0"``, ``"cpu"``, ``"meta"``). None: where the
            tensor they replace is, and the CPU for one on meta. ``map_location`` is an alias.

    Returns:
        For a module, what ``load_state_dict`` returns: ``_IncompatibleKeys(missing_keys,
        unexpected_keys)``, both empty under ``strict=True``. For an optimizer, None (as
        ``optimizer.load_state_dict``).

    Example:
        >>> model = MyModel()
        >>> safeckpt.load_raw("friend.pt", model)          # restricted unpickler, nothing runs
        <All keys matched successfully>
        >>> safeckpt.load_raw("model.safetensors", model, strict=False).missing_keys
        ['head.bias']
        >>> with torch.device("meta"):
        ...     big = MyModel()
        >>> safeckpt.load_raw("model.safetensors", big, assign=True, device="cuda")
    """
    import torch
    from torch import nn

    from . import _device
    from . import state as st

    _named_mistakes("load_raw", path, obj)
    dev = _device.merge_map_location(device, map_location)
    if _runtime.across_ranks(obj):
        from . import distributed

        if assign or dev is not None:
            raise ValueError("device= and assign= are not supported for DTensor state loaded across ranks")
        return distributed.load_raw(path, obj, strict=strict, storage_options=storage_options)  # type: ignore[arg-type]
    target = st.unwrap(obj)
    local = _runtime.local(path, storage_options)
    fetched = _sources.prefetch(local)  # noqa: F841 - from a URL: the whole checkpoint, in large ranged reads
    ckpt = open(local, allow=allow)
    tree = ckpt.tree
    if isinstance(target, nn.Module):
        sd = tree["state_dict"] if _is_trainer_checkpoint(tree) else tree
        own = set(target.state_dict(keep_vars=True))
        if isinstance(sd, Mapping):
            sd = st.strip_wrapper_prefix(sd, own)
            if own and not own & set(sd) and _is_wrapped(sd):
                keys = ", ".join(repr(k) for k in list(sd)[:10])
                raise RuntimeError(
                    f"{path} is a wrapped checkpoint with top-level keys {keys}, not a bare state dict: none of "
                    f"its keys match {type(target).__name__}'s parameters. Load one entry with "
                    f"safeckpt.load(path, {{'model': model}}) (use the key that holds the weights), or extract it "
                    f"with `safeckpt convert {path} weights.safetensors --key model`."
                )
            sd = st.with_tied(target, sd, own)
        if dev is not None and not assign:
            _same_device(target, dev, path)
        st.check_module(target, sd, strict, str(path), assign)
        result = st.load_module(target, sd, strict, assign, dev)
        _warn_left_on_meta(target, path, assign, dev)
        return result
    elif isinstance(target, torch.optim.Optimizer):
        if assign:
            raise ValueError("assign=True applies to modules; an optimizer's state is always loaded into it")
        if isinstance(tree, Mapping) and "param_groups" not in tree and _is_wrapped(tree):
            keys = ", ".join(repr(k) for k in list(tree)[:10])
            raise ValueError(
                f"{path} is a wrapped checkpoint with top-level keys {keys}, not a bare optimizer state dict. "
                "Load it with safeckpt.load(path, {'optimizer': optimizer}) using the key that holds it."
            )
        st.check_optimizer(target, tree, str(path))
        codec.refuse_unbuilt(tree, str(path))
        st.apply(
            target, ckpt.to_python(device=dev) if dev is not None else _optimizer_state(ckpt, tree, target), strict
        )
        return None
    else:
        raise TypeError(
            f"load_raw takes a torch.nn.Module or torch.optim.Optimizer, got {type(obj).__name__}; "
            "for other objects use safeckpt.load(path, {'key': obj})"
        )


def _is_trainer_checkpoint(tree: Any) -> bool:
    return (
        isinstance(tree, Mapping)
        and isinstance(tree.get("state_dict"), Mapping)
        and ("pytorch-lightning_version" in tree or ("global_step" in tree and "epoch" in tree))
    )


def _is_wrapped(sd: Mapping[Any, Any]) -> bool:
    return any(isinstance(v, Mapping) for v in sd.values())


def convert(
    src: PathLike,
    dst: PathLike,
    *,
    format: str | None = None,
    filter: TensorFilter | None = None,
    max_shard_size: int | str | None = None,
    key: Any = None,
    allow: Iterable[str] = (),
    verify: bool = True,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
    storage_options: StorageOptions = None,
) -> Path | str:
    """Convert any readable checkpoint into a safe format, streaming tensor by tensor.

    The defaults are the ``safeckpt convert`` command's: the result is read back and compared with
    the source, and an existing ``dst`` is refused unless ``overwrite=True`` (``--force``).

    Args:
        src: any file, directory or ``hf://`` URI the registry reads.
        dst: where to write; the format comes from ``format``, else from ``dst``'s extension
            (``.safetensors`` holding only tensors -> plain safetensors, anything else -> safeckpt).
        filter: ``fn(name, tensor_ref) -> bool`` keeps the tensors it accepts (``name`` is the
            tensor's path, e.g. ``model/l1.weight``); non-tensor values are kept.
        max_shard_size: write a sharded directory.
        key: convert only this top-level entry (e.g. ``"model"`` or a Trainer's ``"state_dict"``).
        allow: extra pickle globals to admit when reading a pickle-based ``src`` (see `open`).
        verify: check the source's own checksums first (where its format records them) and read
            the written checkpoint back and compare it with the source: every tensor by bytes, every
            value by type and value; damage or a mismatch raises `CorruptCheckpointError`
            (default on; ``False`` skips both reads).
        overwrite: replace an existing ``dst`` (atomically); without it an existing ``dst`` raises
            `FileExistsError` before anything is read. A directory is replaced only when it holds a
            checkpoint of the format written (other files there, such as an HF folder's
            ``config.json``, stay); any other non-empty directory is refused.
        progress: called with a byte count as each source tensor is read (for a progress bar);
            during verification, again as each tensor pair is compared.
        storage_options: passed to fsspec for ``src`` and ``dst`` URLs (``s3://...``). A URL ``dst``
            is written and verified locally, then uploaded all or nothing; its URL is returned.

    Example:
        >>> safeckpt.convert("friend.pt", "friend.safetensors", verify=True)
        PosixPath('friend.safetensors')
    """
    check_name(dst, format, max_shard_size)
    if _remote.is_url(dst):
        return _remote.convert_to(convert, src, os.fspath(dst), overwrite, storage_options, locals())
    if not overwrite and (Path(os.fspath(dst)).exists() or Path(os.fspath(dst)).is_symlink()):
        raise FileExistsError(
            f"{os.fspath(dst)} already exists; pass overwrite=True to replace it, or choose another destination"
        )
    ckpt = open(src, allow=allow, storage_options=storage_options)
    if verify and ckpt.format in _CHECKSUMMED and not os.fspath(src).startswith("hf://"):
        _verify_source(ckpt)
    tree = ckpt.tree
    if key is not None:
        if not isinstance(tree, Mapping) or key not in tree:
            found = list(tree)[:10] if isinstance(tree, Mapping) else type(tree).__name__
            raise KeyError(f"{src} has no top-level key {key!r}; its keys are {found}")
        tree = tree[key]
    if filter is not None:
        tree = _filter_tensors(tree, filter)
    out = Checkpoint(tree, format=ckpt.format, path=ckpt.path, metadata=ckpt.metadata)
    _replaceable(Path(os.fspath(dst)), format or ("safeckpt-sharded" if max_shard_size is not None else None))
    write, opts = _writer(Path(os.fspath(dst)), format, max_shard_size, tree)
    counted, copied = _counting(out, progress) if progress else (out, 0)
    written = write(counted, Path(os.fspath(dst)), **opts)
    if progress and copied:
        progress(copied)  # the tensors copied file to file, counted once the write is done
    if verify:
        from .compare import compare
        from .errors import CorruptCheckpointError

        diff = compare(out, open(written), progress=progress)
        if not diff.equal:
            raise CorruptCheckpointError(
                f"{written}: the written checkpoint does not match {src}: {diff.summary()}; do not use it, and "
                "report this with both files"
            )
    return written


# Formats whose own checks are checksums over the bytes convert copies: checked before a damaged
# source is rewritten under fresh checksums (the read-back compares with the source, so cannot see it).
_CHECKSUMMED = ("safeckpt", "safeckpt-sharded", "safetensors", "hf-sharded")


def _verify_source(ckpt: Checkpoint) -> None:
    from .errors import CorruptCheckpointError

    try:
        _runtime.verify(ckpt)
    except CorruptCheckpointError as e:
        raise CorruptCheckpointError(
            f"{e}; the source fails its own checksums, so nothing was written: converting it would carry the damage "
            "into a file with new, matching checksums",
            path=e.path,
            hint=e.hint,
        ) from None


def _replaceable(dst: Path, fmt_name: str | None) -> None:
    """Refuse to write a directory format (``fmt_name``; None: a file) into a non-empty directory
    that is not a checkpoint of that format: its writer replaces its own set of files and would
    leave everything else beside the new one. (A file format meeting a directory fails in its writer.)"""
    if fmt_name in (None, "safeckpt", "safetensors", "torch"):
        return
    if not dst.is_dir() or dst.is_symlink() or not any(dst.iterdir()):
        return
    try:
        existing: str | None = formats.detect(dst).NAME
    except Exception:
        existing = None
    if existing != fmt_name:
        held = f"a {existing} checkpoint" if existing else "files that are not a checkpoint"
        raise FileExistsError(
            f"{dst} is a directory holding {held}; writing a {fmt_name} checkpoint there would leave them beside "
            f"it: choose a new or empty directory (or remove it first)"
        )


def _counting(ckpt: Checkpoint, progress: Callable[[int], None]) -> tuple[Checkpoint, int]:
    """``ckpt`` with every tensor the writer reads reporting its byte count to ``progress`` when
    it is read, and the bytes of those it copies file to file (its ``span``: no read to count,
    no torch), which the caller reports when the write is done."""
    wrapped: dict[int, TensorRef] = {}
    copied: dict[Any, int] = {}

    def wrap(_: tuple[Any, ...], x: Any) -> Any:
        if not isinstance(x, TensorRef):
            return x
        if x.span is not None:
            copied[x.alias_key] = x.nbytes
            return x
        if id(x) not in wrapped:  # one wrapper per reference keeps tied tensors tied

            def load(ref: TensorRef = x) -> torch.Tensor:
                t = ref.loader()
                progress(ref.nbytes)
                return t

            wrapped[id(x)] = dataclasses.replace(x, loader=load)
        return wrapped[id(x)]

    tree = map_leaves(ckpt.tree, wrap)
    counted = Checkpoint(tree, format=ckpt.format, path=ckpt.path, metadata=ckpt.metadata, info=ckpt.info)
    return counted, sum(copied.values())


def _filter_tensors(tree: Any, keep: TensorFilter) -> Any:
    drop = object()
    filtered = map_leaves(tree, lambda p, x: drop if isinstance(x, TensorRef) and not keep(path_name(p), x) else x)

    def prune(node: Any) -> Any:
        if isinstance(node, dict):
            out = type(node)() if type(node) is not dict else {}
            for k, v in node.items():
                if v is not drop:
                    out[k] = prune(v)
            return out
        if type(node) in (list, tuple):
            return type(node)(prune(v) for v in node if v is not drop)
        return node

    return prune(filtered)


