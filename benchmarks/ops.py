"""Every benchmarked operation, and the child process that times one of them.

Each operation runs alone in a fresh process: its set-up (building the state, the model to load
into, importing a peer) is not timed; then the process's peak RSS is reset (``/proc/self/clear_refs``)
and only the operation itself is timed. The process is either a fork of a server that has imported
torch and nothing else (the default: no state, no threads, no page of data carried over), or a new
interpreter (``--exec``). Saves write a new file after the old one was deleted and ``os.sync()``
ran, and every save is durable (fsync) for safeckpt and for every peer alike.

Usage (bench.py drives this): ``python ops.py serve`` reads one JSON request per line on stdin and
answers one JSON result per line; ``python ops.py run OP --size 100MB --workdir DIR`` runs one.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import resource
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import state as S

STATE_VERSION = 3  # bump when the synthetic state changes, so cached files are rebuilt


@dataclass
class Env:
    """Where one size's files live, and what `prepare` recorded about them."""

    size: int
    workdir: Path

    @property
    def dir(self) -> Path:
        return self.workdir / f"state-{self.size}"

    @property
    def out(self) -> Path:
        return self.dir / "out"

    @property
    def shape(self) -> S.Shape:
        return S.Shape.for_bytes(self.size)

    @property
    def manifest(self) -> dict[str, Any]:
        return json.loads((self.dir / "manifest.json").read_text())

    def file(self, name: str) -> Path:
        return self.dir / name


@dataclass
class Prepared:
    """An operation ready to time: ``run`` is timed; ``check`` (untimed) returns a problem or None."""

    run: Callable[[], Any]
    check: Callable[[], str | None] = lambda: None
    peak: list[int] | None = None  # for a command: its own peak RSS, filled in by `command`
    cleanup: Callable[[], None] = lambda: None


@dataclass(frozen=True)
class Op:
    name: str
    group: str
    tool: str  # "safeckpt", a peer ("torch", "safetensors", "fabric"), or "limit"
    setup: Callable[[Env], Prepared] = field(repr=False)
    nbytes: str = "state_bytes"  # what GB/s counts: a manifest key holding a byte count
    requires: tuple[str, ...] = ()
    sample_anon: bool = False


def available(op: Op) -> str | None:
    """None if the op can run here, else why not."""
    if op.group == "gpu" and not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    for mod in op.requires:
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed"
    return None


# -- helpers ------------------------------------------------------------------------------------


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fresh_output(env: Env, name: str) -> Path:
    """A path for a save: the old file deleted and the page cache written back first."""
    env.out.mkdir(parents=True, exist_ok=True)
    path = env.out / name
    if path.is_dir():
        import shutil

        shutil.rmtree(path)
    path.unlink(missing_ok=True)
    os.sync()
    return path


def command(cmd: list[str], peak: list[int], **kwargs: Any) -> None:
    """Run ``cmd`` and record its peak RSS. Not from ``ru_maxrss``: a child forked from this
    process carries this process's peak into its own across ``exec``; the exec'd program's
    VmHWM, read until it exits, is its own."""
    proc = subprocess.Popen(cmd, **kwargs)

    def sample() -> None:
        try:
            while True:
                with open(f"/proc/{proc.pid}/status") as f:
                    hwm = [int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM")]
                if not hwm:  # a zombie: the command has exited
                    return
                peak.append(max(hwm[0], peak.pop() if peak else 0))
                time.sleep(0.002)
        except OSError:
            return

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    code = proc.wait()
    watcher.join()
    if code:
        raise subprocess.CalledProcessError(code, cmd)


def remover(path: Path) -> Callable[[], None]:
    return lambda: path.unlink(missing_ok=True)


def close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b))


def imported_safeckpt() -> Any:
    """``safeckpt`` with the modules its calls use imported, in the (untimed) set-up, as each peer's
    is (``from safetensors.torch import load_model``): ``import safeckpt`` alone defers its API and
    format modules to the first call, which would time their import (~0.1 s) as part of the op."""
    import safeckpt
    import safeckpt._device
    import safeckpt.api
    import safeckpt.state

    for name in safeckpt.formats.BUILTIN:
        safeckpt.formats.get(name)
    return safeckpt


def load_target(env: Env) -> dict[str, Any]:
    """A model and a stateless fused Adam with other weights, to load a checkpoint into."""
    model = S.build_model(env.shape, seed=1)
    return {"model": model, "optimizer": S.build_optimizer(model), "step": 0, "lr": 0.0, "hparams": {}, "history": []}


