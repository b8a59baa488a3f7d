"""Loading into real models: ``device=``, materializing meta models (``assign=True``), ties kept,
what ``load_raw`` returns, the named mistaken calls, and the CUDA staging path.

Tests marked ``cuda`` run only where ``torch.cuda.is_available()`` (``pytest -m cuda``); the
staging pipeline itself is also run on the CPU here, with tiny buffers.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file, save_model
from torch import nn

import safeckpt
from conformance import bits_equal
from safeckpt import _device
from safeckpt.manager import CheckpointManager

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class TiedLM(nn.Module):
    """An LM head tied to its embedding, a bf16 layer, a norm with an int64 buffer."""

    def __init__(self, vocab: int = 64, dim: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mid = nn.Linear(dim, dim).to(torch.bfloat16)
        self.norm = nn.BatchNorm1d(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight


def source_model() -> TiedLM:
    torch.manual_seed(0)
    m = TiedLM()
    with torch.no_grad():
        m.norm.running_mean.normal_()
        m.norm.num_batches_tracked.fill_(5)
    return m


def meta_model() -> TiedLM:
    with torch.device("meta"):
        return TiedLM()


def assert_materialized(model: nn.Module, want: nn.Module, device: str = "cpu") -> None:
    got, ref = model.state_dict(keep_vars=True), want.state_dict()
    assert list(got) == list(ref)
    for k, v in got.items():
        assert v.device.type == device, k
        assert bits_equal(v, ref[k]), k
    params = dict(model.named_parameters(remove_duplicate=False))
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in params.values())
    assert model.head.weight is model.emb.weight  # one Parameter, as built
    assert len(list(model.parameters())) == len(list(want.parameters()))


# -- the files: one per format, each from its real producer --------------------------------------


def hf_like(model: nn.Module, path: Path) -> Path:
    """What Hugging Face's save_pretrained writes: the tied head dropped, no alias recorded."""
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "head.weight"}
    save_file(sd, str(path), metadata={"format": "pt"})
    return path


def write(kind: str, model: nn.Module, tmp: Path) -> Path:
    if kind == "safeckpt":
        return safeckpt.save(tmp / "m.safeckpt", model)
    if kind == "safetensors.save_model":
        save_model(model, str(tmp / "m.safetensors"))
        return tmp / "m.safetensors"
    if kind == "hf-style safetensors":
        return hf_like(model, tmp / "model.safetensors")
    if kind == "torch.save":
        torch.save(model.state_dict(), tmp / "m.pt")
        return tmp / "m.pt"
    if kind == "safeckpt-sharded":
        return safeckpt.save(tmp / "sharded", model, max_shard_size=2000)
    if kind == "hf-sharded":
        save_torch_state_dict = pytest.importorskip("huggingface_hub").save_torch_state_dict

        (tmp / "hf").mkdir()
        save_torch_state_dict(model.state_dict(), tmp / "hf", max_shard_size=2000)
        assert len(list((tmp / "hf").glob("*.safetensors"))) > 1
        return tmp / "hf"
    raise AssertionError(kind)


KINDS = ["safeckpt", "safetensors.save_model", "hf-style safetensors", "torch.save", "safeckpt-sharded", "hf-sharded"]


