"""The ``hf-sharded`` format: huggingface_hub's own directories, differential against ``safe_open``,
our writer loaded by huggingface_hub and safetensors, crash-safe directory rewrites, and partial
loads that map only the shards they need."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
import safetensors.torch
import torch
from huggingface_hub import save_torch_state_dict, split_torch_state_dict_into_shards
from safetensors import safe_open

import safeckpt
from conformance import FormatConformance, assert_bits_equal, sample_state_dict, sorted_dict
from safeckpt import _fs, _storage, formats
from safeckpt.errors import CorruptCheckpointError
from safeckpt.formats import _safetensors as st
from safeckpt.formats import hf_sharded as hf
from safeckpt.tree import Checkpoint, TensorRef

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "hf"
_spec = importlib.util.spec_from_file_location("hf_fixtures", FIXTURES / "make_fixtures.py")
assert _spec and _spec.loader
fx = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fx)

HAS_TORCH_READER = "torch" in formats.names()
needs_torch_reader = pytest.mark.skipif(
    not HAS_TORCH_READER, reason="the torch format (restricted unpickler) is not registered yet"
)


def stock_dir(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every tensor of every safetensors shard via safe_open, and the index metadata (if any)."""
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for k in f.keys():  # noqa: SIM118 - safe_open is no dict
                assert k not in tensors
                tensors[k] = f.get_tensor(k)
    index = next(directory.glob("*.safetensors.index.json"), None)
    return tensors, json.loads(index.read_text())["metadata"] if index else {}


def quiet_load(path: Path) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return safeckpt.load(path)


class TestHubShardedConformance(FormatConformance):
    """Directories written by ``huggingface_hub.save_torch_state_dict`` (safetensors shards)."""

    NAME = "hf-sharded"

    def make(self, directory: Path, state_dict: dict[str, torch.Tensor]) -> Path:
        out = directory / "hub"
        out.mkdir()
        save_torch_state_dict(state_dict, out, max_shard_size=100)
        assert len(list(out.glob("*.safetensors"))) >= 2
        return out

    def boundaries(self, path: Path) -> list[int]:
        return [0, 1, 8, 16, 64, 100]

    def expected(self, state_dict: dict[str, torch.Tensor]) -> Any:
        return sorted_dict(state_dict)


class TestOurWriterConformance(TestHubShardedConformance):
    def make(self, directory: Path, state_dict: dict[str, torch.Tensor]) -> Path:
        return safeckpt.save(directory / "ours", state_dict, format="hf-sharded", max_shard_size=100)


@needs_torch_reader
class TestHubBinShardedConformance(TestHubShardedConformance):
    """``save_torch_state_dict(safe_serialization=False)``: pickled ``.bin`` shards."""

    def make(self, directory: Path, state_dict: dict[str, torch.Tensor]) -> Path:
        out = directory / "hubbin"
        out.mkdir()
        save_torch_state_dict(state_dict, out, max_shard_size=100, safe_serialization=False)
        return out


# -- reading ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sharded_st", "single_st", "mixin"])
def test_differential_against_safe_open(name: str) -> None:
    directory = FIXTURES / name
    ckpt = safeckpt.open(directory)
    assert ckpt.format == "hf-sharded"
    tensors, index_meta = stock_dir(directory)
    aliases = ckpt.info.get("aliases", {})
    assert sorted(set(ckpt.tree) - set(aliases)) == sorted(tensors)
    assert_bits_equal(sorted_dict(tensors), {k: ckpt[k].load() for k in sorted(tensors)})
    assert aliases == {"head.weight": "emb.weight"} and ckpt["head.weight"] is ckpt["emb.weight"]
    if name == "sharded_st":
        assert index_meta["head.weight"] == "emb.weight" and ckpt.metadata == {
            "total_size": "808",
            "producer": "make_fixtures",
        }
        assert ckpt.info["shards"] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    net = fx.TiedNet()
    safeckpt.load_raw(directory, net)  # strict, though the files lack head.weight
    assert_bits_equal(fx.tied_net().state_dict(), net.state_dict())


