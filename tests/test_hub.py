"""The Hugging Face Hub: push, pull and hf:// paths, with the real huggingface_hub client talking
to a local Hub (tests/minihub.py) in both upload modes:

- ``lfs``: Xet disabled (``HF_HUB_DISABLE_XET``), so binary files go up by git-LFS (basic and
  multipart), and LFS downloads are redirected to a CDN origin as on the Hub;
- ``regular``: Xet left on, as users have it, with the server answering "regular" for every file.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import safeckpt
from conformance import assert_bits_equal
from safeckpt import hub as hubmod
from safeckpt.errors import HubAuthError, HubError, HubNotFoundError
from safeckpt.tree import AttributeDict, TensorRef

hf = pytest.importorskip("huggingface_hub")
from huggingface_hub import constants as hf_constants  # noqa: E402

import minihub  # noqa: E402

TOKEN, OTHER = "hf_me_write_token", "hf_other_user_token"
MODES = {
    "lfs": {"lfs_mode": "auto", "cdn_host": "localhost", "multipart_threshold": 48 << 10, "multipart_chunk": 32 << 10},
    "regular": {"lfs_mode": "never"},
}


@pytest.fixture(scope="session", params=list(MODES))
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    srv = minihub.make_server(
        str(tmp_path_factory.mktemp(f"hub-{request.param}")),
        tokens={TOKEN: "me", OTHER: "other"},
        **MODES[request.param],
    )
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.mode = request.param
    yield srv
    srv.shutdown()
    srv.server_close()


@dataclass
class Hub:
    """One test's view of the server: its endpoint, a fresh cache, and the request log."""

    server: Any
    endpoint: str
    tmp: Path
    monkeypatch: pytest.MonkeyPatch

    @property
    def store(self) -> minihub.Store:
        return self.server.store

    @property
    def mode(self) -> str:
        return self.server.mode

    def repo(self) -> str:
        return f"me/t-{uuid.uuid4().hex[:10]}"

    def mark(self) -> int:
        return len(self.store.log)

    def since(self, mark: int) -> list[minihub.Request]:
        return self.store.requests(mark)

    def new_machine(self) -> Path:
        """A fresh, empty Hub cache, as on another machine."""
        home = self.tmp / f"hf-home-{uuid.uuid4().hex[:6]}"
        self.monkeypatch.setenv("HF_HOME", str(home))
        return home / "hub"

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for a subprocess (the CLI) talking to this hub."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
        env.update(HF_ENDPOINT=self.endpoint, HF_TOKEN=TOKEN, HF_HOME=os.environ["HF_HOME"])
        if self.mode == "lfs":
            env["HF_HUB_DISABLE_XET"] = "1"
        env.update(extra)
        return env


@pytest.fixture
def hub(server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Hub:
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", server.mode == "lfs")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    h = Hub(server, endpoint, tmp_path, monkeypatch)
    h.new_machine()
    return h


# -- helpers ---------------------------------------------------------------------------------------


def train_state(seed: int) -> dict[str, Any]:
    """A small but complete training state: model, AdamW after a step, counters, hparams."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 32)).sum().backward()
    opt.step()
    return {"model": model, "optimizer": opt, "step": seed, "hparams": AttributeDict(lr=1e-3, sizes=[32, 128, 16])}


def fresh_state(seed: int = 1234) -> dict[str, Any]:
    s = train_state(seed)
    s["step"] = -1
    s["hparams"] = None
    return s


def assert_state_equal(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert_bits_equal(got["model"].state_dict(), want["model"].state_dict(), "model")
    assert_bits_equal(got["optimizer"].state_dict(), want["optimizer"].state_dict(), "optimizer")
    assert got["step"] == want["step"]
    assert got["hparams"] == want["hparams"] and type(got["hparams"]) is AttributeDict


class TiedLM(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(64, 32)
        self.body = nn.Linear(32, 32)
        self.mid = nn.Linear(32, 32)
        self.head = nn.Linear(32, 64, bias=False)
        self.head.weight = self.emb.weight


def resolves(log: list[minihub.Request], name: str) -> list[minihub.Request]:
    """GET requests for the file ``name`` (a /resolve URL, or the CDN URL it redirects to)."""
    return [r for r in log if r.method == "GET" and "/resolve/" in r.path and r.path.endswith("/" + name)]


def full_downloads(log: list[minihub.Request]) -> list[str]:
    """Paths of files downloaded without a Range header (LFS files through the CDN count by oid)."""
    return [r.path for r in log if r.method == "GET" and ("/resolve/" in r.path or "/_cdn/" in r.path) and not r.range]


def cli(hub: Hub, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The ``safeckpt`` console script, talking to ``hub`` through HF_ENDPOINT/HF_TOKEN/HF_HOME."""
    script = Path(sys.executable).with_name("safeckpt")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "safeckpt"]
    return subprocess.run([*command, *args], capture_output=True, text=True, env=hub.env(**env), timeout=300)


