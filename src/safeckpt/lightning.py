"""Lightning's checkpoint IO through safeckpt: ``Fabric(plugins=[SafeCheckpointIO()])`` and
``Trainer(plugins=[SafeCheckpointIO()])`` save without pickle and load without running any.

Saving writes the checkpoint dict Lightning hands over (the Trainer's ``state_dict``,
``optimizer_states``, ``lr_schedulers``, ``loops``, ``callbacks``, ``hyper_parameters``, ...; or
Fabric's converted state) as a native safeckpt file, atomically. Loading reads any format safeckpt
reads, so a ``.ckpt`` written earlier by ``TorchCheckpointIO`` still resumes, through the
restricted unpickler. A value that cannot be stored without pickle (an object in
``hyper_parameters``, a callback whose ``state_dict()`` returns one) fails the save before a byte
is written, naming its place in the checkpoint and the fix.

This module is the only one that imports Lightning (``pip install 'safeckpt[lightning]'``);
``import safeckpt`` never does.

Example:
    >>> from safeckpt.lightning import SafeCheckpointIO
    >>> trainer = L.Trainer(plugins=[SafeCheckpointIO()], callbacks=[ModelCheckpoint(save_top_k=2)])
    >>> trainer.fit(model, ckpt_path="last")
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from . import _storage, codec, user_types
from ._remote import is_url, remove_url
from .api import load, save
from .tree import map_leaves

try:
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
except ImportError:
    try:  # the standalone packages (pytorch_lightning / lightning_fabric) without the unified one
        from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO  # type: ignore[assignment]
    except ImportError as e:
        raise ImportError(
            "safeckpt.lightning needs Lightning (lightning>=2.2): pip install 'safeckpt[lightning]'"
        ) from e

__all__ = ["SafeCheckpointIO"]

# Both packages ship their own copy of CheckpointIO; the Trainer of each accepts only its own.
_CHECKPOINT_IO_MODULES = ("lightning.fabric.plugins.io.checkpoint_io", "lightning_fabric.plugins.io.checkpoint_io")


class SafeCheckpointIO(CheckpointIO):
    """A Lightning ``CheckpointIO`` that saves with `safeckpt.save` and loads with `safeckpt.load`.

    Args:
        max_shard_size: write each checkpoint as a sharded directory with shards of at most this
            size (``"2GB"`` or bytes) instead of one file.
        allow: extra pickle globals (``"module.Class"``) to admit as inert data when loading an old
            pickle-based ``.ckpt`` that holds them (see `safeckpt.open`).
        storage_options: passed to fsspec when Lightning hands over a URL (``default_root_dir`` or
            ``ckpt_path`` on ``s3://``...); ``Trainer.save_checkpoint(..., storage_options=)``
            overrides them per call. Without them the store's environment applies (``AWS_*``).

    ``weights_only`` is accepted and ignored: no byte is ever handed to Python's unpickler. Native
    files hold no pickle, and a pickle-based ``.ckpt`` is read by safeckpt's own interpreter, which
    builds only plain values from an allowlist and refuses anything else
    (`UnsafeCheckpointError`), so every load is at least as strict as ``weights_only=True``.

    Example:
        >>> fabric = L.Fabric(plugins=[SafeCheckpointIO()])
        >>> fabric.save("run/step-100.ckpt", {"model": model, "optimizer": optimizer, "step": 100})
        >>> trainer = L.Trainer(plugins=[SafeCheckpointIO(allow=["my_pkg.OldCallbackState"])])
    """

    def __init__(
        self,
        *,
        max_shard_size: int | str | None = None,
        allow: Iterable[str] = (),
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.max_shard_size = max_shard_size
        self.allow = tuple(allow)
        self.storage_options = storage_options
        for name in _CHECKPOINT_IO_MODULES:
            other = sys.modules.get(name)
            if other is not None and not isinstance(self, other.CheckpointIO):
                other.CheckpointIO.register(SafeCheckpointIO)

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike[str], storage_options: Any = None
    ) -> None:
        """Write ``checkpoint`` to ``path`` without pickle, atomically (parent directories created);
        a URL (``s3://...``) is uploaded all or nothing, with ``storage_options`` (else the plugin's).

        Raises:
            TypeError: a value cannot be stored without pickle; the message names where it is and how
                to fix it.

        Example:
            >>> SafeCheckpointIO().save_checkpoint({"state_dict": model.state_dict(), "epoch": 3}, "ckpts/last.ckpt")
        """
        options = self.storage_options if storage_options is None else storage_options
        try:
            # the plugin is the native writer by choice: Lightning's names (any extension) hold the native format
            native = "safeckpt" if self.max_shard_size is None else None
            save(_local(path), checkpoint, format=native, max_shard_size=self.max_shard_size, storage_options=options)
        except TypeError as e:
            raise _unstorable(e, checkpoint, path) from e

    def load_checkpoint(
        self, path: str | os.PathLike[str], map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Read a checkpoint in any format safeckpt reads (native, a ``TorchCheckpointIO`` ``.ckpt``,
        safetensors, sharded or DCP directories, ``hf://`` URIs), tensors on CPU.

        Args:
            map_location: where tensors go, as in ``torch.load``: a device or string, a dict
                (looked up with ``"cpu"``, the location safeckpt reads every tensor into), or a
                function ``fn(storage, "cpu") -> storage`` called once per storage (``None``: stay).
            weights_only: ignored; nothing is ever unpickled by Python (see the class).

        Example:
            >>> ckpt = SafeCheckpointIO().load_checkpoint("ckpts/last.ckpt", map_location="cuda:0")
            >>> ckpt["global_step"]
            120
        """
        text, options = os.fspath(path), self.storage_options
        if not text.startswith("hf://") and not is_url(text) and not os.path.exists(text):
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        if isinstance(map_location, (str, torch.device)):  # read straight onto the device (pinned staging for CUDA)
            return load(text, allow=self.allow, device=map_location, storage_options=options)
        return _relocate(load(text, allow=self.allow, storage_options=options), map_location)

    def remove_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Delete a checkpoint file or sharded directory (a symlink itself, not its target); a
        missing path is not an error.

        Example:
            >>> SafeCheckpointIO().remove_checkpoint("ckpts/epoch=0-step=4.ckpt")
        """
        local = _local(path)
        if isinstance(local, str):  # a URL: the object, or every object under a sharded checkpoint's prefix
            remove_url(local, self.storage_options)
            return
        _storage.remove_tree(local, missing_ok=True)


def _local(path: str | os.PathLike[str]) -> Path | str:
    """``path`` as a local `Path`, or the URL (``s3://...``) as it is."""
    text = os.fspath(path)
    if is_url(text):
        return text
    if "://" in text:
        raise ValueError(f"SafeCheckpointIO cannot write {text}: give a local path or an fsspec URL (s3://, gs://, ...)")
    return Path(text)


_HINTS = {
    "hyper_parameters": "LightningModule",
    "datamodule_hyper_parameters": "LightningDataModule",
    "callbacks": "the `state_dict()` of callback {key!r} returns it: make it return plain values and tensors",
    "optimizer_states": "the optimizer's `state_dict()` holds it",
    "lr_schedulers": "the LR scheduler's `state_dict()` holds it",
    "state_dict": "a module's `get_extra_state()` returns it: make it return plain values and tensors",
}


def _unstorable(error: TypeError, checkpoint: dict[str, Any], path: object) -> TypeError:
    """The codec's refusal, spelled for a Lightning user: the checkpoint path and what to change."""
    # the place in the checkpoint as the user indexes it, not the codec's name for it ("state[...]")
    message = codec.where(error.key, "checkpoint") + error.detail if isinstance(error, codec.Refused) else str(error)
    top = _first_refused(checkpoint)
    if top is None:
        return TypeError(f"{path}: {message}")
    hint, arg = _HINTS.get(top), _first_refused(checkpoint[top])
    registrable = isinstance(error, codec.Unstorable) and user_types.registrable(error.cls)
    if hint in ("LightningModule", "LightningDataModule") and arg is not None:
        register = (
            "register its type as said (resuming with `ckpt_path=` or loading the checkpoint then rebuilds it, "
            "in any process that registers it too), "
            if registrable
            else ""
        )
        hint = (
            f"`{arg}` is an argument of your {hint}'s __init__ recorded by `self.save_hyperparameters()`: {register}"
            f"leave it out with `self.save_hyperparameters(ignore=[{arg!r}])` (and pass it again when loading), "
            "or pass plain values (numbers, strings, lists, dicts, Namespace) instead of the object"
        )
    elif top == "callbacks":
        hint = hint.format(key=arg)  # type: ignore[union-attr]
    elif hint is None or arg is None:
        hint = (
            f"an `on_save_checkpoint` hook (of your LightningModule, DataModule or a callback) or the state given "
            f"to `fabric.save` put it under {top!r}: store plain values and tensors there"
        )
    return TypeError(f"{path}: {message}. Here {hint}.")


def _first_refused(tree: Any) -> Any:
    """The first key of ``tree`` whose value the codec refuses (tensors stand in as references)."""
    if not isinstance(tree, dict):
        return None
    for key, value in tree.items():
        try:
            codec.encode(value, tensor_name=lambda *_: ["", 0])
        except TypeError:
            return key
    return None


def _relocate(tree: Any, map_location: Any) -> Any:
    """Move every tensor as ``torch.load(map_location=...)`` would; tensors sharing a storage keep sharing it."""
    if isinstance(map_location, dict):
        map_location = map_location.get("cpu")
    if map_location is None:
        return tree
    if isinstance(map_location, (str, torch.device)):
        device = torch.device(map_location)
        if device.type == "cpu":
            return tree
        move: Callable[[Any, str], Any] = lambda storage, _: _storage_to(storage, device)  # noqa: E731
    elif callable(map_location):
        move = map_location
    else:
        raise TypeError(
            f"map_location must be a device, a string, a dict or a function, got {type(map_location).__name__}"
        )
    moved: dict[Any, Any] = {}  # storage -> where it went
    done: dict[int, torch.Tensor] = {}  # a tensor met twice (tied) stays one object, as torch.load gives it

    def leaf(_: tuple[Any, ...], x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        if id(x) not in done:
            storage = x.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes()) if storage.nbytes() else id(x)
            if key not in moved:
                new = move(storage, "cpu")
                moved[key] = storage if new is None else new.untyped() if isinstance(new, torch.TypedStorage) else new
            done[id(x)] = _on(x, moved[key])
        return done[id(x)]

    return map_leaves(tree, leaf)


def _storage_to(storage: torch.UntypedStorage, device: torch.device) -> torch.UntypedStorage:
    # through a byte tensor: UntypedStorage.to() does not know every device (meta)
    return torch.empty(0, dtype=torch.uint8).set_(storage).to(device).untyped_storage()  # type: ignore[call-overload]


def _on(t: torch.Tensor, storage: torch.UntypedStorage) -> torch.Tensor:
    """``t`` viewing ``storage`` at its own offset, size and stride; Parameter and requires_grad kept."""
    if storage is t.untyped_storage():
        return t
    with torch.no_grad():
        out = torch.empty(0, dtype=t.dtype, device=storage.device).set_(
            storage,  # type: ignore[call-overload]
            t.storage_offset(),
            t.size(),
            t.stride(),
        )
    if isinstance(t, torch.nn.Parameter):
        return torch.nn.Parameter(out, requires_grad=t.requires_grad)
    return out.requires_grad_() if t.requires_grad else out
