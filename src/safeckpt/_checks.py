"""What ``safeckpt verify`` could check: per region of a checkpoint, ``ok``, ``failed`` or ``none``.

A format's own checks (``fmt.verify``) return problems; this module says which regions of the file
*had* a checksum to check at all, so a file without checksums is reported as unverified, not as ok.
Two regions: ``header`` (tensor names, dtypes, shapes, offsets, the skeleton or pickle) and
``data`` (the tensor bytes). Finding out reads headers only; the checksums themselves are
recomputed by the format's own checks, once.
"""

from __future__ import annotations

import contextlib
import mmap
from collections.abc import Iterable
from pathlib import Path

from .errors import CheckpointError

__all__ = ["REGIONS", "regions", "summary"]

REGIONS = ("header", "data")
OK, FAILED, NONE = "ok", "failed", "none"


def regions(fmt_name: str, path: Path, problems: list[str]) -> dict[str, str]:
    """Per region, ``ok``/``failed``/``none`` (no checksum stored) for the file at ``path`` of format
    ``fmt_name``, given the problems its format's checks found.

    Example:
        >>> regions("safetensors", Path("model.safetensors"), [])   # a file from another writer
        {'header': 'none', 'data': 'none'}
    """
    path = Path(path)
    try:
        if fmt_name in ("safeckpt", "safetensors"):
            return _safetensors_files([path], problems)
        if fmt_name in ("safeckpt-sharded", "hf-sharded"):
            root = path if path.is_dir() else path.parent
            files = sorted(root.glob("*.safetensors"))
            if not files:
                return dict.fromkeys(REGIONS, NONE)
            if fmt_name == "hf-sharded" and any(root.glob("*.bin")):
                return dict.fromkeys(REGIONS, NONE)  # pickle shards carry no checksum of their own
            return _safetensors_files(files, problems)
        if fmt_name == "torch":
            return _torch(path, problems)
    except (CheckpointError, OSError, ValueError):
        pass  # unreadable structure: nothing can be said to be verified
    # dcp (tensor bytes stored raw, the metadata a pickle): no checksums; a registered format says
    # which regions its own verify covers by checksum (`Format.checksummed`)
    from . import formats

    covered = formats.get(fmt_name).checksummed if fmt_name in formats.names() else frozenset()
    return {r: (FAILED if problems else OK) if r in covered else NONE for r in REGIONS}


def summary(found: dict[str, str], problems: Iterable[str]) -> str:
    """One word for the format checks: ``failed`` (a problem), ``ok`` (every region checked and
    matched), ``none`` (no region had a checksum) or ``partial`` (some had none).

    Example:
        >>> summary({"header": "ok", "data": "none"}, [])
        'partial'
    """
    if list(problems) or FAILED in found.values():
        return FAILED
    states = set(found.values())
    return OK if states == {OK} else NONE if states == {NONE} else "partial"


def _combine(states: list[str]) -> str:
    if FAILED in states:
        return FAILED
    return NONE if not states or NONE in states else OK


def _safetensors_files(files: list[Path], problems: list[str]) -> dict[str, str]:
    from .formats import _safetensors as st

    heads, datas = [], []
    for f in files:
        raw, size = st.read_raw_header(f)
        head = st.header_problems(f, raw)
        heads.append(NONE if head is None else FAILED if head else OK)
        try:
            header = st.parse_header(f, raw[8:], size)
            stored = st.checksums(header, "safeckpt.crc32") is not None
        except CheckpointError:
            stored = head is not None  # a damaged header: its tensors' checksums cannot be located
        datas.append(NONE if not stored else FAILED if head else OK)
    header_state = _combine(heads)
    data_state = _combine(datas)
    if data_state == OK and problems and header_state != FAILED:
        data_state = FAILED  # the header passed: what the format's checks found is in the tensors
    return {"header": header_state, "data": data_state}


def _torch(path: Path, problems: list[str]) -> dict[str, str]:
    from .formats import _zip

    with open(path, "rb") as f:
        head = f.read(4)
        if head != _zip.LOCAL:
            return dict.fromkeys(REGIONS, NONE)  # the legacy format: no checksums at all
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            archive = _zip.parse(data, source=str(path))
            records = dict(archive.records)
            del archive
            with contextlib.suppress(BufferError):
                data.close()

    def state(names: list[str]) -> str:
        if any(records[n].crc32 == 0 and records[n].size for n in names):
            return NONE  # torch may record 0: that record is not checked
        failed = any(f"record {n!r}" in p for n in names for p in problems)
        return FAILED if failed else OK

    pickle = [n for n in records if n == "data.pkl"]
    tensors = [n for n in records if n.startswith("data/")]
    return {"header": state(pickle), "data": state(tensors)}
