"""The native format is faithful: every dtype bit-exact, every layout written as its values,
tied weights written once and restored tied, and writes that fail leave nothing behind."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import safeckpt
from conformance import Net, assert_bits_equal
from safeckpt.formats import _safetensors as st

DTYPES = [
    torch.float64, torch.float32, torch.float16, torch.bfloat16,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
    torch.uint16, torch.uint32, torch.uint64,
    torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz, torch.float8_e8m0fnu,
    torch.float4_e2m1fn_x2, torch.complex64, torch.complex128, torch.complex32,
]  # fmt: skip


def random_bits(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A tensor of ``dtype`` holding arbitrary bit patterns (nan payloads, -0.0, subnormals)."""
    g = torch.Generator().manual_seed(seed)
    n = 1
    for s in shape:
        n *= s
    raw = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).reshape(shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 4), (), (0,), (2, 0, 3), (5,)], ids=str)
def test_every_dtype_and_shape_is_bit_exact(dtype: torch.dtype, shape: tuple[int, ...], tmp_path: Path) -> None:
    if dtype == torch.float4_e2m1fn_x2 and shape == ():
        pytest.skip("safetensors stores F4 by pairs along the last dimension")
    t = random_bits(dtype, shape)
    path = safeckpt.save(tmp_path / "d.safeckpt", {"t": t})
    assert_bits_equal({"t": t}, safeckpt.load(path))


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d not in st.AS_REAL], ids=str)
def test_stock_safetensors_reads_every_native_dtype(dtype: torch.dtype, tmp_path: Path) -> None:
    t = random_bits(dtype, (2, 4))
    path = safeckpt.save(tmp_path / "d.safeckpt", {"t": t})
    with safe_open(path, "pt") as f:
        got = f.get_tensor("t")
    assert got.dtype == dtype and torch.equal(got.view(torch.uint8), t.view(torch.uint8))


@pytest.mark.parametrize("dtype", list(st.AS_REAL), ids=str)
def test_complex_without_a_safetensors_dtype_is_stored_as_its_real_view(dtype: torch.dtype, tmp_path: Path) -> None:
    t = random_bits(dtype, (3,))
    path = safeckpt.save(tmp_path / "c.safeckpt", {"z": t})
    with safe_open(path, "pt") as f:
        real = f.get_tensor("z")
    assert real.dtype == st.AS_REAL[dtype] and real.shape == (3, 2)
    assert torch.equal(real.view(torch.uint8).reshape(-1), t.view(torch.uint8).reshape(-1))


def test_layouts_are_written_as_their_values(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    z = torch.randn(4, dtype=torch.complex64)
    state = {
        "transposed": base.t(),
        "strided": base[::2, 1::3],
        "offset_view": base[1],
        "expanded": torch.ones(3, 1).expand(3, 5),
        "channels_last": torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
        "conj": z.conj(),
        "neg": torch.randn(3, dtype=torch.complex64).conj().imag,
    }
    back = safeckpt.load(safeckpt.save(tmp_path / "l.safeckpt", state))
    for k, v in state.items():
        assert torch.equal(back[k], v.resolve_conj().resolve_neg()), k
        assert back[k].is_contiguous()


def test_tied_weights_written_once_and_restored_tied(tmp_path: Path) -> None:
    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)
            self.head = torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight

    model = Tied()
    path = safeckpt.save(tmp_path / "t.safeckpt", {"model": model})
    with safe_open(path, "pt") as f:
        assert list(f.keys()) == ["model/emb.weight"]
    loaded = safeckpt.load(path)["model"]
    assert loaded["emb.weight"] is loaded["head.weight"]
    ckpt = safeckpt.open(path)
    assert ckpt.tied() == [["model/emb.weight", "model/head.weight"]]
    assert ckpt.nbytes == 10 * 4 * 4

    target = Tied()
    safeckpt.load_raw(safeckpt.save(tmp_path / "raw.safeckpt", model.state_dict()), target)
    assert target.head.weight is target.emb.weight and torch.equal(target.emb.weight, model.emb.weight)


