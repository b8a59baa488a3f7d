"""The synthetic training state every benchmark saves and loads (the method of `perf_anchors.md`).

A small language model whose mix of dtypes and layouts matches real checkpoints: an fp32 embedding
tied to the LM head, bf16 attention Linears, fp32 MLP Linears and LayerNorms, an int64 buffer; fused
Adam after one real step; and plain values (an int, a float, a dict, a list). Everything is
deterministic for a given size, so files written by one process match a state built by another.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """Bytes in ``"100MB"``, ``"1GB"``, ``"1.5GiB"`` (GB = 1e9, as in the anchors).

    Example:
        >>> parse_size("100MB")
        100000000
    """
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"cannot read size {text!r}; write it like 100MB, 1GB or 3GB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


@dataclass(frozen=True)
class Shape:
    """The model's dimensions for a parameter budget."""

    d: int
    blocks: int
    vocab: int
    max_len: int = 1024

    @classmethod
    def for_bytes(cls, target: int) -> Shape:
        """Dimensions whose parameters take about ``target`` bytes: ~85% in blocks, the rest in the
        tied embedding (the anchors' 1 GB model is d=1536 with 10 blocks)."""
        d = 256 if target <= 30e6 else 512 if target <= 300e6 else 1536 if target <= 2e9 else 2048
        blocks = max(1, int(0.85 * target // block_bytes(d)))
        vocab = max(256, (target - blocks * block_bytes(d)) // (4 * d))
        return cls(d, blocks, int(vocab))


def block_bytes(d: int) -> int:
    """Parameter bytes of one block: bf16 attention Linears, fp32 MLP and LayerNorms."""
    attention = 4 * (d * d + d) * 2
    mlp = (d * 4 * d + 4 * d + 4 * d * d + d) * 4
    norms = 2 * 2 * d * 4
    return attention + mlp + norms


# Layers allocated without torch's init pass: `build_model` fills every parameter once. (Building on
# the meta device instead would import torch._dynamo on first use: seconds per fresh process.)
class Linear(nn.Linear):
    def reset_parameters(self) -> None:
        pass


class Embedding(nn.Embedding):
    def reset_parameters(self) -> None:
        pass


class LayerNorm(nn.LayerNorm):
    def reset_parameters(self) -> None:
        pass


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = LayerNorm(d), LayerNorm(d)
        self.q, self.k, self.v, self.o = (Linear(d, d, dtype=torch.bfloat16) for _ in range(4))
        self.fc1, self.fc2 = Linear(d, 4 * d), Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x).to(torch.bfloat16)
        x = x + self.o(self.q(h) * torch.sigmoid(self.k(h)) + self.v(h)).float()  # attention-shaped, cheap
        return x + self.fc2(torch.relu(self.fc1(self.ln2(x))))


class LM(nn.Module):
    def __init__(self, shape: Shape) -> None:
        super().__init__()
        self.embed = Embedding(shape.vocab, shape.d)
        self.blocks = nn.ModuleList(Block(shape.d) for _ in range(shape.blocks))
        self.ln_f = LayerNorm(shape.d)
        self.head = Linear(shape.d, shape.vocab, bias=False)
        self.head.weight = self.embed.weight  # tied, as in GPT-2
        self.register_buffer("positions", torch.arange(shape.max_len, dtype=torch.int64))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def build_model(shape: Shape, seed: int = 0) -> LM:
    """The model with deterministic weights (allocated once, filled in place: no init pass)."""
    model = LM(shape)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln" in name or name.startswith("ln_"):
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return model


def build_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """Fused Adam without state (what a load restores into)."""
    return torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)


def build_state(shape: Shape, seed: int = 0) -> dict[str, Any]:
    """The full training state: model, fused Adam after one real step, and plain values.

    The step runs on one thread: Adam's first update is about ``lr * sign(grad)``, so the summation
    order of another thread count would flip near-zero gradients and give other weights."""
    model = build_model(shape, seed)
    opt = build_optimizer(model)
    tokens = torch.randint(0, shape.vocab, (2, 16), generator=torch.Generator().manual_seed(seed + 1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loss = nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
        loss.backward()
        opt.step()
    finally:
        torch.set_num_threads(threads)
    opt.zero_grad(set_to_none=True)
    return {
        "model": model,
        "optimizer": opt,
        "step": 1,
        "lr": 1e-4,
        "hparams": {"d": shape.d, "blocks": shape.blocks, "vocab": shape.vocab, "betas": [0.9, 0.999], "tag": "bench"},
        "history": [loss.item(), math.pi, 0.5],
    }


def plain(state: dict[str, Any]) -> dict[str, Any]:
    """The state with modules and optimizers replaced by their state dicts (what torch.save gets)."""
    return {k: v.state_dict() if hasattr(v, "state_dict") else v for k, v in state.items()}


def _walk(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _walk(v, f"{prefix}/{k}" if prefix else str(k))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _walk(v, f"{prefix}/{i}")
    else:
        yield prefix, tree


def flatten(tree: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``tree`` as safetensors wants it: ``{"model/embed.weight": tensor, ...}``, each shared
    storage once (save_file refuses aliases), and a JSON skeleton of the rest as metadata.
    This is what a user does to keep a training state in safetensors today."""
    import json

    tensors: dict[str, torch.Tensor] = {}
    seen: dict[tuple[int, int], str] = {}
    skeleton: dict[str, Any] = {}
    for name, leaf in _walk(tree):
        if isinstance(leaf, torch.Tensor):
            key = (leaf.untyped_storage().data_ptr(), leaf.storage_offset())
            if key in seen:
                skeleton[name] = {"alias": seen[key]}
                continue
            seen[key] = name
            tensors[name] = leaf
        else:
            skeleton[name] = leaf
    return tensors, {"skeleton": json.dumps(skeleton)}


def tensor_bytes(tree: Any) -> int:
    """Bytes of the distinct tensors in ``tree`` (tied weights once)."""
    tensors, _ = flatten(tree)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def fingerprint(model: nn.Module, opt: torch.optim.Optimizer | None = None) -> list[float]:
    """A few sums that change if a load did not happen (checked after each timed load)."""
    sd = model.state_dict()
    last = len(model.blocks) - 1  # type: ignore[arg-type]
    names = ["embed.weight", f"blocks.{last}.q.weight", f"blocks.{last}.fc2.weight", "positions"]
    sums = [float(sd[n].double().sum()) for n in names]
    if opt is not None:
        state = opt.state_dict()["state"]
        sums.append(float(sum(s["exp_avg_sq"].double().sum() for s in state.values())) if state else 0.0)
    return sums
