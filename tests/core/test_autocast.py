"""``mode="reverse"`` training under autocast: the cells stay exact float32 (reconstruction holds), the stem
and head run in the caller's precision in forward and in the reverse sweep alike, and the gradients match
``mode="store"`` under the same autocast."""

from __future__ import annotations

import os

import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from lightning_revrnn import ReversibleRNN, RevGRU, RevLSTM, StepHead, StepStem
from lightning_revrnn.core.rnn import Mode
from lightning_revrnn.datamodules import SyntheticLMDataModule
from lightning_revrnn.lm import LanguageModel

BF16 = torch.bfloat16
#: The device type the tests' tensors land on (``REVRNN_TEST_DEVICE``, see conftest.py): autocast there.
KIND = torch.device(os.environ.get("REVRNN_TEST_DEVICE", "cpu")).type


class LinearStem(StepStem):
    """A linear stem: under autocast its output is bf16, so forward and reverse must agree on autocast."""

    def __init__(self, features: int, out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(features, out)
        self.dtypes: list[torch.dtype] = []

    def forward(self, inputs: Tensor) -> Tensor:
        y = self.linear(inputs)
        self.dtypes.append(y.dtype)
        return y


class Decoder(StepHead):
    def __init__(self, hidden: int, vocab: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, vocab)
        self.targets: Tensor | None = None
        self.dtypes: list[torch.dtype] = []

    def forward(self, output: Tensor, start: int) -> Tensor:
        assert self.targets is not None
        logits = self.linear(output)
        self.dtypes.append(logits.dtype)
        targets = self.targets[start : start + output.shape[0]]
        return nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")


def run(rnn: ReversibleRNN, mode: Mode, x: Tensor, stem: LinearStem, head: Decoder) -> tuple[Tensor, list[Tensor]]:
    rnn.mode = mode
    params = [*rnn.parameters(), *stem.parameters(), *head.parameters()]
    torch.manual_seed(1)
    with torch.autocast(KIND, dtype=BF16):
        loss, _ = rnn(x, stem=stem, head=head)
    return loss.detach(), list(torch.autograd.grad(loss, params))  # backward outside autocast, as Lightning


@pytest.mark.parametrize("cls", [RevGRU, RevLSTM])
def test_reverse_equals_store_under_bf16_autocast(cls: type) -> None:
    torch.manual_seed(0)
    T, B, F, E, H, V = 37, 3, 5, 6, 8, 11
    rnn = cls(E, [H, H], num_layers=2, dropout=0.2, dropconnect=0.3)
    stem, head = LinearStem(F, E), Decoder(H, V)
    head.targets = torch.randint(0, V, (T, B))
    x = torch.randn(T, B, F)
    loss_s, grads_s = run(rnn, "store", x, stem, head)
    stem.dtypes.clear()
    head.dtypes.clear()
    # Reverse mode raises ReconstructionError if the sweep recomputed any state differently: the stem's bf16
    # output feeds the first layer's projection, so the sweep must re-enter forward's autocast around it.
    loss_r, grads_r = run(rnn, "reverse", x, stem, head)
    assert torch.equal(loss_r, loss_s)  # the same forward, head values included
    assert set(stem.dtypes) == {BF16} and set(head.dtypes) == {BF16}  # forward and sweep both in bf16
    # Tolerance: both modes take the same bf16 logits in forward, but the sweep's per-step head call rounds
    # its bf16 GEMMs (decoder backward on 1 step instead of a chunk) independently: each d_out element may
    # differ by one bf16 rounding, 2^-8 relative. The backward is linear in d_out, so every gradient differs
    # by at most ~2^-8 of the magnitude of what flows through it; 2e-2 relative to the gradient's largest
    # element leaves room for a few roundings adding up, and is far below any real error (a missing or
    # doubled contribution is O(1) relative).
    for i, (a, b) in enumerate(zip(grads_r, grads_s, strict=True)):
        scale = float(b.abs().max())
        assert scale > 0, i
        torch.testing.assert_close(a, b, rtol=0, atol=2e-2 * scale, msg=f"parameter {i}")


def test_cells_are_exact_float32_under_autocast() -> None:
    """Without a stem the cells see the same float32 input under autocast: outputs equal bit for bit, and a
    reverse-mode backward under autocast completes (its reconstruction check passes)."""
    torch.manual_seed(2)
    rnn = RevGRU(4, 8, num_layers=2, dropout=0.2)
    x = torch.randn(40, 2, 4, requires_grad=True)
    torch.manual_seed(3)
    ref, _ = rnn(x)
    torch.manual_seed(3)
    with torch.autocast(KIND, dtype=BF16):
        out, _h_n = rnn(x)
        expected = nn.GRU(4, 8)(x)[0].dtype  # float32 on the CPU, float16 on CUDA (cuDNN)
    assert out.dtype == expected and torch.equal(out, ref.to(expected))
    (out**2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_stem_autocast_mismatch_is_caught() -> None:
    """Teeth for the autocast record: if the sweep ran the stem in another precision than forward did, the
    first layer's projection would differ and the reconstruction check would fire. Simulate it by turning
    the stem's precision off after forward."""
    from lightning_revrnn import ReconstructionError
    from lightning_revrnn.core.numerics import AutocastState

    torch.manual_seed(4)
    rnn = RevGRU(6, 8)
    stem = LinearStem(5, 6)
    x = torch.randn(20, 2, 5)
    with torch.autocast(KIND, dtype=BF16):
        out, _ = rnn(x, stem=stem)
    window = rnn.last_window
    assert window is not None and window.plan.autocast.enabled
    object.__setattr__(window.plan, "autocast", AutocastState(KIND, False, BF16))  # tamper with the frozen plan
    with pytest.raises(ReconstructionError):
        (out.float() ** 2).sum().backward()


@pytest.mark.skipif(KIND != "cpu", reason="a CPU Trainer")
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_language_model_bf16_mixed_runs_the_decoder_in_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reversible LM's decoder GEMM (blockwise, inside the sweep) follows the caller's autocast."""
    import lightning_revrnn.chunked_loss as chunked

    torch.manual_seed(5)
    model = LanguageModel(40, emb_size=8, hidden_size=12, dropout_emb=0.1)
    seen: list[torch.dtype] = []
    logits = chunked._logits

    def spy(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        seen.append(torch.addmm(bias, x, weight.t()).dtype if bias is not None else (x @ weight.t()).dtype)
        return logits(x, weight, bias)

    monkeypatch.setattr(chunked, "_logits", spy)
    data = SyntheticLMDataModule(
        vocab_size=40, train_tokens=600, val_tokens=100, test_tokens=100, batch_size=2, eval_batch_size=2, bptt=20
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        precision="bf16-mixed",
        max_steps=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    before = model.embedding.weight.detach().clone()
    trainer.fit(model, data)  # the reverse sweep checks every reconstructed state
    assert seen and set(seen) == {BF16}
    assert not torch.equal(before, model.embedding.weight.detach())
