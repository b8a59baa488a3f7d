"""The storage layer on its own: each file-name template gives names its own pattern parses back,
the names real saves leave on disk are the templates' names, and `link_or_copy` works with and
without hard links. (Crash safety under SIGKILL and I/O failures: test_reliability_*.)"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

import safeckpt
from safeckpt import _storage, manager
from safeckpt.formats import hf_sharded, safeckpt_sharded

GEN = "0123456789ab"
TEMPLATES = [
    (safeckpt_sharded.SHARD, {"gen": GEN, "rank": 3, "part": 12}, "shard-0123456789ab-00003-00012.safetensors"),
    (safeckpt_sharded.LOCK, {"gen": GEN}, ".safeckpt-0123456789ab.lock"),
    (manager.STEP_FILE, {"step": 100}, "step-000000100.safeckpt"),
    (manager.STEP_DIR, {"step": 1_234_567_890}, "step-1234567890"),
    (hf_sharded.SUFFIX, {"part": 2, "parts": 3}, "-00002-of-00003"),
    (
        hf_sharded.STAGING,
        {"stem": "model-00001-of-00002", "token": "0badcafe"},
        ".model-00001-of-00002.0badcafe.safetensors",
    ),
    (_storage.TEMPORARY, {"name": "a.safeckpt", "token": "0badcafe"}, ".a.safeckpt.0badcafe.tmp"),
    (_storage.LINK, {"name": "a.safetensors", "token": "0badcafe"}, ".a.safetensors.0badcafe.link"),
]


@pytest.mark.parametrize(("template", "values", "name"), TEMPLATES, ids=lambda x: repr(x)[:40])
def test_a_template_parses_back_the_names_it_gives(
    template: _storage.Template, values: dict[str, Any], name: str
) -> None:
    assert template.format(**values) == name
    m = template.match(name)
    assert m is not None and {k: type(v)(m[k]) for k, v in values.items()} == values
    assert template.match("x" + name) is None and template.match(name + "x") is None
    if "token" in template.fields:
        return  # a temporary name itself: it has no temporaries
    tmp = template.temporary()
    assert tmp.match(_storage.temp_name(name)) is not None and template.match(_storage.temp_name(name)) is None


def test_a_literal_template_is_one_name() -> None:
    t = _storage.literal("model.{x}.json")
    assert t.format() == "model.{x}.json" and t.match("model.{x}.json") and not t.match("model.y.json")


def test_saves_leave_only_the_templates_names(tmp_path: Path) -> None:
    sd = {f"w{i}": torch.full((64,), float(i)) for i in range(3)}
    root = safeckpt.save(tmp_path / "run", sd, max_shard_size=300)
    names = sorted(os.listdir(root))
    assert names[0] == safeckpt_sharded.INDEX
    generation = safeckpt_sharded.read_index(root)["generation"]
    assert all(safeckpt_sharded.LAYOUT.generation_of(n) == (True, generation) for n in names[1:]), names
    hf = safeckpt.save(tmp_path / "hf", sd, format="hf-sharded", max_shard_size=300)
    shards = sorted(n for n in os.listdir(hf) if n.endswith(".safetensors"))
    assert shards == [f"model{hf_sharded.SUFFIX.format(part=i, parts=3)}.safetensors" for i in (1, 2, 3)]
    assert all(hf_sharded.SHARD.fullmatch(n) for n in shards)
    m = manager.CheckpointManager(tmp_path / "steps", keep_last=1)
    m.save(7, {"model": sd})
    assert os.listdir(tmp_path / "steps") == [manager.STEP_FILE.format(step=7)]


def test_layout_delete_removes_a_checkpoint_but_not_other_files(tmp_path: Path) -> None:
    root = safeckpt.save(tmp_path / "run", {"w": torch.ones(64)}, max_shard_size=100)
    safeckpt_sharded.LAYOUT.delete(root)
    assert not root.exists()
    root = safeckpt.save(tmp_path / "run2", {"w": torch.ones(64)}, max_shard_size=100)
    (root / "notes.txt").write_text("mine")
    safeckpt_sharded.LAYOUT.delete(root)
    assert os.listdir(root) == ["notes.txt"]


@pytest.mark.parametrize("links", [True, False], ids=["hard-link", "copy"])
def test_link_or_copy_puts_the_bytes_in_place(tmp_path: Path, links: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    src, dst = tmp_path / "src.bin", tmp_path / "dst.bin"
    src.write_bytes(b"new" * 1000)
    dst.write_bytes(b"old")
    if not links:

        def refuse(*_: Any) -> None:
            raise OSError(18, "Invalid cross-device link")

        monkeypatch.setattr(os, "link", refuse)
    _storage.link_or_copy(src, dst)
    assert dst.read_bytes() == src.read_bytes() and src.exists()
    assert (os.stat(dst).st_ino == os.stat(src).st_ino) is links
    assert sorted(os.listdir(tmp_path)) == ["dst.bin", "src.bin"]  # no temporary left


def test_remove_tree_removes_a_directory_a_file_or_a_link_itself(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    (target / "sub").mkdir(parents=True)
    (target / "sub" / "a.safetensors").write_bytes(b"x")
    link = tmp_path / "last"
    link.symlink_to(target, target_is_directory=True)
    _storage.remove_tree(link)
    assert not link.is_symlink() and (target / "sub" / "a.safetensors").exists()
    _storage.remove_tree(target)
    assert not target.exists()
    _storage.remove_tree(target)  # missing: fine by default
    with pytest.raises(FileNotFoundError):
        _storage.remove_tree(target, missing_ok=False)
    (tmp_path / "f.ckpt").write_bytes(b"x")
    _storage.remove_tree(tmp_path / "f.ckpt")
    assert os.listdir(tmp_path) == []
