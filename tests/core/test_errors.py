"""Bad input gets a clear error naming the problem, never a silent wrong result."""

from __future__ import annotations

import pytest
import torch

from lightning_revrnn import FixedPointOverflowError, ReconstructionError, RevGRU, RevGRUCell, RevLSTM
from lightning_revrnn.core.rnn import Mode


def test_odd_hidden_size_is_rejected_with_a_fix() -> None:
    with pytest.raises(ValueError, match="even"):
        RevGRU(4, 7)
    with pytest.raises(ValueError, match="even"):
        RevLSTM(4, [8, 5], num_layers=2)
    with pytest.raises(ValueError, match="even"):
        RevGRUCell(4, 3)


def test_invalid_options() -> None:
    with pytest.raises(ValueError, match="max_forget_bits"):
        RevGRU(4, 8, max_forget_bits=4)
    with pytest.raises(ValueError, match="mode"):
        RevGRU(4, 8, mode="checkpoint")  # type: ignore[arg-type]
    rnn = RevGRU(4, 8)
    with pytest.raises(ValueError, match="mode"):
        rnn.mode = "fast"  # type: ignore[assignment]
    with pytest.raises(ValueError, match="dropout"):
        RevGRU(4, 8, dropout=1.0)
    with pytest.raises(ValueError, match="num_layers"):
        RevGRU(4, [8, 8], num_layers=3)


def test_wrong_input_shape_and_dtype() -> None:
    rnn = RevGRU(4, 8)
    with pytest.raises(ValueError, match="3-D"):
        rnn(torch.randn(5, 4))
    with pytest.raises(ValueError, match="input_size=4"):
        rnn(torch.randn(5, 2, 3))
    with pytest.raises(TypeError, match="floating-point"):
        rnn(torch.ones(5, 2, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"float32.*precision='32-true'"):
        RevGRU(4, 8).double()(torch.randn(5, 2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="empty"):
        rnn(torch.randn(0, 2, 4))
    with pytest.raises(TypeError, match="tensor"):
        rnn([[1.0]])


def test_wrong_initial_state() -> None:
    rnn = RevGRU(4, 8, num_layers=2)
    x = torch.randn(5, 3, 4)
    with pytest.raises(ValueError, match="layer 0 must have shape"):
        rnn(x, torch.zeros(2, 2, 8))
    with pytest.raises(ValueError, match="one \\(batch, hidden\\) state per layer"):
        rnn(x, torch.zeros(1, 3, 8))
    with pytest.raises(ValueError, match="\\(h, c\\)"):
        RevLSTM(4, 8)(x, (torch.zeros(1, 3, 8),))


def test_overflowing_initial_state_raises() -> None:
    rnn = RevGRU(4, 8)
    with pytest.raises(FixedPointOverflowError, match="initial state"):
        rnn(torch.randn(5, 3, 4), torch.full((1, 3, 8), 1e12))
    with pytest.raises(FixedPointOverflowError):
        rnn(torch.randn(5, 3, 4), torch.full((1, 3, 8), float("nan")))


@pytest.mark.parametrize("mode", ["reverse", "store"])
def test_nan_weights_raise_instead_of_wrapping(mode: Mode) -> None:
    rnn = RevLSTM(4, 8, mode=mode)
    with torch.no_grad():
        rnn.cell_list[0].weight_ih[3, 0] = float("nan")
    with pytest.raises(FixedPointOverflowError, match="layer 0"):
        rnn(torch.randn(5, 3, 4, requires_grad=True))
    with torch.no_grad(), pytest.raises(FixedPointOverflowError):
        rnn(torch.randn(5, 3, 4))


@pytest.mark.parametrize("target", ["word", "stack"])
def test_corrupted_buffer_is_detected_and_names_the_layer(target: str) -> None:
    torch.manual_seed(0)
    rnn = RevGRU(4, 8, num_layers=2, max_forget_bits=None)
    with torch.no_grad():
        rnn.cell_list[1].bias.fill_(-5.0)  # layer 1 forgets hard: drains happen
    out, _ = rnn(torch.randn(60, 3, 4, requires_grad=True))
    record = rnn.last_window
    assert record is not None
    buf = record.buffers[1]
    if target == "word":
        buf.word = buf.word + 1
    else:
        assert buf.stack is not None and buf.stack.numel(), "the setup must drain"
        buf.stack = buf.stack ^ 1
    with pytest.raises(ReconstructionError, match="layer 1"):
        out.sum().backward()


def test_reconstruction_error_names_the_step() -> None:
    torch.manual_seed(0)
    rnn = RevGRU(4, 8, max_forget_bits=3)
    out, _ = rnn(torch.randn(10, 2, 4, requires_grad=True))
    record = rnn.last_window
    assert record is not None
    buf = record.buffers[0]
    buf.word = buf.word ^ 1  # corrupts the last multiplication's bits: the last chunk diverges first
    with pytest.raises(ReconstructionError, match=r"layer 0, reconstructing steps 8\.\.9 did not"):  # T 10
        out.sum().backward()


def test_module_pickles_before_and_after_a_training_step() -> None:
    """ddp_spawn and torch.save pickle the module; the weak reference to the last window is dropped."""
    import pickle

    rnn = RevGRU(4, 4)
    pickle.loads(pickle.dumps(rnn))
    out, _ = rnn(torch.randn(3, 2, 4, requires_grad=True))
    clone = pickle.loads(pickle.dumps(rnn))
    assert clone.last_window is None and rnn.last_window is not None
    out.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_does_not_change_the_arithmetic(dtype: torch.dtype) -> None:
    """Mixed precision around the module (Lightning's 16-mixed) leaves evaluation and store mode exact."""
    torch.manual_seed(0)
    rnn = RevLSTM(4, 8)
    x = torch.randn(12, 3, 4)
    kind = x.device.type
    with torch.no_grad():
        ref, h_ref = rnn(x)
        with torch.autocast(kind, dtype=dtype):
            out, h = rnn(x)
    # The cells compute in float32 either way; the results take the dtype nn.LSTM's would (the autocast
    # dtype on the CPU, float16 on CUDA).
    dtype = torch.float16 if kind == "cuda" else dtype
    assert out.dtype == h[0].dtype == dtype
    assert torch.equal(out, ref.to(dtype))
    assert torch.equal(h[0], h_ref[0].to(dtype)) and torch.equal(h[1], h_ref[1].to(dtype))
    rnn.mode = "store"
    with torch.autocast(kind, dtype=dtype):
        out_store, _ = rnn(x.requires_grad_())
    assert torch.equal(out_store, ref.to(dtype))
