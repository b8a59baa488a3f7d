"""The ``safeckpt`` command: inspect, convert, verify and diff checkpoints of any format it reads.

Exit codes: 0 ok; 1 a problem found (``verify``), a difference (``diff``) or a converted file that
does not match its source; 2 a usage error or an input that cannot be read; 3 (``verify``) no
problem found, but part of the file stores no checksum, so it could not be verified. Errors are one line on
stderr naming the file and the fix (``--debug`` adds the traceback). Progress bars go to stderr,
only on a terminal and never with ``--quiet``, so stdout pipes cleanly.

Adding a verb is one entry in `VERBS`: a `Verb` with its help, an ``add_arguments(parser)`` and a
``run(args) -> exit code``; the shared ``--quiet``/``--debug`` flags and the error handling come free.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import math
import os
import sys
import traceback
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safeckpt  # light: its API is imported on first use

from . import _checks, _hub_cli, formats
from ._units import format_size, parse_size
from .errors import CheckpointError, CorruptCheckpointError, HubError, UnknownFormatError, UnsafeCheckpointError

if TYPE_CHECKING:
    from . import codec
    from .compare import Change, compare, leaves, match
    from .tree import AttributeDict, Checkpoint, TensorRef, describe, inline, iter_leaves, path_name


def _import_torch_side() -> None:
    """Bind the names the verbs use from the reading modules, once, when a verb runs: ``--help``,
    ``--version`` and argument errors never import them. (They no longer import torch: that comes
    only when a verb materializes a tensor, e.g. ``diff`` of differing tensors or a ``.pt`` read.)"""
    if "TensorRef" in globals():
        return
    from . import codec as codec_module
    from . import compare as compare_module
    from . import tree as tree_module

    names = {"codec": codec_module}
    names.update({n: getattr(compare_module, n) for n in ("Change", "compare", "leaves", "match")})
    tree_names = ("AttributeDict", "Checkpoint", "TensorRef", "describe", "inline", "iter_leaves", "path_name")
    names.update({n: getattr(tree_module, n) for n in tree_names})
    globals().update(names)


def _with_torch(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A verb's body, run after `_import_torch_side`."""

    def verb(args: argparse.Namespace) -> int:
        _import_torch_side()
        return run(args)

    verb.__doc__, verb.__name__ = run.__doc__, run.__name__
    return verb


__all__ = ["VERBS", "Verb", "main"]

EXIT_OK, EXIT_FOUND, EXIT_USAGE = 0, 1, 2
EXIT_UNVERIFIED = 3  # verify: no problem found, but some of the file had no checksum to check


class Found(Exception):
    """What the verb exists to detect (a corrupt or unsafe file, a bad conversion): exit 1."""


class Usage(Exception):
    """The command line asks for something that cannot be done as asked: exit 2."""


@dataclass(frozen=True)
class Verb:
    """A subcommand: one line of help, a description with examples, its arguments and its body."""

    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# -- shared pieces --------------------------------------------------------------------------------


def _add_select(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="GLOB",
        help=f"only {what} whose path matches (repeatable; e.g. 'model/*')",
    )
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help=f"leave out {what} whose path matches (repeatable)",
    )


def _add_allow(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="MODULE.NAME",
        help="admit one more pickle global as inert data (repeatable; only for files you trust; see `safeckpt verify`)",
    )


def _add_storage(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="storage_option",
        help="an fsspec option for URL paths (s3://...), e.g. endpoint_url=http://127.0.0.1:9000 or anon=true "
        "(repeatable; VALUE is read as JSON where it parses, else as a string; default: the AWS_* environment)",
    )


def _storage_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """``--storage-option KEY=VALUE`` flags as fsspec's ``storage_options`` (None if none)."""
    out: dict[str, Any] = {}
    for item in getattr(args, "storage_option", None) or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise Usage(f"--storage-option {item!r}: write KEY=VALUE, e.g. --storage-option endpoint_url=http://host:9000")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out or None


def _selector(args: argparse.Namespace) -> Callable[[str], bool] | None:
    """A path-name test from --include/--exclude: a glob matches a leaf's path or any enclosing
    container's path, so 'model' selects the whole model subtree and 'model/*' its contents."""
    include, exclude = args.include, args.exclude
    if not include and not exclude:
        return None

    def hits(name: str, globs: list[str]) -> bool:
        parts = name.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        return any(fnmatch.fnmatchcase(p, g) for g in globs for p in prefixes)

    return lambda name: (not include or hits(name, include)) and not hits(name, exclude)


_DROP = object()


def _prune(node: Any, keep: Callable[[str], bool], path: tuple[Any, ...] = ()) -> Any:
    """The tree without the leaves ``keep`` rejects, or the containers left empty; a list that
    loses items becomes a dict keyed by the original indices so every path name stays true."""
    if isinstance(node, dict) or (type(node) in (list, tuple) and len(node)):
        if not len(node):
            return node if keep(path_name(path)) else _DROP
        items = node.items() if isinstance(node, dict) else enumerate(node)
        kept = {k: v for k, v in ((k, _prune(v, keep, (*path, k))) for k, v in items) if v is not _DROP}
        if not kept:
            return _DROP
        if isinstance(node, dict):
            out = type(node)() if type(node) in (dict, OrderedDict, AttributeDict) else {}
            out.update(kept)
            return out
        return type(node)(kept.values()) if len(kept) == len(node) else kept
    return node if keep(path_name(path)) else _DROP


