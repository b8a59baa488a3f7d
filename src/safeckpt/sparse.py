"""Sparse tensors (COO, CSR, CSC, BSR, BSC) as their dense components.

A sparse tensor is stored and read as its layout, its size and its dense component tensors
(COO: ``indices``, ``values``; CSR/BSR: ``crow_indices``, ``col_indices``, ``values``; CSC/BSC:
``ccol_indices``, ``row_indices``, ``values``), plus COO's coalesced flag. Rebuilding always runs
torch's invariant checks (indices in bounds, compressed indices monotone), so a hostile file
cannot make a tensor that reads outside its memory. Spec: ``formats/safeckpt.md`` (ext code 19)
and ``formats/torch.md`` (``_rebuild_sparse_tensor``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import CorruptCheckpointError
from .tree import TensorRef, is_tensor

if TYPE_CHECKING:
    import torch

COMPONENTS: dict[str, tuple[str, ...]] = {
    "sparse_coo": ("indices", "values"),
    "sparse_csr": ("crow_indices", "col_indices", "values"),
    "sparse_bsr": ("crow_indices", "col_indices", "values"),
    "sparse_csc": ("ccol_indices", "row_indices", "values"),
    "sparse_bsc": ("ccol_indices", "row_indices", "values"),
}
MAX_DIMS = 64


def __getattr__(name: str) -> Any:
    """``LAYOUTS`` (layout name -> ``torch.layout``), built when first asked for: it imports torch."""
    if name != "LAYOUTS":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import torch

    value = {layout: getattr(torch, layout) for layout in COMPONENTS}
    globals()[name] = value
    return value


def layout_name(layout: torch.layout) -> str:
    return str(layout).removeprefix("torch.")


def is_sparse(x: Any) -> bool:
    """A sparse torch tensor or a `SparseTensorRef`."""
    return isinstance(x, SparseTensorRef) or (is_tensor(x) and str(x.layout) != "torch.strided")


def parts(x: torch.Tensor | SparseTensorRef) -> tuple[str, tuple[int, ...], tuple[Any, ...], bool | None]:
    """``(layout, size, components, coalesced)`` of a sparse tensor or reference; components are
    dense tensors (or `TensorRef` s) in `COMPONENTS` order.

    Example:
        >>> parts(torch.eye(2).to_sparse())[0]
        'sparse_coo'
    """
    if isinstance(x, SparseTensorRef):
        return x.layout, x.shape, x.components, x.coalesced
    name = layout_name(x.layout)
    if name not in COMPONENTS:
        raise TypeError(f"a {x.layout} tensor cannot be stored; save x.to_dense() instead")
    if name == "sparse_coo":
        return name, tuple(x.shape), (x._indices(), x._values()), x.is_coalesced()
    if name in ("sparse_csr", "sparse_bsr"):
        return name, tuple(x.shape), (x.crow_indices(), x.col_indices(), x.values()), None
    return name, tuple(x.shape), (x.ccol_indices(), x.row_indices(), x.values()), None


def build(layout: str, size: Sequence[int], components: Sequence[torch.Tensor], coalesced: bool | None) -> torch.Tensor:
    """The sparse tensor of ``components``, checked by torch's invariant checks first.

    Example:
        >>> build("sparse_coo", (2, 2), (torch.tensor([[0], [1]]), torch.tensor([3.0])), True)
    """
    import torch

    size = _size(size)
    try:
        if layout == "sparse_coo":
            indices, values = components
            t = torch.sparse_coo_tensor(indices, values, size, check_invariants=True)
            return t.coalesce() if coalesced else t
        compressed, plain, values = components
        return torch.sparse_compressed_tensor(
            compressed, plain, values, size, layout=getattr(torch, layout), check_invariants=True
        )
    except (RuntimeError, ValueError, TypeError) as e:
        raise CorruptCheckpointError(f"an invalid {layout} tensor: {str(e).splitlines()[0][:200]}") from None


def _size(size: Any) -> tuple[int, ...]:
    if (
        not isinstance(size, (tuple, list))  # torch.Size is a tuple
        or len(size) > MAX_DIMS
        or not all(type(d) is int and d >= 0 for d in size)
    ):
        raise CorruptCheckpointError(
            f"a sparse tensor's size must be up to {MAX_DIMS} non-negative ints, got {size!r:.80}"
        )
    return tuple(size)


def check(layout: Any, size: Any, components: Sequence[Any], coalesced: Any) -> tuple[str, tuple[int, ...]]:
    """Validate the parts as read from a file (before anything is built)."""
    if not isinstance(layout, str) or layout not in COMPONENTS:
        raise CorruptCheckpointError(f"unknown sparse layout {layout!r:.40}")
    if len(components) != len(COMPONENTS[layout]):
        raise CorruptCheckpointError(
            f"a {layout} tensor has {len(COMPONENTS[layout])} components, found {len(components)}"
        )
    if coalesced is not None and type(coalesced) is not bool:
        raise CorruptCheckpointError("a sparse tensor's coalesced flag must be a bool or nil")
    return layout, _size(size)


@dataclass(frozen=True, eq=False)
class SparseTensorRef(TensorRef):
    """A sparse tensor in a checkpoint: its layout, size and lazy dense components.

    ``dtype`` is the values' dtype, ``shape`` the sparse size; `load` builds the tensor (invariants
    checked). Writers store the components, never a densified copy.

    Example:
        >>> ref = safeckpt.open("sparse.pt").tensors()["adj"]
        >>> ref.layout, [c.shape for c in ref.components]
        ('sparse_coo', [(2, 3), (3,)])
    """

    layout: str = "sparse_coo"
    components: tuple[TensorRef, ...] = field(default=(), repr=False)
    coalesced: bool | None = None

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.components)

    @property
    def numel(self) -> int:
        return sum(c.numel for c in self.components)


def sparse_ref(
    name: str, source: str, layout: str, size: tuple[int, ...], comps: Sequence[TensorRef], coalesced: bool | None
) -> SparseTensorRef:
    """A lazy sparse tensor over component references (validated with `check` first)."""
    comps = tuple(comps)
    if not all(isinstance(c, TensorRef) for c in comps):
        raise CorruptCheckpointError(f"{source}: {name}: a sparse tensor's components must be tensors")
    values = comps[-1]

    def load() -> torch.Tensor:
        try:
            return build(layout, size, [c.load().detach() for c in comps], coalesced)
        except CorruptCheckpointError as e:
            raise CorruptCheckpointError(f"{source}: {name}: {e}") from None

    return SparseTensorRef(
        name,
        values.dtype_info,  # type: ignore[arg-type]  # a torch-free row, resolved when .dtype is read
        size,
        source,
        load,
        layout=layout,
        components=comps,
        coalesced=coalesced,
    )
