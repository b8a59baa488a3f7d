"""Where a load onto a CUDA device spends its time: the pieces of safeckpt's staging pipeline
measured alone (pinning, reading into pinned memory, host-to-device copies), and the pipeline at
several buffer sizes and thread counts, beside safetensors' ``load_file(device="cuda")``.

    python benchmarks/gpu_profile.py --size 1GB        # needs a CUDA device; PYTHONPATH=src

Prints one line per measurement (median of ``--repeat`` after a warm-up, page cache warm). Used to
choose `_device.BUFFER`/`READ_PIECE`/threads; the side-by-side numbers are `bench.py --only gpu`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import safeckpt
from safeckpt import _device
from safeckpt._units import parse_size


def timed(fn: Callable[[], object], repeat: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1GB")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", default=tempfile.gettempdir())
    args = ap.parse_args()
    size = parse_size(args.size)
    from safetensors.torch import load_file, save_file

    torch.empty(1, device="cuda")
    n = 256  # a model of 256 equal 2-D weights, like a transformer's
    rows = max(1, size // (n * 1024 * 4))
    sd = {f"layer{i}.weight": torch.randn(rows, 1024) for i in range(n)}
    path = Path(args.workdir) / "gpu_profile.safetensors"
    save_file(sd, path)
    nbytes = sum(t.numel() * 4 for t in sd.values())
    del sd
    gb = nbytes / 1e9

    def line(what: str, seconds: float, nb: int = nbytes) -> None:
        print(f"{what:62s} {seconds * 1e3:9.1f} ms  {nb / 1e9 / seconds:7.2f} GB/s", flush=True)

    print(f"file {path} {gb:.3f} GB, {os.cpu_count()} CPUs, torch {torch.__version__}", flush=True)
    for mb in (8, 32, 128):
        t = time.perf_counter()
        b = torch.empty(mb << 20, dtype=torch.uint8, pin_memory=True)
        first = time.perf_counter() - t
        del b
        print(f"pin {mb} MiB (first allocation of that size): {first * 1e3:.1f} ms", flush=True)

    big_pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    line("H2D one copy from pinned memory", timed(lambda d=dev, b=big_pinned: d.copy_(b, non_blocking=True), args.repeat))
    pageable = torch.empty(nbytes, dtype=torch.uint8)
    pageable.fill_(1)
    line("H2D one copy from pageable memory", timed(lambda d=dev, p=pageable: d.copy_(p), args.repeat))
    del pageable

    fd = os.open(path, os.O_RDONLY)
    view = memoryview(big_pinned.numpy())

    def read_all(threads: int, piece: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        def one(off: int) -> None:
            os.preadv(fd, [view[off : off + piece]], off)

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, range(0, nbytes - piece, piece)))

    for threads in (1, 4, 8, 16):
        line(f"preadv page cache -> pinned, {threads} threads, 4 MiB", timed(lambda n=threads: read_all(n, 4 << 20), args.repeat))
    os.close(fd)
    del big_pinned, dev

    refs = list(safeckpt.open(path).tensors().values())
    outs = [torch.empty(r.shape, dtype=r.dtype, device="cuda") for r in refs]
    line("safetensors load_file(device=cuda)", timed(lambda: load_file(path, device="cuda"), args.repeat))
    line("safeckpt.open (header only)", timed(lambda: safeckpt.open(path), args.repeat))
    line("safeckpt.load(device=cuda)", timed(lambda: safeckpt.load(path, device="cuda"), args.repeat))
    for buf in (8, 32, 128):
        for threads in (4, 8, 16):
            for piece in (1, 4):
                _device.READ_PIECE = piece << 20
                line(
                    f"stage: buffer {buf} MiB, {threads} threads, pieces {piece} MiB",
                    timed(
                        lambda b=buf, n=threads: _device.stage(list(zip(refs, outs, strict=True)), buffer=b << 20, threads=n),
                        args.repeat,
                    ),
                )
    fresh(path, nbytes)
    path.unlink()


FRESH = r"""
import cProfile, pstats, sys, time, torch
path, which = sys.argv[1], sys.argv[2]
torch.empty(1, device="cuda"); torch.cuda.synchronize()
if which == "breakdown":
    import safeckpt
    from safeckpt import _device
    marks = [("start", time.perf_counter())]
    def mark(what):
        torch.cuda.synchronize(); marks.append((what, time.perf_counter()))
    refs = list(safeckpt.open(path).tensors().values()); mark("open")
    outs = [torch.empty(r.shape, dtype=r.dtype, device="cuda") for r in refs]; mark("cuda allocations")
    pinned = torch.empty(32 << 20, dtype=torch.uint8, pin_memory=True); mark("pin one 32 MiB buffer")
    _device.stage(list(zip(refs, outs))); mark("stage (first)")
    _device.stage(list(zip(refs, outs))); mark("stage (second)")
    print("breakdown (fresh process):", ", ".join(f"{w} {(t - marks[i][1]) * 1e3:.1f} ms" for i, (w, t) in enumerate(marks[1:])))
    sys.exit()
if which == "safetensors":
    from safetensors.torch import load_file as fn
    call = lambda: fn(path, device="cuda")
else:
    import safeckpt
    call = lambda: safeckpt.load(path, device="cuda")
prof = cProfile.Profile()
t = time.perf_counter(); prof.enable(); out = call(); torch.cuda.synchronize(); prof.disable()
first = time.perf_counter() - t
del out
t = time.perf_counter(); out = call(); torch.cuda.synchronize(); second = time.perf_counter() - t
print(f"{which}: first call in a fresh process {first * 1e3:.1f} ms, second {second * 1e3:.1f} ms")
if which != "safetensors":
    pstats.Stats(prof).sort_stats("tottime").print_stats(12)
"""


def fresh(path: Path, nbytes: int) -> None:
    """A process that loads once (a fresh interpreter, CUDA initialized before the clock starts)."""
    import subprocess

    for which in ("safetensors", "safeckpt", "breakdown"):
        subprocess.run([sys.executable, "-c", FRESH, str(path), which], check=False)


if __name__ == "__main__":
    main()