def _open(path: str, args: argparse.Namespace) -> Checkpoint:
    try:
        return safeckpt.open(path, allow=getattr(args, "allow", ()), storage_options=_storage_options(args))
    except Exception as e:
        e.safeckpt_path = path  # type: ignore[attr-defined]  # lets the error line name the file
        raise


def _shown(given: str, local: Path | str) -> str:
    """How a report names a checkpoint: a URL as typed, not its local view (the Hub cache, a temporary)."""
    return given if "://" in given else str(local)  # a URL (hf://, s3://, ...) as typed


def _unique(tree: Any) -> dict[Hashable, TensorRef]:
    out: dict[Hashable, TensorRef] = {}
    for _, leaf in iter_leaves(tree):
        if isinstance(leaf, TensorRef):
            out.setdefault(leaf.alias_key, leaf)
    return out


def _draws_bars(args: argparse.Namespace) -> bool:
    return not args.quiet and sys.stderr.isatty()


@contextmanager
def _progress(args: argparse.Namespace, total: int, desc: str) -> Iterator[Callable[[int], None]]:
    """A byte-count callback drawing a tqdm bar on stderr, only on a terminal and without --quiet."""
    if total <= 0 or not _draws_bars(args):
        yield lambda n: None
        return
    from tqdm import tqdm

    with tqdm(
        total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1000, leave=False, file=sys.stderr
    ) as bar:
        yield bar.update


@contextmanager
def _phased_progress(args: argparse.Namespace, phases: list[tuple[int, str]]) -> Iterator[Callable[[int], None]]:
    """One byte-count callback over passes run one after the other (``[(total, desc), ...]``): a
    bar per pass, each with its own total; bytes past a pass's total go to the next one."""
    totals = [total for total, _ in phases]
    descs = [desc for _, desc in phases]
    stack = contextlib.ExitStack()
    bar: list[Callable[[int], None]] = []  # the open pass's bar, if any

    def advance(n: int) -> None:
        while n > 0 and totals:
            if not bar:
                bar.append(stack.enter_context(_progress(args, totals[0], descs[0])))
            used = min(n, totals[0])
            bar[0](used)
            totals[0] -= used
            n -= used
            if totals[0] <= 0:  # this pass is done: close its bar, the next bytes open the next one
                totals.pop(0)
                descs.pop(0)
                bar.clear()
                stack.close()

    with stack:
        yield advance


def _jsonable(x: Any) -> Any:
    """Plain JSON: non-finite floats as the strings "nan"/"inf"/"-inf", other objects as their repr."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return repr(x)


def _print_json(obj: Any) -> None:
    print(json.dumps(_jsonable(obj), indent=2, ensure_ascii=False))


def _dtype(ref: TensorRef | Any) -> str:
    # a reference's dtype by its torch-free row: inspecting a header does not import torch
    return ref.dtype_info.name if isinstance(ref, TensorRef) else str(ref.dtype).removeprefix("torch.")


def _leaf_json(x: Any) -> dict[str, Any]:
    """How --json shows one leaf: a tensor's dtype/shape/bytes, a value's type and value (or repr)."""
    if isinstance(x, TensorRef):
        return {"kind": "tensor", "dtype": _dtype(x), "shape": list(x.shape), "nbytes": x.nbytes}
    out: dict[str, Any] = {"kind": "value", "type": type(x).__name__}
    plain = x is None or type(x) in (bool, int, float) or (type(x) is str and len(x) <= 200)
    scalars = (
        type(x) in (list, tuple) and len(x) <= 64 and all(v is None or type(v) in (bool, int, float, str) for v in x)
    )
    if (plain or scalars) and not (isinstance(x, int) and abs(x) >= 2**53):
        out["value"] = list(x) if type(x) in (list, tuple) else x
    else:
        out["repr"] = inline(x, 200) or repr(x)[:200]
    return out


def _file_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else 0


def _top_key(tree: Any, text: str) -> Any:
    """--key as the checkpoint spells it: the string, else the int it reads as (optimizer-style keys)."""
    if isinstance(tree, dict) and text not in tree and text.lstrip("-").isdigit() and int(text) in tree:
        return int(text)
    return text


# -- inspect --------------------------------------------------------------------------------------


def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="a checkpoint file or directory (or hf://repo/file)")
    p.add_argument(
        "--depth", type=_positive_int, metavar="N", help="show N levels of keys; deeper containers are summarised"
    )
    _add_select(p, "leaves")
    _add_allow(p)
    _add_storage(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON (fields described above)")


def _optimizer_paths(tree: Any) -> set[str]:
    """Path names of the optimizer state dicts in a tree (dicts holding 'state' and 'param_groups')."""
    found: set[str] = set()
    stack: list[tuple[tuple[Any, ...], Any]] = [((), tree)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, dict):
            if "state" in node and "param_groups" in node:
                found.add(path_name(path))
                continue
            stack.extend(((*path, k), v) for k, v in node.items())
        elif type(node) in (list, tuple):
            stack.extend(((*path, i), v) for i, v in enumerate(node))
    return found


def _weights_key(tree: Any) -> Any:
    """The top-level entry holding a wrapped checkpoint's model weights, if it has one."""
    if not isinstance(tree, dict) or len(tree) < 2:
        return None
    if "pytorch-lightning_version" in tree and isinstance(tree.get("state_dict"), dict):
        return "state_dict"
    for key in ("model", "state_dict", "model_state_dict", "module", "ema"):
        value = tree.get(key)
        if isinstance(value, dict) and any(isinstance(v, TensorRef) for v in value.values()):
            return key
    return None