# -- import and URI ------------------------------------------------------------------------------


def test_importing_safeckpt_does_not_import_huggingface_hub() -> None:
    code = "import sys, safeckpt; safeckpt.push_to_hub; assert 'huggingface_hub' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_missing_huggingface_hub_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ImportError, match=r"pip install 'safeckpt\[hub\]'"):
        safeckpt.pull_from_hub("me/run1")
    with pytest.raises(ImportError, match=r"safeckpt\[hub\]"):
        safeckpt.load("hf://me/run1/checkpoint.safeckpt")


@pytest.mark.parametrize(
    ("uri", "want"),
    [
        ("hf://me/run1", ("me/run1", None, "", "model")),
        ("hf://me/run1/", ("me/run1", None, "", "model")),
        ("hf://me/run1@v2/a/b.safeckpt", ("me/run1", "v2", "a/b.safeckpt", "model")),
        ("hf://me/run1@" + "a" * 40 + "/x", ("me/run1", "a" * 40, "x", "model")),
        ("hf://me/run1@refs/pr/3/ckpt.safeckpt", ("me/run1", "refs/pr/3", "ckpt.safeckpt", "model")),
        ("hf://me/run1@refs%2Fpr%2F3/ckpt.safeckpt", ("me/run1", "refs/pr/3", "ckpt.safeckpt", "model")),
        ("hf://datasets/me/data@main/x.safetensors", ("me/data", "main", "x.safetensors", "dataset")),
    ],
)
def test_parse_uri(uri: str, want: tuple[Any, ...]) -> None:
    loc = hubmod.parse_uri(uri)
    assert (loc.repo_id, loc.revision, loc.path, loc.repo_type) == want
    assert hubmod.parse_uri(str(loc)) == loc


@pytest.mark.parametrize("uri", ["hf://run1", "hf://me", "hf://@x/y", "hf://me/run1/../etc", "s3://me/run1"])
def test_parse_uri_rejects(uri: str) -> None:
    with pytest.raises(ValueError, match="hf://"):
        hubmod.parse_uri(uri)


# -- round trips -----------------------------------------------------------------------------------


def test_push_training_state_then_load_on_another_machine(hub: Hub) -> None:
    repo = hub.repo()
    state = train_state(7)
    mark = hub.mark()
    uri = safeckpt.push_to_hub(state, repo)
    assert uri.startswith(f"hf://{repo}@") and uri.endswith("/checkpoint.safeckpt")
    pushed = hub.since(mark)
    batch = [r for r in pushed if r.path.endswith(".git/info/lfs/objects/batch")]
    if hub.mode == "lfs":  # the native file went up through git-LFS, in parts (it is over 48 KB)
        assert (
            batch and any("/_lfs/part/" in r.path for r in pushed) and any("/_lfs/complete/" in r.path for r in pushed)
        )
    else:
        assert not batch and not any("/_lfs/" in r.path for r in pushed)
    assert all(r.status < 500 for r in pushed)

    hub.new_machine()
    target = fresh_state()
    remainder = safeckpt.load(f"hf://{repo}/checkpoint.safeckpt", target)
    assert remainder == {}
    assert_state_equal(target, state)
    # the downloaded file is the one pushed, byte for byte: the pinned URI reads the same
    assert_bits_equal(safeckpt.load(uri), safeckpt.load(f"hf://{repo}@main/checkpoint.safeckpt"))


def test_pull_in_fresh_cache_then_load(hub: Hub) -> None:
    repo = hub.repo()
    state = train_state(3)
    safeckpt.push_to_hub(state, repo, path_in_repo="runs/a/last.safeckpt", commit_message="step 3")
    hub.new_machine()
    path = safeckpt.pull_from_hub(repo, filename="runs/a/last.safeckpt")
    assert path.is_file() and "hf-home" in str(path)
    target = fresh_state()
    safeckpt.load(path, target)
    assert_state_equal(target, state)
    snapshot = safeckpt.pull_from_hub(repo, allow_patterns="runs/**")
    assert sorted(p.name for p in snapshot.rglob("*") if p.is_file()) == ["last.safeckpt"]
    local = safeckpt.pull_from_hub(repo, local_dir=hub.tmp / "copy")
    assert (local / "runs/a/last.safeckpt").read_bytes() == path.read_bytes()
    summaries = [c["summary"] for c in hub.store.repos[("model", repo)]["commits"].values()]
    assert "step 3" in summaries


