"""Crafted DCP directories (threats doc §4.5 row 18): each is refused with `UnsafeCheckpointError` or
`CorruptCheckpointError` naming the file and the cause, and no payload ever runs.

The bad ``.metadata`` files are made the way torch makes good ones: torch's own dataclasses,
read from a trusted fixture, edited, and pickled."""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, MetadataIndex

import safeckpt
from safeckpt.errors import CheckpointError, CorruptCheckpointError, UnknownFormatError, UnsafeCheckpointError

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "dcp"
CANARY_ENV = "SAFECKPT_CANARY"


class Touch:
    """Pickles as ``posix.system('touch "$SAFECKPT_CANARY"')``: harmless, and visible if it runs."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f'touch "${CANARY_ENV}"',))


@pytest.fixture
def canary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "canary"
    monkeypatch.setenv(CANARY_ENV, str(path))
    return path


def copy(tmp_path: Path, name: str = "fsdp2") -> tuple[Path, Metadata]:
    path = shutil.copytree(FIXTURES / name, tmp_path / "ckpt")
    return path, FileSystemReader(path).read_metadata()  # our own trusted fixture: torch's dataclasses


def write(path: Path, md: Any) -> Path:
    (path / ".metadata").write_bytes(pickle.dumps(md))
    return path


def read_all(path: Path) -> Any:
    return safeckpt.open(path).to_python()


def entry(md: Metadata, fqn: str, offset: tuple[int, ...] | None = None) -> MetadataIndex:
    return next(k for k in md.storage_data if k.fqn == fqn and (offset is None or tuple(k.offset) == offset))


def torch_runs(code: str, env_canary: Path) -> None:
    """Control: torch's own reader on the same bytes does run the payload (so the canary is live)."""
    env = {**os.environ, CANARY_ENV: str(env_canary)}
    subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=120, check=False)
    assert env_canary.exists(), "the control run did not trigger the payload: the test would prove nothing"


# -- code execution: nothing runs ------------------------------------------------------------------


def test_metadata_payload_never_runs(tmp_path: Path, canary: Path) -> None:
    path, md = copy(tmp_path)
    md.version = Touch()  # type: ignore[assignment]
    write(path, md)
    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata.*'posix\.system'"):
        safeckpt.open(path)
    assert not canary.exists()
    torch_runs(
        f"from torch.distributed.checkpoint import FileSystemReader; FileSystemReader({str(path)!r}).read_metadata()",
        tmp_path / "control",
    )


def test_value_payload_never_runs(tmp_path: Path, canary: Path) -> None:
    path = tmp_path / "ckpt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.ones(2), "step": Touch()}, checkpoint_id=path)  # pickling runs nothing
    assert not canary.exists()
    with pytest.raises(UnsafeCheckpointError, match=r"__0_0\.distcp.*'posix\.system'"):
        safeckpt.open(path)
    assert not canary.exists()
    torch_runs(
        "from torch.distributed.checkpoint.format_utils import dcp_to_torch_save; "
        f"dcp_to_torch_save({str(path)!r}, {str(tmp_path / 'out.pt')!r})",
        tmp_path / "control",
    )


def test_meta_pt_payload_never_runs(tmp_path: Path, canary: Path) -> None:
    path, _ = copy(tmp_path, "fabric_fsdp")
    torch.save({"step": 1, "evil": Touch()}, path / "meta.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"meta\.pt.*'posix\.system'"):
        safeckpt.open(path)
    assert not canary.exists()


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(getattr, id="builtins.getattr"),
        pytest.param(__import__("collections").OrderedDict(a=1), id="OrderedDict"),
        pytest.param(__import__("argparse").Namespace(a=1), id="Namespace"),
        pytest.param(__import__("numpy").zeros(2), id="numpy"),
        pytest.param(torch.nn.Linear, id="torch.nn.Linear"),
    ],
)
def test_metadata_global_outside_the_dcp_table(tmp_path: Path, value: Any) -> None:
    # even names the torch reader admits elsewhere have no business in .metadata
    path, md = copy(tmp_path)
    md.planner_data["step"] = value
    write(path, md)
    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata: the DCP metadata refers to"):
        safeckpt.open(path)


def test_allow_never_reaches_metadata(tmp_path: Path) -> None:
    path, md = copy(tmp_path)
    md.version = __import__("argparse").Namespace(a=1)  # type: ignore[assignment]
    write(path, md)
    with pytest.raises(UnsafeCheckpointError):
        safeckpt.open(path, allow=["argparse.Namespace"])


