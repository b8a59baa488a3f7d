"""Fabric's save / load / load_raw scenarios (reference/fabric_behavior.md §2 A-E, M and §3),
run against safeckpt on real files."""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

import safeckpt
from conformance import Net, assert_bits_equal
from safeckpt import AttributeDict


def trained(seed: int = 0) -> tuple[Net, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(seed)
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(2):
        model(torch.tensor([1, 3, 4])).sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched


class Counter:
    """A stateful object that is neither module nor optimizer (Fabric's _Stateful)."""

    def __init__(self, count: int = 0) -> None:
        self.count = count

    def state_dict(self) -> dict[str, int]:
        return {"count": self.count}

    def load_state_dict(self, sd: dict[str, int]) -> None:
        self.count = sd["count"]


def test_seed_trivial_strict_and_non_strict(tmp_path: Path) -> None:
    """The Fabric docs' example: a model missing a parameter loads with strict=False only."""
    model1 = torch.nn.Linear(2, 2, bias=True)
    path = safeckpt.save(tmp_path / "state.ckpt", {"model": model1})
    model2 = torch.nn.Linear(2, 2, bias=False)
    with pytest.raises(RuntimeError, match='Unexpected key\\(s\\) in state_dict: "bias"'):
        safeckpt.load(path, {"model": model2})
    safeckpt.load(path, {"model": model2}, strict=False)
    assert torch.equal(model2.weight, model1.weight)


def test_full_round_trip_in_place(tmp_path: Path) -> None:
    model, opt, sched = trained(0)
    counter = Counter(100)
    hparams = AttributeDict(lr=0.01, layers=[4, 3], name="run", betas=(0.9, 0.999))
    state = {"model": model, "optimizer": opt, "sched": sched, "counter": counter, "iteration": 12, "hparams": hparams}
    path = safeckpt.save(tmp_path / "ckpt", state)

    model2, opt2, sched2 = trained(1)
    counter2 = Counter()
    new = {"model": model2, "optimizer": opt2, "sched": sched2, "counter": counter2, "iteration": 0, "hparams": None}
    remainder = safeckpt.load(path, new)
    assert remainder == {}
    assert_bits_equal(model.state_dict(), model2.state_dict())
    assert_bits_equal(opt.state_dict(), opt2.state_dict())
    assert sched2.state_dict() == sched.state_dict()
    assert counter2.count == 100 and new["iteration"] == 12
    assert type(new["hparams"]) is AttributeDict and new["hparams"] == hparams and new["hparams"].betas == (0.9, 0.999)
    assert new["model"] is model2 and new["optimizer"] is opt2  # objects restored in place, not replaced

    # training continues identically from the restored state
    for m, o in ((model, opt), (model2, opt2)):
        m(torch.tensor([2, 0])).sum().backward()
        o.step()
    assert_bits_equal(model.state_dict(), model2.state_dict())


def test_remainder_keeps_saved_order(tmp_path: Path) -> None:
    model, opt, _ = trained()
    path = safeckpt.save(tmp_path / "c", {"model": model, "optimizer": opt, "int": 1, "dict": {"cocofruit": 2}})
    remainder = safeckpt.load(path, {"model": Net()})
    assert list(remainder) == ["optimizer", "int", "dict"]
    assert remainder["int"] == 1 and remainder["dict"] == {"cocofruit": 2}
    assert set(remainder["optimizer"]) == {"state", "param_groups"}


def test_load_without_state_returns_everything(tmp_path: Path) -> None:
    model, opt, _ = trained()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "int": 5, "nested": {1: [2, (3, None)]}}
    path = safeckpt.save(tmp_path / "c", state)
    for requested in (None, {}):
        full = safeckpt.load(path, requested)
        assert_bits_equal(state, full)
        assert all(t.device.type == "cpu" for t in full["model"].values())


def test_values_are_replaced_not_merged(tmp_path: Path) -> None:
    path = safeckpt.save(tmp_path / "c", {"dict": {"a": 1, "b": 2}, "t": torch.ones(2)})
    original_tensor = torch.zeros(2)
    state = {"dict": {"a": 100, "c": 3}, "t": original_tensor}
    safeckpt.load(path, state)
    assert state["dict"] == {"a": 1, "b": 2}
    assert torch.equal(state["t"], torch.ones(2)) and torch.equal(original_tensor, torch.zeros(2))


def test_strict_missing_top_level_key_names_it_and_changes_nothing(tmp_path: Path) -> None:
    model, opt, _ = trained()
    path = safeckpt.save(tmp_path / "c", {"a": 1, "b": 2, "model": model})
    target = Net()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    state = {"model": target, "a": 0, "c": 3}
    with pytest.raises(KeyError, match="'c'.*strict=False"):
        safeckpt.load(path, state)
    assert state["a"] == 0
    assert_bits_equal(before, dict(target.state_dict()))


