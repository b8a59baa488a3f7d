"""omegaconf configs inside pickles (Hydra + Lightning ``hyper_parameters``), read as plain data.

An omegaconf ``DictConfig``/``ListConfig`` pickles as its ``__dict__``: ``_content`` (child nodes),
``_metadata`` (a ``ContainerMetadata`` naming Python types: ``ref_type=typing.Any``,
``object_type=builtins.dict``, ...), ``_parent`` (a back-reference, so the graph has cycles).
These handlers turn it into what ``OmegaConf.to_container(cfg)`` returns, without omegaconf:

- a ``DictConfig`` becomes a plain ``dict`` of its content, a ``ListConfig`` a ``list``; a node
  (``AnyNode``, ``IntegerNode``, ...) its value; interpolations (``"${name}"``) and missing values
  (``"???"``) stay the strings they are (never resolved);
- ``Metadata``/``ContainerMetadata`` become plain dicts (dropped from the containers above);
- a type named only as data (``builtins.dict``, ``typing.Any``) is pushed as its name, a string:
  it can never be called (the VM calls only `Global` references to handlers).

Each object is converted when the pickle's ``BUILD`` gives it its state, after its children, so
the cyclic ``_parent`` references are dropped before any tree walk sees them. Nothing of omegaconf
is imported (it need not be installed). Spec: ``formats/torch.md`` §5.4.
"""

from __future__ import annotations

from typing import Any

from ..errors import CorruptCheckpointError
from ._pickle import BASE, Global, Handler

# types omegaconf's metadata names (ref_type, object_type, key_type, element_type); as data only
TYPE_NAMES = (
    "builtins.dict",
    "builtins.list",
    "builtins.tuple",
    "builtins.int",
    "builtins.float",
    "builtins.str",
    "builtins.bool",
    "builtins.object",
    "typing.Any",
    "typing.Dict",
    "typing.List",
    "typing.Tuple",
    "typing.Optional",
    "typing.Union",
)
CONTAINERS = {"omegaconf.dictconfig.DictConfig": dict, "omegaconf.listconfig.ListConfig": list}
NODES = tuple(
    f"omegaconf.nodes.{n}"
    for n in (
        "AnyNode",
        "StringNode",
        "IntegerNode",
        "FloatNode",
        "BooleanNode",
        "BytesNode",
        "PathNode",
        "EnumNode",
        "UnionNode",
        "ValueNode",
        "InterpolationResultNode",
    )
)
METADATA = ("omegaconf.base.Metadata", "omegaconf.base.ContainerMetadata")
# referenced as data (Lightning's ``hparams_type`` is the class DictConfig), they read as {"__global__": name}
CLASSES = frozenset((*CONTAINERS, *NODES, *METADATA))


class _Pending:
    """An omegaconf object between ``NEWOBJ`` and ``BUILD``: only its class name is known."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name} without state>"


def _new(name: str) -> Any:
    def new(*args: Any) -> _Pending:
        if args:
            raise CorruptCheckpointError(f"{name} is created with arguments; omegaconf pickles none")
        return _Pending(name)

    return new


def _state(obj: Any, state: Any) -> dict[str, Any]:
    if not isinstance(obj, _Pending) or not isinstance(state, dict):
        raise CorruptCheckpointError(f"{getattr(obj, 'name', type(obj).__name__)}: its state is not a dict")
    return state


def _as_data(x: Any) -> Any:
    """A type reference in metadata as its name; containers of them too; other values unchanged."""
    if isinstance(x, Global):
        return x.name
    if isinstance(x, _Pending):
        return x.name
    if isinstance(x, (list, tuple)):
        return type(x)(_as_data(v) for v in x)
    if isinstance(x, dict):
        return {k: _as_data(v) for k, v in x.items()}
    return x


def _container(kind: type) -> Any:
    def build(obj: Any, state: Any) -> Any:
        content = _state(obj, state).get("_content")
        if content is None or isinstance(content, str):  # None, "???" (missing) or "${...}" (interpolation)
            return content
        if not isinstance(content, kind):
            raise CorruptCheckpointError(
                f"{obj.name}: its content is a {type(content).__name__}, not a {kind.__name__}"
            )
        return kind(content)  # the children were converted by their own BUILD

    return build


def _node(obj: Any, state: Any) -> Any:
    state = _state(obj, state)
    if "_val" in state:
        return state["_val"]
    return state.get("_value")  # UnionNode holds a node, already converted


def _metadata(obj: Any, state: Any) -> dict[str, Any]:
    return {str(k): _as_data(v) for k, v in _state(obj, state).items()}


def _defaultdict(factory: Any = None, *rest: Any) -> dict[Any, Any]:
    """``collections.defaultdict(factory)`` as a plain dict (omegaconf's resolver cache): the
    factory, a type named as data, is never called."""
    if rest or not (factory is None or isinstance(factory, (str, Global))):
        raise CorruptCheckpointError("collections.defaultdict takes one default factory")
    return {}


def handlers() -> dict[str, Handler]:
    """The omegaconf classes, the defaultdict they use, and the type names their metadata holds.

    Example:
        >>> "omegaconf.dictconfig.DictConfig" in handlers(), handlers()["typing.Any"].value
        (True, 'typing.Any')
    """
    table = {n: Handler(value=n) for n in TYPE_NAMES if n not in BASE}
    for name, kind in CONTAINERS.items():
        table[name] = Handler(new=_new(name), build=_container(kind))
    for name in NODES:
        table[name] = Handler(new=_new(name), build=_node)
    for name in METADATA:
        table[name] = Handler(new=_new(name), build=_metadata)
    table["collections.defaultdict"] = Handler(call=_defaultdict)
    return table
