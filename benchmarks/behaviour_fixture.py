"""Save, or compare against, a fixture of what the reversible RNNs compute: a behaviour check for refactors.

For both cells (RevGRU, RevLSTM), ``mode="reverse"`` and ``"store"``, eager and fused, padded batches, with
and without a stem and head (the language model's embedding stem and decoder head): the outputs or loss,
the exact final states, every tensor the buffers keep from forward to backward (planes, row indices,
words), the accounting and every gradient. A refactor that changes no arithmetic must reproduce the fixture
bit for bit on the same machine (CPU kernels differ across ISAs, so keep the file local, not in git).

    python benchmarks/behaviour_fixture.py save /tmp/fixture.pt
    python benchmarks/behaviour_fixture.py compare /tmp/fixture.pt
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
from torch import Tensor, nn

import lightning_revrnn as lr
from lightning_revrnn.core.rnn import Mode

T, B, E, H, V = 32, 5, 12, 16, 40


def _lm_pieces() -> tuple[type, type]:
    return lr.EmbeddingStem, lr.DecoderHead


def _run_head_stem(rnn: nn.Module, tokens: Tensor, targets: Tensor, keep: Tensor) -> tuple[Tensor, Any, list[Tensor]]:
    EmbeddingStem, DecoderHead = _lm_pieces()
    torch.manual_seed(3)
    embedding = nn.Embedding(V, E)
    decoder = nn.Linear(E, V)
    decoder.weight = embedding.weight
    stem, head = EmbeddingStem(embedding, 0.1), DecoderHead(decoder, 0.2, block_bytes=None)
    torch.manual_seed(4)
    bound_stem = stem.bind(training=True)  # the stem's mask first, then the head's: the LM's draw order
    bound_head = head.bind(targets, training=True)
    loss, h_n = rnn(tokens, None, head=bound_head, stem=bound_stem, keep=keep)
    return loss, h_n, [embedding.weight, decoder.bias]


def case(cell: str, mode: Mode, fused: bool, with_head: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    cls = {"gru": lr.RevGRU, "lstm": lr.RevLSTM}[cell]
    rnn = cls(E, [H, E], num_layers=2, mode=mode, dropout=0.2, dropconnect=0.3, fused=fused)
    rnn.train()
    lengths = torch.tensor([T, T - 3, 7, T, 1])
    keep = torch.arange(T)[:, None] < lengths[None, :]
    saved: list[Tensor] = []

    def pack(t: Tensor) -> Tensor:
        if not t.is_floating_point() and t.dtype != torch.bool:
            saved.append(t.detach().clone())
        return t

    torch.manual_seed(1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if with_head:
            tokens = torch.randint(0, V, (T, B))
            targets = torch.randint(0, V, (T, B))
            value, h_n, extra = _run_head_stem(rnn, tokens, targets, keep)
            x = None
        else:
            x = torch.randn(T, B, E, requires_grad=True)
            out, h_n = rnn(x, None, keep=keep)
            value = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()
            extra = []
    exact = rnn.exact_state(h_n)
    stats = rnn.memory_stats().as_dict()
    value.backward()
    grads = {n: _grad(p) for n, p in rnn.named_parameters()}
    grads.update({f"extra{i}": _grad(t) for i, t in enumerate(extra)})
    if x is not None:
        grads["x"] = _grad(x)
    flat = list(exact) if isinstance(exact, tuple) else [exact]
    return {
        "value": value.detach(),
        "exact": flat,
        "saved_ints": saved if mode == "reverse" else [],
        "stats": _plain(stats),
        "grads": grads,
    }


def _grad(t: Tensor) -> Tensor:
    """A copy of ``t.grad`` (the backward above reached every tensor passed here)."""
    assert t.grad is not None
    return t.grad.clone()


def _plain(stats: Any) -> Any:
    if isinstance(stats, dict):
        return {k: _plain(v) for k, v in stats.items()}
    if isinstance(stats, list):
        return [_plain(v) for v in stats]
    return float(stats)


def all_cases(with_fused: bool) -> dict[str, Any]:
    out = {}
    for cell in ("gru", "lstm"):
        modes: tuple[Mode, ...] = ("reverse", "store")
        for mode in modes:
            for fused in (False, True) if with_fused else (False,):
                if fused and mode == "store":
                    continue  # store training differentiates the eager cells either way
                for with_head in (False, True):
                    name = f"{cell}-{mode}-{'fused' if fused else 'eager'}-{'head' if with_head else 'plain'}"
                    out[name] = case(cell, mode, fused, with_head)
                    print(name, "done", flush=True)
    return out


def _compare(a: Any, b: Any, path: str, problems: list[str]) -> None:
    if isinstance(a, dict):
        if set(a) != set(b):
            problems.append(f"{path}: keys {sorted(a)} vs {sorted(b)}")
        for k in a:
            if k in b:
                _compare(a[k], b[k], f"{path}.{k}", problems)
    elif isinstance(a, list):
        if len(a) != len(b):
            problems.append(f"{path}: {len(a)} vs {len(b)} items")
        for i, (x, y) in enumerate(zip(a, b)):
            _compare(x, y, f"{path}[{i}]", problems)
    elif isinstance(a, Tensor):
        if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b):
            problems.append(f"{path}: tensors differ")
    elif a != b and not (a != a and b != b):
        problems.append(f"{path}: {a} vs {b}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["save", "compare"])
    parser.add_argument("path")
    parser.add_argument("--no-fused", action="store_true", help="skip the fused cases (no compiling)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = all_cases(not args.no_fused)
    if args.action == "save":
        torch.save(result, args.path)
        print(f"saved {len(result)} cases to {args.path}")
        return
    expected = torch.load(args.path)
    if args.no_fused:
        expected = {k: v for k, v in expected.items() if "fused" not in k}
    problems: list[str] = []
    _compare(expected, result, "fixture", problems)
    print("\n".join(problems) if problems else f"all {len(result)} cases bit for bit identical")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