@pytest.mark.parametrize("make", ["torch", "safeckpt"])
def test_load_of_a_bare_state_dict_into_entries_points_to_load_raw(tmp_path: Path, make: str) -> None:
    model = Net()
    path = tmp_path / "weights.pt"
    if make == "torch":
        torch.save(model.state_dict(), path)
    else:
        path = safeckpt.save(tmp_path / "weights.safeckpt", model.state_dict())
    with pytest.raises(
        KeyError, match=r"It holds a bare state dict \('emb.weight', .*safeckpt.load_raw\(path, module\)"
    ):
        safeckpt.load(path, {"model": Net()})
    with pytest.raises(KeyError) as entries:  # a dict of entries gets no such hint
        safeckpt.load(safeckpt.save(tmp_path / "e.safeckpt", {"model": model}), {"other": 1})
    assert "load_raw" not in str(entries.value)


def test_non_strict_loading(tmp_path: Path) -> None:
    model, opt, _ = trained()
    path = safeckpt.save(tmp_path / "c", {"model": model, "optimizer": opt, "int": 1, "str": "x"})
    model2, opt2, _ = trained(3)
    state = {"model": model2, "optimizer": opt2, "int": 0, "new": "keep"}
    remainder = safeckpt.load(path, state, strict=False)
    assert_bits_equal(model.state_dict(), model2.state_dict())
    assert state["int"] == 1 and state["new"] == "keep" and "str" not in state
    assert remainder == {"str": "x"}


def test_failed_module_load_is_transactional(tmp_path: Path) -> None:
    """Beyond Fabric: a later module's mismatch is found before the optimizer is touched."""
    model, opt, _ = trained()
    path = safeckpt.save(tmp_path / "c", {"optimizer": opt, "step": 3, "model": model})
    model2, opt2, _ = trained(5)
    wrong = torch.nn.Linear(4, 4)
    opt_before = opt2.state_dict()["param_groups"][0]["lr"]
    wrong_before = wrong.weight.clone()
    state = {"optimizer": opt2, "step": 0, "model": wrong}
    with pytest.raises(RuntimeError, match="Error\\(s\\) in loading state_dict for Linear"):
        safeckpt.load(path, state)
    assert opt2.state_dict()["param_groups"][0]["lr"] == opt_before and state["step"] == 0
    assert torch.equal(wrong.weight, wrong_before)


def test_shape_mismatch_raises_even_non_strict(tmp_path: Path) -> None:
    path = safeckpt.save(tmp_path / "c", {"model": torch.nn.Linear(3, 2)})
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        safeckpt.load(path, {"model": torch.nn.Linear(2, 2)}, strict=False)


def test_optimizer_group_mismatch(tmp_path: Path) -> None:
    model, opt, _ = trained()
    path = safeckpt.save(tmp_path / "c", {"optimizer": opt})
    other = torch.optim.Adam([torch.nn.Parameter(torch.ones(1))])
    with pytest.raises(ValueError, match="doesn't match the size"):
        safeckpt.load(path, {"optimizer": other})


def test_filters(tmp_path: Path) -> None:
    model, opt, _ = trained()
    state = {"model": model, "optimizer": opt, "anything": {"a": 1, "b": "x"}, "foo": 1}
    path = safeckpt.save(
        tmp_path / "c",
        state,
        filter={
            "model": lambda k, v: "weight" in k,
            "optimizer": lambda k, v: "param_groups" in k,
            "anything": lambda k, v: isinstance(v, int),
            "foo": lambda k, v: False,
        },
    )
    full = safeckpt.load(path)
    assert list(full["model"]) == [k for k in model.state_dict() if "weight" in k]
    assert list(full["optimizer"]) == ["param_groups"]
    assert full["anything"] == {"a": 1}
    assert full["foo"] == 1  # a filter on a non-dict value is ignored, as in Fabric
    # a filter that rejects everything drops the key entirely
    path = safeckpt.save(tmp_path / "d", state, filter={k: (lambda k, v: False) for k in state})
    assert safeckpt.load(path) == {"foo": 1}
    # and a filtered model loads back only with strict=False
    with pytest.raises(RuntimeError, match="Missing key"):
        safeckpt.load(tmp_path / "c", {"model": Net()})
    safeckpt.load(tmp_path / "c", {"model": Net()}, strict=False)