def loaded_check(env: Env, state: dict[str, Any], with_optimizer: bool = True) -> Callable[[], str | None]:
    def check() -> str | None:
        want = env.manifest["fingerprint"]
        got = S.fingerprint(state["model"], state["optimizer"] if with_optimizer else None)
        if not all(close(a, b) for a, b in zip(got, want, strict=False)):
            return f"loaded values differ from the saved state: {got} != {want[: len(got)]}"
        if with_optimizer and state.get("step", 1) != 1:
            return f"step is {state.get('step')}, not 1"
        return None

    return check


def written_check(path: Path, expect: int) -> Callable[[], str | None]:
    def check() -> str | None:
        safeckpt = imported_safeckpt()

        if not path.exists():
            return f"{path} was not written"
        got = safeckpt.open(path).nbytes
        return None if got == expect else f"{path} holds {got} tensor bytes, expected {expect}"

    return check


def fabric() -> Any:
    try:
        from lightning.fabric import Fabric
    except ImportError:
        from lightning_fabric import Fabric  # type: ignore[no-redef]
    return Fabric(accelerator="cpu", devices=1)


# -- save -------------------------------------------------------------------------------------


def dd_sync(env: Env) -> Prepared:
    out = fresh_output(env, "dd.bin")
    mib = -(-env.manifest["dd_bytes"] // 2**20)
    cmd = ["dd", "if=/dev/zero", f"of={out}", "bs=1M", f"count={mib}", "conv=fdatasync", "status=none"]
    peak: list[int] = []
    return Prepared(lambda: command(cmd, peak), peak=peak, cleanup=remover(out))


def write_state(env: Env) -> Prepared:
    """The floor for writing *this memory*: every tensor's bytes, in 1 MiB os.write calls, then
    fsync, from a freshly built state like the savers'. dd reads /dev/zero and starts with an empty
    process, so it shows the disk, not what copying a just-built multi-GB state costs here."""
    state = S.build_state(env.shape)
    out = fresh_output(env, "raw.bin")
    tensors = list(S.flatten(S.plain(state))[0].values())

    def run() -> None:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for t in tensors:
                view = memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())
                for i in range(0, len(view), 1 << 20):
                    os.write(fd, view[i : i + (1 << 20)])
            os.fsync(fd)
        finally:
            os.close(fd)

    return Prepared(run, cleanup=remover(out))


def save_safeckpt(env: Env) -> Prepared:
    safeckpt = imported_safeckpt()

    state = S.build_state(env.shape)
    out = fresh_output(env, "save.safeckpt")
    return Prepared(
        lambda: safeckpt.save(out, state),
        check=written_check(out, env.manifest["state_bytes"]),
        cleanup=remover(out),
    )


def save_torch(env: Env) -> Prepared:
    state = S.build_state(env.shape)
    out = fresh_output(env, "save.pt")

    def run() -> None:
        torch.save(S.plain(state), out)
        fsync_path(out)

    return Prepared(run, cleanup=remover(out))


def save_safetensors(env: Env) -> Prepared:
    from safetensors.torch import save_file

    state = S.build_state(env.shape)
    out = fresh_output(env, "save.safetensors")

    def run() -> None:
        tensors, meta = S.flatten(S.plain(state))
        save_file(tensors, out, metadata=meta)
        fsync_path(out)

    return Prepared(run, cleanup=remover(out))


def save_fabric(env: Env) -> Prepared:
    f = fabric()
    state = S.build_state(env.shape)
    out = fresh_output(env, "save.fabric.ckpt")

    def run() -> None:
        f.save(out, state)
        fsync_path(out)

    return Prepared(run, cleanup=remover(out))


# -- integrity: what the CRC-32s cost ------------------------------------------------------------


def save_crc(impl: str) -> Callable[[Env], Prepared]:
    """`safeckpt.save` with its CRC-32s computed by ``impl``: ``"isal"`` (the default when
    installed), ``"zlib"`` (the standard library's), or ``"none"`` (every CRC taken as 0: what
    saving would cost without checksums; the file then fails verify, so it is only timed)."""

    def setup(env: Env) -> Prepared:
        import zlib

        import safeckpt
        import safeckpt._fs
        import safeckpt.formats._safetensors as st

        if impl == "zlib":
            safeckpt._fs.crc32 = zlib.crc32  # type: ignore[attr-defined]
        elif impl == "none":
            st.checksum = lambda data: 0  # type: ignore[assignment]
        state = S.build_state(env.shape)
        out = fresh_output(env, f"save-crc-{impl}.safeckpt")
        return Prepared(
            lambda: safeckpt.save(out, state),
            check=written_check(out, env.manifest["state_bytes"]),
            cleanup=remover(out),
        )

    return setup


def load_verify_safeckpt(env: Env) -> Prepared:
    safeckpt = imported_safeckpt()

    state = load_target(env)
    return Prepared(
        lambda: safeckpt.load(env.file("full.safeckpt"), state, verify=True), check=loaded_check(env, state)
    )