@pytest.mark.parametrize("kind", KINDS)
def test_meta_model_is_materialized_bit_equal_with_ties_kept(kind: str, tmp_path: Path) -> None:
    src = source_model()
    path = write(kind, src, tmp_path)
    model = meta_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left on meta, nothing torch warns about
        result = safeckpt.load_raw(path, model, assign=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert_materialized(model, src)
    # it trains: the tie is one parameter for autograd and optimizers alike
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.head(model.emb(torch.tensor([1, 2]))).sum().backward()
    opt.step()
    assert torch.equal(model.head.weight, model.emb.weight)
    assert bits_equal(safeckpt.open(path).to_python().get("mid.bias", src.mid.bias), src.mid.bias)  # file unchanged


@pytest.mark.parametrize("kind", ["safeckpt", "hf-style safetensors", "torch.save"])
def test_load_with_state_assigns_modules(kind: str, tmp_path: Path) -> None:
    src = source_model()
    safeckpt.save(tmp_path / "full.safeckpt", {"model": src, "step": 3})
    path = tmp_path / "full.safeckpt" if kind == "safeckpt" else write(kind, src, tmp_path)
    model = meta_model()
    state: dict[str, Any] = {"model": model, "step": 0} if kind == "safeckpt" else {}
    if kind == "safeckpt":
        assert safeckpt.load(path, state, assign=True) == {} and state["step"] == 3
    else:
        safeckpt.load_raw(path, model, assign=True)
    assert_materialized(model, src)


def test_manager_restore_passes_assign_and_device(tmp_path: Path) -> None:
    src = source_model()
    manager = CheckpointManager(tmp_path)
    manager.save(1, {"model": src})
    model = meta_model()
    manager.restore({"model": model}, assign=True, device="cpu")
    assert_materialized(model, src)


def test_assign_to_meta_device_keeps_shapes_and_reads_nothing(tmp_path: Path) -> None:
    path = safeckpt.save(tmp_path / "m.safeckpt", source_model())
    model = meta_model()
    safeckpt.load_raw(path, model, assign=True, device="meta")
    assert all(t.device.type == "meta" for t in model.state_dict().values())
    assert model.head.weight is model.emb.weight


def test_assign_without_device_keeps_each_tensor_where_it_was(tmp_path: Path) -> None:
    src = source_model()
    path = safeckpt.save(tmp_path / "m.safeckpt", src)
    model = TiedLM()
    old = model.emb.weight
    safeckpt.load_raw(path, model, assign=True)
    assert model.emb.weight is not old and model.head.weight is model.emb.weight
    assert_materialized(model, src)


def test_assign_leaves_what_the_file_lacks_on_meta_and_says_so(tmp_path: Path) -> None:
    src = source_model()
    path = hf_like(src, tmp_path / "m.safetensors")
    sd = safeckpt.load(path)
    del sd["mid.bias"]
    save_file(sd, str(tmp_path / "partial.safetensors"))
    model = meta_model()
    with pytest.warns(UserWarning, match=r"still has tensors on the meta device .*mid\.bias"):
        result = safeckpt.load_raw(tmp_path / "partial.safetensors", model, assign=True, strict=False)
    assert result.missing_keys == ["mid.bias"] and result.unexpected_keys == []
    with pytest.raises(RuntimeError, match=r'Missing key\(s\).*"mid.bias"'):
        safeckpt.load_raw(tmp_path / "partial.safetensors", meta_model(), assign=True)


# -- no silent no-op -----------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["load_raw", "load"])
def test_meta_model_without_assign_is_an_error_naming_assign(how: str, tmp_path: Path) -> None:
    src = source_model()
    path = safeckpt.save(tmp_path / "m.safeckpt", {"model": src} if how == "load" else src)
    model = meta_model()
    with pytest.raises(RuntimeError, match=r"meta device.*pass assign=True"):
        if how == "load":
            safeckpt.load(path, {"model": model})
        else:
            safeckpt.load_raw(path, model)
    assert all(t.device.type == "meta" for t in model.state_dict().values())


# -- tie-aware strictness, in place ---------------------------------------------------------------


def test_in_place_load_fills_a_tied_key_the_file_omits(tmp_path: Path) -> None:
    src = source_model()
    path = hf_like(src, tmp_path / "model.safetensors")
    model = TiedLM()
    result = safeckpt.load_raw(path, model)  # strict: head.weight is not missing, it is emb.weight
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert_materialized(model, src)
    untied = nn.Module()  # a module without the tie: the key is really missing
    untied.emb, untied.head = nn.Embedding(64, 16), nn.Linear(16, 64, bias=False)
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "head.weight"'):
        safeckpt.load_raw(path, untied)
    # the same file as a checkpoint entry, loaded with load(path, {"model": m})
    safeckpt.save(tmp_path / "e.safeckpt", {"model": safeckpt.load(path)})
    model = TiedLM()
    assert safeckpt.load(tmp_path / "e.safeckpt", {"model": model}) == {}
    assert_materialized(model, src)


def test_device_without_assign_that_the_module_is_not_on_is_an_error(tmp_path: Path) -> None:
    path = safeckpt.save(tmp_path / "m.safeckpt", source_model())
    model = TiedLM()
    with pytest.raises(ValueError, match=r"loads in place.*on cpu.*module.to\('meta'\)"):
        safeckpt.load_raw(path, model, device="meta")
    assert safeckpt.load_raw(path, model, device="cpu").missing_keys == []  # where it is: fine


# -- what load_raw returns -----------------------------------------------------------------------


def test_load_raw_returns_incompatible_keys_like_load_state_dict(tmp_path: Path) -> None:
    src = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    path = safeckpt.save(tmp_path / "s.safetensors", src.state_dict())
    other = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.Linear(2, 2))
    ours = safeckpt.load_raw(path, other, strict=False)
    theirs = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.Linear(2, 2)).load_state_dict(
        src.state_dict(), strict=False
    )
    assert ours == theirs and type(ours) is type(theirs)
    assert ours.missing_keys == ["3.weight", "3.bias"]
    ours = safeckpt.load_raw(path, nn.Sequential(nn.Linear(3, 4)), strict=False)
    assert ours.missing_keys == [] and sorted(ours.unexpected_keys) == ["2.bias", "2.weight"]
    assert repr(safeckpt.load_raw(path, src)) == "<All keys matched successfully>"
    opt = torch.optim.SGD(src.parameters(), lr=0.1)
    safeckpt.save(tmp_path / "o.safeckpt", opt.state_dict())
    assert safeckpt.load_raw(tmp_path / "o.safeckpt", opt) is None


