"""The modules behave like ``nn.GRU``/``nn.LSTM`` where users expect it: result dtypes, an exact carry of
``h_n``, any floating input, ``cell.half()``, the new TF32 API, and errors that say what to do."""

from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_revrnn import NFRevGRU, NFRevLSTM, ReconstructionError, ReversibleRNN, RevGRU, RevGRUCell, RevLSTM
from lightning_revrnn.core.rnn import Mode
from lightning_revrnn.core.window import _mix, state_checksum
from lightning_revrnn.datamodules import SyntheticLMDataModule
from lightning_revrnn.lm import LanguageModel

BASELINE: dict[type, type[nn.GRU] | type[nn.LSTM]] = {
    RevGRU: nn.GRU,
    NFRevGRU: nn.GRU,
    RevLSTM: nn.LSTM,
    NFRevLSTM: nn.LSTM,
}


def states(h: Tensor | tuple[Tensor, Tensor]) -> list[Tensor]:
    return list(h) if isinstance(h, tuple) else [h]


# ------------------------------------------------------------------------------------------- h_n
@pytest.mark.parametrize("cls", [RevGRU, RevLSTM])
def test_h_n_feeds_a_linear_layer_like_nn_grus(cls: type) -> None:
    rnn = cls(4, 16, num_layers=2)
    out, h_n = rnn(torch.randn(5, 3, 4))
    ref_out, ref_h = BASELINE[cls](4, 16, num_layers=2)(torch.randn(5, 3, 4))
    for ours, theirs in zip(states(h_n), states(ref_h), strict=True):
        assert ours.dtype == theirs.dtype == torch.float32 and ours.shape == theirs.shape
    assert out.dtype == ref_out.dtype
    assert nn.Linear(16, 3)(states(h_n)[0][-1]).shape == (3, 3)


@pytest.mark.parametrize("cls", [NFRevGRU, NFRevLSTM, RevLSTM])
def test_carrying_float32_h_n_is_exact(cls: type) -> None:
    """Without forgetting, h grows beyond 1, where float32 cannot hold the fixed-point state: the module
    continues from its kept exact state. Reference: the same windows carried with the float64 exact state."""
    torch.manual_seed(0)
    rnn = cls(3, 8, num_layers=2)
    with torch.no_grad():
        for p in rnn.parameters():
            p.mul_(3.0)  # large updates: states well beyond ±1
    x1, x2 = torch.randn(30, 2, 3), torch.randn(20, 2, 3)
    twin = copy.deepcopy(rnn)  # same weights, no kept state
    with torch.no_grad():
        _, h1 = rnn(x1)
        exact = rnn.exact_state(h1)
        assert any(bool((e.float().double() != e).any()) for e in states(exact))  # float32 would lose bits
        ref_out, ref_h = rnn(x2, exact)  # float64 hx: used as is
        out, h2 = rnn(x2, h1.detach() if isinstance(h1, Tensor) else tuple(h.detach() for h in h1))
        views = [h.unbind(0) for h in states(h1)]  # a list of per-layer views of h_n
        out_views, _ = rnn(x2, list(views[0]) if len(views) == 1 else tuple(list(v) for v in views))
        twin_out, _ = twin(x2, h1)  # teeth: a module that did not produce h1 rounds from float32
        # A copy is not matched (same rounding does not prove the same state): it carries its float32 value.
        out_clone, _ = rnn(x2, h1.clone() if isinstance(h1, Tensor) else tuple(h.clone() for h in h1))
    assert torch.equal(out, ref_out) and torch.equal(out_views, ref_out)
    assert torch.equal(out_clone, twin_out) and not torch.equal(twin_out, ref_out)
    for a, b in zip(states(h2), states(ref_h), strict=True):
        assert torch.equal(a, b)


def test_the_same_initial_state_twice_is_not_mistaken_for_a_carry() -> None:
    """An hx that merely rounds like the last final state (elements the window barely moved, beyond ±2
    where float32 has fewer fractional bits) is not taken for it: the same call gives the same result."""
    torch.manual_seed(0)
    rnn = NFRevGRU(1, 4, 2)
    x, hx = torch.randn(1, 1, 1), torch.randn(2, 1, 4) * 50
    with torch.no_grad():
        first, _ = rnn(x, hx.clone())
        second, _ = rnn(x, hx.clone())
    assert torch.equal(first, second)


