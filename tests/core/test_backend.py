"""The backend seam: chosen once per window, the reference wherever autograd records, injectable, and the
core imports no fast backend."""

from __future__ import annotations

import subprocess
import sys

import torch
from torch import Tensor

from lightning_revrnn import RevGRU, RevLSTM
from lightning_revrnn.core.backend import EAGER, Backend, EagerBackend, backend_for
from lightning_revrnn.core.buffer import InformationBuffer
from lightning_revrnn.core.cell_base import Halves, ReversibleCell
from lightning_revrnn.core.records import Record

CPU = torch.device("cpu")


class SpyBackend(EagerBackend):
    """The reference arithmetic, counting what the loops ask of it."""

    name = "spy"

    def __init__(self) -> None:
        self.calls = {"half_forward": 0, "half_reverse": 0, "step_backward": 0}

    def half_forward(
        self,
        cell: ReversibleCell,
        w: Tensor,
        xp: Tensor,
        other: Tensor,
        own: list[Tensor],
        own_f: list[Tensor],
        buf: InformationBuffer,
        keep: Tensor | None,
        stored: int,
    ) -> Halves:
        self.calls["half_forward"] += 1
        return super().half_forward(cell, w, xp, other, own, own_f, buf, keep, stored)

    def half_reverse(
        self,
        cell: ReversibleCell,
        w: Tensor,
        xp: Tensor,
        other: Tensor,
        own: list[Tensor],
        own_f: list[Tensor],
        buf: InformationBuffer,
        keep: Tensor | None,
        stored_old: Tensor | None,
    ) -> tuple[list[Tensor], Record]:
        self.calls["half_reverse"] += 1
        return super().half_reverse(cell, w, xp, other, own, own_f, buf, keep, stored_old)

    def step_backward(
        self,
        cell: ReversibleCell,
        w: list[Tensor],
        records: list[Record],
        d_state: list[Tensor],
        d_output: Tensor,
        keep: Tensor | None,
    ) -> tuple[list[Tensor], Tensor]:
        self.calls["step_backward"] += 1
        return super().step_backward(cell, w, records, d_state, d_output, keep)


def test_backend_for_gives_the_reference_wherever_autograd_records() -> None:
    spy = SpyBackend()
    assert backend_for(False, differentiable=False, device=CPU) is EAGER
    assert (
        backend_for(spy, differentiable=True, device=CPU) is EAGER
    )  # mode="store" training: only the reference differentiates
    assert backend_for(spy, differentiable=False, device=CPU) is spy


def test_an_injected_backend_runs_every_half_step_of_reverse_training_with_identical_results() -> None:
    T, B = 20, 3
    results = []
    for fused in (False, SpyBackend()):
        torch.manual_seed(0)
        rnn = RevLSTM(4, 6, num_layers=2, fused=fused)
        x = torch.randn(T, B, 4, requires_grad=True)
        out, _ = rnn(x)
        out.square().sum().backward()
        results.append((out.detach(), x.grad, [p.grad for p in rnn.parameters()]))
        if isinstance(fused, SpyBackend):
            assert fused.calls == {"half_forward": 2 * T * 2, "half_reverse": 2 * T * 2, "step_backward": T * 2}
    (out_a, dx_a, g_a), (out_b, dx_b, g_b) = results
    assert torch.equal(out_a, out_b) and dx_a is not None and dx_b is not None and torch.equal(dx_a, dx_b)
    assert all(a is not None and b is not None and torch.equal(a, b) for a, b in zip(g_a, g_b))


def test_store_mode_training_never_asks_an_injected_backend() -> None:
    spy = SpyBackend()
    rnn = RevGRU(3, 4, mode="store", fused=spy)
    rnn(torch.randn(5, 2, 3, requires_grad=True))[0].sum().backward()
    assert spy.calls == {"half_forward": 0, "half_reverse": 0, "step_backward": 0}
    with torch.no_grad():
        rnn(torch.randn(5, 2, 3))  # evaluation: no autograd, the injected backend runs
    assert spy.calls["half_forward"] == 5 * 2


def test_importing_the_package_imports_no_fast_backend_and_changes_nothing_process_wide() -> None:
    code = (
        "import sys, torch; before = torch._dynamo.config.recompile_limit; import lightning_revrnn; "
        "print('lightning_revrnn.fused' in sys.modules, torch._dynamo.config.recompile_limit == before)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.split() == ["False", "True"]


def test_backend_is_abstract() -> None:
    assert Backend.__abstractmethods__ == {"half_forward", "half_reverse", "step_backward"}
