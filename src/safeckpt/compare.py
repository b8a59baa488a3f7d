"""Compare two checkpoints, across formats: tensors by bytes (or within a tolerance), values by type
and value.

Leaves are matched by path name (``model/l1.weight``), or by the same name with its keys joined by
``.`` (``model.l1.weight``), which is how a flat safetensors file names nested state: a nested
native checkpoint and the safetensors file written from it compare equal. Tensors are read one
pair at a time (memory-mapped where the format allows) and compared in chunks, so memory stays
bounded by one tensor.

Example:
    >>> d = compare(safeckpt.open("a.safeckpt"), safeckpt.open("b.pt"))
    >>> d.equal, d.only_a, [c.name for c in d.changed]
    (False, [], ['model/l1.weight'])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import _shapes, sparse
from .tree import Checkpoint, TensorRef, is_container, is_tensor, path_name

if TYPE_CHECKING:
    import torch

__all__ = ["Change", "Diff", "compare", "leaves", "match"]

_CHUNK = 1 << 22  # elements per comparison step: bounds the float64 temporaries to 32 MB


@dataclass(frozen=True)
class Change:
    """A leaf present on both sides that differs.

    Attributes:
        name: its path name.
        a, b: the two leaves (`TensorRef`, tensor, or plain value).
        max_abs: for two tensors of the same shape, the largest ``|a - b|`` (``nan`` where one side
            has a nan the other lacks; ``None`` when the dtypes cannot be subtracted).
        b_name: the leaf's name in ``b`` where it differs (``model.l1.weight`` for ``model/l1.weight``).
    """

    name: str
    a: Any
    b: Any
    max_abs: float | None = None
    b_name: str | None = None

    @property
    def kind(self) -> str:
        """``"tensor"`` (both tensors), ``"value"`` (both values), or ``"type"`` (one of each)."""
        ta, tb = _is_tensor(self.a), _is_tensor(self.b)
        return "tensor" if ta and tb else "value" if not (ta or tb) else "type"


@dataclass
class Diff:
    """What `compare` found: leaves only on one side, leaves that differ, and how many are equal."""

    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    changed: list[Change] = field(default_factory=list)
    same: int = 0

    @property
    def equal(self) -> bool:
        return not (self.only_a or self.only_b or self.changed)

    def summary(self, limit: int = 5) -> str:
        """The differences on one line, the first ``limit`` of each kind named."""

        def names(items: list[str]) -> str:
            return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")

        parts = []
        if self.only_a:
            parts.append(f"{len(self.only_a)} only in the first ({names(self.only_a)})")
        if self.only_b:
            parts.append(f"{len(self.only_b)} only in the second ({names(self.only_b)})")
        if self.changed:
            parts.append(f"{len(self.changed)} differ ({names([c.name for c in self.changed])})")
        return "; ".join(parts) or f"{self.same} leaves equal"


def leaves(tree: Any) -> dict[str, Any]:
    """Every leaf of a tree by path name. Empty containers count (a lost ``{}`` is a difference), and
    so does a list or tuple of scalars, as one value (``betas``, ``params``), as `inspect` shows them.

    Example:
        >>> leaves({"model": {"w": 1}, "state": {}, "betas": (0.9, 0.999)})
        {'model/w': 1, 'state': {}, 'betas': (0.9, 0.999)}
    """
    out: dict[str, Any] = {}
    stack: list[tuple[tuple[Any, ...], Any]] = [((), tree)]
    while stack:
        path, node = stack.pop()
        if is_container(node) and len(node) and (isinstance(node, dict) or not _scalars(node)):
            items = node.items() if isinstance(node, dict) else enumerate(node)
            stack.extend(((*path, k), v) for k, v in reversed(list(items)))
        elif path or not is_container(node):  # an empty root has no leaves
            name, i = path_name(path), 1
            while name in out:  # keys 0 and "0" share a path name: keep both, so neither hides
                name, i = f"{path_name(path)}~{i}", i + 1
            out[name] = node
    return out


def _scalars(seq: list[Any] | tuple[Any, ...]) -> bool:
    return all(not is_container(v) and not _is_tensor(v) for v in seq)


def match(la: dict[str, Any], lb: dict[str, Any]) -> list[tuple[str, str]]:
    """Pairs of leaf names (one from each side, in ``la``'s order): equal path names first, then,
    among the rest, names equal once keys are joined by ``.``, which is how flat safetensors files
    name nested state (``model/l1.weight`` in a ``.safeckpt`` is ``model.l1.weight`` there).

    Example:
        >>> match({"model/w": 1, "step": 2}, {"model.w": 1, "step": 2})
        [('model/w', 'model.w'), ('step', 'step')]
    """
    pairs = {n: n for n in la if n in lb}
    rest_a = _dotted([n for n in la if n not in lb])
    rest_b = _dotted([n for n in lb if n not in la])
    pairs.update({name: rest_b[d] for d, name in rest_a.items() if d in rest_b})
    return [(n, pairs[n]) for n in la if n in pairs]


def _dotted(names: list[str]) -> dict[str, str]:
    found: dict[str, list[str]] = {}
    for n in names:
        found.setdefault(n.replace("/", "."), []).append(n)
    return {d: ns[0] for d, ns in found.items() if len(ns) == 1}  # an ambiguous form matches nothing


def compare(
    a: Checkpoint | Any,
    b: Checkpoint | Any,
    *,
    atol: float = 0.0,
    rtol: float = 0.0,
    progress: Callable[[int], None] | None = None,
) -> Diff:
    """Compare two checkpoints (or trees) leaf by leaf, matched by path name (see `match`).

    Two tensors are equal when dtype and shape match and their bytes are identical, or, with
    ``atol``/``rtol`` set, when every element is within ``atol + rtol * |b|`` (nan equal to nan).
    Values are equal when their types and values are (nan equal to nan).

    Args:
        progress: called with each tensor pair's byte count (of ``a``'s tensor) once compared.

    Example:
        >>> compare(safeckpt.open("a.safeckpt"), safeckpt.open("a.safetensors")).equal
        True
    """
    la = leaves(a.tree if isinstance(a, Checkpoint) else a)
    lb = leaves(b.tree if isinstance(b, Checkpoint) else b)
    pairs = match(la, lb)
    paired_a, paired_b = {n for n, _ in pairs}, {n for _, n in pairs}
    out = Diff(only_a=[k for k in la if k not in paired_a], only_b=[k for k in lb if k not in paired_b])
    for name, other in pairs:
        x, y = la[name], lb[other]
        if _is_tensor(x) and _is_tensor(y):
            same, max_abs = _tensors_equal(x, y, atol, rtol)
            if progress is not None:
                progress(_nbytes(x))
        else:
            same, max_abs = (not _is_tensor(x) and not _is_tensor(y) and _values_equal(x, y)), None
        if same:
            out.same += 1
        else:
            out.changed.append(Change(name, x, y, max_abs, other if other != name else None))
    return out


def _is_tensor(x: Any) -> bool:
    return isinstance(x, TensorRef) or is_tensor(x)


def _nbytes(x: TensorRef | torch.Tensor) -> int:
    return x.nbytes if isinstance(x, TensorRef) else _shapes.nbytes(x.dtype, x.shape)


def _flat(x: TensorRef | torch.Tensor) -> torch.Tensor:
    t = (x.load() if isinstance(x, TensorRef) else x).detach()
    return t.cpu().resolve_conj().resolve_neg().reshape(-1)


def _tensors_equal(
    x: TensorRef | torch.Tensor, y: TensorRef | torch.Tensor, atol: float, rtol: float
) -> tuple[bool, float | None]:
    if tuple(x.shape) != tuple(y.shape):
        return False, None
    if sparse.is_sparse(x) or sparse.is_sparse(y):  # equal layouts, then each component as a tensor
        if not (sparse.is_sparse(x) and sparse.is_sparse(y)):
            return False, None
        (lx, _, cx, _), (ly, _, cy, _) = sparse.parts(x), sparse.parts(y)  # type: ignore[arg-type]
        if lx != ly:
            return False, None
        results = [_tensors_equal(p, q, atol, rtol) for p, q in zip(cx, cy, strict=True)]
        maxes = [m for _, m in results if m is not None]
        return all(ok for ok, _ in results), (max(maxes) if len(maxes) == len(results) else None)
    if _same_file_bytes(x, y):  # read from the maps, without torch
        return True, 0.0
    import torch

    a, b = _flat(x), _flat(y)
    same_bytes = a.dtype == b.dtype
    max_abs: float | None = 0.0
    close = True
    for i in range(0, a.numel(), _CHUNK):
        ca, cb = a[i : i + _CHUNK], b[i : i + _CHUNK]
        if same_bytes and not torch.equal(ca.contiguous().view(torch.uint8), cb.contiguous().view(torch.uint8)):
            same_bytes = False
        if not same_bytes and max_abs is not None:
            chunk_max, chunk_close = _difference(ca, cb, atol, rtol)
            if chunk_max is None or math.isnan(chunk_max):
                max_abs = chunk_max
            elif not math.isnan(max_abs):
                max_abs = max(max_abs, chunk_max)
            close = close and chunk_close
    if same_bytes:
        return True, 0.0
    tolerant = (atol > 0 or rtol > 0) and a.dtype == b.dtype and close and max_abs is not None
    return tolerant, max_abs


def _same_file_bytes(x: Any, y: Any) -> bool:
    """Whether two references of one dtype and shape have identical bytes where their files hold
    them (False: they differ, or it cannot be told without loading them)."""
    if not (isinstance(x, TensorRef) and isinstance(y, TensorRef) and x.span is not None and y.span is not None):
        return False
    if x.dtype_info is not y.dtype_info:
        return False
    n = x.nbytes
    if n == 0:
        return True
    ma, mb = x.span.file.map, y.span.file.map
    oa, ob = x.span.offset, y.span.offset
    if oa + n > len(ma) or ob + n > len(mb):
        return False
    step = _CHUNK * 8
    return all(ma[oa + i : oa + min(i + step, n)] == mb[ob + i : ob + min(i + step, n)] for i in range(0, n, step))


def _difference(a: torch.Tensor, b: torch.Tensor, atol: float, rtol: float) -> tuple[float | None, bool]:
    """Largest |a - b| over a chunk (nan if one side alone has a nan) and whether it is all close."""
    import torch

    wide = torch.complex128 if a.is_complex() or b.is_complex() else torch.float64
    try:
        da, db = a.to(wide), b.to(wide)
    except (RuntimeError, TypeError):
        return None, False  # e.g. float4 or bit-packed dtypes: only bytes can be compared
    both_nan = torch.isnan(da) & torch.isnan(db)
    d = torch.where((da == db) | both_nan, torch.zeros((), dtype=torch.float64), (da - db).abs().to(torch.float64))
    worst = float(d.max()) if d.numel() else 0.0
    if torch.isnan(d).any():
        worst = math.nan
    return worst, bool(torch.isclose(da, db, rtol=rtol, atol=atol, equal_nan=True).all())


def _values_equal(x: Any, y: Any) -> bool:
    if type(x) is not type(y):
        return False
    if type(x).__name__ == "ndarray" and type(x).__module__ == "numpy":
        return x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
    if isinstance(x, float) and math.isnan(x):
        return math.isnan(y)
    if isinstance(x, dict):
        return len(x) == 0 and len(y) == 0  # leaves() yields only empty dicts
    if type(x) in (list, tuple):
        return len(x) == len(y) and all(_values_equal(u, v) for u, v in zip(x, y, strict=True))
    try:
        return bool(x == y)
    except Exception:  # a value whose == does not give a bool: fall back to its text
        return repr(x) == repr(y)
