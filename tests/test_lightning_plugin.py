"""safeckpt.lightning.SafeCheckpointIO on real Fabric and Trainer runs, side by side with Lightning's
own TorchCheckpointIO: what is written (no pickle), what loads back (value by value), resuming,
ModelCheckpoint's top-k deletion, old pickle checkpoints, and refusals that reach the user."""

from __future__ import annotations

import argparse
import dataclasses
import enum
import functools
import os
import pathlib
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import safetensors
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import safeckpt
from conformance import assert_bits_equal
from safeckpt import formats
from safeckpt.errors import UnsafeCheckpointError
from safeckpt.lightning import SafeCheckpointIO
from safeckpt.user_types import _unregister

ROOT = Path(__file__).resolve().parents[1]
TRAINER_FIXTURE = ROOT / "fixtures" / "lightning" / "trainer.ckpt"

pytestmark = pytest.mark.filterwarnings("ignore")  # Lightning's advice about workers, logging and seeds


equal_values = functools.partial(
    assert_bits_equal, strict=True
)  # the project's comparison, plus tensor class, requires_grad, device and _metadata


def without_root(tree: Any, root: Path) -> Any:
    """ModelCheckpoint records absolute paths (in values and keys): the run's root becomes '<root>'."""
    if isinstance(tree, str):
        return tree.replace(str(root), "<root>")
    if isinstance(tree, dict):
        out = type(tree)((without_root(k, root), without_root(v, root)) for k, v in tree.items())
        if hasattr(tree, "_metadata"):
            out._metadata = tree._metadata
        return out
    if type(tree) in (list, tuple):
        return type(tree)(without_root(v, root) for v in tree)
    return tree


def assert_native_without_pickle(path: Path) -> None:
    """Sniffed as safeckpt; every file a valid safetensors file (JSON header, raw bytes) or the
    msgpack index of a sharded directory: nothing a torch zip or a pickle stream could hide in."""
    sharded = path.is_dir()
    assert ("safeckpt-sharded" if sharded else "safeckpt") == formats.detect(path).NAME, path
    files = sorted(path.iterdir()) if sharded else [path]
    assert {f.suffix for f in files} <= ({".safetensors", ".msgpack"} if sharded else {".ckpt"}), files
    for f in files:
        assert not f.read_bytes()[:8].startswith((b"PK\x03\x04", b"\x80")), f
        if f.suffix != ".msgpack":
            with safetensors.safe_open(f, "pt") as st:  # the values live in a msgpack skeleton beside the tensors
                assert sharded or "safeckpt.skeleton" in st.metadata()


# -- a tiny Lightning run ------------------------------------------------------------------------------


class Data(L.LightningDataModule):
    def __init__(self, batch_size: int = 4, cfg: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()

    def train_dataloader(self) -> DataLoader[Any]:
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g))
        return DataLoader(data, batch_size=self.hparams.batch_size)

    def val_dataloader(self) -> DataLoader[Any]:
        return self.train_dataloader()


class Net(L.LightningModule):
    """Linear -> BatchNorm -> Linear, AdamW with MultiStepLR (a Counter in its state), hparams
    holding a Namespace and a dict."""

    def __init__(self, args: argparse.Namespace | None = None, extra: dict[str, Any] | None = None, lr: float = 0.05):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        loss = nn.functional.mse_loss(self.net(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        self.log("val_loss", nn.functional.mse_loss(self.net(batch[0]), batch[1]))

    def configure_optimizers(self) -> dict[str, Any]:
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.MultiStepLR(opt, [3, 6, 9], gamma=0.5)}


class Losses(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, out: Any, batch: Any, i: int) -> None:
        self.losses.append(out["loss"].item())


def trainer(root: Path, plugin: Any, *callbacks: Callback, **kwargs: Any) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        plugins=[plugin],
        callbacks=list(callbacks),
        **kwargs,
    )


