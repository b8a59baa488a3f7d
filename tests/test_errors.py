"""Structured errors: `CheckpointError`'s ``path``/``key``/``hint`` fields survive a process
boundary, and every decision that used to read an error's message text reads a field or a type
instead (each test rewords the message to show the decision does not depend on it)."""

from __future__ import annotations

import concurrent.futures
import errno
import multiprocessing
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

import safeckpt
from safeckpt import _storage, cli, codec, errors, lightning
from safeckpt.errors import CheckpointError, CorruptCheckpointError, TruncatedCheckpointError
from safeckpt.formats import _pickle, safeckpt_sharded, torch_pickle

CLASSES = [getattr(errors, name) for name in errors.__all__]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_fields_default_to_none_and_survive_pickling(cls: type[CheckpointError]) -> None:
    bare = cls("f.pt: something")
    assert (bare.path, bare.key, bare.hint) == (None, None, None) and str(bare) == "f.pt: something"
    e = cls("f.pt: something", path=Path("f.pt"), key="model/w", hint="save it again")
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is cls and str(back) == str(e) == "f.pt: something"
    assert (back.path, back.key, back.hint) == ("f.pt", "model/w", "save it again")


def _load_in_worker(path: str) -> Any:
    return safeckpt.load(path)


def test_fields_cross_a_real_process_boundary(tmp_path: Path) -> None:
    """A worker process's load of a damaged sharded checkpoint raises in the parent with its fields."""
    root = safeckpt.save(tmp_path / "run", {"w": torch.ones(4)}, max_shard_size=8)
    (root / safeckpt_sharded.INDEX).write_bytes(b"\xc1 not msgpack")
    ctx = multiprocessing.get_context("fork")
    with (
        concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool,
        pytest.raises(CorruptCheckpointError) as info,
    ):
        pool.submit(_load_in_worker, str(root)).result()
    assert info.value.path == str(root / safeckpt_sharded.INDEX) and info.value.hint == "the file is damaged"


def test_codec_refusals_pickle_with_their_key() -> None:
    e = codec.Unstorable(("hparams", "cb"), " is a x.Y, which ...", object)
    back = pickle.loads(pickle.dumps(e))
    assert (
        str(back) == "state['hparams']['cb'] is a x.Y, which ..."
        and back.key == ("hparams", "cb")
        and back.cls is object
    )


# -- cli._fix --------------------------------------------------------------------------------------


def test_fix_hints_at_a_directory_only_for_the_systems_error(tmp_path: Path) -> None:
    with pytest.raises(IsADirectoryError) as system:
        open(tmp_path, "rb")  # noqa: SIM115 - raises
    assert system.value.errno == errno.EISDIR
    assert cli._fix(system.value).endswith("give a checkpoint file, not a directory")
    with pytest.raises(IsADirectoryError) as ours:
        _storage.target_file(tmp_path)
    line = cli._fix(ours.value)
    assert "give a file path" in line and "not a directory" not in line
    # safeckpt's own (no errno) says its fix, whatever its words
    assert cli._fix(IsADirectoryError(f"{tmp_path}: pick a file inside it")) == f"{tmp_path}: pick a file inside it"


def test_fix_adds_the_damage_hint_only_without_a_hint(tmp_path: Path) -> None:
    root = safeckpt.save(tmp_path / "run", {"w": torch.ones(4)}, max_shard_size=8)
    (root / safeckpt_sharded.INDEX).write_bytes(b"\x81\xa6format\xa1x")  # valid msgpack, not our index
    with pytest.raises(CorruptCheckpointError) as info:
        safeckpt.open(root)
    assert info.value.hint == "the file is damaged (restore it, or re-save)"
    assert cli._fix(info.value) == " ".join(str(info.value).split())
    # the field decides, not the words
    assert cli._fix(CorruptCheckpointError("x.pt: bad bytes", hint="fetch it again")) == "x.pt: bad bytes"
    assert cli._fix(CorruptCheckpointError("x.pt: damaged bytes")).endswith(
        "damaged bytes; the file is damaged: fetch or save it again"
    )