def _inspect_report(ckpt: Checkpoint, tree: Any, depth: int | None) -> dict[str, Any]:
    entries: list[dict[str, Any]] = []

    def walk(node: Any, path: tuple[Any, ...]) -> None:
        if (isinstance(node, dict) or type(node) in (list, tuple)) and inline(node) is None:
            if depth is not None and len(path) >= depth:
                refs = _unique(node)
                entries.append(
                    {"path": path_name(path), "keys": list(path), "kind": "container", "type": type(node).__name__,
                     "len": len(node), "tensors": len(refs), "nbytes": sum(r.nbytes for r in refs.values())}
                )  # fmt: skip
                return
            for k, v in node.items() if isinstance(node, dict) else enumerate(node):
                walk(v, (*path, k))
            return
        entries.append({"path": path_name(path), "keys": list(path), **_leaf_json(node)})

    walk(tree, ())
    unique = _unique(tree)
    by_dtype: dict[str, dict[str, int]] = {}
    for ref in unique.values():
        d = by_dtype.setdefault(_dtype(ref), {"tensors": 0, "nbytes": 0, "numel": 0})
        d["tensors"] += 1
        d["nbytes"] += ref.nbytes
        d["numel"] += ref.numel
    # parameters: the weights entry of a wrapped checkpoint, else every tensor outside optimizer state
    weights_key = _weights_key(ckpt.tree)
    params_tree = tree[weights_key] if isinstance(tree, dict) and weights_key in tree else tree
    optimizers = _optimizer_paths(params_tree)
    params: dict[Hashable, TensorRef] = {}
    for p, leaf in iter_leaves(params_tree):
        name = path_name(p)
        if isinstance(leaf, TensorRef) and not any(
            o == "" or name == o or name.startswith(o + "/") for o in optimizers
        ):
            params.setdefault(leaf.alias_key, leaf)
    groups: dict[Hashable, list[str]] = {}
    storages: dict[Hashable, dict[Hashable, str]] = {}
    for name, ref in Checkpoint(tree, format=ckpt.format, path=ckpt.path).tensors().items():
        groups.setdefault(ref.alias_key, []).append(name)
        # A storage equal to the whole source file (safetensors-based formats) says where bytes live,
        # not that tensors overlap; only a real storage shared by different views counts.
        if ref.storage is not None and ref.storage != ref.source:
            storages.setdefault(ref.storage, {}).setdefault(ref.alias_key, name)
    lightning = None
    if isinstance(ckpt.tree, dict) and "pytorch-lightning_version" in ckpt.tree:
        t = ckpt.tree
        lightning = {
            "version": t.get("pytorch-lightning_version"),
            "epoch": t.get("epoch"),
            "global_step": t.get("global_step"),
            "optimizers": len(t.get("optimizer_states") or ()),
            "callbacks": [str(k) for k in t.get("callbacks") or {}],
            "hyper_parameters": sorted(str(k) for k in t.get("hyper_parameters") or {}),
        }
    return {
        "path": str(ckpt.path),
        "format": ckpt.format,
        "file_bytes": _file_bytes(ckpt.path),
        "entries": entries,
        "totals": {
            "tensors": len(unique),
            "names": sum(isinstance(leaf, TensorRef) for _, leaf in iter_leaves(tree)),
            "nbytes": sum(r.nbytes for r in unique.values()),
            "numel": sum(r.numel for r in unique.values()),
            "parameters": sum(r.numel for r in params.values()),
            "by_dtype": by_dtype,
        },
        "tied": [g for g in groups.values() if len(g) > 1],
        "shared": [list(v.values()) for v in storages.values() if len(v) > 1],
        "metadata": ckpt.metadata,
        "info": ckpt.info,
        "lightning": lightning,
        "weights_key": weights_key,
    }


def _run_inspect(args: argparse.Namespace) -> int:
    ckpt = _open(args.path, args)
    keep = _selector(args)
    tree = ckpt.tree if keep is None else _prune(ckpt.tree, keep)
    if tree is _DROP:
        raise Usage(
            f"{args.path}: no leaf matches --include {args.include} --exclude {args.exclude}; run without them to see every path"
        )
    report = _inspect_report(ckpt, tree, args.depth)
    report["path"] = _shown(args.path, ckpt.path)
    if args.json:
        _print_json(report)
        return EXIT_OK
    if args.quiet:
        return EXIT_OK
    t = report["totals"]
    print(
        describe(
            tree,
            title=f"{report['path']}  ({ckpt.format}, {format_size(report['file_bytes'])} on disk)",
            depth=args.depth,
        )
    )
    print()
    dtypes = ", ".join(
        f"{k} {v['tensors']} ({format_size(v['nbytes'])})"
        for k, v in sorted(t["by_dtype"].items(), key=lambda kv: -kv[1]["nbytes"])
    )
    names = f" ({t['names']} names)" if t["names"] != t["tensors"] else ""
    print(f"tensors:    {t['tensors']}{names}, {format_size(t['nbytes'])}" + (f": {dtypes}" if dtypes else ""))
    selected = bool(args.include or args.exclude)
    in_all = "in the selected tensors" if selected else "in all tensors"
    weights = report["weights_key"]
    if weights is not None and not (isinstance(tree, dict) and weights in tree):
        # the selection leaves out the weights entry: no parameter was counted, say where they are
        print(f"parameters: none selected (the weights are in {weights!r}; {t['numel']:,} elements {in_all})")
    else:
        where = f" in {weights!r}" if weights is not None else ""
        print(f"parameters: {t['parameters']:,}{where} ({t['numel']:,} elements {in_all})")

    def short(name: str) -> str:  # --json has the full names; a callback's state key can run to 200 characters
        return "/".join(
            part if len(part) <= 28 else part[:24] + "...}"[: 3 + part.endswith("}")] for part in name.split("/")
        )

    def listed(group: list[str], sep: str) -> str:
        more = f" (and {len(group) - 4} more)" if len(group) > 4 else ""
        return sep.join(map(short, group[:4])) + more

    for group in report["tied"]:
        print(f"tied:       {listed(group, ' = ')}")
    for group in report["shared"]:
        print(f"shared:     {listed(group, ', ')} (views of one storage)")
    if report["lightning"]:
        lt = report["lightning"]
        print(
            f"lightning:  Trainer checkpoint, Lightning {lt['version']}, epoch {lt['epoch']}, global step {lt['global_step']}"
        )
    for k, v in report["metadata"].items():
        print(f"metadata:   {k} = {v if len(v) <= 100 else v[:97] + '...'}")
    if report["info"]:
        print(
            "info:       "
            + ", ".join(f"{k}={v if isinstance(v, str) else inline(v, 80)}" for k, v in report["info"].items())
        )
    if report["weights_key"] is not None:
        print(f"weights:    under {report['weights_key']!r}; extract them with "
              f"`safeckpt convert {args.path} weights.safetensors --key {report['weights_key']}`")  # fmt: skip
    return EXIT_OK