def test_carry_uses_changed_rows_as_given() -> None:
    """Rows the caller resets take hx's value; the other rows continue exactly (elementwise, no sync)."""
    torch.manual_seed(1)
    rnn = NFRevGRU(3, 8)
    with torch.no_grad():
        for p in rnn.parameters():
            p.mul_(3.0)
        _, h1 = rnn(torch.randn(25, 3, 3))
        exact_h1 = rnn.exact_state(h1)
        assert isinstance(exact_h1, Tensor)  # one GRU layer: a tensor
        exact = exact_h1.clone()
        reset = h1  # reset in place: the other rows still carry exactly
        reset[:, 1] = 0.0
        exact[:, 1] = 0.0
        x2 = torch.randn(10, 3, 3)
        out, _ = rnn(x2, reset)
        ref, _ = rnn(x2, exact)
    assert torch.equal(out, ref)


def test_exact_carry_keeps_gradients_of_hx() -> None:
    """A non-detached carry (BPTT across windows) still gets hx's gradient: reverse equals store."""
    torch.manual_seed(2)
    rnn = NFRevGRU(3, 6)
    x = torch.randn(20, 2, 3)
    grads = {}
    for mode in ("store", "reverse"):
        rnn.mode = mode
        _, h1 = rnn(x[:10])
        h1 = h1.detach().requires_grad_()
        out, h2 = rnn(x[10:], h1)
        grads[mode] = torch.autograd.grad((out**2).sum() + h2.sum(), h1)[0]
    torch.testing.assert_close(grads["reverse"], grads["store"], rtol=1e-5, atol=1e-6)
    assert grads["reverse"].abs().sum() > 0


# -------------------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("cls", [RevGRU, RevLSTM])
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_dtypes_under_autocast_match_nn(cls: type, input_dtype: torch.dtype) -> None:
    torch.manual_seed(3)
    rnn, base = cls(4, 8), BASELINE[cls](4, 8)
    x = torch.randn(6, 2, 4).to(input_dtype).requires_grad_()
    with torch.autocast(x.device.type, dtype=torch.bfloat16):  # CUDA under REVRNN_TEST_DEVICE=cuda
        out, h_n = rnn(x)
    out.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == input_dtype
    try:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            ref_out, ref_h = base(x)
    except RuntimeError as err:  # oneDNN has no bf16 LSTM on CPUs without AVX-512 (or DNNL_MAX_CPU_ISA=AVX2)
        if "primitive descriptor" not in str(err):
            raise
        pytest.skip(f"{type(base).__name__} cannot run under bf16 autocast on this CPU, nothing to match: {err}")
    assert out.dtype == ref_out.dtype
    for ours, theirs in zip(states(h_n), states(ref_h), strict=True):
        assert ours.dtype == theirs.dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_any_floating_input_computes_in_float32(dtype: torch.dtype) -> None:
    """The cells compute in float32 from the input cast to float32; results take the input's dtype."""
    torch.manual_seed(4)
    rnn = RevGRU(4, 8)
    x = torch.randn(6, 2, 4).to(dtype)
    out, h_n = rnn(x.requires_grad_())
    with torch.no_grad():
        ref, ref_h = rnn(x.float())
    assert out.dtype == h_n.dtype == dtype
    assert torch.equal(out, ref.to(dtype)) and torch.equal(h_n, ref_h.to(dtype))
    out.float().sum().backward()  # reverse mode through the cast


def test_carry_of_a_bf16_h_n_is_exact() -> None:
    torch.manual_seed(5)
    rnn = NFRevGRU(3, 8)
    x = torch.randn(20, 2, 3, dtype=torch.bfloat16)
    with torch.no_grad():
        _, h1 = rnn(x[:10])
        ref, _ = rnn(x[10:], rnn.exact_state(h1))
        out, _ = rnn(x[10:], h1)
    assert h1.dtype == torch.bfloat16 and torch.equal(out, ref)