def test_push_a_checkpoint_file(hub: Hub, tmp_path: Path) -> None:
    """Any file the registry reads is pushed; a training state goes up native, named after it."""
    repo = hub.repo()
    state = train_state(5)
    src = safeckpt.save(tmp_path / "run" / "fabric.safeckpt", state)
    uri = safeckpt.push_to_hub(src, repo)
    assert uri.endswith("/fabric.safeckpt")
    hub.new_machine()
    target = fresh_state()
    safeckpt.load(f"hf://{repo}/fabric.safeckpt", target)
    assert_state_equal(target, state)


def test_weights_sharded_open_in_the_hub_loaders(hub: Hub) -> None:
    from safetensors import safe_open

    repo = hub.repo()
    model = TiedLM(0)
    uri = safeckpt.push_to_hub(model, repo, max_shard_size="6KB")
    assert uri == f"hf://{repo}@{uri.split('@')[1]}" and "/" not in uri.split("@")[1]
    hub.new_machine()
    snap = safeckpt.pull_from_hub(repo)
    index = json.loads((snap / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    n = len(shards)
    assert n > 1 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    for shard in shards:
        with safe_open(snap / shard, "pt") as f:
            assert f.metadata()["format"] == "pt"

    fresh = TiedLM(1)
    hf.load_torch_model(fresh, snap)
    assert_bits_equal(fresh.state_dict(), model.state_dict())
    assert fresh.head.weight is fresh.emb.weight

    # and safeckpt reads the same weights straight from the Hub, tie and all, strictly
    other = TiedLM(2)
    safeckpt.load_raw(f"hf://{repo}", other)
    assert_bits_equal(other.state_dict(), model.state_dict())


def test_weights_single_file_loads_with_safetensors_load_model(hub: Hub) -> None:
    from safetensors.torch import load_model

    repo = hub.repo()
    model = TiedLM(0)
    safeckpt.push_to_hub(model, repo, path_in_repo="weights")
    snap = safeckpt.pull_from_hub(repo)
    assert sorted(p.name for p in (snap / "weights").iterdir()) == ["model.safetensors"]
    fresh = TiedLM(1)
    load_model(fresh, snap / "weights" / "model.safetensors", strict=True)
    assert_bits_equal(fresh.state_dict(), model.state_dict())
    fresh = TiedLM(3)
    hf.load_torch_model(fresh, snap / "weights")
    assert_bits_equal(fresh.state_dict(), model.state_dict())


def test_repush_weights_replaces_the_old_shards(hub: Hub) -> None:
    repo = hub.repo()
    safeckpt.push_to_hub(TiedLM(0), repo, max_shard_size="6KB")
    model = TiedLM(4)
    safeckpt.push_to_hub(model, repo)  # now one file: the old index and shards must go
    files = hf.HfApi(endpoint=hub.endpoint, token=TOKEN).list_repo_files(repo)
    assert sorted(files) == [".gitattributes", "model.safetensors"]
    fresh = TiedLM(1)
    hf.load_torch_model(fresh, safeckpt.pull_from_hub(repo))
    assert_bits_equal(fresh.state_dict(), model.state_dict())


def test_two_commits_then_the_older_revision(hub: Hub) -> None:
    repo = hub.repo()
    first, second = train_state(1), train_state(2)
    uri1 = safeckpt.push_to_hub(first, repo)
    uri2 = safeckpt.push_to_hub(second, repo)
    sha1 = uri1.split("@")[1].split("/")[0]
    assert uri1 != uri2
    hf.HfApi(endpoint=hub.endpoint, token=TOKEN).create_tag(repo, tag="v1", revision=sha1)
    for older in (uri1, f"hf://{repo}@v1/checkpoint.safeckpt"):
        target = fresh_state()
        safeckpt.load(older, target)
        assert_state_equal(target, first)
    target = fresh_state()
    safeckpt.load(f"hf://{repo}/checkpoint.safeckpt", target)
    assert_state_equal(target, second)
    hub.new_machine()
    target = fresh_state()
    safeckpt.load(safeckpt.pull_from_hub(repo, filename="checkpoint.safeckpt", revision=sha1), target)
    assert_state_equal(target, first)


def test_branch_private_and_pull_request(hub: Hub) -> None:
    repo = hub.repo()
    main, dev, pr = train_state(1), train_state(2), train_state(3)
    safeckpt.push_to_hub(main, repo, private=True)
    safeckpt.push_to_hub(dev, repo, revision="dev")
    uri = safeckpt.push_to_hub(pr, repo, create_pr=True)
    for rev, want in (("main", main), ("dev", dev), ("refs/pr/1", pr), (uri.split("@")[1].split("/")[0], pr)):
        target = fresh_state()
        safeckpt.load(f"hf://{repo}@{rev}/checkpoint.safeckpt", target)
        assert_state_equal(target, want)
    assert hub.store.repos[("model", repo)]["private"]
    hub.monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubNotFoundError, match="private"):
        safeckpt.load(f"hf://{repo}/checkpoint.safeckpt")
    with pytest.raises(ValueError, match="create_pr"):
        safeckpt.push_to_hub(pr, repo, revision="dev", create_pr=True)


# -- hf:// everywhere ------------------------------------------------------------------------------


def test_hf_paths_in_open_load_raw_and_convert(hub: Hub, tmp_path: Path) -> None:
    repo = hub.repo()
    state = train_state(9)
    safeckpt.push_to_hub(state, repo)
    uri = f"hf://{repo}/checkpoint.safeckpt"
    ckpt = safeckpt.open(uri)
    assert ckpt["step"] == 9 and ckpt.format == "safeckpt"
    assert_bits_equal(ckpt.tensors()["model/0.weight"].load(), state["model"][0].weight.detach())
    out = safeckpt.convert(uri, tmp_path / "model.safetensors", key="model")
    fresh = fresh_state()["model"]
    safeckpt.load_raw(out, fresh)
    assert_bits_equal(fresh.state_dict(), state["model"].state_dict())

    safeckpt.push_to_hub(state["model"].state_dict(), repo, path_in_repo="bare.safeckpt")
    fresh = fresh_state()["model"]
    safeckpt.load_raw(f"hf://{repo}/bare.safeckpt", fresh)
    assert_bits_equal(fresh.state_dict(), state["model"].state_dict())


# -- partial pulls, cache, offline -----------------------------------------------------------------


def shards_of(view: Path, prefix: str) -> set[str]:
    """Shard files of a safeckpt-sharded checkpoint holding the tensor ``prefix`` or those under ``prefix/``."""
    from safeckpt.formats import safeckpt_sharded

    index = safeckpt_sharded.read_index(view)
    files = [f["name"] for f in index["files"]]
    chosen = [t for name, t in index["tensors"].items() if name == prefix or name.startswith(prefix.rstrip("/") + "/")]
    return {files[c["file"]] for t in chosen for c in t["chunks"]}


def test_partial_load_downloads_only_the_needed_shards(hub: Hub) -> None:
    repo = hub.repo()
    state = train_state(11)
    uri = safeckpt.push_to_hub(state, repo, max_shard_size="24KB")
    assert uri.endswith("/checkpoint")
    hub.new_machine()
    mark = hub.mark()
    model = fresh_state()["model"]
    remainder = safeckpt.load(f"hf://{repo}/checkpoint", {"model": model})
    assert_bits_equal(model.state_dict(), state["model"].state_dict())
    log = hub.since(mark)

    view = hubmod.resolve(f"hf://{repo}/checkpoint")  # a commit already cached: no request
    assert hub.since(mark + len(log)) == [r for r in hub.since(mark + len(log)) if "/revision/" in r.path]
    every = {p.name for p in view.iterdir() if p.name.startswith("shard-")}
    needed = shards_of(view, "model/")
    assert len(every) > len(needed) > 0, "the test needs shards the model does not use"
    assert {name for name in every if resolves(log, name) and any(not r.range for r in resolves(log, name))} <= needed
    for name in every - needed:  # read only as far as the header, by range requests
        assert resolves(log, name) and all(r.range for r in resolves(log, name)), name
    downloaded = len(full_downloads(log))
    assert downloaded == len(needed) + 1  # the needed shards and the index

    # the remainder is lazy: loading one optimizer tensor fetches just its shard
    ref = remainder["optimizer"]["state"][0]["exp_avg"]
    assert isinstance(ref, TensorRef) and remainder["step"] == 11
    mark = hub.mark()
    assert_bits_equal(ref.load(), state["optimizer"].state_dict()["state"][0]["exp_avg"])
    assert len(full_downloads(hub.since(mark))) == len(shards_of(view, "optimizer/state/0/exp_avg") - needed)


def test_partial_read_of_hub_weights(hub: Hub, tmp_path: Path) -> None:
    repo = hub.repo()
    model = TiedLM(0)
    safeckpt.push_to_hub(model, repo, max_shard_size="5KB")
    hub.new_machine()
    mark = hub.mark()
    ckpt = safeckpt.open(f"hf://{repo}")
    assert ckpt.format == "hf-sharded" and len(ckpt.info["shards"]) > 2
    whole = full_downloads(hub.since(mark))  # the index (and .gitattributes): no shard yet
    assert any(p.endswith(".index.json") for p in whole) and all(p.endswith((".json", ".gitattributes")) for p in whole)
    mark = hub.mark()
    assert_bits_equal(ckpt["body.weight"].load(), model.body.weight.detach())
    assert len(full_downloads(hub.since(mark))) == 1
    out = safeckpt.convert(
        f"hf://{repo}", tmp_path / "body.safetensors", filter=lambda name, ref: name.startswith("body.")
    )
    assert len(full_downloads(hub.since(mark))) == 1  # same shard, from the cache
    assert sorted(safeckpt.load(out)) == ["body.bias", "body.weight"]


def test_second_load_hits_the_cache(hub: Hub) -> None:
    repo = hub.repo()
    state = train_state(4)
    uri = safeckpt.push_to_hub(state, repo, max_shard_size="24KB")
    first = safeckpt.load(f"hf://{repo}/checkpoint")
    mark = hub.mark()
    assert_bits_equal(safeckpt.load(f"hf://{repo}/checkpoint"), first)
    again = hub.since(mark)
    assert [r.path for r in again] == [f"/api/models/{repo}/revision/main"]  # the branch, looked up once
    mark = hub.mark()
    assert_bits_equal(safeckpt.load(uri), first)  # pinned to a commit: no request at all
    assert safeckpt.pull_from_hub(
        repo, filename="checkpoint/safeckpt-index.msgpack", revision=uri.split("@")[1].split("/")[0]
    )
    assert hub.since(mark) == []


def test_offline_mode_works_from_the_cache(hub: Hub) -> None:
    repo = hub.repo()
    state = train_state(6)
    safeckpt.push_to_hub(state, repo, max_shard_size="24KB")
    safeckpt.push_to_hub(state["model"], repo)
    model = fresh_state()["model"]
    safeckpt.load(f"hf://{repo}/checkpoint", {"model": model})  # fetches the model's shards only
    full = safeckpt.load(f"hf://{repo}/checkpoint")  # and now everything
    safeckpt.pull_from_hub(repo, filename="model.safetensors")
    hub.monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    mark = hub.mark()
    assert_bits_equal(safeckpt.load(f"hf://{repo}/checkpoint"), full)
    target = fresh_state()
    safeckpt.load(f"hf://{repo}@main/checkpoint", target)
    assert_state_equal(target, state)
    fresh = fresh_state()["model"]
    safeckpt.load_raw(f"hf://{repo}/model.safetensors", fresh)
    assert_bits_equal(fresh.state_dict(), state["model"].state_dict())
    assert safeckpt.pull_from_hub(repo, filename="model.safetensors").is_file()
    assert hub.since(mark) == []
    with pytest.raises(HubNotFoundError, match="HF_HUB_OFFLINE=1") as e:
        safeckpt.load(f"hf://{hub.repo()}/checkpoint.safeckpt")
    assert "\n" not in str(e.value)


def test_offline_partial_cache_names_the_missing_shard(hub: Hub) -> None:
    repo = hub.repo()
    safeckpt.push_to_hub(train_state(6), repo, max_shard_size="24KB")
    remainder = safeckpt.load(f"hf://{repo}/checkpoint", {"model": fresh_state()["model"]})
    hub.monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubNotFoundError, match=r"shard-.*not in the local cache .* HF_HUB_OFFLINE=1"):
        remainder["optimizer"]["state"][1]["exp_avg_sq"].load()