@needs_torch_reader
def test_bin_shards_match_torch_load() -> None:
    """The .bin fixture (our own, trusted) against torch.load as the oracle."""
    directory = FIXTURES / "sharded_bin"
    expected: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.bin")):
        expected.update(torch.load(shard, weights_only=False))
    ckpt = safeckpt.open(directory)
    assert ckpt.info["index"] == "pytorch_model.bin.index.json"
    assert_bits_equal(sorted_dict(expected), ckpt.to_python())
    net = fx.TiedNet()
    safeckpt.load_raw(directory, net)
    assert_bits_equal(fx.tied_net().state_dict(), net.state_dict())


def test_index_file_given_directly_and_stray_files_warned(tmp_path: Path) -> None:
    directory = tmp_path / "d"
    shutil.copytree(FIXTURES / "sharded_st", directory)
    ckpt = safeckpt.open(directory / "model.safetensors.index.json")
    assert ckpt.format == "hf-sharded" and len(ckpt.tree) == 9
    safetensors.torch.save_file({"junk": torch.ones(1)}, directory / "model-00009-of-00009.safetensors")
    with pytest.warns(UserWarning, match=r"ignoring files the index does not reference: \['model-00009-of-00009"):
        assert "junk" not in safeckpt.open(directory).tree


def test_tensors_missing_from_the_index_are_read_with_a_warning(tmp_path: Path) -> None:
    directory = tmp_path / "d"
    shutil.copytree(FIXTURES / "sharded_st", directory)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    del index["weight_map"]["hidden.bias"]
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.warns(UserWarning, match="hidden.bias"):
        ckpt = safeckpt.open(directory)
    assert torch.equal(ckpt["hidden.bias"].load(), fx.tied_net().hidden.bias)


def test_huggingface_cache_snapshot_symlinks_are_followed(tmp_path: Path) -> None:
    """The HF cache keeps snapshot files as symlinks into the repo's blobs/; that is not an escape."""
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted((FIXTURES / "sharded_st").iterdir())):
        blob = repo / "blobs" / f"{i:040x}"
        shutil.copyfile(f, blob)
        (snapshot / f.name).symlink_to(Path("..", "..", "blobs", blob.name))
    assert_bits_equal(quiet_load(FIXTURES / "sharded_st"), safeckpt.load(snapshot))


# -- partial loads ------------------------------------------------------------------------------------


