"""benchmarks/opcount.py counts what it documents, and the reverse sweep's host syncs do not grow with T."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from lightning_revrnn import RevGRU, RevLSTM
from lightning_revrnn.fused import StageCounter


def _load_opcount() -> ModuleType:
    """benchmarks/ is not a package: load the module from its file (as the benchmark scripts import it)."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "opcount.py"
    spec = importlib.util.spec_from_file_location("opcount", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("opcount", module)
    spec.loader.exec_module(module)
    return module


opcount = _load_opcount()


def test_counts_ops_not_views_or_allocations() -> None:
    x = torch.randn(4, 6)
    with opcount.OpCounter() as counter, counter.phase("p") as counts:
        y = (x + 1) * 2
        y = y[1:].reshape(-1).view(2, 9).t().detach()  # views and aliases: no op
        y.exp()
        x.new_empty(5)  # an allocation: counted apart
    assert counts.total_ops == 3
    assert dict(counts.ops) == {"aten.add.Tensor": 1, "aten.mul.Tensor": 1, "aten.exp.default": 1}
    assert counts.allocations == 1
    assert counts.total_syncs == 0


def test_counts_host_reads_as_syncs_and_restores_tensor_methods() -> None:
    x = torch.randn(4, 3)
    before = {name: torch.Tensor.__dict__.get(name) for name in opcount.HOST_READ_METHODS}
    with opcount.OpCounter() as counter:
        with counter.phase("item") as item:
            x.sum().item()
        with counter.phase("reads") as reads:
            bool(x[0, 0] > 0)
            x.tolist()
            x.cpu()
            x.to("cpu")
            x.numpy()
            x[x > 0]
        with counter.phase("no reads") as none:
            x.to(torch.float64)
            torch.where(x > 0, x, 0.0)
    assert dict(item.syncs) == {"_local_scalar_dense": 1}
    assert item.total_ops == 2  # sum and the scalar read
    assert dict(reads.syncs) == {
        "_local_scalar_dense": 1,
        "Tensor.tolist": 1,
        "Tensor.cpu": 1,
        "Tensor.to": 1,
        "Tensor.numpy": 1,
        "index(bool mask)": 1,
    }
    assert sum(reads.sync_sites.values()) == 6 and all("test_opcount.py" in s for s in reads.sync_sites)
    assert none.total_syncs == 0
    assert {name: torch.Tensor.__dict__.get(name) for name in opcount.HOST_READ_METHODS} == before


def test_backward_is_counted_in_its_phase() -> None:
    w = torch.randn(5, requires_grad=True)
    x = torch.randn(5)
    counts = opcount.count_step(lambda: (w * x).exp(), steps=1, layers=1, to_loss=lambda y: y.sum())
    assert dict(counts.forward.ops) == {"aten.mul.Tensor": 1, "aten.exp.default": 1}
    assert counts.reverse.total_ops > 0 and "aten.mul.Tensor" in counts.reverse.ops
    assert w.grad is not None


def test_stage_counter_kernels_are_counted_in_their_phase() -> None:
    """With a fused backend's StageCounter, each phase adds the compiled kernels counted while it ran, and the
    step runs inside the counter's recording (inductor's graph cache off, so every stage compiles and counts)."""
    stages = StageCounter()
    w = torch.randn(5, requires_grad=True)
    w.register_hook(lambda grad: stages.kernels.update(backward_stage=2))  # runs inside backward()

    def forward() -> torch.Tensor:
        assert not torch._inductor.config.fx_graph_cache
        stages.kernels["gates"] += 3
        return (w * 2).exp()

    counts = opcount.count_step(forward, steps=1, layers=1, to_loss=lambda y: y.sum(), stage_counter=stages)
    assert counts.forward.kernels == 3 and counts.reverse.kernels == 2
    assert counts.forward.ops_and_kernels == counts.forward.total_ops + 3
    assert opcount.count_step(lambda: (w * 2).sum(), steps=1, layers=1).forward.kernels == 0  # no counter: none


@pytest.mark.parametrize("cls", [RevGRU, RevLSTM])
def test_reverse_sweep_syncs_per_window_do_not_grow_with_t(cls: type[RevGRU]) -> None:
    """A tiny training step with drains: at most 2 syncs in forward and 2 in backward, the same at T 16
    and T 64 (none per step); the op counts grow with T (the counter sees the time loop)."""
    counts = {}
    for T in (16, 64):
        torch.manual_seed(0)
        rnn = cls(4, 6, num_layers=1, max_forget_bits=3)
        x = torch.randn(T, 3, 4, requires_grad=True)
        counts[T] = opcount.count_step(lambda rnn=rnn, x=x: rnn(x)[0], steps=T, layers=1, to_loss=lambda out: out.sum())
        if T == 64:
            assert rnn.memory_stats().drains > 0  # the drain path ran
    short, long = counts[16], counts[64]
    assert long.forward.total_syncs == short.forward.total_syncs <= 2
    assert long.reverse.total_syncs == short.reverse.total_syncs <= 2
    assert long.forward.total_ops > 3 * short.forward.total_ops
    assert long.reverse.total_ops > 3 * short.reverse.total_ops
    fwd, rev = opcount.marginal_per_step_layer(short, long)
    assert fwd > 0 and rev > 0