# -- errors ----------------------------------------------------------------------------------------


def test_hub_errors_are_one_clear_line(hub: Hub) -> None:
    repo = hub.repo()
    safeckpt.push_to_hub(train_state(1), repo)
    cases = [
        (HubNotFoundError, f"hf://{hub.repo()}/checkpoint.safeckpt", "not found"),
        (HubNotFoundError, f"hf://{repo}@nope/checkpoint.safeckpt", "revision 'nope' not found"),
        (HubNotFoundError, f"hf://{repo}/missing.safeckpt", "no file or folder 'missing.safeckpt'"),
    ]
    for kind, uri, words in cases:
        with pytest.raises(kind) as e:
            safeckpt.load(uri)
        text = str(e.value)
        assert words in text and repo.split("/")[0] in text and "\n" not in text, text
        assert isinstance(e.value, FileNotFoundError)
    with pytest.raises(HubNotFoundError, match=r"no file 'nope.bin' in me/") as e:
        safeckpt.pull_from_hub(repo, filename="nope.bin")
    with pytest.raises(HubAuthError, match=r"refused access \(401") as e:
        safeckpt.pull_from_hub(repo, filename="checkpoint.safeckpt", token="hf_not_a_token")
    with pytest.raises(HubAuthError, match=r"403.*write access") as e:
        safeckpt.push_to_hub(train_state(1), repo, token=OTHER)
    assert isinstance(e.value, PermissionError) and "\n" not in str(e.value)
    with pytest.raises(HubError, match=r"http://127\.0\.0\.1:9 cannot be reached; check HF_ENDPOINT"):
        safeckpt.pull_from_hub(repo, endpoint="http://127.0.0.1:9")


