"""Lightning checkpoints as they are: Fabric's fabric.save output and the Trainer's save_checkpoint,
read without Lightning's loader, restored in place, and converted to the native format and back."""

from __future__ import annotations

import argparse
import functools
import pathlib
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import safeckpt
from conformance import MLP, assert_bits_equal
from safeckpt.errors import UnsafeCheckpointError

ROOT = Path(__file__).resolve().parents[1]
FABRIC = ROOT / "fixtures" / "lightning" / "fabric.ckpt"
TRAINER = ROOT / "fixtures" / "lightning" / "trainer.ckpt"
TORCH = ROOT / "fixtures" / "torch"


def fabric_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


class TrainerNet(nn.Module):
    """The weights of fixtures/lightning/make_fixtures.py's TinyModule, without Lightning."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 1))


def equal_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


equal_values = functools.partial(
    assert_bits_equal, strict=True
)  # the project's comparison, plus tensor class, requires_grad, device and _metadata


# -- the Trainer checkpoint ----------------------------------------------------------------------------


def test_load_raw_trainer_checkpoint_uses_its_state_dict() -> None:
    expected = torch.load(TRAINER, weights_only=False)["state_dict"]
    model = TrainerNet()
    safeckpt.load_raw(TRAINER, model)
    equal_state(model.state_dict(), expected)
    assert model.net[1].num_batches_tracked.item() == 4


def test_load_raw_trainer_checkpoint_into_the_lightning_module() -> None:
    import lightning as L

    class TinyModule(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 1))

    module = TinyModule()
    safeckpt.load_raw(TRAINER, module)
    reference = TinyModule()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.load_state_dict(torch.load(TRAINER, weights_only=False)["state_dict"])
    equal_state(module.state_dict(), reference.state_dict())


def test_trainer_checkpoint_loads_as_what_it_is() -> None:
    ckpt = safeckpt.load(TRAINER)
    assert {
        "state_dict",
        "optimizer_states",
        "lr_schedulers",
        "epoch",
        "global_step",
        "hyper_parameters",
        "callbacks",
        "loops",
    } <= set(ckpt)
    assert ckpt["hyper_parameters"] == {"hidden": 6, "lr": 0.05, "name": "tiny"}
    assert (ckpt["epoch"], ckpt["global_step"], ckpt["pytorch-lightning_version"]) == (1, 4, "2.6.6")
    (callback,) = ckpt["callbacks"].values()
    assert callback["monitor"] == "loss" and isinstance(callback["best_model_score"], torch.Tensor)
    opt = torch.optim.Adam(TrainerNet().parameters(), lr=0.05)
    opt.load_state_dict(ckpt["optimizer_states"][0])
    assert opt.param_groups[0]["lr"] == 0.025
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    sched.load_state_dict(ckpt["lr_schedulers"][0])
    assert sched.last_epoch == 1


# -- the Fabric checkpoint ------------------------------------------------------------------------------


def test_fabric_load_restores_in_place_like_fabric() -> None:
    import lightning as L

    model, ref_model = fabric_model(), fabric_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.5)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.5, momentum=0.5)
    state = {"model": model, "optimizer": opt, "hparams": safeckpt.AttributeDict(), "step": 0}
    remainder = safeckpt.load(FABRIC, state)

    fabric = L.Fabric(accelerator="cpu", devices=1)
    ref_state = {"model": ref_model, "optimizer": ref_opt, "hparams": None, "step": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_remainder = fabric.load(FABRIC, ref_state, weights_only=False)  # our own trusted fixture

    equal_state(model.state_dict(), ref_model.state_dict())
    equal_values(opt.state_dict(), ref_opt.state_dict())
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["momentum"] == 0.9
    assert isinstance(state["hparams"], safeckpt.AttributeDict) and state["hparams"].lr == 0.1
    assert state["hparams"] == dict(ref_state["hparams"]) and state["hparams"].layers == [4, 8, 2]
    assert state["step"] == ref_state["step"] == 1
    assert list(remainder) == list(ref_remainder) == ["args", "data_dir"]
    assert remainder["args"] == argparse.Namespace(batch_size=3, name="fabric-run") == ref_remainder["args"]
    assert remainder["data_dir"] == pathlib.Path("data/train") == ref_remainder["data_dir"]


def test_fabric_load_strict_names_the_missing_key() -> None:
    model = fabric_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(KeyError, match="'scheduler'"):
        safeckpt.load(FABRIC, {"model": model, "scheduler": object()})
    equal_state(model.state_dict(), before)  # nothing changed


def test_load_raw_of_a_fabric_checkpoint_says_what_it_holds() -> None:
    with pytest.raises(RuntimeError, match=r"wrapped checkpoint.*'model', 'optimizer'"):
        safeckpt.load_raw(FABRIC, fabric_model())


# -- convert every fixture to the native format and back -----------------------------------------------

BENIGN = [*sorted(p for p in TORCH.glob("*.pt") if p.name != "module.pt"), FABRIC, TRAINER]


@pytest.mark.parametrize("path", BENIGN, ids=lambda p: p.name)
def test_convert_to_native_and_back_keeps_every_value(path: Path, tmp_path: Path) -> None:
    native = safeckpt.convert(path, tmp_path / "x.safeckpt")
    assert safeckpt.open(native).format == "safeckpt"
    equal_values(safeckpt.load(native), safeckpt.open(path).to_python())


def _weights(path: Path) -> tuple[Any, str, dict[str, torch.Tensor]]:
    """How to build the fixture's module, how safeckpt loads it, and its weights read the trusted way."""
    data = torch.load(path, weights_only=False)
    if path.name in ("protocol4.pt", "optimizer.pt"):
        return MLP, "model", data["model"]
    if path == FABRIC:
        return fabric_model, "model", data["model"]
    if path == TRAINER:
        return TrainerNet, "raw", data["state_dict"]
    return MLP, "raw", data


WEIGHTS = [
    TORCH / n for n in ("friend.pt", "friend_legacy.pt", "align4096.pt", "crc0.pt", "protocol4.pt", "optimizer.pt")
] + [FABRIC, TRAINER]


@pytest.mark.parametrize("path", WEIGHTS, ids=lambda p: p.name)
def test_convert_to_native_and_back_to_a_module_gives_identical_tensors(path: Path, tmp_path: Path) -> None:
    native = safeckpt.convert(path, tmp_path / "x.safeckpt")
    make, key, sd = _weights(path)
    module, reference = make(), make()
    reference.load_state_dict(sd)
    if key == "raw":
        safeckpt.load_raw(native, module)
    else:
        safeckpt.load(native, {key: module}, strict=False)
    equal_state(module.state_dict(), reference.state_dict())


def test_whole_module_fixture_is_refused_everywhere(tmp_path: Path) -> None:
    path = TORCH / "module.pt"
    for call in (
        lambda: safeckpt.open(path),
        lambda: safeckpt.load(path),
        lambda: safeckpt.load_raw(path, MLP()),
        lambda: safeckpt.convert(path, tmp_path / "x.safeckpt"),
    ):
        with pytest.raises(UnsafeCheckpointError, match=r"__main__\.MLP"):
            call()
    assert not (tmp_path / "x.safeckpt").exists()