def test_overlapping_views_are_written_as_values(tmp_path: Path) -> None:
    base = torch.arange(10.0)
    state = {"a": base[:6], "b": base[4:]}
    back = safeckpt.load(safeckpt.save(tmp_path / "o", state))
    assert torch.equal(back["a"], base[:6]) and torch.equal(back["b"], base[4:])


def test_parameters_keep_their_type_and_requires_grad(tmp_path: Path) -> None:
    state = {
        "p": torch.nn.Parameter(torch.ones(2)),
        "q": torch.nn.Parameter(torch.ones(2), requires_grad=False),
        "g": torch.ones(1, requires_grad=True),
    }
    back = safeckpt.load(safeckpt.save(tmp_path / "p", state))
    assert type(back["p"]) is torch.nn.Parameter and back["p"].requires_grad
    assert type(back["q"]) is torch.nn.Parameter and not back["q"].requires_grad
    assert type(back["g"]) is torch.Tensor and back["g"].requires_grad


def test_refused_dtypes_and_layouts_name_the_path(tmp_path: Path) -> None:
    q = torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8)
    for value, match in ((q, "qint8"), (torch.empty(2, device="meta"), "meta")):  # sparse is stored: test_realworld
        with pytest.raises(TypeError, match=match) as info:
            safeckpt.save(tmp_path / "x", {"model": {"w": value}})
        assert "state['model']['w']" in str(info.value)
        assert list(tmp_path.iterdir()) == []


def test_loaded_tensors_are_writable_and_the_file_unchanged(tmp_path: Path) -> None:
    path = safeckpt.save(tmp_path / "w.safeckpt", {"t": torch.zeros(4)})
    before = path.read_bytes()
    t = safeckpt.load(path)["t"]
    t += 1
    assert path.read_bytes() == before
    assert torch.equal(safeckpt.load(path)["t"], torch.zeros(4))


def test_loaded_tensors_outlive_replacement_of_the_file(tmp_path: Path) -> None:
    path = safeckpt.save(tmp_path / "r.safeckpt", {"t": torch.arange(4.0)})
    t = safeckpt.load(path)["t"]
    safeckpt.save(path, {"t": torch.zeros(4)})  # atomic replace: the old inode stays mapped
    assert torch.equal(t, torch.arange(4.0))


# -- writes that fail leave nothing broken -----------------------------------------------------


def test_refused_save_leaves_previous_checkpoint_byte_identical(tmp_path: Path) -> None:
    path = safeckpt.save(tmp_path / "c.safeckpt", {"model": Net(), "step": 1})
    before = path.read_bytes()
    with pytest.raises(TypeError, match="state\\['extra'\\]\\['fn'\\]"):
        safeckpt.save(path, {"model": Net(), "step": 2, "extra": {"fn": print}})
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["c.safeckpt"]


def test_crash_mid_write_leaves_previous_checkpoint_and_no_temp_file(tmp_path: Path) -> None:
    path = safeckpt.save(tmp_path / "c.safeckpt", {"w": torch.ones(3)})
    before = path.read_bytes()

    class Boom(Exception):
        pass

    def exploding() -> torch.Tensor:
        raise Boom

    items = [st.Item("a", torch.float32, (2,), lambda: torch.ones(2)), st.Item("b", torch.float32, (2,), exploding)]
    with pytest.raises(Boom):
        st.write(path, items, {})
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["c.safeckpt"]


def test_new_file_mode_follows_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        path = safeckpt.save(tmp_path / "m.safeckpt", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_save_through_a_symlink_updates_its_target(tmp_path: Path) -> None:
    real = safeckpt.save(tmp_path / "real.safeckpt", {"a": 1})
    link = tmp_path / "latest.safeckpt"
    link.symlink_to(real.name)
    safeckpt.save(link, {"a": 2})
    assert link.is_symlink() and safeckpt.load(real) == {"a": 2}