def test_pulled_pickle_goes_through_the_restricted_unpickler(hub: Hub, tmp_path: Path) -> None:
    if "torch" not in safeckpt.formats.names():
        pytest.fail("the torch format is not registered")
    canary = tmp_path / "pwned"

    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {canary}",))

    buf = io.BytesIO()
    pickle.dump({"weight": Payload()}, buf, protocol=2)
    repo = hub.repo()
    api = hf.HfApi(endpoint=hub.endpoint, token=TOKEN)
    api.create_repo(repo)
    api.upload_file(path_or_fileobj=buf.getvalue(), path_in_repo="pytorch_model.bin", repo_id=repo)
    with pytest.raises(safeckpt.UnsafeCheckpointError, match="system"):
        safeckpt.load(f"hf://{repo}/pytorch_model.bin")
    with pytest.raises(safeckpt.UnsafeCheckpointError):
        safeckpt.load(safeckpt.pull_from_hub(repo, filename="pytorch_model.bin"))
    assert not canary.exists()


def test_placeholder_header_is_the_real_header(hub: Hub) -> None:
    """A view's placeholder holds the real header and nothing else until fetched."""
    repo = hub.repo()
    safeckpt.push_to_hub(TiedLM(0), repo)
    hub.new_machine()
    view = hubmod.resolve(f"hf://{repo}/model.safetensors")
    real = safeckpt.pull_from_hub(repo, filename="model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", real[:8])
    data = view.read_bytes()
    assert len(data) == len(real) and data[: 8 + n] == real[: 8 + n] and not any(data[8 + n :])