# -- where the bytes are ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["parent", "absolute", "subdir", "dotdot", "metadata", "empty", "backslash"])
def test_relative_path_must_be_a_file_in_the_directory(tmp_path: Path, kind: str) -> None:
    path, md = copy(tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(path / "__0_0.distcp", outside / "__0_0.distcp")  # a real copy: only the check stops it
    (path / "sub").mkdir()
    shutil.copy(path / "__0_0.distcp", path / "sub" / "__0_0.distcp")
    bad = {
        "parent": "../elsewhere/__0_0.distcp",
        "absolute": str(outside / "__0_0.distcp"),
        "subdir": "sub/__0_0.distcp",
        "dotdot": "..",
        "metadata": ".metadata",
        "empty": "",
        "backslash": "..\\elsewhere\\__0_0.distcp",
    }[kind]
    for k, v in md.storage_data.items():
        if v.relative_path == "__0_0.distcp":
            md.storage_data[k] = _StorageInfo(bad, v.offset, v.length)
    write(path, md)
    with pytest.raises(CorruptCheckpointError, match=r"\.metadata: .*not a file name inside the checkpoint directory"):
        safeckpt.open(path)


def test_symlink_out_of_the_directory(tmp_path: Path) -> None:
    path, _ = copy(tmp_path)
    outside = tmp_path / "elsewhere.distcp"
    shutil.move(path / "__1_0.distcp", outside)
    (path / "__1_0.distcp").symlink_to(outside)
    with pytest.raises(CorruptCheckpointError, match=r"'__1_0\.distcp', which is missing or not a regular file"):
        safeckpt.open(path)


def test_missing_data_file(tmp_path: Path) -> None:
    path, _ = copy(tmp_path)
    (path / "__1_0.distcp").unlink()
    with pytest.raises(CorruptCheckpointError, match=r"__1_0\.distcp.*missing"):
        safeckpt.open(path)


def test_offset_plus_length_past_eof(tmp_path: Path) -> None:
    path, md = copy(tmp_path)
    k = entry(md, "model.0.weight", (3, 0))
    v = md.storage_data[k]
    size = (path / v.relative_path).stat().st_size
    md.storage_data[k] = _StorageInfo(v.relative_path, v.offset, size - v.offset + 1)
    write(path, md)
    with pytest.raises(CorruptCheckpointError, match=r"'model\.0\.weight'.*past the end of __1_0\.distcp"):
        safeckpt.open(path)


def test_truncated_data_file(tmp_path: Path) -> None:
    path, _ = copy(tmp_path)
    data = (path / "__0_0.distcp").read_bytes()
    (path / "__0_0.distcp").write_bytes(data[: len(data) - 100])
    with pytest.raises(CorruptCheckpointError, match=r"past the end of __0_0\.distcp.*truncated"):
        safeckpt.open(path)


@pytest.mark.parametrize("how", ["longer", "shifted"])
def test_overlapping_segments(tmp_path: Path, how: str) -> None:
    path, md = copy(tmp_path)
    a, b = entry(md, "model.0.weight", (0, 0)), entry(md, "model.0.bias", (0,))
    va, vb = md.storage_data[a], md.storage_data[b]
    assert va.relative_path == vb.relative_path and va.offset + va.length == vb.offset
    if how == "longer":  # a's bytes run into b's archive
        md.storage_data[a] = _StorageInfo(va.relative_path, va.offset, va.length + 100)
        cause = r"the bytes of 'model\.0\.weight' and 'model\.0\.bias' overlap in __0_0\.distcp"
    else:  # b starts inside a's archive
        md.storage_data[b] = _StorageInfo(vb.relative_path, va.offset + va.length - 8, vb.length)
        cause = r"(overlap|starts neither a torch.save archive nor a safetensors blob)"
    write(path, md)
    with pytest.raises(CorruptCheckpointError, match=cause):
        safeckpt.open(path)


def test_two_values_claim_one_segment(tmp_path: Path) -> None:
    path, md = copy(tmp_path)
    a, b = entry(md, "model.0.weight", (0, 0)), entry(md, "model.0.bias", (0,))
    md.storage_data[b] = md.storage_data[a]
    write(path, md)
    with pytest.raises(CorruptCheckpointError, match=r"claim the same bytes"):
        safeckpt.open(path)


def test_stream_transforms_refused(tmp_path: Path) -> None:
    path, md = copy(tmp_path)
    k = entry(md, "model.0.weight", (0, 0))
    v = md.storage_data[k]
    md.storage_data[k] = _StorageInfo(v.relative_path, v.offset, v.length, transform_descriptors=["zstd"])
    write(path, md)
    with pytest.raises(CorruptCheckpointError, match=r"stream transforms \['zstd'\]"):
        safeckpt.open(path)


# -- chunks ----------------------------------------------------------------------------------------


def edit_chunks(
    md: Metadata,
    fqn: str,
    chunks: list[tuple[tuple[int, ...], tuple[int, ...]]],
    rekey: dict[tuple[int, ...], tuple[int, ...]] | None = None,
) -> None:
    item = md.state_dict_metadata[fqn]
    item.chunks = [ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in chunks]  # type: ignore[union-attr]
    for old, new in (rekey or {}).items():
        k = entry(md, fqn, old)
        md.storage_data[MetadataIndex(fqn, new)] = md.storage_data.pop(k)


@pytest.mark.parametrize(
    "chunks, rekey, cause",
    [
        pytest.param([((0, 0), (3, 4)), ((3, 0), (4, 4))], None, "outside it", id="size-past-the-end"),
        pytest.param([((0, 0), (3, 4)), ((3, 1), (3, 4))], {(3, 0): (3, 1)}, "outside it", id="offset-past-the-end"),
        pytest.param([((0, 0), (3, 4)), ((3, 0), (3, 4, 1))], None, "differ in rank", id="rank-mismatch"),
        pytest.param([((0, 0), (3, 4))], None, "cover 12 elements of its 24", id="gap"),
        pytest.param([((0, 0), (3, 4)), ((3, 0), (3, 4)), ((3, 0), (3, 4))], None, "do not tile", id="duplicate"),
        pytest.param([((0, 0), (3, 4)), ((2, 0), (3, 4))], {(3, 0): (2, 0)}, "overlap", id="overlap-same-volume"),
        pytest.param([((0, 0), (3, 4)), ((4, 0), (2, 4))], {(3, 0): (4, 0)}, "do not tile", id="gap-and-short"),
    ],
)
def test_chunks_must_tile_the_tensor(tmp_path: Path, chunks: Any, rekey: Any, cause: str) -> None:
    path, md = copy(tmp_path)
    edit_chunks(md, "model.0.weight", chunks, rekey)
    write(path, md)
    with pytest.raises(CorruptCheckpointError, match=rf"\.metadata: .*{cause}"):
        read_all(path)


def test_one_chunk_shared_many_times(tmp_path: Path) -> None:
    # the memo makes each extra reference cost 2 bytes: refused in time linear in the references
    path, md = copy(tmp_path)
    item = md.state_dict_metadata["model.0.weight"]
    item.chunks = [item.chunks[0]] * 100_000  # type: ignore[union-attr]
    write(path, md)
    assert (path / ".metadata").stat().st_size < 1 << 20
    with pytest.raises(CorruptCheckpointError, match=r"cover 1200000 elements of its 24"):
        safeckpt.open(path)


def test_absurd_size_backed_by_a_few_bytes(tmp_path: Path) -> None:
    path, md = copy(tmp_path)
    item = md.state_dict_metadata["model.0.bias"]
    item.size = torch.Size([3 << 40])  # type: ignore[union-attr]
    edit_chunks(md, "model.0.bias", [((0,), (3 << 40,))], {(0,): (0,)})
    write(path, md)
    rss = psutil.Process().memory_info().rss
    with pytest.raises(CorruptCheckpointError, match=r"needs 13194139533312 bytes, its storage entry has"):
        read_all(path)
    assert psutil.Process().memory_info().rss - rss < 64 << 20


def test_chunk_that_disagrees_with_its_archive(tmp_path: Path) -> None:
    path, md = copy(tmp_path)
    item = md.state_dict_metadata["model.0.weight"]
    item.size = torch.Size([6, 3])  # type: ignore[union-attr]
    edit_chunks(md, "model.0.weight", [((0, 0), (3, 3)), ((3, 0), (3, 3))])
    write(path, md)
    ckpt = safeckpt.open(path)  # consistent metadata: found when the bytes are read
    with pytest.raises(
        CorruptCheckpointError,
        match=r"__0_0\.distcp .*torch.float32 \[3, 4\] where chunk \[0, 0\] of tensor 'model\.0\.weight'",
    ):
        ckpt.tensors()["model/0.weight"].load()


def test_safetensors_entry_that_disagrees(tmp_path: Path) -> None:
    path, md = copy(tmp_path, "safetensors")
    item = md.state_dict_metadata["model.weight"]
    item.size = torch.Size([4, 3])  # type: ignore[union-attr]
    edit_chunks(md, "model.weight", [((0, 0), (4, 3))])
    write(path, md)
    with pytest.raises(CorruptCheckpointError, match=r"safetensors entry 'model\.weight' \(F32 \[3, 4\]"):
        read_all(path)


# -- the tree --------------------------------------------------------------------------------------


def test_planner_path_through_a_value(tmp_path: Path) -> None:
    path, md = copy(tmp_path)
    md.planner_data["step"] = ("model", "0.weight", "x")
    write(path, md)
    with pytest.raises(
        CorruptCheckpointError, match=r"\.metadata: 'step': planner path .* (runs through|already taken)"
    ):
        safeckpt.open(path)


def test_planner_huge_list_index(tmp_path: Path) -> None:
    path, md = copy(tmp_path)
    md.planner_data["step"] = ("optimizer", "param_groups", 1 << 40, "x")
    write(path, md)
    with pytest.raises(CorruptCheckpointError, match=r"planner path"):
        safeckpt.open(path)


def test_planner_path_too_deep(tmp_path: Path) -> None:
    path, md = copy(tmp_path)
    md.planner_data["step"] = ("a",) * 10_000  # a tree that deep would break every recursive walker
    write(path, md)
    with pytest.raises(CorruptCheckpointError, match=r"planner_data must map names to tuples of 1 to 256 keys"):
        safeckpt.open(path)


@pytest.mark.parametrize(
    "field, value, cause",
    [
        pytest.param("dtype", torch.qint8, "no quantized tensors", id="quantized"),
        pytest.param("size", torch.Size([1] * 65), "up to 64 non-negative ints", id="65-dims"),
    ],
)
def test_tensor_description_refused(tmp_path: Path, field: str, value: Any, cause: str) -> None:
    path, md = copy(tmp_path)
    item = md.state_dict_metadata["model.0.bias"]
    if field == "dtype":
        item.properties.dtype = value  # type: ignore[union-attr]
    else:
        item.size = value  # type: ignore[union-attr]
    write(path, md)
    with pytest.raises(CorruptCheckpointError, match=rf"\.metadata: .*{cause}"):
        safeckpt.open(path)


# -- truncated and damaged .metadata ---------------------------------------------------------------


def test_truncated_metadata(tmp_path: Path) -> None:
    path, _ = copy(tmp_path)
    data = (path / ".metadata").read_bytes()
    for cut in (1, 2, 10, len(data) // 3, len(data) // 2, len(data) - 1):
        (path / ".metadata").write_bytes(data[:cut])
        with pytest.raises(CorruptCheckpointError, match=r"\.metadata"):
            safeckpt.open(path)
    (path / ".metadata").write_bytes(b"")
    with pytest.raises(UnknownFormatError):
        safeckpt.open(path)


def test_trailing_bytes_after_metadata(tmp_path: Path) -> None:
    path, _ = copy(tmp_path)
    with open(path / ".metadata", "ab") as f:
        f.write(pickle.dumps(Touch()))
    with pytest.raises(CheckpointError, match=r"\.metadata"):
        safeckpt.open(path)


def test_not_a_metadata_object(tmp_path: Path) -> None:
    path, _ = copy(tmp_path)
    (path / ".metadata").write_bytes(pickle.dumps({"state_dict_metadata": {}}))
    with pytest.raises(CorruptCheckpointError, match=r"\.metadata: holds a dict, not a DCP Metadata"):
        safeckpt.open(path)


@pytest.mark.parametrize("target", [".metadata", "__0_0.distcp", "__1_0.distcp"])
def test_random_damage_is_an_error_never_a_crash(tmp_path: Path, target: str) -> None:
    rng = random.Random(target)
    path, _ = copy(tmp_path)
    original = (path / target).read_bytes()
    rss = psutil.Process().memory_info().rss
    for _ in range(60):
        data = bytearray(original)
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        (path / target).write_bytes(bytes(data))
        with contextlib.suppress(CheckpointError):
            read_all(path)
    assert psutil.Process().memory_info().rss - rss < 256 << 20
