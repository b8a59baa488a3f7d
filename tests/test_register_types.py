"""safeckpt.register_type: dataclasses, enums, NamedTuples and classes with converters round-trip by
type and value (tensors inside included); names collide loudly; a value of a type the loading
process has not registered is an inert record (the rest of the file loads), refused with the path
and the fix where it is loaded into a state, imports nothing, and the file stays readable by stock
safetensors and by the `safeckpt` command, which needs no class."""

from __future__ import annotations

import dataclasses
import enum
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import msgpack
import pytest
import safetensors
import torch

import safeckpt
from safeckpt import codec, user_types
from safeckpt.errors import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError
from safeckpt.user_types import Unregistered, _unregister


@pytest.fixture(autouse=True)
def registry() -> Iterator[None]:
    """Each test starts from this module's registrations and leaves nothing behind."""
    by_name, by_class = dict(user_types._BY_NAME), dict(user_types._BY_CLASS)
    for cls in REGISTERED:
        safeckpt.register_type(cls)
    yield
    user_types._BY_NAME.clear()
    user_types._BY_NAME.update(by_name)
    user_types._BY_CLASS.clear()
    user_types._BY_CLASS.update(by_class)


class Kind(enum.Enum):
    STEP = (1, "step")  # a value the codec could store only as a tuple: members are stored by name
    COSINE = (2, "cosine")


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Mode(str, enum.Enum):
    TRAIN = "train"
    EVAL = "eval"


class Perm(enum.Flag):
    R = 1
    W = 2
    X = 4
    RW = 3  # a named combination


@dataclasses.dataclass(frozen=True)
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    kind: Kind = Kind.COSINE


@dataclasses.dataclass
class Config:
    name: str
    optim: Optim
    class_weights: torch.Tensor
    per_layer: dict[int, float] = dataclasses.field(default_factory=dict)
    seen: int = dataclasses.field(init=False, default=0)  # set after construction: restored as saved


class Span(NamedTuple):
    start: int
    stop: int
    mask: torch.Tensor | None = None


class Interval:
    """A plain class: stored through its own converters."""

    __slots__ = ("hi", "lo")

    def __init__(self, lo: float, hi: float) -> None:
        self.lo, self.hi = lo, hi

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Interval) and (self.lo, self.hi) == (other.lo, other.hi)

    def __hash__(self) -> int:
        return hash((self.lo, self.hi))


REGISTERED = (Kind, Level, Mode, Perm, Optim, Config, Span)


def register_interval() -> None:
    safeckpt.register_type(
        Interval, name="tests.Interval", to_data=lambda i: [i.lo, i.hi], from_data=lambda d: Interval(*d)
    )