# -- convert --------------------------------------------------------------------------------------


def _writable_names() -> list[str]:
    """The formats `--format` offers: the registry's writable ones (known without importing them)."""
    return formats.writable()


def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="any checkpoint safeckpt reads (file, directory or hf://repo/file)")
    p.add_argument("dst", help="where to write; the format comes from --format, else the extension")
    # names only: importing every format module to list the writable ones would slow every command
    writable = _writable_names()
    p.add_argument(
        "--format",
        metavar="NAME",
        choices=writable,
        help="output format (default: from DST's extension): " + ", ".join(writable),
    )
    p.add_argument(
        "--max-shard-size", metavar="SIZE", help="write a sharded directory with shards of at most SIZE (e.g. 5GB)"
    )
    p.add_argument("--key", metavar="KEY", help="convert only this top-level entry (e.g. model, state_dict)")
    _add_select(p, "tensors")
    _add_allow(p)
    _add_storage(p)
    p.add_argument("--force", action="store_true", help="overwrite DST if it exists")
    p.add_argument("--no-verify", action="store_true", help="skip reading DST back and comparing it with SRC")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _run_convert(args: argparse.Namespace) -> int:
    if args.format is not None:
        formats.get(args.format)  # unknown name -> ValueError listing the known ones (exit 2)
    max_shard = parse_size(args.max_shard_size) if args.max_shard_size is not None else None
    from ._remote import is_url

    dst: Any = args.dst if is_url(args.dst) else Path(args.dst)  # a URL's existence: safeckpt.convert checks it
    if not isinstance(dst, str) and (dst.exists() or dst.is_symlink()) and not args.force:  # before the source is read
        raise Usage(f"{dst} already exists; pass --force to overwrite it, or choose another destination")
    from .api import check_name

    try:  # the naming rule of safeckpt.save/convert, checked before the source is read
        check_name(dst, args.format, max_shard)
    except ValueError as e:
        raise Usage(str(e)) from None
    ckpt = _open(args.src, args)
    tree = ckpt.tree
    key = None
    if args.key is not None:
        key = _top_key(tree, args.key)
        if not isinstance(tree, dict) or key not in tree:
            found = (
                ", ".join(repr(k) for k in list(tree)[:20]) if isinstance(tree, dict) else f"a {type(tree).__name__}"
            )
            raise Usage(f"{args.src} has no top-level key {args.key!r}; its keys are {found}")
        tree = tree[key]
    keep = _selector(args)
    if keep is not None:
        pruned = _prune(tree, keep)
        if not _unique({} if pruned is _DROP else pruned) and _unique(tree):
            raise Usage(
                f"{args.src}: no tensor matches --include {args.include} --exclude {args.exclude}; see the paths with `safeckpt inspect {args.src}`"
            )
        tree = {} if pruned is _DROP else pruned
    # the writer reads each distinct tensor once; verification compares every name (tied ones too):
    # two bars, each the size of its own pass, not one bar twice the file
    phases = [(sum(r.nbytes for r in _unique(tree).values()), "converting")]
    if not args.no_verify:
        phases.append((sum(x.nbytes for _, x in iter_leaves(tree) if isinstance(x, TensorRef)), "verifying"))
    tensor_filter = (lambda name, ref: keep(name)) if keep is not None else None
    with _phased_progress(args, phases) as bar:
        try:
            written = safeckpt.convert(
                args.src, dst, format=args.format, filter=tensor_filter, max_shard_size=max_shard, key=key,
                allow=args.allow, verify=not args.no_verify, overwrite=args.force, progress=bar,
                storage_options=_storage_options(args),
            )  # fmt: skip
        except CheckpointError as e:  # the source opened fine: damaged tensor data, or a mismatch on verify
            raise Found(str(e)) from e
    out = safeckpt.open(written, storage_options=_storage_options(args))
    # the destination as the user typed it (relative stays relative), unless the writer chose another path
    shown = args.dst if Path(written).absolute() == Path(args.dst).absolute() else str(written)
    result = {
        "src": args.src,
        "dst": shown,
        "format": out.format,
        "tensors": len(_unique(out.tree)),
        "nbytes": out.nbytes,
        "file_bytes": _file_bytes(Path(written)),
        "verified": not args.no_verify,
    }
    if args.json:
        _print_json(result)
    elif not args.quiet:
        check = (
            "verified: every tensor and value matches the source"
            if result["verified"]
            else "not verified (--no-verify)"
        )
        print(
            f"wrote {shown} ({out.format}, {result['tensors']} tensors, {format_size(result['file_bytes'])}); {check}"
        )
    return EXIT_OK