def fit(root: Path, plugin: Any, epochs: int, ckpt_path: Path | None = None) -> dict[str, Any]:
    """Train from seed 0 (resuming from ``ckpt_path`` if given), a checkpoint after every epoch's validation."""
    torch.manual_seed(0)
    losses = Losses()
    checkpoints = ModelCheckpoint(dirpath=root / "ckpts", monitor="val_loss", save_top_k=-1)
    stopping = EarlyStopping("val_loss", patience=50)
    t = trainer(root, plugin, losses, checkpoints, stopping, max_epochs=epochs)
    model = Net(argparse.Namespace(layers=2, name="tiny"), {"depth": 3, "widths": [6, 1]})
    # weights_only=False: Lightning's own loader refuses the Namespace otherwise (our trusted files)
    t.fit(model, datamodule=Data(cfg={"k": 1}), ckpt_path=ckpt_path, weights_only=False if ckpt_path else None)
    return {
        "losses": losses.losses,
        "model": model.state_dict(),
        "optimizer": t.optimizers[0].state_dict(),
        "scheduler": t.lr_scheduler_configs[0].scheduler.state_dict(),
        "checkpoint": checkpoints.state_dict(),
        "stopping": stopping.state_dict(),
        "global_step": t.global_step,
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Four epochs with each plugin, and resumes from epoch 1 (epoch=1-step=8.ckpt) of each."""
    base = tmp_path_factory.mktemp("runs")
    out: dict[str, Any] = {"torch_root": base / "torch", "safe_root": base / "safe"}
    out["torch"] = fit(base / "torch", TorchCheckpointIO(), 4)
    out["safe"] = fit(base / "safe", SafeCheckpointIO(), 4)
    middle = "ckpts/epoch=1-step=8.ckpt"
    out["torch_resumed"] = fit(base / "r_torch", TorchCheckpointIO(), 4, base / "torch" / middle)
    out["safe_resumed"] = fit(base / "r_safe", SafeCheckpointIO(), 4, base / "safe" / middle)
    out["old_resumed"] = fit(base / "r_old", SafeCheckpointIO(), 4, base / "torch" / middle)  # a pickle .ckpt
    return out


# -- the Trainer -----------------------------------------------------------------------------------------


def test_trainer_writes_native_checkpoints_without_pickle(runs: dict[str, Any]) -> None:
    written = sorted((runs["safe_root"] / "ckpts").iterdir())
    assert [p.name for p in written] == [f"epoch={e}-step={4 * (e + 1)}.ckpt" for e in range(4)]
    for path in written:
        assert_native_without_pickle(path)
    assert formats.detect(runs["torch_root"] / "ckpts" / written[0].name).NAME == "torch"  # the control


def test_trainer_checkpoint_loads_back_as_torch_checkpoint_io_does(runs: dict[str, Any]) -> None:
    for name in ("epoch=0-step=4.ckpt", "epoch=3-step=16.ckpt"):
        ours = SafeCheckpointIO().load_checkpoint(runs["safe_root"] / "ckpts" / name)
        theirs = TorchCheckpointIO().load_checkpoint(runs["torch_root"] / "ckpts" / name, weights_only=False)
        equal_values(without_root(ours, runs["safe_root"]), without_root(theirs, runs["torch_root"]))
    # what a Trainer checkpoint holds on Lightning 2.6.6, all of it plain data
    assert list(ours) == [
        "epoch",
        "global_step",
        "pytorch-lightning_version",
        "state_dict",
        "loops",
        "callbacks",
        "optimizer_states",
        "lr_schedulers",
        "hparams_name",
        "hyper_parameters",
        "datamodule_hparams_name",
        "datamodule_hyper_parameters",
    ]
    assert [k.split("{")[0] for k in ours["callbacks"]] == ["EarlyStopping", "ModelCheckpoint"]
    assert ours["hyper_parameters"]["args"] == argparse.Namespace(layers=2, name="tiny")
    assert ours["lr_schedulers"][0]["milestones"] == Counter({3: 1, 6: 1, 9: 1})
    assert ours["datamodule_hyper_parameters"] == {"batch_size": 4, "cfg": {"k": 1}}


def test_resume_gives_what_the_default_plugin_gives(runs: dict[str, Any]) -> None:
    safe, torch_ = runs["safe_resumed"], runs["torch_resumed"]
    assert safe["losses"] == torch_["losses"] and len(safe["losses"]) == 8  # epochs 2 and 3
    assert safe["global_step"] == torch_["global_step"] == 16
    for key in ("model", "optimizer", "scheduler", "stopping"):
        equal_values(safe[key], torch_[key], key)
    equal_values(
        without_root(safe["checkpoint"], runs["safe_root"].parent / "r_safe"),
        without_root(torch_["checkpoint"], runs["torch_root"].parent / "r_torch"),
    )
    # and what an uninterrupted run gives: every piece of state came back
    assert safe["losses"] == runs["safe"]["losses"][8:] == runs["torch"]["losses"][8:]
    for key in ("model", "optimizer", "scheduler"):
        equal_values(safe[key], runs["safe"][key], key)


def test_a_torch_checkpoint_io_ckpt_resumes_through_the_plugin(runs: dict[str, Any]) -> None:
    old, reference = runs["old_resumed"], runs["torch_resumed"]
    assert old["losses"] == reference["losses"]
    for key in ("model", "optimizer", "scheduler", "stopping"):
        equal_values(old[key], reference[key], key)


def test_the_shipped_trainer_fixture_loads_as_torch_load_gives_it() -> None:
    ours = SafeCheckpointIO().load_checkpoint(TRAINER_FIXTURE)
    equal_values(ours, torch.load(TRAINER_FIXTURE, weights_only=False))  # our own trusted fixture


def test_a_module_rebuilds_from_a_native_checkpoint_and_validate_reads_it(runs: dict[str, Any], tmp_path: Path) -> None:
    path = runs["safe_root"] / "ckpts" / "epoch=3-step=16.ckpt"
    model = Net(**safeckpt.load(path)["hyper_parameters"])  # what the README offers for load_from_checkpoint
    safeckpt.load_raw(path, model)
    equal_values(model.state_dict(), runs["safe"]["model"])
    assert model.hparams.args == argparse.Namespace(layers=2, name="tiny")

    def validate(plugin: Any, path: Path) -> list[dict[str, float]]:
        return trainer(tmp_path, plugin).validate(Net(), datamodule=Data(), ckpt_path=path, weights_only=False)

    reference = validate(TorchCheckpointIO(), runs["torch_root"] / "ckpts" / path.name)
    assert validate(SafeCheckpointIO(), path) == reference and reference[0]["val_loss"] > 0


@pytest.mark.parametrize("max_shard_size", [None, 300], ids=["file", "sharded"])
def test_model_checkpoint_top_k_deletes_through_remove_checkpoint(max_shard_size: int | None, tmp_path: Path) -> None:
    saved: list[Path] = []
    removed: list[Path] = []

    class Recording(SafeCheckpointIO):
        def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
            saved.append(Path(path))
            super().save_checkpoint(checkpoint, path, storage_options)

        def remove_checkpoint(self, path: str | os.PathLike[str]) -> None:
            removed.append(Path(path))
            super().remove_checkpoint(path)

    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpts", monitor="train_loss", every_n_train_steps=1, save_top_k=2)
    t = trainer(tmp_path, Recording(max_shard_size=max_shard_size), checkpoints, max_steps=6, limit_val_batches=0)
    torch.manual_seed(0)
    t.fit(Net(), datamodule=Data())

    kept = sorted((tmp_path / "ckpts").iterdir())
    assert len(kept) == 2 and {str(p) for p in kept} == set(checkpoints.best_k_models)
    assert removed and sorted(removed) == sorted(set(saved) - set(kept))
    assert not any(p.exists() for p in removed)
    for path in kept:
        assert path.is_dir() == (max_shard_size is not None)
        assert_native_without_pickle(path)
    best = SafeCheckpointIO().load_checkpoint(checkpoints.best_model_path)
    assert best["callbacks"] and best["global_step"] == int(Path(checkpoints.best_model_path).stem.split("step=")[1])


# -- Fabric ----------------------------------------------------------------------------------------------


def fabric_round_trip(plugin: Any, path: Path) -> dict[str, Any]:
    """Three steps, fabric.save; then fabric.load into fresh objects and fabric.load of everything."""
    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=[plugin] if plugin else None)

    def build() -> tuple[Any, Any, Any]:
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        opt = torch.optim.Adam(model.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, [1, 2])
        model, opt = fabric.setup(model, opt)
        return model, opt, sched

    torch.manual_seed(0)
    model, opt, sched = build()
    for _ in range(3):
        fabric.backward(model(torch.randn(3, 4)).square().sum())
        opt.step()
        opt.zero_grad()
        sched.step()
    extras = {"args": argparse.Namespace(batch=3), "data_dir": pathlib.Path("data/train"), "tags": ("a", "b")}
    state = {"model": model, "optimizer": opt, "scheduler": sched, "step": 3, **extras}
    state["hparams"] = safeckpt.AttributeDict(lr=0.1, layers=[4, 8, 2])
    fabric.save(path, state)

    torch.manual_seed(1)
    fresh_model, fresh_opt, fresh_sched = build()
    target = {"model": fresh_model, "optimizer": fresh_opt, "scheduler": fresh_sched, "step": 0}
    trusted = {} if plugin else {"weights_only": False}  # Lightning's loader refuses the Namespace otherwise
    remainder = fabric.load(path, target, **trusted)
    return {
        "trained": (model.state_dict(), opt.state_dict(), sched.state_dict()),
        "loaded": (fresh_model.state_dict(), fresh_opt.state_dict(), fresh_sched.state_dict(), target["step"]),
        "remainder": remainder,
        "everything": fabric.load(path, **trusted),
    }


def test_fabric_save_and_load_through_the_plugin_equal_plain_fabric(tmp_path: Path) -> None:
    ours = fabric_round_trip(SafeCheckpointIO(), tmp_path / "safe.ckpt")
    plain = fabric_round_trip(None, tmp_path / "plain.ckpt")
    assert_native_without_pickle(tmp_path / "safe.ckpt")
    assert formats.detect(tmp_path / "plain.ckpt").NAME == "torch"
    equal_values(ours["trained"], plain["trained"], "trained")  # the same run
    equal_values(ours["loaded"], plain["loaded"], "loaded")
    equal_values(ours["loaded"][:3], ours["trained"], "restored")  # bit for bit what was saved
    equal_values(ours["remainder"], plain["remainder"], "remainder")
    assert list(ours["remainder"]) == ["args", "data_dir", "tags", "hparams"]
    equal_values(ours["everything"], plain["everything"], "everything")


def test_fabric_load_raw_reads_a_friends_torch_file_through_the_plugin() -> None:
    friend = ROOT / "fixtures" / "torch" / "friend.pt"
    expected = torch.load(friend, weights_only=True)
    model = nn.Sequential()
    model.l1, model.l2 = nn.Linear(8, 16), nn.Linear(16, 4)
    L.Fabric(accelerator="cpu", devices=1, plugins=[SafeCheckpointIO()]).load_raw(friend, model)
    equal_values(dict(model.state_dict()), dict(expected))


# -- safety ----------------------------------------------------------------------------------------------


class Payload:
    """Pickles as a call to os.mkdir(canary): what a planted checkpoint would run on load."""

    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.canary),))


def plant(path: Path, canary: Path) -> Path:
    ckpt = {"state_dict": Net().state_dict(), "epoch": 0, "global_step": 4, "callbacks": {"x": Payload(canary)}}
    torch.save(ckpt, path)
    return path


def test_a_planted_ckpt_is_refused_everywhere_and_runs_nothing(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    evil = plant(tmp_path / "evil.ckpt", canary)
    calls = [
        lambda: SafeCheckpointIO().load_checkpoint(evil, weights_only=False),
        lambda: trainer(tmp_path, SafeCheckpointIO(), max_steps=8).fit(Net(), datamodule=Data(), ckpt_path=evil),
        lambda: L.Fabric(accelerator="cpu", plugins=[SafeCheckpointIO()]).load(evil, weights_only=False),
    ]
    for call in calls:
        with pytest.raises(UnsafeCheckpointError, match=r"posix\.mkdir"):
            call()
        assert not canary.exists()
    # the control: the same payload is live under a real unpickler
    live = tmp_path / "live"
    torch.load(plant(tmp_path / "control.ckpt", live), weights_only=False)
    assert live.is_dir()


def test_allow_admits_a_trusted_old_class_as_inert_data(tmp_path: Path) -> None:
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": {}, "callbacks": {"timer": argparse.ArgumentParser}}, path)  # a class, not data
    with pytest.raises(UnsafeCheckpointError, match=r"argparse\.ArgumentParser"):
        SafeCheckpointIO().load_checkpoint(path)
    loaded = SafeCheckpointIO(allow=["argparse.ArgumentParser"]).load_checkpoint(path)
    assert set(loaded) == {"state_dict", "callbacks"}


@pytest.mark.parametrize("weights_only", [None, True, False])
def test_weights_only_changes_nothing(weights_only: bool | None, tmp_path: Path) -> None:
    state = {"w": torch.arange(4.0), "args": argparse.Namespace(a=1)}
    SafeCheckpointIO().save_checkpoint(state, tmp_path / "x.ckpt")
    equal_values(SafeCheckpointIO().load_checkpoint(tmp_path / "x.ckpt", weights_only=weights_only), state)


# -- refusals reach the user -----------------------------------------------------------------------------


class Holder(Net):
    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.save_hyperparameters()  # records the module object: picklable, not storable


def test_an_object_in_hyper_parameters_fails_fit_naming_it_and_the_fix(tmp_path: Path) -> None:
    t = trainer(tmp_path, SafeCheckpointIO(), ModelCheckpoint(dirpath=tmp_path / "ckpts"), max_steps=2)
    with pytest.raises(TypeError) as info:
        t.fit(Holder(nn.MSELoss()), datamodule=Data())
    message = str(info.value)
    assert "checkpoint['hyper_parameters']['loss'] is a torch.nn.modules.loss.MSELoss" in message
    assert "self.save_hyperparameters(ignore=['loss'])" in message and "epoch=0-step=2.ckpt" in message
    assert not (tmp_path / "ckpts").exists() or not any((tmp_path / "ckpts").iterdir())


class Keeper(Callback):
    def state_dict(self) -> dict[str, Any]:
        return {"seen": {"sampler": object()}}


def test_a_callback_state_holding_an_object_names_the_callback(tmp_path: Path) -> None:
    t = trainer(tmp_path, SafeCheckpointIO(), Keeper(), ModelCheckpoint(dirpath=tmp_path / "ckpts"), max_steps=2)
    with pytest.raises(
        TypeError, match=r"checkpoint\['callbacks'\]\['Keeper'\]\['seen'\]\['sampler'\].*callback 'Keeper'"
    ):
        t.fit(Net(), datamodule=Data())


def test_fabric_save_of_an_object_names_it_before_writing(tmp_path: Path) -> None:
    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=[SafeCheckpointIO()])
    with pytest.raises(TypeError, match=r"checkpoint\['loader'\] is a torch\.utils\.data.*fabric\.save"):
        fabric.save(tmp_path / "x.ckpt", {"model": nn.Linear(2, 2), "loader": DataLoader([1, 2])})
    assert list(tmp_path.iterdir()) == []


class Decay(enum.Enum):
    STEP = "step"
    COSINE = "cosine"


@dataclasses.dataclass(frozen=True)
class Schedule:
    milestones: tuple[int, ...] = (3, 6)
    decay: Decay = Decay.STEP


class Scheduled(Net):
    def __init__(self, schedule: Schedule, lr: float = 0.05) -> None:
        super().__init__(lr=lr)
        self.save_hyperparameters()  # records the dataclass: storable once its types are registered


def test_a_dataclass_in_hyper_parameters_needs_register_type_then_saves_and_resumes(tmp_path: Path) -> None:
    schedule = Schedule((2, 4), Decay.COSINE)
    t = trainer(tmp_path / "a", SafeCheckpointIO(), ModelCheckpoint(dirpath=tmp_path / "a" / "ckpts"), max_steps=2)
    with pytest.raises(TypeError) as info:
        t.fit(Scheduled(schedule), datamodule=Data())
    message = str(info.value)
    assert f"checkpoint['hyper_parameters']['schedule'] is a {__name__}.Schedule" in message
    assert f"`safeckpt.register_type({__name__}.Schedule)`" in message and "ignore=['schedule']" in message

    def run(root: Path, epochs: int, ckpt_path: Path | None = None) -> tuple[Scheduled, Path]:
        torch.manual_seed(0)
        checkpoints = ModelCheckpoint(dirpath=root / "ckpts", monitor="val_loss", save_top_k=-1)
        model = Scheduled(schedule)
        trainer(root, SafeCheckpointIO(), checkpoints, max_epochs=epochs).fit(
            model, datamodule=Data(), ckpt_path=ckpt_path
        )
        return model, root / "ckpts"

    safeckpt.register_type(Schedule)
    safeckpt.register_type(Decay)
    try:
        whole, ckpts = run(tmp_path / "b", 2)
        first = ckpts / "epoch=0-step=4.ckpt"
        assert_native_without_pickle(first)
        hparams = SafeCheckpointIO().load_checkpoint(first)["hyper_parameters"]
        assert type(hparams["schedule"]) is Schedule and hparams["schedule"] == schedule
        assert hparams["schedule"].decay is Decay.COSINE
        resumed, _ = run(tmp_path / "c", 2, first)
        equal_values(resumed.state_dict(), whole.state_dict())
        rebuilt = Scheduled(hparams["schedule"], hparams["lr"])  # what the README offers for load_from_checkpoint
        assert rebuilt.hparams.schedule == schedule
    finally:
        _unregister(Schedule)
        _unregister(Decay)
    # without the class the checkpoint still loads (a resume needs no hparams); the value is an inert
    # record, and using it names the fix
    schedule_record = SafeCheckpointIO().load_checkpoint(first)["hyper_parameters"]["schedule"]
    with pytest.raises(AttributeError, match=rf"no attribute 'decay': .*register_type\({__name__}\.Schedule\)"):
        schedule_record.decay  # noqa: B018
    with pytest.raises(UnsafeCheckpointError, match=r"\['hyper_parameters'\]\['schedule'\] .*register_type"):
        safeckpt.load(first, {"hyper_parameters": {}})


def test_storage_options_are_taken_for_local_paths_too(tmp_path: Path) -> None:
    """Lightning hands storage_options on; for a local path fsspec has nothing to do with them
    (remote paths: tests/test_remote.py)."""
    SafeCheckpointIO().save_checkpoint({"a": 1}, tmp_path / "s.ckpt", storage_options={"anon": True})
    assert SafeCheckpointIO().load_checkpoint(tmp_path / "s.ckpt") == {"a": 1}


def test_missing_file_and_remote_paths(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="Checkpoint file not found"):
        SafeCheckpointIO().load_checkpoint(tmp_path / "nope.ckpt")
    with pytest.raises(ValueError, match=r"nosuchscheme\+x://bucket/x.ckpt: fsspec cannot open"):
        SafeCheckpointIO().save_checkpoint({"a": 1}, "nosuchscheme+x://bucket/x.ckpt")


# -- map_location and remove_checkpoint ------------------------------------------------------------------


def mapping_state() -> dict[str, Any]:
    shared = torch.arange(6.0)
    return {"a": shared, "tied": shared, "p": nn.Parameter(torch.ones(2, 3)), "i": torch.arange(3), "n": 7}


@pytest.mark.parametrize("where", ["meta", torch.device("meta"), {"cpu": "meta"}, {"cuda:0": "meta"}, "cpu"], ids=repr)
def test_map_location_moves_tensors_as_torch_load_does(where: Any, tmp_path: Path) -> None:
    torch.save(mapping_state(), tmp_path / "t.pt")
    SafeCheckpointIO().save_checkpoint(mapping_state(), tmp_path / "s.ckpt")
    theirs = torch.load(tmp_path / "t.pt", map_location=where, weights_only=True)
    ours = SafeCheckpointIO().load_checkpoint(tmp_path / "s.ckpt", map_location=where)
    for key in ("a", "tied", "p", "i"):
        a, b = ours[key], theirs[key]
        assert (type(a), a.device, a.dtype, a.shape, a.requires_grad) == (
            type(b),
            b.device,
            b.dtype,
            b.shape,
            b.requires_grad,
        )
        if a.device.type == "cpu":
            assert torch.equal(a, b)
    assert ours["n"] == 7 and ours["tied"] is ours["a"] and theirs["tied"] is theirs["a"]


def test_map_location_function_sees_each_storage_once(tmp_path: Path) -> None:
    torch.save(mapping_state(), tmp_path / "t.pt")
    SafeCheckpointIO().save_checkpoint(mapping_state(), tmp_path / "s.ckpt")
    seen: dict[str, list[str]] = {"torch": [], "ours": []}

    def spy(name: str) -> Any:
        def fn(storage: Any, location: str) -> Any:
            seen[name].append(location)
            return torch.empty(0, dtype=torch.uint8).set_(storage).to("meta").untyped_storage()

        return fn

    theirs = torch.load(tmp_path / "t.pt", map_location=spy("torch"), weights_only=True)
    ours = SafeCheckpointIO().load_checkpoint(tmp_path / "s.ckpt", map_location=spy("ours"))
    assert seen["ours"] == ["cpu"] * 3 == seen["torch"]  # 'a' and 'tied' share one storage
    assert all(ours[k].device.type == "meta" and ours[k].shape == theirs[k].shape for k in ("a", "tied", "p", "i"))
    assert isinstance(ours["p"], nn.Parameter) and ours["tied"].untyped_storage() is ours["a"].untyped_storage()
    unchanged = SafeCheckpointIO().load_checkpoint(tmp_path / "s.ckpt", map_location=lambda storage, location: None)
    equal_values(unchanged, mapping_state())


def test_remove_checkpoint_removes_files_directories_and_links_only(tmp_path: Path) -> None:
    io = SafeCheckpointIO(max_shard_size=64)
    io.save_checkpoint(mapping_state(), tmp_path / "sharded.ckpt")
    SafeCheckpointIO().save_checkpoint(mapping_state(), tmp_path / "one.ckpt")
    (tmp_path / "link.ckpt").symlink_to(tmp_path / "sharded.ckpt")
    assert (tmp_path / "sharded.ckpt").is_dir()
    io.remove_checkpoint(tmp_path / "link.ckpt")
    assert not (tmp_path / "link.ckpt").is_symlink() and (tmp_path / "sharded.ckpt").is_dir()  # the target stays
    equal_values(io.load_checkpoint(tmp_path / "sharded.ckpt")["p"], mapping_state()["p"])
    io.remove_checkpoint(tmp_path / "sharded.ckpt")
    io.remove_checkpoint(str(tmp_path / "one.ckpt"))
    io.remove_checkpoint(tmp_path / "never-written.ckpt")
    assert list(tmp_path.iterdir()) == []


# -- packaging -------------------------------------------------------------------------------------------


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)


def test_import_safeckpt_does_not_import_lightning() -> None:
    done = run_python("import sys, safeckpt; print(sorted(m for m in sys.modules if 'lightning' in m))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_without_lightning_the_import_error_says_how_to_install() -> None:
    code = (
        "import sys\n"
        "for name in ('lightning', 'lightning_fabric', 'pytorch_lightning'): sys.modules[name] = None\n"
        "import safeckpt\n"
        "try:\n    import safeckpt.lightning\nexcept ImportError as e:\n    print(e)\n"
    )
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    assert "pip install 'safeckpt[lightning]'" in done.stdout


def test_the_standalone_pytorch_lightning_trainer_accepts_the_plugin(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pytorch_lightning as pl

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(4, 1)

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
            return nn.functional.mse_loss(self.layer(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    plugin = SafeCheckpointIO()
    t = pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
        plugins=[plugin],
    )
    assert t.strategy.checkpoint_io is plugin
    t.fit(Tiny(), DataLoader(TensorDataset(torch.randn(8, 4), torch.randn(8, 1)), batch_size=4))
    t.save_checkpoint(tmp_path / "pl.ckpt")
    assert_native_without_pickle(tmp_path / "pl.ckpt")


def test_the_standalone_lightning_fabric_accepts_the_plugin(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import lightning_fabric as lf

    fabric = lf.Fabric(accelerator="cpu", devices=1, plugins=[SafeCheckpointIO()])

    def build(seed: int) -> tuple[Any, Any]:
        torch.manual_seed(seed)
        model = nn.Linear(4, 2)
        return fabric.setup(model, torch.optim.Adam(model.parameters(), lr=0.1))

    model, opt = build(0)
    fabric.backward(model(torch.randn(3, 4)).square().sum())
    opt.step()
    fabric.save(tmp_path / "lf.ckpt", {"model": model, "optimizer": opt, "step": 1})
    assert_native_without_pickle(tmp_path / "lf.ckpt")
    fresh, fresh_opt = build(1)
    target = {"model": fresh, "optimizer": fresh_opt, "step": 0}
    assert fabric.load(tmp_path / "lf.ckpt", target) == {}
    equal_values((fresh.state_dict(), fresh_opt.state_dict()), (model.state_dict(), opt.state_dict()), "restored")
    assert target["step"] == 1
