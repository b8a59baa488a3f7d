"""Putting a checkpoint's tensors on a device: ``device=`` arguments, and the CUDA staging path.

Tensors for a CUDA device are not copied one by one from pageable memory (each such copy is
staged by the driver through a small bounce buffer, synchronously). Instead the bytes are read
from the file straight into one of two pinned host buffers while the other one's host-to-device
copy runs on a side stream (double buffering): reading the file and the copy over PCIe overlap,
and each buffer is filled by a few threads (``preadv`` and ``memcpy`` release the GIL).

`plan` (which bytes go in which buffer fill) is pure and is tested on the CPU; `stage` runs the
same pipeline with a CPU destination when no GPU is there, so its reading is tested too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

import torch

from .errors import CorruptCheckpointError

if TYPE_CHECKING:  # the tree imports this module to load its tensors: at run time, no import back
    from .tree import TensorRef

DeviceLike = str | torch.device | int

# Each pinned buffer: large enough that a fill's fixed costs (an event wait, a copy launch: tens of
# microseconds) vanish, small enough that pinning two is cheap in a fresh process (pinning costs
# about a millisecond per few MB; torch's host allocator then caches them between loads).
BUFFER = 32 << 20
# A fill is read by several threads in pieces of at most this much.
READ_PIECE = 4 << 20
# Below this many bytes in all, a plain copy is as fast as setting up the staging.
SMALL = 1 << 20


def as_device(device: Any, what: str = "device") -> torch.device | None:
    """``device`` as a ``torch.device`` (None stays None); a clear error for anything else.

    Example:
        >>> as_device("meta"), as_device(None)
        (device(type='meta'), None)
    """
    if device is None:
        return None
    if isinstance(device, (str, int)) and not isinstance(device, bool):
        try:
            device = torch.device(device)
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"{what}={device!r} is not a device: {e}") from None
    if not isinstance(device, torch.device):
        raise TypeError(
            f"{what} must be a str or torch.device (e.g. 'cpu', 'cuda:0', 'meta'), got {type(device).__name__}"
        )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"{what}={str(device)!r}, but torch.cuda.is_available() is False here "
            f"(torch {torch.__version__}{', a CPU-only build' if torch.version.cuda is None else ''}); load to 'cpu'"
        )
    return device


def merge_map_location(device: Any, map_location: Any) -> torch.device | None:
    """``device=`` and its alias ``map_location=`` (what ``torch.load`` users type) as one device.

    Only a device or a string is accepted as ``map_location``: torch's dicts and functions remap
    storages by their saved location, which a safe checkpoint does not record.
    """
    dev = as_device(device)
    if map_location is None:
        return dev
    if isinstance(map_location, Mapping) or callable(map_location):
        raise TypeError(
            "map_location= takes a device or a string here (e.g. 'cuda:0'); every tensor is read as saved, so a "
            "dict or function of saved locations has nothing to map: pass device= instead"
        )
    loc = as_device(map_location, "map_location")
    if dev is not None and dev != loc:
        raise ValueError(f"device={dev} and map_location={loc} disagree; pass one of them")
    return loc


def is_cpu(device: torch.device | None) -> bool:
    return device is None or device.type == "cpu"


# -- planning ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """``length`` bytes of tensor ``index`` from its byte ``offset``, at ``at`` in a buffer."""

    index: int
    offset: int
    length: int
    at: int


def plan(sizes: Sequence[int], buffer: int) -> list[list[Piece]]:
    """Cut tensors of ``sizes`` bytes into buffer fills: small tensors share a fill, a large one
    spans several; every byte is in exactly one piece, in order. Empty tensors get no piece.

    Example:
        >>> [[(p.index, p.offset, p.length, p.at) for p in fill] for fill in plan([3, 10, 2], 8)]
        [[(0, 0, 3, 0), (1, 0, 5, 3)], [(1, 5, 5, 0), (2, 0, 2, 5)]]
    """
    if buffer <= 0:
        raise ValueError(f"buffer must be positive, got {buffer}")
    fills: list[list[Piece]] = []
    fill: list[Piece] = []
    used = 0
    for i, size in enumerate(sizes):
        done = 0
        while done < size:
            n = min(size - done, buffer - used)
            fill.append(Piece(i, done, n, used))
            used, done = used + n, done + n
            if used == buffer:
                fills.append(fill)
                fill, used = [], 0
    if fill:
        fills.append(fill)
    return fills


def split_reads(fill: Sequence[Piece], piece: int) -> list[Piece]:
    """A fill's pieces cut further into reads of at most ``piece`` bytes, for several threads.

    Example:
        >>> [(p.offset, p.length, p.at) for p in split_reads([Piece(0, 0, 10, 0)], 4)]
        [(0, 4, 0), (4, 4, 4), (8, 2, 8)]
    """
    out = []
    for p in fill:
        for start in range(0, p.length, piece):
            n = min(piece, p.length - start)
            out.append(Piece(p.index, p.offset + start, n, p.at + start))
    return out


# -- reading into a buffer ------------------------------------------------------------------------


class _Source:
    """Where one tensor's bytes come from: a span of the file (read with ``preadv`` through the
    descriptor `stage` opened once for that file), else the tensor as the format loads it (a map
    of the file, or a tensor the reader built)."""

    def __init__(self, ref: TensorRef | torch.Tensor, files: dict[int, BinaryIO]) -> None:
        self.ref = ref
        self.fd: int | None = None
        self.bytes: torch.Tensor | None = None
        span = None if isinstance(ref, torch.Tensor) else ref.span
        if span is not None and span.file.local and ref.dtype not in (torch.complex32, torch.complex128):
            key = id(span.file)
            if key not in files:  # one open (and one identity check) per file, not per tensor
                files[key] = span.file.open()
            self.fd, self.base = files[key].fileno(), span.offset
        else:
            t = ref if isinstance(ref, torch.Tensor) else ref.loader()
            if not isinstance(ref, torch.Tensor) and (t.dtype != ref.dtype or tuple(t.shape) != ref.shape):
                t = ref.load()  # raises the damaged-file error
            self.bytes = _flat_bytes(t.detach().cpu())

    def read(self, view: memoryview, buf: torch.Tensor, p: Piece) -> None:
        if self.fd is None:
            assert self.bytes is not None
            buf[p.at : p.at + p.length].copy_(self.bytes[p.offset : p.offset + p.length])
            return
        done = 0
        while done < p.length:
            n = os.preadv(self.fd, [view[p.at + done : p.at + p.length]], self.base + p.offset + done)
            if n <= 0:
                name = "?" if isinstance(self.ref, torch.Tensor) else self.ref.name
                raise CorruptCheckpointError(f"{getattr(self.ref, 'source', '?')}: ends inside tensor {name!r}")
            done += n


def _flat_bytes(t: torch.Tensor) -> torch.Tensor:
    t = t.resolve_conj().resolve_neg().contiguous()
    if t.numel() == 0:
        return torch.empty(0, dtype=torch.uint8)
    return t.reshape(-1).view(torch.uint8)


# -- the pipeline ------------------------------------------------------------------------------


def stage(
    pairs: Sequence[tuple[TensorRef | torch.Tensor, torch.Tensor]],
    *,
    buffer: int = BUFFER,
    threads: int | None = None,
    _sync: Copier | None = None,
) -> None:
    """Copy each source's bytes into its destination tensor (contiguous, same dtype and shape),
    through two staging buffers: pinned, with copies on a side stream, when the destinations are
    on a CUDA device; plain memory otherwise (the same code path, for testing on a CPU).

    Example:
        >>> dst = torch.empty(ref.shape, dtype=ref.dtype, device="cuda")
        >>> stage([(ref, dst)])
    """
    if not pairs:
        return
    device = pairs[0][1].device
    for src, dst in pairs:
        if (
            dst.device != device
            or not dst.is_contiguous()
            or dst.dtype != src.dtype
            or tuple(dst.shape) != tuple(src.shape)
        ):
            raise ValueError(f"stage: destination for {getattr(src, 'name', '?')} is not a matching contiguous tensor")
    sizes = [dst.numel() * dst.element_size() for _, dst in pairs]
    total = sum(sizes)
    sync = _sync or (CudaCopier(device) if device.type == "cuda" else Copier())
    size = max(1, min(buffer, total))
    fills = plan(sizes, size)
    workers = threads or min(8, os.cpu_count() or 1)
    pool = ThreadPoolExecutor(workers) if workers > 1 and total > READ_PIECE else None

    def new_buffer() -> torch.Tensor:
        return torch.empty(size, dtype=torch.uint8, pin_memory=sync.pinned)

    # Pinning costs about 0.5 ms per MiB the first time in a process: the second buffer is pinned
    # by a worker while the first fill is read, and only if there is a second fill.
    buffers: list[Any] = [new_buffer(), None]
    if len(fills) > 1:
        buffers[1] = pool.submit(new_buffer) if pool is not None else new_buffer()
    views: list[memoryview | None] = [memoryview(buffers[0].numpy()), None]
    dsts = [_flat_bytes_view(dst) for _, dst in pairs]
    sources: dict[int, _Source] = {}
    files: dict[int, BinaryIO] = {}
    try:
        sync.start()
        for n, fill in enumerate(fills):
            b = n % 2
            if isinstance(buffers[b], Future):
                buffers[b] = buffers[b].result()
            view = views[b] = views[b] or memoryview(buffers[b].numpy())
            sync.wait(b)  # this buffer's previous copy is done: it may be overwritten
            for p in fill:
                if p.index not in sources:
                    sources[p.index] = _Source(pairs[p.index][0], files)
            reads = split_reads(fill, READ_PIECE)
            read = lambda p, b=b, view=view: sources[p.index].read(view, buffers[b], p)  # noqa: E731
            if pool is not None and len(reads) > 1:
                list(pool.map(read, reads))
            else:
                for p in reads:
                    read(p)
            sync.copy(
                b, [(dsts[p.index][p.offset : p.offset + p.length], buffers[b][p.at : p.at + p.length]) for p in fill]
            )
    finally:
        sync.finish()  # also after an error: no copy may still read a buffer once it is freed
        if pool is not None:
            pool.shutdown()
        for f in files.values():
            f.close()


def _flat_bytes_view(dst: torch.Tensor) -> torch.Tensor:
    if dst.numel() == 0:
        return torch.empty(0, dtype=torch.uint8, device=dst.device)
    return dst.detach().reshape(-1).view(torch.uint8)


class Copier:
    """How a filled buffer reaches the destinations: here at once (CPU destinations)."""

    pinned = False

    def start(self) -> None:
        """Before the first copy."""

    def copy(self, buffer: int, pieces: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy each ``(destination, source)`` slice; ``buffer`` (0 or 1) is the staging buffer read."""
        with torch.no_grad():
            for dst, src in pieces:
                dst.copy_(src)

    def wait(self, buffer: int) -> None:
        """Return once every copy out of ``buffer`` is done."""

    def finish(self) -> None:
        """Return once every copy is done and visible to the caller's stream."""