# -- verify ---------------------------------------------------------------------------------------


def _verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="a checkpoint file or directory")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_storage(p)


def _span_readable(ref: TensorRef) -> bool:
    """For a reference whose exact bytes lie in its file (its ``span``: every safetensors-based
    tensor, a ``.pt``'s stored as they are), local or a URL's: check they are all there, without
    reading them or importing torch, and return True; False for any other (the caller loads it).
    Their integrity is the format's checksums' to judge."""
    span = ref.span
    if span is None:
        return False
    span.file.check_range(span.offset, ref.nbytes, str(span.file.path), key=ref.name)
    return True


def _run_verify(args: argparse.Namespace) -> int:
    from . import _runtime
    from .formats.safeckpt_sharded import ShardedRef

    try:
        local = _runtime.local(args.path, _storage_options(args))  # hf:// and s3:// paths: a local view first
        fmt = formats.detect(local)  # a missing or unrecognised file is a usage error (exit 2), not a finding
    except Exception as e:
        e.safeckpt_path = args.path  # type: ignore[attr-defined]
        raise
    problems: list[str] = []
    report: dict[str, Any] = {"path": _shown(args.path, local), "format": fmt.NAME, "tensors": 0, "nbytes": 0}
    globals_report = fmt.globals_report
    ckpt = None
    try:
        ckpt = fmt.read(local)
        report["structure"] = "ok"
    except UnsafeCheckpointError as e:
        report["structure"] = "unsafe"
        if globals_report is None:  # else the globals report below names every refused global
            problems.append(str(e))
    except CheckpointError as e:
        report["structure"] = "failed"
        problems.append(str(e))
    if ckpt is not None:
        refs = _unique(ckpt.tree)
        report["tensors"], report["nbytes"] = len(refs), sum(r.nbytes for r in refs.values())
        failed = 0
        with _progress(args, report["nbytes"], "reading") as bar:
            for ref in refs.values():
                try:
                    if isinstance(ref, ShardedRef):  # each chunk against its shard, without torch
                        ref.check_readable()
                    elif not _span_readable(ref):  # in place, without torch
                        ref.load()
                except CheckpointError as e:
                    failed += 1
                    problems.append(str(e))
                bar(ref.nbytes)
        report["tensors_read"] = len(refs) - failed
    check = fmt.verify  # the format's own checks: checksums, zip CRCs, ...
    found: list[str] = []
    if check is not None:
        try:
            found = list(check(local))
        except CheckpointError as e:
            found = [str(e)]
        problems.extend(found)
    # what had a checksum to check: a file without any is unverified, never "ok"
    report["checksums"] = _checks.regions(fmt.NAME, local, found)
    report["checks"] = _checks.summary(report["checksums"], found)
    if globals_report is not None:
        try:
            report["globals"] = [{"name": str(g), "allowed": bool(ok)} for g, ok in globals_report(local)]
        except CheckpointError as e:
            problems.append(str(e))
            report["globals"] = None
        for g in report["globals"] or ():
            if not g["allowed"] and not any(g["name"] in p for p in problems):
                problems.append(
                    f"{local}: refers to the global {g['name']}, which safeckpt refuses: torch.load would import it "
                    "(and may run code); do not load this file with torch.load"
                )
    report["problems"] = problems = list(dict.fromkeys(problems))  # a format's checks may repeat the reader
    report["ok"] = not problems
    unverified = [r for r, state in report["checksums"].items() if state == "none"]
    report["verified"] = not problems and not unverified
    if args.json:
        _print_json(report)
    elif not args.quiet:
        print(f"{report['path']}  ({fmt.NAME}, {report['tensors']} tensors, {format_size(report['nbytes'])})")
        print(f"  structure  {report['structure']}")
        if "tensors_read" in report:
            print(f"  tensors    {report['tensors_read']} of {report['tensors']} read")
        print("  checksums  " + ", ".join(f"{r} {state}" for r, state in report["checksums"].items()))
        if report.get("globals") is not None:
            refused = sum(not g["allowed"] for g in report["globals"])
            print(f"  globals    {len(report['globals']) - refused} allowed, {refused} refused")
            for g in report["globals"]:
                print(f"    {'allowed' if g['allowed'] else 'REFUSED'}  {g['name']}")
        if problems:
            print(f"{len(problems)} problem{'s' * (len(problems) != 1)}:")
            for p in problems:
                print(f"  {p}")
        elif unverified:
            what = " and ".join("tensor data" if r == "data" else r for r in unverified)
            print(
                f"NOT VERIFIED: no problem found, but the {what} could not be verified: the file stores no "
                f"checksum for {'it' if len(unverified) == 1 else 'them'}, so damage there would go unnoticed "
                "(only the structure was checked); compare with the source's published hash, or convert it "
                "to .safeckpt, which records checksums"
            )
        else:
            print("ok: the structure is sound and every checksum matches")
    if problems:
        return EXIT_FOUND
    return EXIT_UNVERIFIED if unverified else EXIT_OK