def test_filter_errors(tmp_path: Path) -> None:
    model = Net()
    with pytest.raises(TypeError, match="Filter should be a dictionary"):
        safeckpt.save(tmp_path / "c", {"model": model}, filter="model")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="callable, given 'foo'"):
        safeckpt.save(tmp_path / "c", {"model": model}, filter={"model": "foo"})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="\\{'asd'\\} are not present in the state keys"):
        safeckpt.save(tmp_path / "c", {"model": model}, filter={"asd": lambda k, v: True})
    assert not (tmp_path / "c").exists()


def test_wrapped_objects_are_unwrapped(tmp_path: Path) -> None:
    model = Net()
    compiled = torch.compile(model)
    path = safeckpt.save(tmp_path / "c", {"model": compiled})
    keys = list(safeckpt.open(path)["model"])
    assert keys == list(model.state_dict()) and not any("_orig_mod" in k for k in keys)
    target = Net()
    safeckpt.load(path, {"model": torch.compile(target)})
    assert_bits_equal(model.state_dict(), target.state_dict())


def test_module_prefix_of_a_ddp_state_dict_is_stripped_on_load(tmp_path: Path) -> None:
    model = Net()
    ddp_style = OrderedDict((f"module.{k}", v) for k, v in model.state_dict().items())
    path = safeckpt.save(tmp_path / "w.safetensors", ddp_style)
    target = Net()
    safeckpt.load_raw(path, target)
    assert_bits_equal(model.state_dict(), target.state_dict())


def test_attribute_dict_as_state(tmp_path: Path) -> None:
    model, opt, _ = trained()
    path = safeckpt.save(tmp_path / "c", AttributeDict(model=model, optimizer=opt, iter_num=7))
    state = AttributeDict(model=Net(), optimizer=trained(2)[1], iter_num=0)
    safeckpt.load(path, state)
    assert state.iter_num == 7
    assert_bits_equal(model.state_dict(), state.model.state_dict())


def test_load_raw_module_and_optimizer(tmp_path: Path) -> None:
    model, opt, _ = trained()
    m_path = safeckpt.save(tmp_path / "m.safeckpt", model.state_dict())
    o_path = safeckpt.save(tmp_path / "o.safeckpt", opt.state_dict())
    model2, opt2, _ = trained(4)
    safeckpt.load_raw(m_path, model2)
    safeckpt.load_raw(o_path, opt2)
    assert_bits_equal(model.state_dict(), model2.state_dict())
    assert_bits_equal(opt.state_dict(), opt2.state_dict())


def test_load_raw_of_torch_saved_state_dict(tmp_path: Path) -> None:
    """A friend's ``torch.save(model.state_dict())``, read through the restricted unpickler."""
    model, opt, _ = trained()
    torch.save(model.state_dict(), tmp_path / "friend.pt")
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    model2, opt2, _ = trained(9)
    safeckpt.load_raw(tmp_path / "friend.pt", model2)
    safeckpt.load_raw(tmp_path / "opt.pt", opt2)
    assert_bits_equal(model.state_dict(), model2.state_dict())
    assert opt2.state_dict()["param_groups"] == opt.state_dict()["param_groups"]


def test_load_raw_of_wrapped_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    """Fabric silently loads nothing with strict=False; we name the keys found and the fix."""
    model, opt, _ = trained()
    path = safeckpt.save(tmp_path / "c", {"model": model, "optimizer": opt, "step": 1})
    for strict in (True, False):
        with pytest.raises(RuntimeError, match="wrapped checkpoint with top-level keys 'model', 'optimizer', 'step'"):
            safeckpt.load_raw(path, Net(), strict=strict)
    with pytest.raises(ValueError, match="wrapped checkpoint"):
        safeckpt.load_raw(path, opt)
    with pytest.raises(TypeError, match="load_raw takes a torch.nn.Module or torch.optim.Optimizer"):
        safeckpt.load_raw(path, Counter())  # type: ignore[arg-type]


def test_save_refuses_directory_and_creates_parents(tmp_path: Path) -> None:
    (tmp_path / "adir").mkdir()
    with pytest.raises(IsADirectoryError, match="adir is a directory"):
        safeckpt.save(tmp_path / "adir", {"a": 1})
    assert os.listdir(tmp_path / "adir") == []
    path = safeckpt.save(tmp_path / "new" / "deeper" / "c.ckpt", {"a": 1})
    assert safeckpt.load(path) == {"a": 1}


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        safeckpt.load(tmp_path / "nope.ckpt")


def test_empty_state(tmp_path: Path) -> None:
    path = safeckpt.save(tmp_path / "e", {})
    assert safeckpt.load(path) == {}