# -- the CLI ---------------------------------------------------------------------------------------

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def test_cli_push_fabric_checkpoint_then_load_it_elsewhere(hub: Hub) -> None:
    """`safeckpt push fabric.ckpt me/run1`, then on another machine `safeckpt.load("hf://me/run1/...")`."""
    fixture = FIXTURES / "lightning" / "fabric.ckpt"
    repo = hub.repo()
    r = cli(hub, "push", repo, str(fixture), "--commit-message", "from fabric")  # `hf upload`'s order
    assert r.returncode == 0, r.stderr
    uri = r.stdout.strip()
    assert uri.startswith(f"hf://{repo}@") and uri.endswith("/fabric.safeckpt"), uri

    hub.new_machine()
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.5)
    state = {"model": model, "optimizer": opt, "hparams": None, "args": None, "data_dir": None, "step": 0}
    assert safeckpt.load(f"hf://{repo}/fabric.safeckpt", state) == {}
    oracle = torch.load(fixture, weights_only=False)  # our own trusted fixture, as the differential oracle
    assert_bits_equal(model.state_dict(), oracle["model"])
    assert_bits_equal(opt.state_dict(), oracle["optimizer"])
    assert (state["step"], dict(state["hparams"]), state["args"]) == (
        oracle["step"],
        dict(oracle["hparams"]),
        oracle["args"],
    )
    assert state["data_dir"] == oracle["data_dir"]


@pytest.mark.parametrize("server", ["regular"], indirect=True)
def test_cli_pull_by_file_revision_offline_and_errors(hub: Hub) -> None:
    repo = hub.repo()
    uri = safeckpt.push_to_hub(train_state(2), repo, path_in_repo="fabric.safeckpt")
    sha = uri.split("@")[1].split("/")[0]
    r = cli(hub, "pull", repo, "fabric.safeckpt", "--revision", sha)
    assert r.returncode == 0, r.stderr
    pulled = Path(r.stdout.strip())
    assert pulled.read_bytes() == safeckpt.pull_from_hub(repo, filename="fabric.safeckpt").read_bytes()
    mark = hub.mark()
    r = cli(hub, "pull", f"hf://{repo}@{sha}/fabric.safeckpt", "--json", HF_HUB_OFFLINE="1")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["path"] == str(pulled) and hub.since(mark) == []
    r = cli(hub, "pull", f"{repo}-nope")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "not found" in r.stderr and f"{repo}-nope" in r.stderr, r.stderr


@pytest.mark.parametrize("server", ["regular"], indirect=True)
def test_cli_push_weights_and_read_hf_paths(hub: Hub, tmp_path: Path) -> None:
    model = TiedLM(0)
    src = safeckpt.save(tmp_path / "weights.safetensors", model)
    repo = hub.repo()
    r = cli(hub, "push", repo, str(src), "--max-shard-size", "5KB", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["path_in_repo"] == ""
    fresh = TiedLM(1)
    hf.load_torch_model(fresh, safeckpt.pull_from_hub(repo))
    assert_bits_equal(fresh.state_dict(), model.state_dict())

    out = tmp_path / "body.safetensors"
    r = cli(hub, "convert", f"hf://{repo}", str(out), "--include", "body*")
    assert r.returncode == 0, r.stderr
    assert_bits_equal(
        safeckpt.load(out), {"body.bias": model.body.bias.detach(), "body.weight": model.body.weight.detach()}
    )
    r = cli(hub, "pull", f"hf://{repo}", "--local-dir", str(tmp_path / "copy"), "--include", "*.json")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "copy").iterdir() if not p.name.startswith(".")) == [
        "model.safetensors.index.json"
    ]