# -- diff -----------------------------------------------------------------------------------------


def _diff_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", help="first checkpoint")
    p.add_argument("b", help="second checkpoint (any format)")
    p.add_argument(
        "--atol", type=_non_negative, default=0.0, help="tensors within this absolute tolerance count as equal"
    )
    p.add_argument("--rtol", type=_non_negative, default=0.0, help="... and this relative tolerance (of b)")
    _add_select(p, "leaves")
    _add_allow(p)
    _add_storage(p)
    p.add_argument("--json", action="store_true", help="print the differences as JSON")


def _short(x: Any) -> str:
    text = inline(x, 50) or ""
    return f"tensor {text}" if isinstance(x, TensorRef) else text


def _change_text(c: Change) -> str:
    if c.kind == "tensor":
        a, b = c.a, c.b
        head = f"{_dtype(a)} {list(a.shape)}"
        if (_dtype(a), tuple(a.shape)) != (_dtype(b), tuple(b.shape)):
            head += f" -> {_dtype(b)} {list(b.shape)}"
        return head + (f"  max abs diff {c.max_abs:.6g}" if c.max_abs is not None else "")
    return f"{_short(c.a)} -> {_short(c.b)}"


def _run_diff(args: argparse.Namespace) -> int:
    ca, cb = _open(args.a, args), _open(args.b, args)
    ta, tb = ca.tree, cb.tree
    keep = _selector(args)
    if keep is not None:
        ta, tb = _prune(ta, keep), _prune(tb, keep)
        ta, tb = ({} if ta is _DROP else ta), ({} if tb is _DROP else tb)
    la, lb = leaves(ta), leaves(tb)
    total = sum(la[n].nbytes for n, m in match(la, lb) if isinstance(la[n], TensorRef) and isinstance(lb[m], TensorRef))
    with _progress(args, total, "comparing") as bar:
        d = compare(ta, tb, atol=args.atol, rtol=args.rtol, progress=bar)
    if args.json:
        _print_json(
            {
                "a": {"path": _shown(args.a, ca.path), "format": ca.format},
                "b": {"path": _shown(args.b, cb.path), "format": cb.format},
                "equal": d.equal,
                "atol": args.atol,
                "rtol": args.rtol,
                "same": d.same,
                "only_a": [{"path": k, **_leaf_json(la[k])} for k in d.only_a],
                "only_b": [{"path": k, **_leaf_json(lb[k])} for k in d.only_b],
                "changed": [
                    {
                        "path": c.name,
                        **({"path_b": c.b_name} if c.b_name else {}),
                        "kind": c.kind,
                        "a": _leaf_json(c.a),
                        "b": _leaf_json(c.b),
                        "max_abs_diff": c.max_abs,
                    }
                    for c in d.changed
                ],
            }
        )
    elif not args.quiet:
        print(f"--- {_shown(args.a, ca.path)}  ({ca.format})")
        print(f"+++ {_shown(args.b, cb.path)}  ({cb.format})")
        width = min(max((len(n) for n in [*d.only_a, *d.only_b, *(c.name for c in d.changed)]), default=0), 50)
        for k in d.only_a:
            print(f"- {k:{width}}  {_short(la[k])}")
        for k in d.only_b:
            print(f"+ {k:{width}}  {_short(lb[k])}")
        for c in d.changed:
            print(f"~ {c.name:{width}}  {_change_text(c)}")
        parts = [f"{d.same} equal"]
        if d.changed:
            parts.append(f"{len(d.changed)} differ")
        if d.only_a:
            parts.append(f"{len(d.only_a)} only in a")
        if d.only_b:
            parts.append(f"{len(d.only_b)} only in b")
        tolerance = f" (atol={args.atol:g}, rtol={args.rtol:g})" if args.atol or args.rtol else ""
        print(("identical: " if d.equal else "different: ") + ", ".join(parts) + tolerance)
    return EXIT_OK if d.equal else EXIT_FOUND


# -- argument types -------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


# -- the table and the entry point ----------------------------------------------------------------