def same(a: Any, b: Any, where: str = "value") -> None:
    """Equal type and value all the way down; tensors bit for bit (and real tensors, not lazy references)."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(b, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and a.requires_grad == b.requires_grad, where
        assert torch.equal(a.detach().reshape(-1).view(torch.uint8), b.detach().reshape(-1).view(torch.uint8)), where
    elif dataclasses.is_dataclass(b):
        for f in dataclasses.fields(b):
            same(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    elif isinstance(b, dict):
        assert list(a) == list(b), where
        for k in b:
            same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(b, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def config() -> Config:
    cfg = Config("run", Optim(lr=3e-4), torch.tensor([0.25, 1.0, 4.0]), {0: 0.5, 12: 1e-6})
    cfg.seen = 7
    return cfg


def round_trip(tmp_path: Path, state: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    path = safeckpt.save(tmp_path / "run.safeckpt", state, **kwargs)
    return safeckpt.load(path)


# -- round trips -----------------------------------------------------------------------------------


def test_a_nested_dataclass_with_tensors_and_int_keys_round_trips(tmp_path: Path) -> None:
    state: dict[str, Any] = {"hparams": {"cfg": config()}, "model": {"w": torch.randn(3, 2)}}
    out = round_trip(tmp_path, state)
    same(out, state)
    assert out["hparams"]["cfg"].seen == 7 and list(out["hparams"]["cfg"].per_layer) == [0, 12]
    # the tensor inside is a real tensor stored beside the others, under the path of its field
    with safetensors.safe_open(tmp_path / "run.safeckpt", "pt") as f:
        assert sorted(f.keys()) == ["hparams/cfg/class_weights", "model/w"]
        assert torch.equal(f.get_tensor("hparams/cfg/class_weights"), state["hparams"]["cfg"].class_weights)
    opened = safeckpt.open(tmp_path / "run.safeckpt")["hparams"]["cfg"]
    assert type(opened.class_weights) is torch.Tensor  # rebuilt objects never hold lazy TensorRefs


@pytest.mark.parametrize("max_shard_size", [None, 64])
def test_every_kind_round_trips_by_type(max_shard_size: int | None, tmp_path: Path) -> None:
    register_interval()
    state = {
        "enums": [Kind.STEP, Level.HIGH, Mode.EVAL],
        "flags": [Perm.R | Perm.W, Perm.RW | Perm.X, Perm(0), Perm.X],
        "frozen": Optim(),
        "named": Span(2, 9, torch.tensor([True, False])),
        "named_plain": Span(0, 1),
        "custom": Interval(0.5, 2.0),
        "as_keys": {Level.LOW: 1, Optim(lr=0.1): 2, Interval(1, 2): 3, 5: 4},
        "in_set": {Mode.TRAIN, Optim()},
        "in_tuple": (Kind.COSINE, Span(1, 2)),
        "model": {"w": torch.arange(40, dtype=torch.float32)},
    }
    out = round_trip(tmp_path, state, max_shard_size=max_shard_size)
    same(out, state)
    assert type(out["enums"][1]) is Level and type(out["enums"][2]) is Mode  # not int, not str
    assert out["flags"] == [Perm.RW, Perm.R | Perm.W | Perm.X, Perm(0), Perm.X]
    assert out["in_set"] == state["in_set"]


def test_enums_are_stored_by_member_name_so_renumbering_keeps_the_meaning(tmp_path: Path) -> None:
    path = safeckpt.save(tmp_path / "e.safeckpt", {"kind": Kind.STEP, "level": Level.HIGH})

    class Kind2(enum.Enum):  # the next version of the code renumbered the members
        COSINE = 1
        STEP = 2

    _unregister(Kind)
    safeckpt.register_type(Kind2, name=f"{__name__}.Kind")
    out = safeckpt.load(path)
    assert out["kind"] is Kind2.STEP and out["level"] is Level.HIGH


def test_register_type_as_a_decorator_with_and_without_arguments(tmp_path: Path) -> None:
    @safeckpt.register_type
    @dataclasses.dataclass
    class Plain:
        x: int = 1

    @safeckpt.register_type(name="myproj.Named")
    @dataclasses.dataclass
    class Named:
        y: list[int] = dataclasses.field(default_factory=list)

    assert user_types.entry_for_class(Plain).name == f"{__name__}.{Plain.__qualname__}"  # type: ignore[union-attr]
    assert user_types.entry_for_class(Named).name == "myproj.Named"  # type: ignore[union-attr]
    same(round_trip(tmp_path, {"a": Plain(3), "b": Named([1, 2])}), {"a": Plain(3), "b": Named([1, 2])})


def test_a_subclass_of_a_registered_class_is_not_stored_as_its_parent(tmp_path: Path) -> None:
    @dataclasses.dataclass(frozen=True)
    class Tuned(Optim):
        warmup: int = 10

    with pytest.raises(TypeError, match=r"state\['o'\] is a .*Tuned.*register_type\("):
        safeckpt.save(tmp_path / "x.safeckpt", {"o": Tuned()})
    assert not (tmp_path / "x.safeckpt").exists()


def test_unstorable_values_inside_a_registered_type_name_their_path_and_the_fix(tmp_path: Path) -> None:
    @dataclasses.dataclass
    class Inner:
        v: int = 0

    with pytest.raises(TypeError) as info:
        safeckpt.save(tmp_path / "x.safeckpt", {"cfg": Config("x", Inner(), torch.zeros(1))})  # type: ignore[arg-type]
    assert "state['cfg']['optim'] is a" in str(info.value) and "safeckpt.register_type(" in str(info.value)
    with pytest.raises(TypeError, match=r"state\['s'\]\['stop'\] is a builtins\..*to_data=\.\.\., from_data=\.\.\."):
        safeckpt.save(tmp_path / "x.safeckpt", {"s": Span(1, len)})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"state\['p'\]: to_data of registered type .*Bits.*bits no member"):
        safeckpt.save(tmp_path / "x.safeckpt", {"p": _unnamed_bits()})
    assert not (tmp_path / "x.safeckpt").exists()


def _unnamed_bits() -> enum.IntFlag:
    class Bits(enum.IntFlag):  # IntFlag keeps bits no member names (boundary KEEP)
        A = 1

    safeckpt.register_type(Bits, name=f"{__name__}.Bits")
    return Bits(5)


# -- registration rules --------------------------------------------------------------------------------


def test_one_name_for_two_classes_and_two_names_for_one_class_are_errors() -> None:
    @dataclasses.dataclass
    class Other:
        lr: float = 0.0

    with pytest.raises(ValueError, match=rf"the name '{__name__}\.Optim' is already registered for {__name__}\.Optim"):
        safeckpt.register_type(Other, name=f"{__name__}.Optim")
    with pytest.raises(
        ValueError, match=rf"already registered as '{__name__}\.Optim'; a class is stored under one name"
    ):
        safeckpt.register_type(Optim, name="tests.Optim")
    safeckpt.register_type(Optim)  # again, same name: fine (a module imported twice)
    assert user_types.entry_for_name(f"{__name__}.Optim").cls is Optim  # type: ignore[union-attr]
    assert user_types.entry_for_name("tests.Optim") is None and user_types.entry_for_class(Other) is None


def test_a_redefined_class_replaces_its_old_definition(tmp_path: Path) -> None:
    """A notebook cell run twice defines a new class object with the same module and name."""

    def define() -> type:
        @dataclasses.dataclass
        class Cell:
            x: int = 0

        return safeckpt.register_type(Cell)

    first, second = define(), define()
    assert first is not second and user_types.entry_for_name(f"{__name__}.{second.__qualname__}").cls is second  # type: ignore[union-attr]
    assert type(round_trip(tmp_path, {"c": second(4)})["c"]) is second
    with pytest.raises(TypeError, match="register_type"):
        safeckpt.save(tmp_path / "y.safeckpt", {"c": first(4)})  # the stale class no longer stores


def test_classes_that_cannot_be_registered_say_why() -> None:
    class Bare:
        pass

    with pytest.raises(TypeError, match=r"not a dataclass, Enum or NamedTuple; pass to_data="):
        safeckpt.register_type(Bare)
    with pytest.raises(TypeError, match="give both to_data and from_data"):
        safeckpt.register_type(Bare, to_data=vars)
    for native in (dict, tuple, torch.Tensor, torch.nn.Parameter, int):
        with pytest.raises(TypeError, match="safeckpt stores"):
            safeckpt.register_type(native, to_data=repr, from_data=eval)  # never called
    with pytest.raises(TypeError, match="takes a class"):
        safeckpt.register_type(Optim(), to_data=repr, from_data=repr)  # type: ignore[call-overload]

    @dataclasses.dataclass
    class WithInitVar:
        x: int
        seed: dataclasses.InitVar[int]

    with pytest.raises(TypeError, match=r"__init__ needs \['seed'\], which are not fields"):
        safeckpt.register_type(WithInitVar)


# -- loading without the class ---------------------------------------------------------------------------


def test_an_unregistered_type_is_refused_naming_the_path_and_the_fix(tmp_path: Path) -> None:
    path = safeckpt.save(tmp_path / "run.safeckpt", {"hparams": {"cfg": config()}, "step": 3})
    _unregister(Config)
    # asked for into a state: refused with the path and the fix, before anything changes
    state: dict[str, Any] = {"hparams": {}, "step": 0}
    with pytest.raises(UnsafeCheckpointError) as info:
        safeckpt.load(path, state)
    message = str(info.value)
    assert message.startswith(f"{path}: state['hparams']['cfg'] is a value of registered type '{__name__}.Config'")
    assert f"safeckpt.register_type({__name__}.Config) before loading" in message
    assert state == {"hparams": {}, "step": 0}
    # everything else reads; the value itself is an inert record, and using it names the fix
    rest = safeckpt.load(path, {"step": 0})
    assert list(rest) == ["hparams"] and isinstance(rest["hparams"]["cfg"], Unregistered)
    cfg = safeckpt.open(path)["hparams"]["cfg"]
    assert isinstance(cfg, Unregistered) and cfg.name == f"{__name__}.Config" and cfg.data["name"] == "run"
    with pytest.raises(AttributeError, match=rf"'optim': .*safeckpt\.register_type\({__name__}\.Config\)"):
        safeckpt.load(path)["hparams"]["cfg"].optim  # noqa: B018
    # the cause is named even when it sits inside a registered value that could not be built because of it
    safeckpt.register_type(Config)
    _unregister(Optim)
    with pytest.raises(UnsafeCheckpointError, match=rf"state\['hparams'\]\['cfg'\]\['optim'\] .* '{__name__}\.Optim'"):
        safeckpt.load(path, {"hparams": {}})


def test_an_unregistered_type_imports_and_runs_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    canary = tmp_path / "canary"
    (tmp_path / "evil_cfg.py").write_text(f"open({str(canary)!r}, 'w').close()\nclass Config: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    @dataclasses.dataclass
    class Innocent:
        x: int = 1

    safeckpt.register_type(Innocent, name="evil_cfg.Config")  # a file recording a name that is an importable module
    path = safeckpt.save(tmp_path / "run.safeckpt", {"cfg": Innocent()})
    _unregister("evil_cfg.Config")
    with pytest.raises(UnsafeCheckpointError, match="nothing was imported or run"):
        safeckpt.load(path, {"cfg": None})
    record = safeckpt.load(path)["cfg"]
    with pytest.raises(AttributeError, match="nothing was imported or run"):
        record.x  # noqa: B018
    assert not canary.exists() and "evil_cfg" not in sys.modules


def test_a_field_added_since_the_file_was_written_takes_its_default(tmp_path: Path) -> None:
    path = safeckpt.save(tmp_path / "run.safeckpt", {"o": Optim(lr=0.5)})

    @dataclasses.dataclass(frozen=True)
    class Optim2(Optim):
        weight_decay: float = 0.01

    _unregister(Optim)
    safeckpt.register_type(Optim2, name=f"{__name__}.Optim")
    assert safeckpt.load(path)["o"] == Optim2(lr=0.5, weight_decay=0.01)


def test_data_the_registered_class_no_longer_accepts_is_a_clear_error(tmp_path: Path) -> None:
    path = safeckpt.save(tmp_path / "run.safeckpt", {"o": [Optim(lr=0.5)], "k": Kind.STEP})

    @dataclasses.dataclass(frozen=True)
    class Optim2:  # the field `betas` was removed since the file was written
        lr: float = 0.1
        kind: Kind = Kind.STEP

    _unregister(Optim)
    safeckpt.register_type(Optim2, name=f"{__name__}.Optim")
    with pytest.raises(CheckpointError) as info:
        safeckpt.load(path, {"o": None})
    message = str(info.value)
    assert f"state['o'][0] is a stored '{__name__}.Optim' that the registered" in message
    assert "unexpected keyword argument 'betas'" in message and "from_data" in message

    class Kind3(enum.Enum):  # a member renamed
        LINEAR = 1

    _unregister(Optim2)
    safeckpt.register_type(Optim)
    _unregister(Kind)
    safeckpt.register_type(Kind3, name=f"{__name__}.Kind")
    with pytest.raises(
        CheckpointError, match=r"state\['o'\]\[0\]\['kind'\] .*'COSINE' is not a member name of .*Kind3 \(LINEAR\)"
    ):
        safeckpt.load(path, {"o": None})
    with pytest.raises(AttributeError, match="could not rebuild .*from_data"):  # the record, used
        safeckpt.load(path)["o"][0].kind  # noqa: B018


def test_without_the_class_a_file_stays_data_and_converts_losslessly(tmp_path: Path) -> None:
    state = {"hparams": {"cfg": config(), "kind": Kind.STEP}, "model": {"w": torch.randn(2, 2)}}
    path = safeckpt.save(tmp_path / "run.safeckpt", state)
    _unregister(Config)
    _unregister(Kind)
    with codec.keep_unregistered():
        tree = safeckpt.open(path).tree
        cfg = tree["hparams"]["cfg"]
        assert isinstance(cfg, Unregistered) and cfg.name == f"{__name__}.Config" and cfg.data["name"] == "run"
        assert repr(tree["hparams"]["kind"]) == f"{__name__}.Kind('STEP')"
        copy = safeckpt.convert(path, tmp_path / "copy.safeckpt")  # written back as it was stored
    safeckpt.register_type(Config)
    safeckpt.register_type(Kind)
    same(safeckpt.load(copy), state)


def test_malformed_registered_values_are_corrupt_not_crashes() -> None:
    for payload in ([1, 2], ["x"], "x", ["a", 1, 2]):
        data = msgpack.packb({"v": msgpack.ExtType(codec.Ext.USER, msgpack.packb(payload))})
        with pytest.raises(CorruptCheckpointError, match="malformed registered-type value"):
            codec.decode(data, tensor=None, source="f")


# -- stock readers and the command line ----------------------------------------------------------------


def test_stock_safetensors_and_the_cli_read_the_file_without_the_class(tmp_path: Path) -> None:
    register_interval()
    state: dict[str, Any] = {
        "hparams": {"cfg": config(), "span": Span(3, 4), "iv": Interval(1.0, 2.5)},
        "model": {"w": torch.ones(3)},
    }
    path = safeckpt.save(tmp_path / "run.safeckpt", state)
    with safetensors.safe_open(path, "pt") as f:
        assert torch.equal(f.get_tensor("hparams/cfg/class_weights"), state["hparams"]["cfg"].class_weights)
        assert torch.equal(f.get_tensor("model/w"), torch.ones(3))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        # a fresh interpreter that never imports this test module: none of its classes exist there
        return subprocess.run(
            [sys.executable, "-m", "safeckpt", *args], capture_output=True, text=True, check=True, cwd=tmp_path
        )

    shown = cli("inspect", str(path)).stdout
    assert f"cfg:  {__name__}.Config(name='run', " in shown  # the outline cuts long values
    assert "iv:   tests.Interval([1.0, 2.5])" in shown and f"span: {__name__}.Span(start=3, stop=4, mask=None)" in shown
    entries = {e["path"]: e for e in json.loads(cli("inspect", str(path), "--json").stdout)["entries"]}
    assert entries["hparams/span"]["repr"] == f"{__name__}.Span(start=3, stop=4, mask=None)"
    optim = f"optim={__name__}.Optim(lr=0.0003, betas=(0.9, 0.999), kind={__name__}.Kind('COSINE'))"
    assert entries["hparams/cfg"]["repr"].startswith(f"{__name__}.Config(name='run', {optim}, class_weights=")
    cli("convert", str(path), str(tmp_path / "copy.safeckpt"))
    cli("verify", str(tmp_path / "copy.safeckpt"))
    same(safeckpt.load(tmp_path / "copy.safeckpt"), state)
