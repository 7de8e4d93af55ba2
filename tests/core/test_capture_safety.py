"""Capture safety on the CPU: a window's forward and its reverse sweep never read the device inside, nor
allocate by values, so a CUDA graph can capture them; each reads the host exactly once, at its end.

The guard (:mod:`capture_guard`) is on for the calls of :func:`~lightning_revrnn.core.forward.run_forward`
(the forward of ``mode="reverse"``) and of the reverse sweep (``lightning_revrnn.core.sweep._reverse``); the
permitted reads are the forward's ``_end_of_window_read`` (range guard and drain counts) and the sweep's
``_check_reconstruction`` (checksums and empty buffers). The windows cover what can hide a data-dependent
step: buffer drains (no forget limit, large weights), padding (``keep``), dropout and DropConnect, stored
units, several chunks, the language model's blockwise decoder head and embedding stem, and the translation
model's encoder and attention decoder. The eager backend runs here (the reference); the fused one computes the
same control flow (its stages take and return tensors only), and ``make gpu-check`` checks it with
``torch.cuda.set_sync_debug_mode``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Literal

import pytest
import torch
from capture_guard import CaptureViolation, NoHostRead

import lightning_revrnn.core.forward as forward_module
import lightning_revrnn.core.sweep as sweep_module
from lightning_revrnn import LanguageModel, RevGRU, RevLSTM

READS = ((forward_module, "_end_of_window_read"), (sweep_module, "_check_reconstruction"))
REGIONS = ((sweep_module, "run_forward"), (sweep_module, "_reverse"))


@contextlib.contextmanager
def guarded_windows() -> Iterator[NoHostRead]:
    """The guard on for every window forward and reverse sweep, their one read each permitted."""
    guard = NoHostRead()
    with contextlib.ExitStack() as stack:
        for module, name in READS:
            stack.enter_context(guard.permit(module, name))
        for module, name in REGIONS:
            stack.enter_context(guard.capture(module, name))
        yield guard


@pytest.mark.parametrize(
    "read",
    [
        lambda t: t.sum().item(),
        lambda t: bool(t.sum() > 0),
        lambda t: t.tolist(),
        lambda t: t.nonzero(),
        lambda t: t[t > 0],
        lambda t: torch.equal(t, t),
        lambda t: t.unique(),
    ],
    ids=["item", "bool", "tolist", "nonzero", "bool-index", "equal", "unique"],
)
def test_the_guard_catches_reads_and_value_sized_allocations(read: Callable[[torch.Tensor], object]) -> None:
    with pytest.raises(CaptureViolation), NoHostRead():
        read(torch.randn(4))


def test_the_guard_lets_fixed_shape_work_through() -> None:
    with NoHostRead() as guard:
        t = torch.randn(4)
        torch.where(t > 0, t, 0).cumsum(0).index_select(0, torch.tensor([2, 0]))
        with guard.allowed("end"):
            assert len(t.tolist()) == 4
    assert guard.allowed_entries == {"end": 1}


@pytest.mark.parametrize("cls", [RevGRU, RevLSTM], ids=lambda c: c.__name__)
@pytest.mark.parametrize("stored_units", [0, 3])
def test_a_reverse_training_window_reads_the_host_once_each_way(cls, stored_units: int) -> None:
    torch.manual_seed(0)
    rnn = cls(
        5, 16, 2, max_forget_bits=None, dropout=0.3, input_dropout=0.2, dropconnect=0.5, stored_units=stored_units
    )
    with torch.no_grad():
        for p in rnn.parameters():
            p.mul_(4.0)  # saturated gates: words grow fast and drain
    x = torch.randn(40, 3, 5, requires_grad=True)  # three chunks
    keep = torch.ones(40, 3, dtype=torch.bool)
    keep[29:, 1] = False  # a padded example
    with guarded_windows() as guard:
        out, h_n = rnn(x, keep=keep)
        final = h_n[0] if isinstance(h_n, tuple) else h_n
        (out.square().sum() + final.sum()).backward()
    assert guard.allowed_entries == {"_end_of_window_read": 1, "_check_reconstruction": 1}
    assert rnn.memory_stats().drains > 0  # the drain path ran inside the guarded region
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("rnn", ["revgru", "revlstm"])
def test_a_language_model_window_with_its_head_and_stem(rnn: Literal["revgru", "revlstm"]) -> None:
    """The LM's training window: embedding stem and blockwise decoder head run inside the sweep, guarded."""
    torch.manual_seed(0)
    model = LanguageModel(rnn=rnn, vocab_size=50, emb_size=16, hidden_size=16, num_layers=2, head_block_bytes=4096)
    model.train()
    tokens = torch.randint(0, 50, (35, 4))
    targets = torch.randint(0, 50, (35, 4))
    targets[-3:, 2] = -100  # ignored targets
    stem = model.stem.bind(training=True)
    head = model.head.bind(targets, training=True)
    with guarded_windows() as guard:
        total, _ = model.window_loss(tokens, None, stem, head)
        total.backward()
    assert guard.allowed_entries == {"_end_of_window_read": 1, "_check_reconstruction": 1}
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_a_translation_step_with_padding_and_attention() -> None:
    """Encoder (stored attention units, padded sources) and attention decoder (padded targets): two windows,
    one read each way per window."""
    from seq2seq_helpers import padded_batch, tiny_model

    model = tiny_model("revlstm")
    model.train()
    batch = padded_batch([5, 3, 7], [4, 6, 2], vocab=13)
    with guarded_windows() as guard:
        model.summed_loss(batch).backward()
    assert guard.allowed_entries == {"_end_of_window_read": 2, "_check_reconstruction": 2}