VERBS: dict[str, Verb] = {
    "inspect": Verb(
        help="show what is in a checkpoint, reading headers only",
        description="""\
Show what a checkpoint holds without reading tensor data: its format, a tree of keys with
dtype, shape and size for tensors and the value of small non-tensor leaves, totals (tensors,
bytes by dtype, parameters: the elements of the weights entry of a wrapped checkpoint, else of
every tensor outside optimizer state), tied tensors and views of one storage,
Lightning and safetensors metadata.

examples:
  safeckpt inspect model.safetensors
  safeckpt inspect last.ckpt --depth 2
  safeckpt inspect run.safeckpt --include 'model/*' --json | jq .totals

--json prints one object: path, format, file_bytes; entries: a list of
{path, keys, kind: tensor|value|container, ...} in tree order (tensor: dtype, shape,
nbytes; value: type and value, or repr when it is not plain JSON; container, past --depth:
type, len, tensors, nbytes); totals: {tensors (distinct), names, nbytes, numel, parameters,
by_dtype: {dtype: {tensors, nbytes, numel}}}; tied and shared: lists of path groups;
metadata, info, lightning (null unless a Trainer checkpoint) and weights_key (the entry
holding a wrapped checkpoint's weights, or null). Non-finite floats print as "nan"/"inf".""",
        add_arguments=_inspect_args,
        run=_with_torch(_run_inspect),
    ),
    "convert": Verb(
        help="convert a checkpoint to another format, verified",
        description="""\
Convert any checkpoint safeckpt reads into a format it writes, streaming tensor by tensor:
first check the source's own checksums (where its format records them), then write, then read
the result back and check every tensor (by bytes) and every value against the source.
The output format is --format, else DST's extension: .safetensors for tensors only gives plain
safetensors; .safeckpt, .ckpt or no extension the native format; .pt/.pth/.bin or an extension of
no format needs --format (torch to export, safeckpt for the native format under that name), as
safeckpt.save does. --max-shard-size writes a directory.

examples:
  safeckpt convert friend.pt friend.safetensors
  safeckpt convert last.ckpt weights.safetensors --key state_dict
  safeckpt convert run.safeckpt model-dir --key model --max-shard-size 2GB
  safeckpt convert big.pt small.safeckpt --exclude 'optimizer/*'

exit codes: 0 written and verified; 1 the source's data is damaged or the written file does not
match it; 2 bad arguments, an unreadable source, or DST exists (use --force).
--json prints {src, dst, format, tensors, nbytes, file_bytes, verified}.""",
        add_arguments=_convert_args,
        run=_with_torch(_run_convert),
    ),
    "verify": Verb(
        help="check a checkpoint's integrity and, for pickles, its safety",
        description="""\
Check a checkpoint: its headers, offsets and sizes; that every tensor reads as declared;
the format's own checks (checksums, zip CRCs) where it has them; and, for pickle-based files, every global the pickle
refers to, each marked allowed or refused (nothing in the file is run or imported).

examples:
  safeckpt verify friend.pt
  safeckpt verify run.safeckpt --quiet && echo intact

Checksums are reported per region: header (names, dtypes, shapes, offsets, the skeleton or
pickle) and data (the tensor bytes), each ok, failed, or none when the file stores no checksum
for it. Plain safetensors files from other writers and legacy torch files store none: for them
only the structure is checked, and verify says so (exit 3) instead of calling the data ok.

exit codes: 0 no problem, and every region's checksum matches; 1 a problem found (corrupt, or a
refused global); 2 not a checkpoint; 3 no problem found, but a region had no checksum to check
(a script that accepts files without checksums treats 3 like 0).
--json prints {path, format, tensors, nbytes, structure: ok|failed|unsafe, tensors_read,
checksums: {header, data: ok|failed|none}, checks: ok|failed|none|partial (all regions together),
globals: [{name, allowed}] or absent, problems: [...], ok (no problem found), verified (ok, and no
region unchecked)}.""",
        add_arguments=_verify_args,
        run=_with_torch(_run_verify),
    ),
    "diff": Verb(
        help="compare two checkpoints, across formats",
        description="""\
Compare two checkpoints leaf by leaf, matched by path name (so a nested .safeckpt and a flat
.safetensors with the same names compare): leaves only in a or only in b, dtype or shape
changes, the largest absolute difference of each differing tensor, changed values.
Tensors are equal when their bytes are, or within --atol/--rtol when given.

examples:
  safeckpt diff before.pt after.safetensors
  safeckpt diff a.safeckpt b.safeckpt --include 'model/*' --atol 1e-6
  safeckpt diff a.ckpt b.ckpt --quiet || echo differ

exit codes: 0 equal; 1 different; 2 an input cannot be read.
--json prints {a, b, equal, atol, rtol, same, only_a: [...], only_b: [...],
changed: [{path, path_b (when b names it differently, e.g. model.w for model/w), kind: tensor|value|type,
a, b, max_abs_diff}]}; leaves as in inspect --json.""",
        add_arguments=_diff_args,
        run=_with_torch(_run_diff),
    ),
    "push": Verb(_hub_cli.PUSH_HELP, _hub_cli.PUSH_DESCRIPTION, _hub_cli.push_args, _with_torch(_hub_cli.run_push)),
    "pull": Verb(_hub_cli.PULL_HELP, _hub_cli.PULL_DESCRIPTION, _hub_cli.pull_args, _with_torch(_hub_cli.run_pull)),
}


_JSON_ERRORS = [False]  # set by `main` when the command line asks for --json: errors go to stdout as JSON too


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, like every other error, and where to look
        if _JSON_ERRORS[0]:
            _print_error_json(message, None, f"see `{self.prog} --help`")
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _print_error_json(error: str, path: str | None, hint: str | None, key: str | None = None) -> None:
    """An error as the one JSON object a ``--json`` caller parses from stdout."""
    print(json.dumps({"error": error, "path": path, "hint": hint, "key": key}, ensure_ascii=False), flush=True)


def _error_fields(e: BaseException, line: str) -> tuple[str, str | None, str | None, str | None]:
    """(error, path, hint, key) of an error line from `_fix`: the hint is what follows its first
    '; '; the path as the command was given it, else the error's own; the key the error names."""
    path = getattr(e, "safeckpt_path", None)
    if path is None and isinstance(e, CheckpointError):
        path = e.path
    if path is None and isinstance(e, OSError) and e.filename is not None:
        path = e.filename
    error, _, hint = line.partition("; ")
    key = e.key if isinstance(e, CheckpointError) else None
    return error, None if path is None else str(path), hint or None, key