# -- named mistakes -------------------------------------------------------------------------------


def test_mistaken_calls_name_the_right_one(tmp_path: Path) -> None:
    m = nn.Linear(2, 2)
    path = safeckpt.save(tmp_path / "m.safeckpt", m)
    with pytest.raises(TypeError, match=r"load_raw\(path, module\).*\{'model': module\}"):
        safeckpt.load(path, m)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"arguments are swapped"):
        safeckpt.load_raw(m, path)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="assign=True materializes the modules in state"):
        safeckpt.load(path, assign=True)


# -- device= without targets ------------------------------------------------------------------------


def test_load_device_and_map_location(tmp_path: Path) -> None:
    src = source_model()
    path = safeckpt.save(tmp_path / "m.safeckpt", {"model": src, "n": 1})
    on_meta = safeckpt.load(path, device="meta")
    assert on_meta["n"] == 1 and all(t.device.type == "meta" for t in on_meta["model"].values())
    assert on_meta["model"]["head.weight"] is on_meta["model"]["emb.weight"]
    alias = safeckpt.load(path, map_location=torch.device("cpu"))
    assert all(bits_equal(alias["model"][k], v) for k, v in src.state_dict().items())
    with pytest.raises(ValueError, match="disagree"):
        safeckpt.load(path, device="cpu", map_location="meta")
    with pytest.raises(TypeError, match="pass device= instead"):
        safeckpt.load(path, map_location={"cuda:0": "cpu"})
    with pytest.raises(TypeError, match="must be a str or torch.device"):
        safeckpt.load(path, device=1.5)  # type: ignore[arg-type]
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match=r"device='cuda', but torch.cuda.is_available\(\) is False"):
            safeckpt.load(path, device="cuda")
    ref = safeckpt.open(path).tensors()["model/mid.weight"]
    t = ref.load(device="meta")
    assert t.device.type == "meta" and t.shape == ref.shape and t.dtype == torch.bfloat16
    # plain values and the remainder follow device= when loading into state too
    state: dict[str, Any] = {"model": TiedLM()}
    assert safeckpt.load(path, state, device="meta") == {"n": 1}
    assert state["model"].mid.weight.device.type == "cpu"  # in place: the module's own device