# -- load into an existing model + optimizer ---------------------------------------------------


def load_safeckpt(env: Env) -> Prepared:
    safeckpt = imported_safeckpt()

    state = load_target(env)
    return Prepared(lambda: safeckpt.load(env.file("full.safeckpt"), state), check=loaded_check(env, state))


def _torch_load(env: Env, mmap: bool) -> Prepared:
    state = load_target(env)

    def run() -> None:
        ckpt = torch.load(env.file("full.pt"), mmap=mmap, weights_only=True)
        state["model"].load_state_dict(ckpt.pop("model"))
        state["optimizer"].load_state_dict(ckpt.pop("optimizer"))
        state.update(ckpt)

    return Prepared(run, check=loaded_check(env, state))


def load_torch_mmap(env: Env) -> Prepared:
    return _torch_load(env, mmap=True)


def load_torch(env: Env) -> Prepared:
    return _torch_load(env, mmap=False)


def load_fabric(env: Env) -> Prepared:
    f = fabric()
    state = load_target(env)
    return Prepared(lambda: f.load(env.file("full.pt"), state), check=loaded_check(env, state))


# -- load_raw of a safetensors model file --------------------------------------------------------


def load_raw_safeckpt(env: Env) -> Prepared:
    safeckpt = imported_safeckpt()

    state = load_target(env)
    return Prepared(
        lambda: safeckpt.load_raw(env.file("model.safetensors"), state["model"]),
        check=loaded_check(env, state, with_optimizer=False),
    )


def load_model_safetensors(env: Env) -> Prepared:
    from safetensors.torch import load_model

    state = load_target(env)
    return Prepared(
        lambda: load_model(state["model"], env.file("model.safetensors")),
        check=loaded_check(env, state, with_optimizer=False),
    )


# -- loads onto a CUDA device (group "gpu": the model's bytes, page-cache warm) ----------------------
# Each op ends with torch.cuda.synchronize() inside the timed region, so queued copies count. CUDA
# is initialized in the untimed set-up (by allocating the model, or one tensor).


def _cuda_model(env: Env) -> nn.Module:
    with torch.device("cuda"):
        return S.LM(env.shape)  # allocated, not initialized: every value comes from the load


def _meta_model(env: Env) -> nn.Module:
    with torch.device("meta"):
        return S.LM(env.shape)


def _model_pt(env: Env) -> Path:
    """The model's state dict as ``torch.save`` writes it (tie included), made once from full.pt."""
    path, full = env.file("model.pt"), env.file("full.pt")
    if not path.exists() or path.stat().st_mtime < full.stat().st_mtime:
        torch.save(torch.load(full, mmap=True, weights_only=True)["model"], path)
    return path


def model_check(env: Env, box: list[Any]) -> Callable[[], str | None]:
    """The loaded model (``box[0]``: a module or a state dict) against the saved fingerprint, on CUDA."""

    def check() -> str | None:
        obj = box[0] if box else None
        if obj is None:
            return "nothing was loaded"
        sd = obj.state_dict() if isinstance(obj, nn.Module) else obj
        last = env.shape.blocks - 1
        names = ["embed.weight", f"blocks.{last}.q.weight", f"blocks.{last}.fc2.weight", "positions"]
        if any(sd[n].device.type != "cuda" for n in names):
            return f"not on CUDA: {[str(sd[n].device) for n in names]}"
        got = [float(sd[n].double().sum()) for n in names]
        want = env.manifest["fingerprint"][:4]
        return None if all(close(a, b) for a, b in zip(got, want, strict=True)) else f"loaded {got} != saved {want}"

    return check


def _gpu(env: Env, model: nn.Module | None, fn: Callable[[], Any]) -> Prepared:
    if model is None:
        torch.empty(1, device="cuda")  # CUDA context created outside the timed region
    box: list[Any] = []

    def run() -> None:
        out = fn()
        torch.cuda.synchronize()
        box.append(model if model is not None else out)

    return Prepared(run, check=model_check(env, box))


def gpu_load_raw_safeckpt(env: Env) -> Prepared:
    safeckpt = imported_safeckpt()

    model = _cuda_model(env)
    return _gpu(env, model, lambda: safeckpt.load_raw(env.file("model.safetensors"), model))


def gpu_assign_safeckpt(env: Env) -> Prepared:
    safeckpt = imported_safeckpt()

    model = _meta_model(env)
    torch.empty(1, device="cuda")
    return _gpu(env, model, lambda: safeckpt.load_raw(env.file("model.safetensors"), model, assign=True, device="cuda"))


def gpu_load_safeckpt(env: Env) -> Prepared:
    safeckpt = imported_safeckpt()

    return _gpu(env, None, lambda: safeckpt.load(env.file("model.safetensors"), device="cuda"))