def _global_flags() -> _Parser:
    """``-q``/``--debug``, accepted before and after the verb. SUPPRESS: a flag given before the
    verb is not reset by the verb's default. A fresh parser each call: ``parents=`` shares action
    objects, so one copy for the top parser and one for the verbs keeps the top's ``set_defaults``
    from becoming the verbs' default (which silently dropped ``safeckpt -q verify``)."""
    flags = _Parser(add_help=False)
    flags.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="no progress bar and no report (--json still prints); errors still go to stderr; the exit code tells",
    )
    flags.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error")
    return flags


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every verb in `VERBS`."""
    parser = _Parser(
        prog="safeckpt",
        description="Inspect, convert, verify and compare checkpoints (torch .pt/.ckpt, safetensors, sharded and DCP directories, .safeckpt) without running pickle.",
        epilog="exit codes: 0 ok, 1 problem or difference found, 2 usage error or unreadable input,\n3 (verify) no problem found but data without checksums could not be verified.\nRun `safeckpt VERB --help` for a verb's options and examples.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_global_flags()],
    )
    parser.add_argument("--version", action="version", version=f"safeckpt {safeckpt.__version__}")
    parser.set_defaults(quiet=False, debug=False)  # on the top parser's own copy of the flags (see _global_flags)
    common = _global_flags()
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    for name, verb in VERBS.items():
        p = sub.add_parser(
            name,
            help=verb.help,
            description=verb.description,
            parents=[common],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        verb.add_arguments(p)
    return parser


def _fix(e: BaseException) -> str:
    """One line naming the file and the fix, from any exception a verb can raise."""
    msg = " ".join(str(e.args[0] if isinstance(e, KeyError) and e.args else e).split())
    where = getattr(e, "safeckpt_path", None)
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        where = where or e.filename
        msg = f"{e.filename}: {e.strerror.lower()}" if isinstance(e, (FileNotFoundError, PermissionError)) else msg
    msg = msg.replace("pass max_shard_size=", "pass --max-shard-size").rstrip(".")  # the API's words, in the CLI's
    msg = msg.replace('format="torch"', "--format torch").replace('format="safeckpt"', "--format safeckpt")
    if isinstance(e, HubError):
        pass  # already names the repo and the fix
    elif isinstance(e, FileNotFoundError):
        msg += "; check the path"
    elif isinstance(e, PermissionError):
        msg += "; check its permissions, or choose another path"
    elif isinstance(e, IsADirectoryError) and e.errno is not None:  # the OS's; safeckpt's own says the fix
        msg += "; give a checkpoint file, not a directory"
    elif isinstance(e, UnknownFormatError):
        is_dir = where is not None and Path(str(where)).is_dir()
        msg += (
            "; give a checkpoint file inside it, or a sharded/DCP checkpoint directory"
            if is_dir
            else "; is it a checkpoint? safeckpt reads torch .pt/.pth/.bin/.ckpt, safetensors, sharded and DCP directories and .safeckpt"
        )
    elif isinstance(e, UnsafeCheckpointError):
        msg += "; run `safeckpt verify` on it to list every global it refers to"
    elif isinstance(e, CorruptCheckpointError) and e.hint is None:  # else the message says the fix already
        msg += "; the file is damaged: fetch or save it again"
    elif isinstance(e, ImportError):
        extra = {"huggingface_hub": "hub", "lightning": "lightning"}.get((e.name or "").split(".")[0])
        msg += f"; install it: pip install 'safeckpt[{extra}]'" if extra else "; install the missing package"
    elif not isinstance(e, (Usage, Found, CheckpointError, OSError, ValueError, TypeError, KeyError, RuntimeError)):
        msg = f"unexpected {type(e).__name__}: {msg}; re-run with --debug and report it"
    if where is not None and not _names_its_file(e):
        msg = f"{where}: {msg}"
    return msg


def _names_its_file(e: BaseException) -> bool:
    """Whether ``e``'s message already names the file: safeckpt's own errors about a file do (its
    rule: every CheckpointError, and the ValueError/TypeError/KeyError/RuntimeError it raises),
    an OSError names its ``filename`` (`_fix` spells it so); another library's error does not."""
    if isinstance(e, CheckpointError) or (isinstance(e, OSError) and e.filename is not None):
        return True
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    raiser = "" if tb is None else str(tb.tb_frame.f_globals.get("__name__", ""))
    return isinstance(e, (ValueError, TypeError, KeyError, RuntimeError)) and raiser.split(".")[0] == "safeckpt"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``safeckpt`` command; returns its exit code.

    Example:
        >>> main(["verify", "run.safeckpt", "--quiet"])
        0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    _JSON_ERRORS[0] = "--json" in argv
    verb = "safeckpt"
    try:  # Ctrl-C anywhere (the torch import included) is one line and 130, never a traceback
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help, --version, an argument error: the code, for callers in-process too
            return e.code if isinstance(e.code, int) else EXIT_USAGE
        if args.verb is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        verb = f"safeckpt {args.verb}"
        return _run(args)
    except KeyboardInterrupt:
        print(f"{verb}: interrupted", file=sys.stderr)
        return 130
    finally:
        _JSON_ERRORS[0] = False


def _run(args: argparse.Namespace) -> int:
    try:
        _import_torch_side()
        with codec.keep_unregistered():  # the command imports no user code: registered types stay data
            code = VERBS[args.verb].run(args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:
        if args.debug:
            traceback.print_exc()
        line = _fix(e)
        if getattr(args, "json", False):
            _print_error_json(*_error_fields(e, line))
        print(f"safeckpt {args.verb}: error: {line}", file=sys.stderr)
        return EXIT_FOUND if isinstance(e, Found) else EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