def plugin() -> Any:
    pytest.importorskip("lightning")
    from safeckpt.lightning import SafeCheckpointIO

    return SafeCheckpointIO()


def test_lightning_plugin_reads_onto_the_map_location(tmp_path: Path) -> None:
    io = plugin()
    src = source_model()
    io.save_checkpoint({"state_dict": src.state_dict(), "epoch": 1}, tmp_path / "c.ckpt")
    ckpt = io.load_checkpoint(tmp_path / "c.ckpt", map_location="meta")
    assert ckpt["epoch"] == 1 and ckpt["state_dict"]["mid.weight"].device.type == "meta"


# -- memory: materializing costs (almost) no anonymous memory ------------------------------------------

MEMORY_CHILD = """
import json, sys, torch, safeckpt
from torch import nn

def anon():
    with open("/proc/self/smaps_rollup") as f:
        return sum(int(l.split()[1]) * 1024 for l in f if l.startswith("Anonymous:"))

def build():
    return nn.Sequential(*[nn.Linear(2048, 2048) for _ in range(LAYERS)])

with torch.device("meta"):
    model = build()
before = anon()
safeckpt.load_raw(sys.argv[1], model, assign=True)
loaded = anon()
total = sum(float(p.double().sum()) for p in model.parameters())  # every page read
read = anon()
with torch.no_grad():
    model[0].weight.add_(1)  # one layer written: its pages are copied, the others stay shared
written = anon()
print(json.dumps({"loaded": loaded - before, "read": read - before, "written": written - before, "sum": total}))
"""


def test_materializing_a_large_model_costs_little_anonymous_memory(tmp_path: Path) -> None:
    layers = 16  # 16 x 16 MiB = 256 MiB of float32 weights
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(2048, 2048) for _ in range(layers)])
    size = sum(p.nbytes for p in model.parameters())
    path = safeckpt.save(tmp_path / "big.safeckpt", model)
    want = sum(float(p.detach().double().sum()) for p in model.parameters())
    del model
    code = textwrap.dedent(MEMORY_CHILD).replace("LAYERS", str(layers))
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    print(f"model {size / 2**20:.0f} MiB; anonymous memory growth: {got}")
    assert abs(got["sum"] - want) <= 1e-6 * max(1.0, abs(want))
    assert got["loaded"] < 0.05 * size and got["read"] < 0.05 * size
    one_layer = 2048 * 2048 * 4
    assert one_layer * 0.9 < got["written"] < one_layer + 0.05 * size  # copy-on-write: only what was written


# -- the staging pipeline (planner and reads), on the CPU -------------------------------------------


def test_plan_covers_every_byte_once_in_order() -> None:
    for buffer in (1, 3, 7, 64):
        for sizes in ([], [0], [5], [3, 10, 2], [0, 8, 0, 1], [64, 64], [1] * 20, [100, 1, 100]):
            fills = _device.plan(sizes, buffer)
            seen: dict[int, int] = {}
            for fill in fills:
                used = 0
                for p in fill:
                    assert p.at == used and p.length > 0  # packed from the start, no empty piece
                    assert seen.get(p.index, 0) == p.offset  # each tensor continues where it stopped
                    seen[p.index] = p.offset + p.length
                    used += p.length
                assert 0 < used <= buffer
            assert all(used == buffer for used in [sum(p.length for p in f) for f in fills[:-1]])  # full but the last
            assert {i: n for i, n in enumerate(sizes) if n} == seen
    with pytest.raises(ValueError):
        _device.plan([1], 0)