# ----------------------------------------------------------------------------------------- misc
def test_cell_half_is_nn_module_half() -> None:
    cell = RevGRUCell(4, 8)
    assert cell.half_size == 4
    assert cell.half() is cell and cell.weight_hh.dtype == torch.float16


def test_reverse_mode_with_the_new_tf32_api() -> None:
    matmul = torch.backends.cuda.matmul
    previous = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        rnn = RevGRU(3, 6)
        out, _ = rnn(torch.randn(7, 2, 3, requires_grad=True))
        out.sum().backward()
        assert rnn.cells[0].weight_hh.grad is not None
        # Changed between forward and backward: the sweep cannot redo forward's arithmetic; it says so.
        out, _ = rnn(torch.randn(7, 2, 3, requires_grad=True))
        matmul.fp32_precision = "ieee"
        with pytest.raises(ReconstructionError, match="precision changed between forward and backward"):
            out.sum().backward()
    finally:
        matmul.fp32_precision = previous


def test_checksum_weights_cache_is_bounded() -> None:
    _mix.cache_clear()
    for b in range(1, 40):
        state_checksum([torch.zeros(b, 2, dtype=torch.int64)] * 2)
    assert _mix.cache_info().currsize <= 16


@pytest.mark.parametrize("cls", [RevGRU, NFRevGRU])
def test_second_backward_through_a_carried_state_says_detach(cls: type) -> None:
    rnn = cls(3, 6)
    x = torch.randn(10, 2, 3, requires_grad=True)
    out1, h1 = rnn(x[:5])
    out1.sum().backward()
    out2, _ = rnn(x[5:], h1)  # carried without .detach()
    with pytest.raises(RuntimeError, match=r"hx = h_n\.detach\(\)"):
        out2.sum().backward()


# ---------------------------------------------------------------------------- language model
class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _lm(**kwargs: object) -> LanguageModel:
    torch.manual_seed(0)
    drop = dict(dropout_emb=0.2, dropout_input=0.0, dropout_hidden=0.0, dropout_output=0.0, dropconnect=0.0)
    return LanguageModel(50, emb_size=8, hidden_size=12, **{**drop, **kwargs})  # type: ignore[arg-type]


def test_tied_weight_one_accumulator_and_index_add() -> None:
    model = _lm().train()
    tokens, targets = torch.randint(0, 50, (40, 3)), torch.randint(0, 50, (40, 3))
    rnn = model.rnn
    assert isinstance(rnn, ReversibleRNN)  # rnn="revgru"
    grads = {}
    modes: tuple[Mode, ...] = ("store", "reverse")
    for mode in modes:
        rnn.mode = mode
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        stem, head = model.stem.bind(training=True), model.head.bind(targets, training=True)
        total, _ = model.window_loss(tokens, None, stem, head)
        if mode == "reverse":
            record = rnn.last_window
            assert record is not None
            extras = record.plan.extras
            assert sum(e is model.embedding.weight for e in extras) == 1  # one V×E accumulator
        with OpCounter() as ops:
            total.backward()
        if mode == "reverse":  # the embedding rows by index_add, no dense embedding backward per chunk
            assert not any("embedding_dense_backward" in n for n in ops.names)
            assert any("index_add" in n for n in ops.names)
        grad = model.embedding.weight.grad
        assert grad is not None
        grads[mode] = grad.clone()
    torch.testing.assert_close(grads["reverse"], grads["store"], rtol=1e-4, atol=1e-6)


@pytest.fixture
def quiet_trainer() -> dict[str, object]:
    return dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_trainer_precision_64_true_says_what_to_use(quiet_trainer: dict[str, object]) -> None:
    data = SyntheticLMDataModule(
        vocab_size=50, train_tokens=400, val_tokens=100, test_tokens=100, batch_size=2, eval_batch_size=2, bptt=8
    )
    trainer = pl.Trainer(precision="64-true", fast_dev_run=1, **quiet_trainer)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"precision='64-true'.*Fix: use Trainer\(precision='32-true'\)"):
        trainer.fit(_lm(), data)