@pytest.mark.parametrize("server", ["regular"], indirect=True)
def test_cli_push_and_pull_take_hf_arguments(hub: Hub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`safeckpt push REPO SRC [PATH_IN_REPO]` and `pull` with `hf upload`/`hf download`'s options,
    in-process (the console script is exercised above)."""
    from safeckpt import cli as safeckpt_cli

    def run(*args: Any) -> tuple[int, str, str]:
        capsys.readouterr()
        code = safeckpt_cli.main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    repo = hub.repo()
    src = safeckpt.save(tmp_path / "last.ckpt", train_state(1))
    code, out, err = run("push", repo, src, "runs/epoch3.safeckpt", "--commit-message", "epoch 3", "--private")
    assert code == 0, err
    uri = out.strip()
    assert uri.startswith(f"hf://{repo}@") and uri.endswith("/runs/epoch3.safeckpt")
    stored = hub.store.repos[("model", repo)]
    assert stored["private"] and stored["commits"][uri.split("@")[1].split("/")[0]]["summary"] == "epoch 3"
    code, out, err = run("push", repo, src, "dev.safeckpt", "--revision", "dev", "--json")
    assert code == 0 and json.loads(out)["path_in_repo"] == "dev.safeckpt", err
    code, out, err = run("push", repo, src, "pr.safeckpt", "--create-pr")
    assert code == 0 and "refs/pr/1" in stored["branches"], err
    # the old order (SRC REPO) is named as such, not reported as a missing file
    code, out, err = run("push", src, repo, "--json")
    assert code == 2 and f"safeckpt push {repo} {src}" in json.loads(out)["hint"]

    code, out, err = run("pull", repo, "dev.safeckpt", "--revision", "dev", "--cache-dir", tmp_path / "cache")
    assert code == 0, err
    assert Path(out.strip()).is_relative_to(tmp_path / "cache") and safeckpt.load(out.strip())["step"] == 1
    local = tmp_path / "local"
    code, out, err = run("pull", repo, "--local-dir", local, "--include", "runs/*", "--exclude", "*.md")
    assert code == 0 and Path(out.strip()) == local, err
    assert sorted(str(p.relative_to(local)) for p in local.rglob("*.safeckpt")) == ["runs/epoch3.safeckpt"]
    code, out, err = run(
        "pull", repo, "--local-dir", tmp_path / "none", "--exclude", "*.safeckpt", "--exclude", "runs/*"
    )
    assert code == 0 and not list((tmp_path / "none").rglob("*.safeckpt")), err
    code, out, err = run("pull", f"{repo}-nope", "--json")
    assert code == 2 and set(json.loads(out)) == {"error", "path", "hint", "key"} and "not found" in json.loads(out)["error"]


def test_folder_view_skips_subfolders_and_other_formats_copies(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model repo root with pytorch_model.bin beside model.safetensors, and other runs in
    sub-folders: reading the weights downloads neither."""
    monkeypatch.setattr(hubmod, "OTHER_WEIGHTS_SIZE", 1000)
    repo = hub.repo()
    model = TiedLM(0)
    safeckpt.push_to_hub(model, repo)
    safeckpt.push_to_hub(train_state(1), repo, path_in_repo="runs/a/checkpoint.safeckpt")
    api = hf.HfApi(endpoint=hub.endpoint, token=TOKEN)
    api.upload_file(path_or_fileobj=b"\0" * 5000, path_in_repo="pytorch_model.bin", repo_id=repo)
    api.upload_file(path_or_fileobj=b'{"dim": 32}', path_in_repo="config.json", repo_id=repo)
    hub.new_machine()
    mark = hub.mark()
    fresh = TiedLM(1)
    safeckpt.load_raw(f"hf://{repo}", fresh)
    assert_bits_equal(fresh.state_dict(), model.state_dict())
    got = [r.path for r in hub.since(mark) if r.method == "GET" and "/resolve/" in r.path]
    assert not [p for p in got if p.endswith(("pytorch_model.bin", "checkpoint.safeckpt"))], got
    assert any(p.endswith("config.json") for p in got)


@pytest.mark.parametrize("server", ["regular"], indirect=True)
def test_verify_and_diff_read_hf_paths(hub: Hub) -> None:
    from safeckpt import cli as safeckpt_cli

    repo = hub.repo()
    a = safeckpt.push_to_hub(train_state(1), repo, max_shard_size="24KB")
    b = safeckpt.push_to_hub(train_state(2), repo, max_shard_size="24KB")
    assert safeckpt_cli.main(["verify", "--quiet", f"hf://{repo}/checkpoint"]) == 0
    assert safeckpt_cli.main(["diff", "--quiet", a, a]) == 0
    assert safeckpt_cli.main(["diff", "--quiet", a, b]) == 1
    assert safeckpt.load(b, verify=True)["step"] == 2


def test_a_download_that_disagrees_with_the_header_read_is_refused(hub: Hub) -> None:
    repo = hub.repo()
    model = TiedLM(0)
    safeckpt.push_to_hub(model, repo)
    ckpt = safeckpt.open(f"hf://{repo}/model.safetensors")  # placeholder: header only
    # the blob behind the commit changes (a stale CDN, a bad mirror): the same bytes count, another header
    store = hub.store
    entry = store.repos[("model", repo)]["commits"][store.repos[("model", repo)]["branches"]["main"]]["files"][
        "model.safetensors"
    ]
    blob = Path(store.blob_path(entry))
    data = bytearray(blob.read_bytes())
    at = data.index(b'"format":"pt"')
    data[at : at + 13] = b'"format":"PT"'
    blob.write_bytes(bytes(data))
    with pytest.raises(safeckpt.CorruptCheckpointError, match="header differs"):
        ckpt["body.weight"].load()


def test_push_checkpoint_directories(hub: Hub) -> None:
    """A pickle-sharded HF directory goes up as safetensors weights; a DCP directory (Fabric FSDP,
    two ranks) as one native checkpoint. Both read back equal to the source."""
    repo = hub.repo()
    weights, dcp = FIXTURES / "hf" / "sharded_bin", FIXTURES / "dcp" / "fabric_fsdp"
    assert safeckpt.push_to_hub(weights, repo, max_shard_size=400).count("/") == 3  # the repo root
    assert safeckpt.push_to_hub(dcp, repo).endswith("/fabric_fsdp.safeckpt")
    files = hf.HfApi(endpoint=hub.endpoint, token=TOKEN).list_repo_files(repo)
    assert "model.safetensors.index.json" in files and not [f for f in files if f.endswith(".bin")]
    hub.new_machine()
    assert_bits_equal(safeckpt.load(f"hf://{repo}"), safeckpt.load(weights))
    assert_bits_equal(safeckpt.load(f"hf://{repo}/fabric_fsdp.safeckpt"), safeckpt.load(dcp))


@pytest.mark.parametrize("server", ["regular"], indirect=True)
def test_a_listing_that_escapes_the_folder_is_refused(
    hub: Hub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    repo = hub.repo()
    safeckpt.push_to_hub(TiedLM(0), repo, path_in_repo="weights")
    listing = minihub.tree_entries

    def malicious(files: dict[str, Any], path: str, recursive: bool) -> list[dict[str, Any]]:
        entries = listing(files, path, recursive)
        return [*entries, {**entries[0], "path": f"{path}/../../../../escaped.json"}]

    monkeypatch.setattr(minihub, "tree_entries", malicious)
    with pytest.raises(HubError, match="refusing to write it"):
        safeckpt.open(f"hf://{repo}/weights")
    assert not list(Path(os.environ["HF_HOME"]).rglob("escaped.json"))


def test_pull_of_a_folder_decides_by_the_error_key_not_its_text(
    hub: Hub, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`safeckpt pull hf://repo/folder` first asks for a file of that name; the Hub's "no such file"
    carries the file as ``key``, and that (not the message's words) makes it pull the folder."""
    from safeckpt import cli as safeckpt_cli

    repo = hub.repo()
    hubmod.push_to_hub(safeckpt.save(tmp_path / "a.safeckpt", train_state(1)), repo, path_in_repo="runs/a.safeckpt")
    with pytest.raises(HubNotFoundError) as info:
        hubmod.pull_from_hub(repo, filename="runs", cache_dir=tmp_path / "c0")
    assert info.value.key == "runs"
    real = hubmod.pull_from_hub

    def reworded(*args: Any, **kwargs: Any) -> Path:
        try:
            return real(*args, **kwargs)
        except HubNotFoundError as e:  # the same error in other words: the decision must not change
            raise HubNotFoundError("the Hub has nothing by that name", key=e.key) from None

    monkeypatch.setattr(hubmod, "pull_from_hub", reworded)
    capsys.readouterr()
    code = safeckpt_cli.main(["pull", f"hf://{repo}/runs", "--cache-dir", str(tmp_path / "c1")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert safeckpt.load(Path(out.strip()) / "a.safeckpt")["step"] == 1