@pytest.mark.parametrize("kind", ["safeckpt", "torch.save"])
def test_stage_reads_every_tensor_exactly_through_small_buffers(kind: str, tmp_path: Path) -> None:
    src = source_model()
    path = write(kind, src, tmp_path)
    refs = list(safeckpt.open(path).tensors().values())
    for buffer, threads in ((7, 1), (100, 2), (1 << 20, 2)):
        dsts = [torch.full(r.shape, 0, dtype=r.dtype) for r in refs]
        _device.stage(list(zip(refs, dsts, strict=True)), buffer=buffer, threads=threads)
        for r, d in zip(refs, dsts, strict=True):
            assert bits_equal(d, src.state_dict()[r.name]), r.name
    with pytest.raises(ValueError, match="not a matching contiguous tensor"):
        _device.stage([(refs[0], torch.empty(3))])


class DeferredCopier(_device.Copier):
    """Acts like a GPU stream: a copy runs only when its buffer is waited for, or at the end. A
    pipeline that refilled a buffer before waiting for its copies would copy the wrong bytes."""

    def __init__(self) -> None:
        self.pending: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {0: [], 1: []}
        self.log: list[str] = []

    def copy(self, buffer: int, pieces: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.pending[buffer] += pieces  # views of the buffer, read later
        self.log.append(f"copy{buffer}")

    def wait(self, buffer: int) -> None:
        for dst, src in self.pending[buffer]:
            dst.copy_(src)
        self.pending[buffer] = []
        self.log.append(f"wait{buffer}")

    def finish(self) -> None:
        self.wait(0)
        self.wait(1)


def test_stage_overlaps_reads_with_copies_without_overwriting_a_buffer_in_use(tmp_path: Path) -> None:
    src = source_model()
    path = write("safeckpt", src, tmp_path)
    refs = list(safeckpt.open(path).tensors().values())
    dsts = [torch.zeros(r.shape, dtype=r.dtype) for r in refs]
    copier = DeferredCopier()
    _device.stage(list(zip(refs, dsts, strict=True)), buffer=256, threads=2, _sync=copier)
    for r, d in zip(refs, dsts, strict=True):
        assert bits_equal(d, src.state_dict()[r.name]), r.name
    fills = copier.log.count("copy0") + copier.log.count("copy1")
    assert fills > 4
    # double buffering: a fill is read while the previous one's copy is still queued
    log = copier.log
    assert log[:4] == ["wait0", "copy0", "wait1", "copy1"] and log[4:6] == ["wait0", "copy0"]


@pytest.mark.parametrize("kind", ["safeckpt", "torch.save"])
def test_stage_reads_large_tensors_with_several_threads(kind: str, tmp_path: Path) -> None:
    torch.manual_seed(1)
    big = {"a": torch.randn(3 << 20), "b": torch.arange(5, dtype=torch.int16), "c": torch.randn(1 << 20).half()}
    big["z"] = torch.randn(1 << 19, dtype=torch.complex128)  # copied from the loaded tensor, not read by span
    if kind == "safeckpt":
        path = safeckpt.save(tmp_path / "big.safeckpt", big)
    else:
        torch.save(big, tmp_path / "big.pt")
        path = tmp_path / "big.pt"
    refs = safeckpt.open(path).tensors()
    assert refs["a"].span is not None  # read with preadv
    dsts = {k: torch.zeros(r.shape, dtype=r.dtype) for k, r in refs.items()}
    _device.stage([(refs[k], dsts[k]) for k in refs], buffer=(5 << 20) + 3, threads=3)  # fills > READ_PIECE
    assert all(bits_equal(dsts[k], v) for k, v in big.items())


def test_split_reads_cuts_pieces_for_threads() -> None:
    pieces = _device.split_reads([_device.Piece(0, 4, 10, 2), _device.Piece(1, 0, 3, 12)], 4)
    assert [(p.index, p.offset, p.length, p.at) for p in pieces] == [
        (0, 4, 4, 2),
        (0, 8, 4, 6),
        (0, 12, 2, 10),
        (1, 0, 3, 12),
    ]


# -- CUDA ---------------------------------------------------------------------------------------------


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("kind", ["safeckpt", "hf-style safetensors", "torch.save", "hf-sharded"])
def test_cuda_in_place_load(kind: str, tmp_path: Path) -> None:
    src = source_model()
    path = write(kind, src, tmp_path)
    model = TiedLM().cuda()
    result = safeckpt.load_raw(path, model)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert_materialized(model, src, device="cuda")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("kind", ["safeckpt", "safetensors.save_model", "torch.save", "safeckpt-sharded"])
def test_cuda_assign_materializes_meta_model(kind: str, tmp_path: Path) -> None:
    src = source_model()
    path = write(kind, src, tmp_path)
    model = meta_model()
    safeckpt.load_raw(path, model, assign=True, device="cuda")
    assert_materialized(model, src, device="cuda")


@pytest.mark.cuda
@cuda
def test_cuda_load_device_and_tensor_ref(tmp_path: Path) -> None:
    big = {"a": torch.randn(1 << 20), "b": torch.arange(3 << 19, dtype=torch.int64), "c": torch.ones(3)}
    big["tied"] = big["a"]
    path = safeckpt.save(tmp_path / "big.safeckpt", {"w": big, "n": 2})
    got = safeckpt.load(path, device="cuda")
    assert got["n"] == 2 and got["w"]["tied"] is got["w"]["a"]
    for k, v in big.items():
        assert got["w"][k].device.type == "cuda" and bits_equal(got["w"][k], v)
    ref = safeckpt.open(path).tensors()["w/b"]
    assert bits_equal(ref.load(device="cuda:0"), big["b"])
    dsts = [torch.empty(3 << 19, dtype=torch.int64, device="cuda")]
    _device.stage([(ref, dsts[0])], buffer=1000)  # many fills, alternating buffers
    assert bits_equal(dsts[0], big["b"])
    ckpt = plugin().load_checkpoint(path, map_location="cuda")
    assert ckpt["w"]["a"].is_cuda


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("fused", [False, True])
def test_cuda_load_into_state_with_optimizer(fused: bool, tmp_path: Path) -> None:
    src = source_model().float()
    opt = torch.optim.Adam(src.parameters(), lr=0.1)
    src.head(src.mid(src.emb(torch.tensor([1, 2])))).sum().backward()
    opt.step()
    path = safeckpt.save(tmp_path / "s.safeckpt", {"model": src, "optimizer": opt, "step": 4})
    model = TiedLM().float().cuda()
    target = torch.optim.Adam(model.parameters(), lr=0.1, fused=fused)
    state = {"model": model, "optimizer": target, "step": 0}
    assert safeckpt.load(path, state) == {} and state["step"] == 4
    assert_materialized(model, src, device="cuda")
    want = opt.state_dict()["state"]
    # the oracle is torch's own load_state_dict: each state tensor goes where it puts it (it takes
    # "fused" from the saved groups, so a non-fused save keeps each step on the CPU)
    twin = torch.optim.Adam(TiedLM().float().cuda().parameters(), lr=0.1, fused=fused)
    twin.load_state_dict(opt.state_dict())
    assert target.param_groups[0]["fused"] == twin.param_groups[0]["fused"]
    for i, s in target.state_dict()["state"].items():
        for k, v in s.items():
            assert v.device == twin.state_dict()["state"][i][k].device, (i, k)
            assert torch.equal(v.cpu(), want[i][k]), (i, k)
    model.head(model.mid(model.emb(torch.tensor([1, 2], device="cuda")))).sum().backward()
    target.step()  # torch accepts where each state tensor is
