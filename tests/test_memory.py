"""What reverse mode keeps alive between forward and backward (measured with saved-tensor hooks)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_revrnn import RevGRU, RevLSTM
from lightning_revrnn.memory import saved_tensor_bytes


def _saved(rnn: nn.Module, T: int, B: int = 4) -> tuple[int, int, int]:
    """(saved bytes excluding parameters, input bytes, buffer bytes) for one reverse-mode window."""
    torch.manual_seed(0)
    x = torch.randn(T, B, rnn.input_size, requires_grad=True)
    with saved_tensor_bytes(rnn.parameters()) as saved:
        out, _ = rnn(x)
    buffer_bytes = sum(t.untyped_storage().nbytes() for b in rnn.last_window.buffers for t in b.tensors())
    out.sum().backward()  # the sweep still reconstructs exactly
    return saved.total, x.untyped_storage().nbytes(), buffer_bytes


@pytest.mark.parametrize("cls", [RevGRU, RevLSTM])
def test_reverse_mode_memory_does_not_grow_with_T_except_for_buffer_and_input(cls: type) -> None:
    rnn = cls(8, 16, num_layers=2, max_forget_bits=3, dropout=0.2, dropconnect=0.3)
    rest = []
    for T in (20, 80, 320):
        total, x_bytes, buf_bytes = _saved(rnn, T)
        checksum_bytes = 8 * T * rnn.num_layers  # one int64 fingerprint per layer and step
        rest.append(total - x_bytes - buf_bytes - checksum_bytes)
    assert rest[0] == rest[1] == rest[2], rest


def test_store_mode_memory_grows_with_T_and_reverse_is_far_smaller() -> None:
    rnn = RevGRU(8, 16, max_forget_bits=3, mode="store")
    store = [_saved_store(rnn, T) for T in (20, 80)]
    assert store[1] > 3 * store[0]
    rnn.mode = "reverse"
    total, x_bytes, _ = _saved(rnn, 80)
    assert store[1] > 5 * total


def _saved_store(rnn: nn.Module, T: int) -> int:
    x = torch.randn(T, 4, rnn.input_size, requires_grad=True)
    with saved_tensor_bytes(rnn.parameters()) as saved:
        rnn(x)
    return saved.total


def test_saved_tensor_bytes_deduplicates_views_and_skips_parameters() -> None:
    w = nn.Parameter(torch.randn(5, 5))
    x = torch.randn(10, 5, requires_grad=True)
    with saved_tensor_bytes([w]) as saved:
        y = x @ w  # saves x and w
        z = x[:3] * x[:3]  # saves views of x again
    assert saved.total == x.untyped_storage().nbytes()
    assert saved.storages == 1
    (y.sum() + z.sum()).backward()