def gpu_load_file_safetensors(env: Env) -> Prepared:
    from safetensors.torch import load_file

    return _gpu(env, None, lambda: load_file(env.file("model.safetensors"), device="cuda"))


def gpu_load_model_safetensors(env: Env) -> Prepared:
    from safetensors.torch import load_model

    model = _cuda_model(env)
    return _gpu(env, model, lambda: load_model(model, env.file("model.safetensors"), device="cuda"))


def gpu_torch_load(env: Env) -> Prepared:
    path, model = _model_pt(env), _cuda_model(env)
    return _gpu(env, model, lambda: model.load_state_dict(torch.load(path, map_location="cuda", weights_only=True)))


# -- convert .pt -> native -----------------------------------------------------------------------


def cp_fsync(env: Env) -> Prepared:
    out, peak = fresh_output(env, "cp.pt"), []

    def run() -> None:
        command(["cp", str(env.file("full.pt")), str(out)], peak)
        fsync_path(out)

    return Prepared(run, peak=peak, cleanup=remover(out))


def convert_safeckpt(env: Env) -> Prepared:
    safeckpt = imported_safeckpt()

    out = fresh_output(env, "convert.safeckpt")
    return Prepared(
        # the conversion alone, as measured before convert() read the result back by default
        lambda: safeckpt.convert(env.file("full.pt"), out, verify=False),
        check=written_check(out, env.manifest["state_bytes"]),
        cleanup=remover(out),
    )


def convert_to_safetensors(source: str) -> Callable[[Env], Prepared]:
    """``safeckpt.convert`` of ``source`` to a ``.safetensors`` path (issue 19: tensors copied file to
    file; the state's non-tensor values make it a native file under that name)."""

    def setup(env: Env) -> Prepared:
        safeckpt = imported_safeckpt()

        out = fresh_output(env, "convert.safetensors")
        return Prepared(
            lambda: safeckpt.convert(env.file(source), out, verify=False),
            check=written_check(out, env.manifest["state_bytes"]),
            cleanup=remover(out),
        )

    return setup


def convert_user(env: Env) -> Prepared:
    from safetensors.torch import save_file

    out = fresh_output(env, "convert.safetensors")

    def run() -> None:
        tensors, meta = S.flatten(torch.load(env.file("full.pt"), mmap=True, weights_only=True))
        save_file(tensors, out, metadata=meta)
        fsync_path(out)

    return Prepared(run, check=written_check(out, env.manifest["state_bytes"]), cleanup=remover(out))


# -- one tensor out of the big file --------------------------------------------------------------


def tensor_check(env: Env, box: list[torch.Tensor]) -> Callable[[], str | None]:
    def check() -> str | None:
        got, want = float(box[0].double().sum()), env.manifest["one_tensor_sum"]
        return None if close(got, want) else f"read {env.manifest['one_tensor']} summing to {got}, expected {want}"

    return check


def one_tensor_safeckpt(filename: str) -> Callable[[Env], Prepared]:
    def setup(env: Env) -> Prepared:
        safeckpt = imported_safeckpt()

        name, box = env.manifest["one_tensor"], []
        return Prepared(
            lambda: box.append(safeckpt.open(env.file(filename)).tensors()[name].load().clone()),
            check=tensor_check(env, box),
        )

    return setup


def one_tensor_torch(env: Env) -> Prepared:
    name, box = env.manifest["one_tensor"], []
    key = name.removeprefix("model/")
    return Prepared(
        lambda: box.append(torch.load(env.file("full.pt"), mmap=True, weights_only=True)["model"][key].clone()),
        check=tensor_check(env, box),
    )


def one_tensor_safe_open(env: Env) -> Prepared:
    from safetensors import safe_open

    name, box = env.manifest["one_tensor"], []

    def run() -> None:
        with safe_open(env.file("full.safetensors"), "pt") as f:
            box.append(f.get_tensor(name).clone())

    return Prepared(run, check=tensor_check(env, box))


# -- remote: the same state on a local S3-compatible server (s3_server.py) ---------------------


def _s3() -> Any:
    """s3fs's client, connected (untimed): a timed call pays for its requests, not a session."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)  # AWS_ENDPOINT_URL and keys: set by bench.py
    fs.ls("bench")
    return fs


def _warm_fabric() -> None:
    """Lightning's client (fsspec's cached one for the URL), connected (untimed)."""
    import fsspec

    fsspec.core.url_to_fs("s3://bench")[0].ls("bench")


def _warm_safeckpt() -> None:
    """The client safeckpt will use, connected (untimed), as `_s3` does for s3fs's own calls."""
    from safeckpt import _remote

    _remote.filesystem("s3://bench")[0].ls("bench")


