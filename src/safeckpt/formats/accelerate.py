"""``accelerate``: a folder written by ``Accelerator.save_state`` (spec: ``formats/accelerate.md``).

accelerate 1.x writes one file per object it tracks: ``model.safetensors`` / ``pytorch_model.bin``
(``model_1…`` for the second model, or an HF index with shards), ``optimizer.bin``,
``scheduler.bin``, ``sampler.bin``, ``scaler.pt``, ``random_states_<rank>.pkl`` and
``custom_checkpoint_<i>.pkl`` (each pickle a ``torch.save`` file). Opened here as ONE checkpoint
whose top-level keys name those objects, so ``safeckpt.load(folder, {"model": m, "optimizer":
opt, "scheduler": sched, "custom_checkpoint_0": obj})`` resumes in one call. Every pickle goes
through the ``torch`` format's restricted unpickler; tensors stay lazy.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .._fs import member_problem
from ..errors import CorruptCheckpointError, UnknownFormatError
from ..tree import Checkpoint
from . import Format

NAME = "accelerate"
EXTENSIONS: tuple[str, ...] = ()

# file name -> top-level key; the first model/optimizer/... has no suffix, the n-th gets "_n"
_MODEL = re.compile(r"(?:model|pytorch_model)(_\d+)?\.(safetensors|bin)\Z")
_INDEX = re.compile(r"(?:model|pytorch_model)(_\d+)?\.(safetensors|bin)\.index\.json\Z")
_SHARD = re.compile(r"(?:model|pytorch_model)(_\d+)?-\d{5}-of-\d{5}\.(safetensors|bin)\Z")
_PICKLED = re.compile(r"(optimizer|scheduler|sampler|dl_state_dict)(_\d+)?\.bin\Z")
_RANDOM = re.compile(r"random_states_(\d+)\.pkl\Z")
_CUSTOM = re.compile(r"custom_checkpoint_\d+\.pkl\Z")
_SCALER = "scaler.pt"


def _names(path: Path) -> list[str]:
    try:
        return sorted(n for n in os.listdir(path) if not n.startswith("."))
    except OSError:
        return []


def sniff(head: bytes, path: Path) -> bool:
    """A directory with accelerate's own state files: ``random_states_<n>.pkl`` (every
    ``save_state`` writes one) or ``optimizer.bin``."""
    if not path.is_dir():
        return False
    return any(_RANDOM.fullmatch(n) or n == "optimizer.bin" for n in _names(path))


def _key(name: str) -> str | None:
    """The checkpoint key a file of the folder contributes, or None for files that are not state."""
    if m := _MODEL.fullmatch(name) or _INDEX.fullmatch(name):
        return "model" + (m.group(1) or "")
    if m := _PICKLED.fullmatch(name):
        return m.group(1) + (m.group(2) or "")
    if m := _RANDOM.fullmatch(name):
        return "random_states" if m.group(1) == "0" else f"random_states_{m.group(1)}"
    if _CUSTOM.fullmatch(name):
        return name.removesuffix(".pkl")
    if name == _SCALER:
        return "scaler"
    return None


def _read_one(directory: Path, name: str, allow: Iterable[str]) -> Checkpoint:
    from . import get

    problem = member_problem(directory, name, cache_blobs=True)  # the rule every directory format shares
    if problem is not None:
        raise CorruptCheckpointError(f"{directory}: {name} {problem}; an accelerate folder holds regular files only")
    file = directory / name
    if name.endswith(".index.json"):
        return get("hf-sharded").read(file, allow=allow)
    fmt = "safetensors" if name.endswith(".safetensors") else "torch"
    return get(fmt).read(file, allow=allow)


def read(path: Path, *, allow: Iterable[str] = ()) -> Checkpoint:
    """Open a ``save_state`` folder as one checkpoint: ``model``, ``optimizer``, ``scheduler``,
    ``random_states`` (rank 0; ``random_states_<n>`` for the others), ``custom_checkpoint_<i>``,
    ``scaler``, ``sampler`` (``_<n>`` suffixes for second and later objects).

    Example:
        >>> ckpt = read(Path("checkpoints/checkpoint_3"))
        >>> sorted(ckpt.tree)
        ['custom_checkpoint_0', 'model', 'optimizer', 'random_states', 'scheduler']
    """
    path = Path(path)
    names = _names(path)
    files: dict[str, str] = {}
    for name in names:
        if _SHARD.fullmatch(name):
            continue  # read through their index
        key = _key(name)
        if key is None:
            continue
        if key in files:  # both model.safetensors and pytorch_model.bin, or a file and an index
            raise CorruptCheckpointError(
                f"{path}: both {files[key]} and {name} hold {key!r}; remove the stale one or open the file you mean directly"
            )
        files[key] = name
    if not files:
        raise UnknownFormatError(
            f"{path}: no accelerate state files (random_states_0.pkl, optimizer.bin, model.safetensors)"
        )
    tree: dict[str, Any] = {}
    for key in sorted(files, key=_order):
        tree[key] = _read_one(path, files[key], allow).tree
    info = {"files": {k: files[k] for k in tree}, "producer": "accelerate"}
    return Checkpoint(tree, format=NAME, path=path, info=info)


def _order(key: str) -> tuple[int, str]:
    kinds = ("model", "optimizer", "scheduler", "sampler", "dl_state_dict", "scaler", "random_states", "custom")
    return next((i for i, k in enumerate(kinds) if key.startswith(k)), len(kinds)), key


def verify(path: Path) -> list[str]:
    """Each state file's own checks (the ``torch``/``safetensors`` formats' ``verify``)."""
    from . import get

    problems: list[str] = []
    for name in _names(Path(path)):
        if _key(name) is None or name.endswith(".index.json"):
            continue
        check = get("safetensors" if name.endswith(".safetensors") else "torch").verify
        if check is not None:
            problems += check(Path(path) / name)
    return problems


FORMAT = Format(NAME, EXTENSIONS, "dir", sniff=sniff, read=read, verify=verify)
