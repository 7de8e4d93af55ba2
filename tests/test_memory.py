"""What a step allocates and keeps alive for backward (allocation trace + saved-tensor hooks)."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import nn

from lightning_revrnn import ReversibleRNN, RevGRU, RevLSTM
from lightning_revrnn.core.protocol import chunk_steps
from lightning_revrnn.memory import MemoryTrace, _Allocation, _peak, _without_kineto_markers, saved_tensor_bytes


def _saved(rnn: ReversibleRNN, T: int, B: int = 4) -> tuple[int, int, int]:
    """(saved bytes allocated in the forward, input bytes, buffer bytes) for one reverse-mode window; the
    input exists before the forward, so it is not counted (its bytes are returned for comparison)."""
    torch.manual_seed(0)
    x = torch.randn(T, B, rnn.input_size, requires_grad=True)
    with saved_tensor_bytes(rnn.parameters()) as saved:
        out, _ = rnn(x)
    window = rnn.last_window
    assert window is not None  # the forward just ran a reverse-mode window
    buffer_bytes = sum(t.untyped_storage().nbytes() for b in window.buffers for t in b.tensors())
    out.sum().backward()  # the sweep still reconstructs exactly
    return saved.total, x.untyped_storage().nbytes(), buffer_bytes


@pytest.mark.parametrize("cls", [RevGRU, RevLSTM])
def test_reverse_mode_memory_does_not_grow_with_T_except_for_buffer_and_input(cls: type) -> None:
    rnn = cls(8, 16, num_layers=2, max_forget_bits=3, dropout=0.2, dropconnect=0.3)
    rest = []
    for T in (20, 40, 80):
        total, _x_bytes, buf_bytes = _saved(rnn, T)
        checksum_bytes = 8 * -(-T // chunk_steps(T)) * rnn.num_layers  # one int64 fingerprint per layer and chunk
        rest.append(total - buf_bytes - checksum_bytes)
    assert rest[0] == rest[1] == rest[2], rest


def test_store_mode_memory_grows_with_T_and_reverse_is_far_smaller() -> None:
    rnn = RevGRU(8, 16, max_forget_bits=3, mode="store")
    store = [_saved_store(rnn, T) for T in (20, 80)]
    assert store[1] > 3 * store[0]
    rnn.mode = "reverse"
    total, _x_bytes, _ = _saved(rnn, 80)
    assert store[1] > 5 * total


def _saved_store(rnn: ReversibleRNN, T: int) -> int:
    x = torch.randn(T, 4, rnn.input_size, requires_grad=True)
    with saved_tensor_bytes(rnn.parameters()) as saved:
        _out, _ = rnn(x)  # held: only storages some graph still holds when the block ends count
    return saved.total


def test_a_graph_discarded_inside_the_block_counts_nothing() -> None:
    """Only what a graph still holds when the block ends counts (a probe graph dropped without backward
    is freed at once: the trace keeps no reference to it)."""
    w = nn.Parameter(torch.randn(5, 5))
    x = torch.randn(10, 5, requires_grad=True)
    with saved_tensor_bytes([w]) as saved:
        (torch.sigmoid(x * 2) @ w).sum()  # dropped at once
        held = torch.sigmoid(x * 3) @ w  # sigmoid saves its output, matmul its input: one storage
    assert saved.total == 200 and saved.storages == 1
    held.sum().backward()


def test_saved_tensor_bytes_deduplicates_views_and_skips_parameters() -> None:
    w = nn.Parameter(torch.randn(5, 5))
    x = torch.randn(10, 5, requires_grad=True)
    with saved_tensor_bytes([w]) as saved:
        x2 = x * 2  # allocated in the block
        y = x2 @ w  # saves x2 and w
        z = x2[:3] * x2[:3]  # saves views of x2 again
    assert saved.total == x2.untyped_storage().nbytes() == 200
    assert saved.storages == 1
    (y.sum() + z.sum()).backward()


def test_saved_view_of_a_pre_existing_tensor_costs_nothing_but_a_new_storage_counts_whole() -> None:
    corpus = torch.randn(10_000, 8)  # 320 KB, alive before the step (a corpus the batches are sliced from)
    w = nn.Parameter(torch.randn(8, 8))
    with saved_tensor_bytes() as saved:
        batch = corpus[:20]  # a (20, 8) view: no new memory
        hidden = batch @ w  # saves batch (a view of the corpus) and w (a parameter)
    assert saved.total == 0 and saved.storages == 0
    with saved_tensor_bytes() as saved:
        big = corpus * 1.0  # 320 KB allocated in the block
        kept = big[:20] @ w  # saves a (20, 8) view of it: the whole 320 KB stays alive for backward
    assert saved.total == big.untyped_storage().nbytes() == 10_000 * 8 * 4
    del hidden, kept


def test_trace_peak_is_the_highest_level_of_the_steps_allocations() -> None:
    trace = MemoryTrace(torch.device("cpu"))
    trace.start()
    a = torch.empty(1000)  # level 4000
    b = torch.empty(2000)  # 12000: the peak
    del a  # 8000
    c = torch.empty(500)  # 10000
    measured = trace.stop()
    assert measured.peak_bytes == measured.peak_excl_grad_bytes == 12_000
    assert measured.grad_bytes == measured.saved_bytes == 0
    del b, c


def test_only_frees_of_blocks_allocated_in_the_trace_lower_the_level() -> None:
    """The CPU allocator also reports frees of blocks older than the trace, with the size an earlier trace saw
    at that address; they must not offset the step's own allocations (which addresses get reused, and so which
    old frees show up, changes from run to run)."""
    cpu = torch.device("cpu")
    events = [
        _Allocation(1, (cpu, 0xA0), -4000),  # a block from before the trace is freed
        _Allocation(2, (cpu, 0xB0), 3000),  # level 3000
        _Allocation(3, (cpu, 0xC0), 2000),  # 5000: the peak
        _Allocation(4, (cpu, 0xB0), -3000),  # 2000
        _Allocation(5, (cpu, 0xB0), 1000),  # the address again: 3000
        _Allocation(6, (cpu, 0xC0), -9999),  # freed with another (stale) size: its own 2000 count, 1000
        _Allocation(7, (cpu, 0xD0), 3500),  # 4500
    ]
    assert _peak(events, cpu, set()) == 5000
    assert _peak(events, cpu, {2}) == 4500  # the 2000 left out (a gradient), and its free with it: 1000 + 3500


def test_the_same_step_measures_the_same_peak_every_time() -> None:
    """Identical steps, the state carried: from the fifth on, each step frees the exact carry kept from a step
    four earlier (allocated in that step's trace), which must not lower this step's peak. The buffer's final
    words are packed in as many bits as they hold, which depends on the carried state: the peak less what the
    buffers hold is the same every step."""
    torch.manual_seed(0)
    rnn = RevGRU(8, 16)
    x = torch.randn(20, 4, 8)
    h_n = None
    peaks, packed = [], []
    for _ in range(7):
        trace = MemoryTrace(torch.device("cpu"))
        trace.start()
        out, h_n = rnn(x, h_n)
        window = rnn.last_window
        assert window is not None
        packed.append(sum(t.numel() * t.element_size() for b in window.buffers for t in b.tensors()))
        out.sum().backward()
        h_n = h_n.detach()
        peaks.append(trace.stop(rnn.parameters()).peak_bytes)
        rnn.zero_grad(set_to_none=True)
    assert len(set(packed)) > 1  # the packed words do vary, so the subtraction below is needed
    assert len({p - w for p, w in zip(peaks[1:], packed[1:])}) == 1, (peaks, packed)  # the first has no carry


def test_trace_reports_parameter_gradients_apart_and_the_peak_without_them() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(100, 200)
    x = torch.randn(64, 100)
    trace = MemoryTrace(torch.device("cpu"))
    trace.start()
    trace.begin_forward()
    out = torch.tanh(lin(x))  # saves x (pre-existing: 0) and tanh's 64·200 float32 output
    trace.end_forward()
    out.sum().backward()
    measured = trace.stop(lin.parameters())
    assert measured.saved_bytes == 64 * 200 * 4 and measured.saved_storages == 1
    assert measured.grad_bytes == (100 * 200 + 200) * 4  # both gradients were allocated by this backward
    # at least the linear output, the tanh output (saved) and one backward temporary of the same size
    assert measured.peak_excl_grad_bytes >= 2 * 64 * 200 * 4
    assert measured.peak_excl_grad_bytes < measured.peak_bytes <= measured.peak_excl_grad_bytes + measured.grad_bytes


def test_a_trace_writes_no_profiler_lines(capfd: pytest.CaptureFixture[str]) -> None:
    """Recent PyTorch releases print "USDT:... profiler_start" / "profiler_stop" at every profiler start and stop,
    to file descriptor 2 (C++): MemoryReport traces a step every 50, and the lines swamped training logs."""
    for _ in range(2):
        trace = MemoryTrace(torch.device("cpu"))
        trace.start()
        kept = torch.ones(100) * 2
        trace.stop()
    captured = capfd.readouterr()
    assert "USDT" not in captured.err and "profiler_st" not in captured.err + captured.out
    del kept


def test_only_the_profiler_lines_are_dropped(capfd: pytest.CaptureFixture[str]) -> None:
    with _without_kineto_markers():
        os.write(2, b"USDT:2026-01-01 00:00:00 1:1 SyncActivityProfilerHandler.cpp:52] profiler_start\n")
        os.write(2, b"[W CPUAllocator.cpp:245] something else\n")
        print("from Python", file=sys.stderr)
        os.write(2, b"USDT:2026-01-01 00:00:00 1:1 SyncActivityProfilerHandler.cpp:59] profiler_stop\n")
    captured = capfd.readouterr()  # (pytest collects Python's and the descriptor's writes apart)
    assert sorted((captured.out + captured.err).splitlines()) == [
        "[W CPUAllocator.cpp:245] something else",
        "from Python",
    ]