def _uploaded(env: Env, name: str) -> str:
    """``name``'s file in the bucket (uploaded once, untimed); its URL."""
    fs, key = _s3(), f"bench/{env.size}/{name}"
    if not fs.exists(key) or fs.size(key) != env.file(name).stat().st_size:
        fs.put_file(str(env.file(name)), key)
    return f"s3://{key}"


def s3_put(env: Env) -> Prepared:
    """The floor for a save: s3fs's own upload of a file of the native checkpoint's size."""
    fs, src = _s3(), env.file("full.safeckpt")
    return Prepared(lambda: fs.put_file(str(src), f"bench/{env.size}/put.bin"))


def s3_get(env: Env) -> Prepared:
    """The floor for a load: the whole native checkpoint's bytes into memory."""
    url = _uploaded(env, "full.safeckpt")
    fs = _s3()
    return Prepared(lambda: fs.cat_file(url.removeprefix("s3://")))


def save_safeckpt_s3(env: Env) -> Prepared:
    import safeckpt

    _warm_safeckpt()
    state = S.build_state(env.shape)
    return Prepared(lambda: safeckpt.save(f"s3://bench/{env.size}/save.safeckpt", state))


def save_fabric_s3(env: Env) -> Prepared:
    f = fabric()
    _warm_fabric()
    state = S.build_state(env.shape)
    return Prepared(lambda: f.save(f"s3://bench/{env.size}/save.fabric.ckpt", state))


def load_safeckpt_s3(env: Env) -> Prepared:
    import safeckpt

    _warm_safeckpt()
    url, state = _uploaded(env, "full.safeckpt"), load_target(env)
    return Prepared(lambda: safeckpt.load(url, state), check=loaded_check(env, state))


def load_fabric_s3(env: Env) -> Prepared:
    f = fabric()
    _warm_fabric()
    url, state = _uploaded(env, "full.pt"), load_target(env)
    return Prepared(lambda: f.load(url, state), check=loaded_check(env, state))


def one_tensor_s3(env: Env) -> Prepared:
    import safeckpt

    _warm_safeckpt()
    url, name, box = _uploaded(env, "full.safeckpt"), env.manifest["one_tensor"], []
    return Prepared(
        lambda: box.append(safeckpt.open(url).tensors()[name].load().clone()), check=tensor_check(env, box)
    )


# -- open / inspect ------------------------------------------------------------------------------


def open_safeckpt(filename: str) -> Callable[[Env], Prepared]:
    def setup(env: Env) -> Prepared:
        safeckpt = imported_safeckpt()

        box: list[int] = []
        want = env.manifest["state_bytes"]
        return Prepared(
            lambda: box.append(safeckpt.open(env.file(filename)).nbytes),
            check=lambda: None if box == [want] else f"open counted {box} tensor bytes, expected {want}",
        )

    return setup


def open_names(filename: str) -> Callable[[Env], Prepared]:
    """``open`` + the tensors' names: what ``safe_open`` + ``keys()`` gives (the sizes, which
    ``keys()`` does not, are summed in the untimed check)."""

    def setup(env: Env) -> Prepared:
        safeckpt = imported_safeckpt()

        box: list[Any] = []
        want = env.manifest["state_bytes"]

        def check() -> str | None:
            names, ckpt = box[0]
            ok = ckpt.nbytes == want and names == list(ckpt.tensors())
            return None if ok else f"open listed {len(names)} tensors of {ckpt.nbytes} bytes, expected {want}"

        def run() -> None:
            ckpt = safeckpt.open(env.file(filename))
            box.append((list(ckpt.tensors()), ckpt))

        return Prepared(run, check=check)

    return setup


def open_torch(env: Env) -> Prepared:
    return Prepared(lambda: torch.load(env.file("full.pt"), mmap=True, weights_only=True))


def open_safe_open(env: Env) -> Prepared:
    from safetensors import safe_open

    def run() -> None:
        with safe_open(env.file("full.safetensors"), "pt") as f:
            f.metadata()
            list(f.keys())

    return Prepared(run)


def inspect_cli(filename: str) -> Callable[[Env], Prepared]:
    def setup(env: Env) -> Prepared:
        cmd, peak = [sys.executable, "-m", "safeckpt", "inspect", str(env.file(filename))], []
        return Prepared(lambda: command(cmd, peak, stdout=subprocess.DEVNULL), peak=peak)

    return setup


def command_op(*argv: str) -> Callable[[Env], Prepared]:
    """A command as a fresh process (interpreter start included), its output discarded."""

    def setup(env: Env) -> Prepared:
        cmd, peak = [*argv], []
        return Prepared(lambda: command(cmd, peak, stdout=subprocess.DEVNULL), peak=peak)

    return setup


# the `hf` command of the installed huggingface_hub, beside this interpreter
HF = str(Path(sys.executable).with_name("hf"))