class CudaCopier(Copier):
    """Copies queued on a side stream from pinned memory, returning at once; an event per buffer
    says when its copies are done, so the reader waits only for the buffer it refills."""

    pinned = True

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.events: list[Any] = [None, None]

    def start(self) -> None:
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the destinations are allocated

    def copy(self, buffer: int, pieces: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        with torch.cuda.stream(self.stream), torch.no_grad():
            for dst, src in pieces:
                dst.copy_(src, non_blocking=True)
        event = torch.cuda.Event()
        event.record(self.stream)
        self.events[buffer] = event

    def wait(self, buffer: int) -> None:
        if self.events[buffer] is not None:
            self.events[buffer].synchronize()

    def finish(self) -> None:
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        self.stream.synchronize()


# -- loading refs onto a device --------------------------------------------------------------------


def load_many(refs: Sequence[TensorRef], device: torch.device | None) -> list[torch.Tensor]:
    """``[ref.load(device) for ref in refs]``, with the CUDA ones staged together.

    Tensors come back as plain tensors (``requires_grad`` and ``Parameter`` are the caller's).
    """
    if device is None or device.type != "cuda" or sum(r.nbytes for r in refs) < SMALL:
        return [data(r, device) for r in refs]
    out: list[torch.Tensor] = []
    pairs: list[tuple[TensorRef | torch.Tensor, torch.Tensor]] = []
    for r in refs:
        src: TensorRef | torch.Tensor = r if r.span is not None else checked(r)  # a map of the file, for most
        if isinstance(src, torch.Tensor) and src.layout != torch.strided:
            out.append(src.to(device))  # sparse and other layouts: torch's own copy keeps the layout
            continue
        out.append(torch.empty(r.shape, dtype=r.dtype, device=device))
        pairs.append((src, out[-1]))
    stage(pairs)
    return out


def data(ref: TensorRef, device: torch.device | None) -> torch.Tensor:
    """One tensor's data on ``device`` (None: where the format reads it, the CPU, mapped)."""
    if device is not None and device.type == "meta":
        return torch.empty(ref.shape, dtype=ref.dtype, device="meta")
    if device is not None and device.type == "cuda" and ref.nbytes >= SMALL:
        return load_many([ref], device)[0]
    t = checked(ref)
    return t if device is None or device.type == "cpu" else t.to(device)


def checked(ref: TensorRef) -> torch.Tensor:
    """The tensor as the format reads it, checked to be what the header declared."""
    t = ref.loader()
    if t.dtype != ref.dtype or tuple(t.shape) != ref.shape:
        raise CorruptCheckpointError(
            f"{ref.source}: tensor {ref.name!r} declared {ref.dtype} {list(ref.shape)} "
            f"but reads as {t.dtype} {list(t.shape)}; the file is damaged",
            path=ref.source,
            key=ref.name,
            hint="the file is damaged",
        )
    return t.detach()


def read_into(pairs: Sequence[tuple[TensorRef, torch.Tensor]]) -> list[tuple[TensorRef, torch.Tensor]]:
    """Stage each ref straight into its CUDA target where it can go as it is; return the pairs
    that cannot (non-contiguous targets, another dtype or shape), for the caller to copy."""
    direct: list[tuple[TensorRef, torch.Tensor]] = []
    rest: list[tuple[TensorRef, torch.Tensor]] = []
    for ref, t in pairs:
        ok = t.device.type == "cuda" and t.is_contiguous() and t.dtype == ref.dtype and tuple(t.shape) == ref.shape
        (direct if ok else rest).append((ref, t))
    with torch.no_grad():
        stage(direct)
    return rest


def wrap(ref: TensorRef, t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``ref`` says it was saved: a ``Parameter``, or requiring grad."""
    if ref.parameter:
        return torch.nn.Parameter(t, requires_grad=ref.requires_grad)
    return t.requires_grad_() if ref.requires_grad and (t.is_floating_point() or t.is_complex()) else t