@pytest.fixture
def mapped(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Records every file whose tensor data gets read: mapped (once, on first use) or opened to
    read a tensor straight into its destination (both go through ``MappedFile.open``)."""
    seen: list[Path] = []
    original = _fs.MappedFile.open

    def spy(self: _fs.MappedFile) -> Any:
        if Path(self.path).resolve() not in seen:
            seen.append(Path(self.path).resolve())
        return original(self)

    monkeypatch.setattr(_fs.MappedFile, "open", spy)
    return seen


def shards_of(directory: Path) -> dict[str, Path]:
    weight_map, _ = hf.read_index(directory / "model.safetensors.index.json")
    return {k: (directory / v).resolve() for k, v in weight_map.items()}


def test_partial_load_maps_only_the_shards_it_needs(tmp_path: Path, mapped: list[Path]) -> None:
    directory = tmp_path / "d"
    shutil.copytree(FIXTURES / "sharded_st", directory)
    where = shards_of(directory)
    ckpt = safeckpt.open(directory)
    assert mapped == []  # opening reads headers only
    ckpt["hidden.weight"].load()
    ckpt["hidden.bias"].load()
    assert mapped == [where["hidden.weight"]]
    maps = Path("/proc/self/maps").read_text()
    assert str(where["hidden.weight"]) in maps
    assert str(where["emb.weight"]) not in maps and str(where["norm.weight"]) not in maps

    mapped.clear()
    out = safeckpt.convert(directory, tmp_path / "norm.safetensors", filter=lambda name, ref: name.startswith("norm."))
    assert mapped == [where["norm.weight"]] and sorted(safeckpt.load(out)) == [
        f"norm.{k}" for k in ("bias", "num_batches_tracked", "running_mean", "running_var", "weight")
    ]


def test_partial_load_raw_maps_only_the_shards_it_needs(tmp_path: Path, mapped: list[Path]) -> None:
    """load_raw(strict=False) into a module that wants part of a checkpoint leaves the rest unmapped."""
    directory = tmp_path / "d"
    shutil.copytree(FIXTURES / "sharded_st", directory)
    where = shards_of(directory)

    class JustHidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.hidden = torch.nn.Linear(8, 8)

    part = JustHidden()
    safeckpt.load_raw(directory, part, strict=False)
    assert torch.equal(part.hidden.weight, fx.tied_net().hidden.weight)
    assert mapped == [where["hidden.weight"]]


# -- writing ------------------------------------------------------------------------------------------


def ordered_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sizes = [60, 10, 200, 30, 30, 500, 5, 80, 80, 1]
    return {f"t{i}.w": torch.randn(n, generator=g) for i, n in enumerate(sizes)}


@pytest.mark.parametrize("limit", [100, 400, 1000, "1KB", "1KiB", 10**9])
def test_split_matches_huggingface_hub(limit: int | str, tmp_path: Path) -> None:
    sd = ordered_state(0)
    ours = safeckpt.save(tmp_path / "o", sd, format="hf-sharded", max_shard_size=limit)
    theirs = split_torch_state_dict_into_shards(sd, max_shard_size=safeckpt._units.parse_size(limit))
    files = sorted(p.name for p in ours.iterdir())
    assert files == sorted(
        [*theirs.filename_to_tensors, *(["model.safetensors.index.json"] if theirs.is_sharded else [])]
    )
    for name, tensors in theirs.filename_to_tensors.items():
        with safe_open(ours / name, "pt") as f:
            assert sorted(f.keys()) == sorted(tensors), name
            assert f.metadata()["format"] == "pt"
    if theirs.is_sharded:
        index = json.loads((ours / "model.safetensors.index.json").read_text())
        assert index["metadata"] == {"total_size": theirs.metadata["total_size"]}
        assert index["weight_map"] == dict(sorted(theirs.tensor_to_filename.items()))
    assert_bits_equal(sorted_dict(sd), safeckpt.load(ours))


def test_written_directory_loads_in_huggingface_hub_and_safetensors(tmp_path: Path) -> None:
    net = fx.tied_net()
    sharded = safeckpt.save(tmp_path / "sharded", net, format="hf-sharded", max_shard_size=300)
    assert sorted(p.name for p in sharded.iterdir()) == [
        *(f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)),
        "model.safetensors.index.json",
    ]
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_size": 808, "head.weight": "emb.weight"}  # what huggingface_hub writes
    hub_index = json.loads((FIXTURES / "sharded_st" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].items()) == set(hub_index["weight_map"].items())
    other = fx.TiedNet()
    result = huggingface_hub.load_torch_model(other, sharded)
    assert result.missing_keys == ["head.weight"] and result.unexpected_keys == []  # hub's tie gap, values still right
    assert_bits_equal(net.state_dict(), other.state_dict())
    other = fx.TiedNet()
    safeckpt.load_raw(sharded, other)
    assert_bits_equal(net.state_dict(), other.state_dict())
    assert other.head.weight is other.emb.weight

    single = safeckpt.save(tmp_path / "single", net, format="hf-sharded")
    assert sorted(p.name for p in single.iterdir()) == ["model.safetensors"]
    other = fx.TiedNet()
    assert safetensors.torch.load_model(other, single / "model.safetensors") == (set(), [])
    assert_bits_equal(net.state_dict(), other.state_dict())
    other = fx.TiedNet()
    huggingface_hub.load_torch_model(other, single)
    assert_bits_equal(net.state_dict(), other.state_dict())


def test_custom_filename_pattern_and_bad_options(tmp_path: Path) -> None:
    out = formats.get("hf-sharded").write(
        Checkpoint(ordered_state(1), format="memory", path="-"),
        tmp_path / "p",
        max_shard_size=400,
        filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
    )
    assert (out / "diffusion_pytorch_model.safetensors.index.json").exists()
    assert_bits_equal(sorted_dict(ordered_state(1)), safeckpt.load(out))
    for pattern in ("model.safetensors", "../model{suffix}.safetensors", "model{suffix}.bin"):
        with pytest.raises(ValueError, match="filename_pattern"):
            formats.get("hf-sharded").write(
                Checkpoint({}, format="memory", path="-"), tmp_path / "q", filename_pattern=pattern
            )
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        safeckpt.save(tmp_path / "file", ordered_state(1), format="hf-sharded")
    with pytest.raises(TypeError, match="'step'"):
        safeckpt.save(tmp_path / "r", {"w": torch.ones(1), "step": 1}, format="hf-sharded")


def test_rewrite_removes_only_the_old_set(tmp_path: Path) -> None:
    directory = tmp_path / "d"
    shutil.copytree(FIXTURES / "sharded_st", directory)
    (directory / "config.json").write_text("{}")
    (directory / "model.safetensors.backup").write_bytes(b"keep me")
    safeckpt.save(directory, ordered_state(2), format="hf-sharded", max_shard_size=3000)
    names = sorted(p.name for p in directory.iterdir())
    assert names == [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.backup",
        "model.safetensors.index.json",
    ]
    assert_bits_equal(sorted_dict(ordered_state(2)), safeckpt.load(directory))
    safeckpt.save(directory, ordered_state(3), format="hf-sharded")  # back to one file: the index goes
    assert sorted(p.name for p in directory.iterdir()) == [
        "config.json",
        "model.safetensors",
        "model.safetensors.backup",
    ]
    assert_bits_equal(sorted_dict(ordered_state(3)), safeckpt.load(directory))


def test_reshard_in_place(tmp_path: Path) -> None:
    """The source's shards are still being read while the new set is written over them."""
    directory = tmp_path / "d"
    shutil.copytree(FIXTURES / "sharded_st", directory)
    before = safeckpt.load(directory)
    for limit in (300, 500, 10_000, 300):
        safeckpt.convert(directory, directory, format="hf-sharded", max_shard_size=limit, overwrite=True)
        assert_bits_equal(before, safeckpt.load(directory))


def failing_ref(name: str) -> TensorRef:
    def boom() -> torch.Tensor:
        raise OSError("disk on fire")

    return TensorRef(name, torch.float32, (4,), "<test>", boom)


def test_failed_rewrite_leaves_the_old_set_untouched(tmp_path: Path) -> None:
    new = {**fx.tied_net(1).state_dict(), "zz.bad": failing_ref("zz.bad")}
    for old_limit in (300, 10_000):  # an old sharded set, an old lone model.safetensors
        directory = tmp_path / f"d{old_limit}"
        directory.mkdir()
        save_torch_state_dict(fx.tied_net(0).state_dict(), directory, max_shard_size=old_limit)
        listing = {p.name: p.read_bytes() for p in directory.iterdir()}
        for limit in (300, 500, 10_000):  # same names (staged), other names, one file
            with pytest.raises(OSError, match="disk on fire"):
                formats.get("hf-sharded").write(
                    Checkpoint(new, format="memory", path="-"), directory, max_shard_size=limit
                )
            assert {p.name: p.read_bytes() for p in directory.iterdir()} == listing


def run_until_crash(k: int, action: Callable[[], None]) -> int:
    """Run ``action`` in a forked child that dies (os._exit, no cleanup) before its k-th file operation.
    Returns 0 if the action finished first, 77 if it crashed."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            calls = 0

            def crashing(fn: Callable[..., Any]) -> Callable[..., Any]:
                def inner(*args: Any, **kwargs: Any) -> Any:
                    nonlocal calls
                    if calls == k:
                        os._exit(77)
                    calls += 1
                    return fn(*args, **kwargs)

                return inner

            for owner, name in (
                (st, "write"),
                (st, "write_all"),
                (hf, "_write_index"),
                (_storage, "link_or_copy"),
                (os, "link"),
                (os, "replace"),
                (os, "unlink"),
            ):
                setattr(owner, name, crashing(getattr(owner, name)))
            action()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.parametrize(
    ("old_limit", "new_limit"),
    [(300, 300), (300, 500), (10_000, 300), (300, 10_000), (10_000, 10_000)],
    ids=["3-to-3-same-names", "3-to-2", "1-to-3", "3-to-1", "1-to-1"],
)
def test_crash_at_any_point_leaves_old_or_new_set(old_limit: int, new_limit: int, tmp_path: Path) -> None:
    """Kill the writer before each of its file operations in turn: the directory always loads, as
    exactly the old checkpoint or exactly the new one, in safeckpt and in huggingface_hub."""
    pristine = tmp_path / "pristine"
    pristine.mkdir()
    save_torch_state_dict(fx.tied_net(0).state_dict(), pristine, max_shard_size=old_limit)
    old, new = fx.tied_net(0).state_dict(), fx.tied_net(1).state_dict()
    directory = tmp_path / "d"
    seen = set()
    for k in range(60):
        shutil.rmtree(directory, ignore_errors=True)
        shutil.copytree(pristine, directory)
        code = run_until_crash(
            k, lambda: safeckpt.save(directory, fx.tied_net(1), format="hf-sharded", max_shard_size=new_limit)
        )
        assert code in (0, 77), f"writer failed at step {k} with exit code {code}"
        got = quiet_load(directory)
        state = "old" if all(torch.equal(got[n], old[n]) for n in old) else "new"
        assert_bits_equal(sorted_dict(old if state == "old" else new), got, f"after a crash at step {k}")
        net = fx.TiedNet()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            huggingface_hub.load_torch_model(net, directory)
        assert_bits_equal(
            old if state == "old" else new, net.state_dict(), f"huggingface_hub after a crash at step {k}"
        )
        seen.add(state)
        if code == 0:
            break
    else:
        pytest.fail("the writer never finished")
    assert seen == {"old", "new"} and state == "new"
    leftovers = sorted(p.name for p in directory.iterdir())
    assert all(not n.startswith(".") for n in leftovers), leftovers


def test_verify(tmp_path: Path) -> None:
    directory = safeckpt.save(tmp_path / "v", sample_state_dict(), format="hf-sharded", max_shard_size=100)
    assert hf.verify(directory) == []
    assert hf.verify(FIXTURES / "sharded_st") == []
    shard = next(directory.glob("*-00002-of-*.safetensors"))
    header = st.read_header(shard)
    entry = next(e for e in header.entries.values() if e.end > e.begin)
    data = bytearray(shard.read_bytes())
    data[entry.begin] ^= 0xFF
    shard.write_bytes(bytes(data))
    problems = hf.verify(directory)
    assert len(problems) == 1 and entry.name in problems[0] and shard.name in problems[0]
    with pytest.raises(CorruptCheckpointError, match=shard.name):
        safeckpt.load(directory, verify=True)


@pytest.mark.parametrize("name", ["sharded_st", "sharded_bin", "single_st", "mixin"])
def test_convert_fixture_to_native_and_back_to_a_module(name: str, tmp_path: Path) -> None:
    if name == "sharded_bin" and not HAS_TORCH_READER:
        pytest.skip("the torch format is not registered yet")
    native = safeckpt.convert(FIXTURES / name, tmp_path / "x.safeckpt")
    assert safeckpt.open(native).format == "safeckpt"
    net = fx.TiedNet()
    safeckpt.load_raw(native, net)
    assert_bits_equal(fx.tied_net().state_dict(), net.state_dict())
    assert net.head.weight is net.emb.weight
    back = safeckpt.convert(native, tmp_path / "back", format="hf-sharded", max_shard_size=300)
    net = fx.TiedNet()
    huggingface_hub.load_torch_model(net, back)
    assert_bits_equal(fx.tied_net().state_dict(), net.state_dict())