def cli_startup(env: Env) -> Prepared:
    cmd, peak = [sys.executable, "-c", "import safeckpt.cli"], []
    return Prepared(lambda: command(cmd, peak), peak=peak)


ST, LN, S3 = ("safetensors",), ("lightning",), ("s3fs", "moto")
GPU: dict[str, Any] = {"nbytes": "model_bytes", "sample_anon": True}
OPS: dict[str, Op] = {
    op.name: op
    for op in [
        Op("dd conv=fdatasync", "save", "limit", dd_sync, nbytes="dd_bytes"),
        Op("write+fsync of the state's bytes", "save", "limit", write_state),
        Op("safeckpt.save", "save", "safeckpt", save_safeckpt),
        Op("torch.save+fsync", "save", "torch", save_torch),
        Op("st.save_file+fsync", "save", "safetensors", save_safetensors, requires=ST),
        Op("fabric.save+fsync", "save", "fabric", save_fabric, requires=LN),
        Op("safeckpt.load", "load", "safeckpt", load_safeckpt, sample_anon=True),
        Op("torch.load(mmap)+load_state_dict", "load", "torch", load_torch_mmap, sample_anon=True),
        Op("torch.load+load_state_dict", "load", "torch", load_torch, sample_anon=True),
        Op("fabric.load", "load", "fabric", load_fabric, requires=LN, sample_anon=True),
        Op("safeckpt.load_raw", "load_raw", "safeckpt", load_raw_safeckpt, nbytes="model_bytes", sample_anon=True),
        Op(
            "st.load_model",
            "load_raw",
            "safetensors",
            load_model_safetensors,
            nbytes="model_bytes",
            requires=ST,
            sample_anon=True,
        ),
        Op("cp+fsync", "convert", "limit", cp_fsync, nbytes="pt_bytes"),
        Op("safeckpt.convert", "convert", "safeckpt", convert_safeckpt, nbytes="pt_bytes", sample_anon=True),
        *(
            Op(f"safeckpt.convert [{ext} -> .safetensors]", "convert", "safeckpt", convert_to_safetensors(f"full{ext}"))
            for ext in (".pt", ".safetensors", ".safeckpt")
        ),
        Op(
            "torch.load(mmap)+st.save_file+fsync",
            "convert",
            "torch",
            convert_user,
            nbytes="pt_bytes",
            requires=ST,
            sample_anon=True,
        ),
        Op("safeckpt.open+1 tensor [.pt]", "one_tensor", "safeckpt", one_tensor_safeckpt("full.pt"), nbytes=""),
        Op(
            "safeckpt.open+1 tensor [.safeckpt]",
            "one_tensor",
            "safeckpt",
            one_tensor_safeckpt("full.safeckpt"),
            nbytes="",
        ),
        Op(
            "safeckpt.open+1 tensor [.safetensors]",
            "one_tensor",
            "safeckpt",
            one_tensor_safeckpt("full.safetensors"),
            nbytes="",
        ),
        Op("torch.load(mmap)+1 tensor [.pt]", "one_tensor", "torch", one_tensor_torch, nbytes=""),
        Op(
            "safe_open+1 tensor [.safetensors]",
            "one_tensor",
            "safetensors",
            one_tensor_safe_open,
            nbytes="",
            requires=ST,
        ),
        Op("safeckpt.open [.pt]", "open", "safeckpt", open_safeckpt("full.pt"), nbytes=""),
        Op("safeckpt.open [.safeckpt]", "open", "safeckpt", open_safeckpt("full.safeckpt"), nbytes=""),
        Op("safeckpt.open [.safetensors]", "open", "safeckpt", open_safeckpt("full.safetensors"), nbytes=""),
        Op("safeckpt.open+names [.safeckpt]", "open", "safeckpt", open_names("full.safeckpt"), nbytes=""),
        Op("safeckpt.open+names [.safetensors]", "open", "safeckpt", open_names("full.safetensors"), nbytes=""),
        Op("torch.load(mmap) lazy [.pt]", "open", "torch", open_torch, nbytes=""),
        Op("safe_open keys [.safetensors]", "open", "safetensors", open_safe_open, nbytes="", requires=ST),
        Op("safeckpt inspect CLI [.pt]", "open", "safeckpt", inspect_cli("full.pt"), nbytes=""),
        Op("safeckpt inspect CLI [.safeckpt]", "open", "safeckpt", inspect_cli("full.safeckpt"), nbytes=""),
        Op("safeckpt inspect CLI [.safetensors]", "open", "safeckpt", inspect_cli("full.safetensors"), nbytes=""),
        Op("python -c 'import safeckpt.cli'", "open", "limit", cli_startup, nbytes=""),
        Op("python -c 'import torch'", "open", "limit", command_op(sys.executable, "-c", "import torch"), nbytes=""),
        Op("safeckpt --help", "open", "safeckpt", command_op(sys.executable, "-m", "safeckpt", "--help"), nbytes=""),
        Op(
            "safeckpt --version",
            "open",
            "safeckpt",
            command_op(sys.executable, "-m", "safeckpt", "--version"),
            nbytes="",
        ),
        Op(
            "hf version", "open", "huggingface_hub", command_op(HF, "version"), nbytes="", requires=("huggingface_hub",)
        ),
        Op("s3fs put_file [s3]", "remote", "limit", s3_put, requires=S3),
        Op("safeckpt.save [s3]", "remote", "safeckpt", save_safeckpt_s3, requires=S3),
        Op("fabric.save [s3]", "remote", "fabric", save_fabric_s3, requires=S3 + LN),
        Op("s3fs cat_file (whole object) [s3]", "remote", "limit", s3_get, requires=S3),
        Op("safeckpt.load [s3]", "remote", "safeckpt", load_safeckpt_s3, requires=S3, sample_anon=True),
        Op("fabric.load [s3]", "remote", "fabric", load_fabric_s3, requires=S3 + LN, sample_anon=True),
        Op("safeckpt.open+1 tensor [s3]", "remote", "safeckpt", one_tensor_s3, requires=S3, nbytes="one_tensor_bytes"),
        Op("safeckpt.save [no CRC]", "integrity", "limit", save_crc("none")),
        Op("safeckpt.save [CRC zlib]", "integrity", "safeckpt", save_crc("zlib")),
        Op("safeckpt.save [CRC isal]", "integrity", "safeckpt", save_crc("isal"), requires=("isal",)),
        Op("safeckpt.load [integrity]", "integrity", "safeckpt", load_safeckpt),
        Op("safeckpt.load verify=True", "integrity", "safeckpt", load_verify_safeckpt),
        Op("safeckpt.load_raw [CUDA model]", "gpu", "safeckpt", gpu_load_raw_safeckpt, **GPU),
        Op("safeckpt.load_raw assign=True [meta -> CUDA]", "gpu", "safeckpt", gpu_assign_safeckpt, **GPU),
        Op("safeckpt.load(device=cuda)", "gpu", "safeckpt", gpu_load_safeckpt, **GPU),
        Op("st.load_file(device=cuda)", "gpu", "safetensors", gpu_load_file_safetensors, requires=ST, **GPU),
        Op("st.load_model [CUDA model]", "gpu", "safetensors", gpu_load_model_safetensors, requires=ST, **GPU),
        Op("torch.load(map_location=cuda)+load_state_dict", "gpu", "torch", gpu_torch_load, **GPU),
    ]
}
GROUPS = ("save", "load", "load_raw", "convert", "one_tensor", "open", "integrity", "gpu", "remote")