def test_fix_names_the_file_unless_the_error_does(tmp_path: Path) -> None:
    def raised_here() -> ValueError:  # another library's error: it does not know the file
        try:
            int("x")
        except ValueError as e:
            return e
        raise AssertionError

    foreign = raised_here()
    foreign.safeckpt_path = "f.pt"  # type: ignore[attr-defined]
    assert cli._fix(foreign).startswith("f.pt: invalid literal")
    with pytest.raises(ValueError) as ours:
        safeckpt.hub.parse_uri("hf://a/b/../c")  # safeckpt's own ValueError names its URI
    ours.value.safeckpt_path = "hf://a/b/../c"  # type: ignore[attr-defined]
    assert cli._fix(ours.value).count("hf://a/b/../c") == 1
    checkpoint_error = CorruptCheckpointError("/abs/elsewhere/f.pt: bad")
    checkpoint_error.safeckpt_path = "f.pt"  # type: ignore[attr-defined]
    assert cli._fix(checkpoint_error).startswith("/abs/elsewhere/f.pt: bad")


def test_json_error_carries_the_fields(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = safeckpt.save(tmp_path / "run", {"w": torch.ones(4)}, max_shard_size=8)
    (root / safeckpt_sharded.INDEX).write_bytes(b"\x81\xa6format\xa1x")
    assert cli.main(["inspect", str(root), "--json"]) == 2
    report = __import__("json").loads(capsys.readouterr().out)
    assert report["path"] == str(root) and report["key"] is None and "invalid index" in report["error"]


# -- lightning._unstorable ---------------------------------------------------------------------------


def test_lightning_names_the_place_from_the_refusals_key() -> None:
    checkpoint = {"state_dict": {}, "hyper_parameters": {"cb": object()}}
    refused = codec.Refused(("hyper_parameters", "cb"), " is refused in any words")
    message = str(lightning._unstorable(refused, checkpoint, "last.ckpt"))
    assert message.startswith("last.ckpt: checkpoint['hyper_parameters']['cb'] is refused in any words")
    # a TypeError that merely reads like one is not rewritten
    lookalike = TypeError("state['x'] is not from the codec")
    assert str(lightning._unstorable(lookalike, checkpoint, "last.ckpt")).startswith("last.ckpt: state['x']")


def test_lightning_plugin_reports_a_real_refusal_as_a_checkpoint_key(tmp_path: Path) -> None:
    class Opaque:
        pass

    with pytest.raises(TypeError) as info:
        lightning.SafeCheckpointIO().save_checkpoint({"state_dict": {}, "loops": {"x": Opaque()}}, tmp_path / "a.ckpt")
    assert "checkpoint['loops']['x'] is a " in str(info.value)


# -- torch_pickle's sniff ------------------------------------------------------------------------------


def test_sniff_takes_a_pickle_cut_short_by_the_head(tmp_path: Path) -> None:
    path = tmp_path / "big.pkl"  # a pickle longer than the 4 KiB head sniffing sees
    path.write_bytes(pickle.dumps({"names": [f"name{i}" for i in range(2000)]}, protocol=2))
    head = path.read_bytes()[:4096]
    with pytest.raises(TruncatedCheckpointError):
        _pickle.scan(head, 0, str(path))
    assert torch_pickle._looks_like_pickle(head)
    assert not torch_pickle._looks_like_pickle(b"\x80\x02\xff" + b"\x00" * 20)  # an unknown opcode: malformed


def test_sniff_decides_by_the_error_type_not_its_words(monkeypatch: pytest.MonkeyPatch) -> None:
    def raises(e: Exception) -> Any:
        def scan(*_: Any) -> Any:
            raise e

        return scan

    monkeypatch.setattr(_pickle, "scan", raises(TruncatedCheckpointError("the head ran out")))
    assert torch_pickle._looks_like_pickle(b"\x80\x02}q\x00")
    monkeypatch.setattr(_pickle, "scan", raises(CorruptCheckpointError("opcode truncated? no: malformed")))
    assert not torch_pickle._looks_like_pickle(b"\x80\x02}q\x00")