# -- preparing the files every load reads --------------------------------------------------------


def prepare(env: Env, fresh_native: bool = True) -> dict[str, Any]:
    """Write (or reuse) the state's files: ``full.pt`` (torch.save), ``full.safetensors`` (the
    flattened state), ``model.safetensors`` (save_model), and ``full.safeckpt`` (rewritten by the
    safeckpt under test unless ``fresh_native`` is false); record sizes and fingerprints."""
    import safetensors
    from safetensors.torch import save_file, save_model

    import safeckpt

    key = {
        "state_version": STATE_VERSION,
        "shape": vars(env.shape),
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
    }
    path = env.dir / "manifest.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    reuse = old.get("key") == key and all(
        env.file(n).exists() for n in ("full.pt", "full.safetensors", "model.safetensors")
    )
    native = env.file("full.safeckpt")
    if reuse and not fresh_native and native.exists():
        return old
    env.dir.mkdir(parents=True, exist_ok=True)
    state = S.build_state(env.shape)
    tree = S.plain(state)
    # the native file must hold the same state as the cached peer files
    fresh = S.fingerprint(state["model"], state["optimizer"])
    reuse = reuse and all(close(a, b) for a, b in zip(old.get("fingerprint", []), fresh, strict=True))
    if not reuse:
        for n in ("full.pt", "full.safetensors", "model.safetensors"):
            env.file(n).unlink(missing_ok=True)
        torch.save(tree, env.file("full.pt"))
        tensors, meta = S.flatten(tree)
        save_file(tensors, env.file("full.safetensors"), metadata=meta)
        save_model(state["model"], str(env.file("model.safetensors")))
    native.unlink(missing_ok=True)
    safeckpt.save(native, state)
    one = f"model/blocks.{env.shape.blocks - 1}.ln1.weight"
    manifest = {
        "key": key,
        "state_bytes": S.tensor_bytes(tree),
        "model_bytes": S.tensor_bytes(tree["model"]),
        "dd_bytes": S.tensor_bytes(tree),
        "pt_bytes": env.file("full.pt").stat().st_size,
        "files": {
            n: env.file(n).stat().st_size for n in ("full.pt", "full.safetensors", "full.safeckpt", "model.safetensors")
        },
        "tensors": len(S.flatten(tree)[0]),
        "fingerprint": S.fingerprint(state["model"], state["optimizer"]),
        "one_tensor": one,
        "one_tensor_bytes": tree["model"][one.removeprefix("model/")].nbytes,
        "one_tensor_sum": float(tree["model"][one.removeprefix("model/")].double().sum()),
    }
    path.write_text(json.dumps(manifest, indent=1))
    os.sync()
    return manifest


# -- measuring -----------------------------------------------------------------------------------


def status() -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) * 1024
    return out


class AnonPeak(threading.Thread):
    """Samples RssAnon every few milliseconds: the kernel keeps no peak of anonymous memory alone,
    and an mmap reader's file-backed pages count in VmHWM without costing memory."""

    def __init__(self, interval: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.interval, self.peak, self.done = interval, 0, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, status()["RssAnon"])
            self.done.wait(self.interval)

    def stop(self) -> int:
        self.done.set()
        self.join()
        return max(self.peak, status()["RssAnon"])


def measure(op: Op, env: Env) -> dict[str, Any]:
    """Set ``op`` up, time it alone, and report wall/CPU time and memory of the op."""
    prepared = op.setup(env)
    gc.collect()
    before = status()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS: the peak that follows is the op's
    sampler = AnonPeak() if op.sample_anon else None
    if sampler:
        sampler.start()
    self0, kids0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    prepared.run()
    elapsed = time.perf_counter() - t0
    self1, kids1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    anon_peak = sampler.stop() if sampler else None
    after = status()
    cpu = sum(
        getattr(b, a) - getattr(a0, a) for a in ("ru_utime", "ru_stime") for a0, b in ((self0, self1), (kids0, kids1))
    )
    result = {
        "time_s": elapsed,
        "cpu_s": cpu,
        "rss_start": before["VmRSS"],
        "peak_rss": after["VmHWM"],
        "extra_rss": after["VmHWM"] - before["VmRSS"],
        "anon_start": before["RssAnon"],
        "anon_peak": anon_peak,
        "file_rss_end": after["RssFile"],
    }
    if prepared.peak is not None:  # a command: its own peak
        result["peak_rss"] = result["extra_rss"] = max(prepared.peak, default=0)
    result["problem"] = prepared.check()
    prepared.cleanup()
    return result


def run_one(name: str, size: int, workdir: Path, threads: int | None = None) -> dict[str, Any]:
    """One request, answered with a result dict (an error is a result too, never a crash)."""
    env = Env(size, workdir)
    if threads:
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # for the commands it starts
    try:
        if name == "prepare":
            return {"op": name, "manifest": prepare(env)}
        if name == "prepare-reuse":
            return {"op": "prepare", "manifest": prepare(env, fresh_native=False)}
        op = OPS[name]
        why = available(op)
        if why:
            return {"op": name, "skipped": why}
        return {"op": name, **measure(op, env)}
    except BaseException as e:
        return {"op": name, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}


def _child(request: dict[str, Any], out_fd: int) -> None:
    os.dup2(2, 1)  # library prints go to stderr; results go to out_fd only
    result = run_one(request["op"], int(request["size"]), Path(request["workdir"]), request.get("threads"))
    os.write(out_fd, (json.dumps(result) + "\n").encode())


def serve() -> None:
    """Fork one fresh child per request line; this process imports torch (and safetensors and
    safeckpt) once, runs no tensor op, starts no thread, and so hands each child a clean process."""
    import safetensors.torch  # noqa: F401

    import safeckpt  # noqa: F401

    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    for line in sys.stdin:
        request = json.loads(line)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            code = 0
            try:
                _child(request, w)
            except BaseException:
                code = 1
            os._exit(code)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            data = f.read()
        _, status_, _ = os.wait4(pid, 0)
        result = json.loads(data) if data else {"op": request["op"], "error": f"child died (wait status {status_})"}
        out.write(json.dumps(result) + "\n")
        out.flush()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("serve")
    one = sub.add_parser("run")
    one.add_argument("op")
    one.add_argument("--size", required=True, type=S.parse_size)
    one.add_argument("--workdir", required=True, type=Path)
    one.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    if args.cmd == "serve":
        serve()
    else:
        out_fd = os.dup(1)
        _child({"op": args.op, "size": args.size, "workdir": str(args.workdir), "threads": args.threads}, out_fd)


if __name__ == "__main__":
    main()
