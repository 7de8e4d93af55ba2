"""Padding: the per-step, per-example keep mask ``rnn(x, hx, keep=mask)``.

* Exactness: an all-True mask is bit-identical to no mask; an all-False example keeps its initial state;
  an example's final state equals the same batch run unpadded for that example's own length (same GEMM
  shapes, drains decided per example); the reverse sweep's checksums pass for arbitrary masks (holes).
* Gradients: ``mode="reverse"`` equals ``mode="store"`` for padded batches (all cells, 1-2 layers, head,
  stem), and masked steps give no gradient to their input.
* The cells directly: a masked row's state halves and buffer words stay bit for bit, the reverse step
  undoes the step, and a fully masked step adds nothing to ``optimal_bits``.
* Clear errors for a wrong dtype, shape or device.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_revrnn import NFRevGRU, NFRevLSTM, RevGRU, RevLSTM, StepHead, StepStem
from lightning_revrnn.core.backend import EAGER
from lightning_revrnn.core.buffer import InformationBuffer
from lightning_revrnn.core.cells import RevGRUCell, RevLSTMCell
from lightning_revrnn.core.fixed_point import FORGET_ONE, R_Z, to_fixed, to_float

ALL_CLASSES = (RevGRU, RevLSTM, NFRevGRU, NFRevLSTM)
IDS = lambda v: getattr(v, "__name__", str(v))  # noqa: E731


# ----------------------------------------------------------------------------------------- helpers
def right_padded(lengths: list[int], T: int) -> Tensor:
    """``(T, B)`` keep mask: example ``b`` takes its first ``lengths[b]`` steps."""
    return torch.arange(T)[:, None] < torch.tensor(lengths)[None, :]


def fixed_point_hx(rnn, batch: int, seed: int = 0) -> list[Tensor]:
    """Flat per-layer initial states whose float32 values are exact fixed-point values (so an untouched
    state comes back bit-identical)."""
    g = torch.Generator(torch.get_default_device()).manual_seed(seed)
    return [
        to_float(to_fixed(torch.randn(batch, h, generator=g) * 0.5))
        for h in rnn.hidden_sizes
        for _ in range(rnn.state_count)
    ]


def pack(rnn, flat: list[Tensor]):
    """Flat layer-major list (h, or h and c per layer) to the module's ``hx`` (uniform sizes: stacked)."""
    n = rnn.state_count
    kinds = [torch.stack(flat[k::n]) for k in range(n)]
    return kinds[0] if n == 1 else tuple(kinds)


def unpack(rnn, h_n) -> list[Tensor]:
    kinds = list(h_n) if rnn.state_count == 2 else [h_n]
    return [kinds[k][l] for l in range(rnn.num_layers) for k in range(rnn.state_count)]


def exact(rnn, h_n) -> list[Tensor]:
    """The exact (float64) final state, flat."""
    return unpack(rnn, rnn.exact_state(h_n))


def close(actual: Tensor, expected: Tensor, what: str, rtol: float = 1e-5, atol_frac: float = 1e-6) -> None:
    """assert_close with an absolute tolerance relative to the gradient's scale (as test_gradients)."""
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(
        actual, expected, rtol=rtol, atol=atol_frac * max(scale, 1e-12), msg=lambda m: f"{what}: {m}"
    )


class MaskedDecoder(StepHead):
    """Linear decoder + cross-entropy that masks its own loss at padded steps (the head's job)."""

    def __init__(self, hidden: int, vocab: int) -> None:
        super().__init__()
        self.lin = nn.Linear(hidden, vocab)
        self.targets: Tensor | None = None
        self.keep: Tensor | None = None

    def forward(self, output: Tensor, start: int) -> Tensor:
        assert self.targets is not None and self.keep is not None
        stop = start + output.shape[0]
        losses = F.cross_entropy(self.lin(output).flatten(0, 1), self.targets[start:stop].flatten(), reduction="none")
        return (losses * self.keep[start:stop].flatten()).sum()


def run(rnn, mode: str, x: Tensor, hx: list[Tensor], keep: Tensor | None, head=None, stem=None, seed: int = 3):
    """One forward + backward of a loss on outputs (or the head) and the final state; returns
    (primary, final states, grad of x, grads of hx, grads of every parameter)."""
    rnn.mode = mode
    modules = [m for m in (rnn, head, stem) if m is not None]
    params = [p for m in modules for p in m.parameters()]
    xl = x.detach().clone().requires_grad_(x.is_floating_point())
    hl = [h.detach().clone().requires_grad_() for h in hx]
    torch.manual_seed(seed)
    primary, h_n = rnn(xl, pack(rnn, hl), head=head, stem=stem, keep=keep)
    g = torch.Generator(torch.get_default_device()).manual_seed(9)
    loss = primary if head is not None else (primary * torch.randn(primary.shape, generator=g)).sum()
    for f in unpack(rnn, h_n):
        loss = loss + (f * torch.randn(f.shape, generator=g)).sum()
    inputs = ([xl] if xl.requires_grad else []) + hl + params
    grads = torch.autograd.grad(loss, inputs)
    dx = grads[0] if xl.requires_grad else None
    rest = grads[1:] if xl.requires_grad else grads
    return primary.detach(), [f.detach() for f in unpack(rnn, h_n)], dx, rest[: len(hl)], rest[len(hl) :]


def compare_modes(rnn, x, hx, keep, head=None, stem=None):
    rev = run(rnn, "reverse", x, hx, keep, head, stem)
    sto = run(rnn, "store", x, hx, keep, head, stem)
    assert torch.equal(rev[0], sto[0]), "forward outputs differ between modes"
    for a, b in zip(rev[1], sto[1]):
        assert torch.equal(a, b), "final states differ between modes"
    if rev[2] is not None:
        close(rev[2], sto[2], "grad x")
    for i, (a, b) in enumerate(zip(rev[3], sto[3])):
        close(a, b, f"grad hx[{i}]")
    for i, (a, b) in enumerate(zip(rev[4], sto[4])):
        close(a, b, f"grad param {i}")
    return rev, sto


# ------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("cls", ALL_CLASSES, ids=IDS)
@pytest.mark.parametrize("mode", ["reverse", "store"])
def test_all_true_mask_is_bit_identical_to_no_mask(cls, mode):
    torch.manual_seed(0)
    rnn = cls(3, 8, 2, max_forget_bits=2)
    x, hx = torch.randn(21, 3, 3), fixed_point_hx(rnn, 3)
    a = run(rnn, mode, x, hx, None)
    b = run(rnn, mode, x, hx, torch.ones(21, 3, dtype=torch.bool))
    for u, v in zip([a[0], *a[1], a[2], *a[3], *a[4]], [b[0], *b[1], b[2], *b[3], *b[4]]):
        assert torch.equal(u, v)


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=IDS)
@pytest.mark.parametrize("mode", ["reverse", "store", "eval"])
def test_final_state_is_the_state_after_each_examples_own_length(cls, mode):
    """Right padding: example b's exact final state equals the same batch run unpadded for lengths[b]
    steps (the same GEMM shapes, so bit for bit); a length-0 example keeps its initial state exactly.
    The window is long enough to drain (no forget limit)."""
    torch.manual_seed(1)
    T, lengths = 70, [70, 41, 17, 0]
    rnn = cls(3, 6, 2, max_forget_bits=None)
    x, hx = torch.randn(T, 4, 3), fixed_point_hx(rnn, 4, seed=2)
    rnn.mode = "store" if mode == "eval" else mode
    keep = right_padded(lengths, T)
    with torch.set_grad_enabled(mode != "eval"):
        xl = x.clone().requires_grad_(mode != "eval")
        out, h_n = rnn(xl, pack(rnn, hx), keep=keep)
        finals = exact(rnn, h_n)
        if mode == "reverse":
            (out.sum() + sum(f.sum() for f in unpack(rnn, h_n))).backward()  # the sweep checks every state
            assert xl.grad is not None and torch.all(xl.grad[~keep] == 0)
        for b, n in enumerate(lengths):
            if n == 0:
                for f, h in zip(finals, hx):
                    assert torch.equal(f[b], h[b].double())
                assert torch.equal(out[:, b], hx[-rnn.state_count][b].expand(T, -1))
                continue
            ref_out, ref_h = rnn(x[:n], pack(rnn, hx))
            for f, r in zip(finals, exact(rnn, ref_h)):
                assert torch.equal(f[b], r[b]), f"example {b} (length {n})"
            assert torch.equal(out[:n, b], ref_out[:, b].detach())
            assert torch.equal(out[n:, b], ref_out[-1, b].detach().expand(T - n, -1))  # masked: unchanged state


@pytest.mark.parametrize("cls", [RevGRU, RevLSTM], ids=IDS)
def test_reverse_sweep_reconstructs_arbitrary_masks(cls):
    """Holes anywhere (left padding, gaps): the sweep's checksum check passes and gradients equal store."""
    torch.manual_seed(2)
    T, B = 40, 5
    rnn = cls(2, 6, 2, max_forget_bits=1, dropout=0.2, dropconnect=0.3)
    keep = torch.rand(T, B) < 0.6
    keep[:, 0] = True
    keep[:, 1] = False
    keep[: T // 2, 2] = False  # left padding
    compare_modes(rnn, torch.randn(T, B, 2), fixed_point_hx(rnn, B), keep)


# ------------------------------------------------------------------------------------ gradients
@pytest.mark.parametrize("cls", ALL_CLASSES, ids=IDS)
@pytest.mark.parametrize("layers", [1, 2])
def test_padded_reverse_gradients_equal_store(cls, layers):
    torch.manual_seed(3)
    T = 23
    rnn = cls(3, 8, layers, max_forget_bits=3, dropout=0.3, input_dropout=0.2, dropconnect=0.4)
    keep = right_padded([23, 19, 4], T)
    rev, _ = compare_modes(rnn, torch.randn(T, 3, 3), fixed_point_hx(rnn, 3), keep)
    assert torch.all(rev[2][~keep] == 0), "a padded step's input got a gradient"


@pytest.mark.parametrize("cls", [RevGRU, RevLSTM], ids=IDS)
@pytest.mark.parametrize("layers", [1, 2])
def test_padded_head_reverse_equals_store(cls, layers):
    torch.manual_seed(4)
    T, B, V = 19, 3, 7
    rnn = cls(3, 6, layers, max_forget_bits=2, dropout=0.3, dropconnect=0.3)
    head = MaskedDecoder(6, V)
    head.targets = torch.randint(0, V, (T, B))
    head.keep = right_padded([19, 11, 2], T)
    rev, _ = compare_modes(rnn, torch.randn(T, B, 3), fixed_point_hx(rnn, B), head.keep, head=head)
    assert rev[0].dim() == 0


class Embed(StepStem):
    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)

    def forward(self, inputs: Tensor) -> Tensor:
        return self.emb(inputs)


@pytest.mark.parametrize("cls", [RevGRU, RevLSTM], ids=IDS)
def test_padded_stem_and_head_reverse_equals_store(cls):
    torch.manual_seed(5)
    T, B, V = 20, 3, 9
    rnn = cls(4, 6, 2)
    stem, head = Embed(V, 4), MaskedDecoder(6, V)
    head.targets = torch.randint(0, V, (T, B))
    head.keep = right_padded([5, 20, 13], T)
    compare_modes(rnn, torch.randint(0, V, (T, B)), fixed_point_hx(rnn, B), head.keep, head=head, stem=stem)


def test_batch_first_mask_follows_the_input_layout():
    torch.manual_seed(6)
    rnn = RevGRU(3, 4)
    x, keep = torch.randn(9, 2, 3), right_padded([9, 4], 9)
    out, h = rnn(x, keep=keep)
    rnn.batch_first = True
    out_bf, h_bf = rnn(x.transpose(0, 1), keep=keep.t())
    assert torch.equal(out_bf.transpose(0, 1), out) and torch.equal(h_bf, h)


# ------------------------------------------------------------------------------- cells directly
def _filled(cell_cls, B: int, seed: int):
    """A cell, a retained buffer and a state after 6 real steps (so the words hold bits)."""
    torch.manual_seed(seed)
    cell = cell_cls(3, 8, 3)
    buf = InformationBuffer((B, 4), torch.get_default_device(), 3, retain=True)
    state = [to_fixed(torch.randn(B, 4) * 0.5) for _ in range(cell.state_halves)]
    state_f = [to_float(s) for s in state]
    w = list(cell.weight_hh.split(cell.hidden_rows, 0))
    with torch.no_grad():
        for _ in range(6):
            state, state_f = EAGER.forward_step(cell, w, cell.project_input(torch.randn(B, 3)), state, state_f, buf)
    return cell, buf, w, state, state_f


@pytest.mark.parametrize("cell_cls", [RevGRUCell, RevLSTMCell], ids=IDS)
def test_masked_rows_keep_state_and_buffer_words(cell_cls):
    B = 4
    cell, buf, w, state, state_f = _filled(cell_cls, B, seed=7)
    keep = torch.tensor([True, False, True, False])[:, None]
    word, before = buf.word.clone(), [s.clone() for s in state]
    assert bool(word[~keep[:, 0]].any()), "the test needs non-empty words in the masked rows"
    xp = cell.project_input(torch.randn(B, 3))
    with torch.no_grad():
        after, _ = EAGER.forward_step(cell, w, xp, state, state_f, buf, keep)
    masked, kept = ~keep[:, 0], keep[:, 0]
    assert torch.equal(buf.word[masked], word[masked])
    assert not torch.equal(buf.word[kept], word[kept])
    for a, b in zip(after, before):
        assert torch.equal(a[masked], b[masked]) and not torch.equal(a[kept], b[kept])
    # The reverse step with the same mask undoes it: state and words as before, bit for bit.
    restored, _ = EAGER.reverse_step(cell, w, xp, after, [to_float(h) for h in after], buf, keep)
    assert torch.equal(buf.word, word)
    for r, b in zip(restored, before):
        assert torch.equal(r, b)


@pytest.mark.parametrize("cell_cls", [RevGRUCell, RevLSTMCell], ids=IDS)
def test_fully_masked_step_adds_no_optimal_bits(cell_cls):
    """optimal_bits = M·units·R_Z − Σ log2 z*: a masked multiplication has z* = 2^R_Z, adding R_Z to both
    terms, so the total stays (up to float64 rounding of the sum); the words stay, so used_bits stays too."""
    B = 3
    cell, buf, w, state, state_f = _filled(cell_cls, B, seed=8)
    _, masked, *_ = _filled(cell_cls, B, seed=8)  # the same buffer, then one fully masked step
    keep = torch.zeros(B, 1, dtype=torch.bool)
    with torch.no_grad():
        EAGER.forward_step(cell, w, cell.project_input(torch.randn(B, 3)), state, state_f, masked, keep)
    before, after = buf.stats(0), masked.stats(0)
    assert after.multiplications == before.multiplications + cell.multiplications_per_step
    assert abs(float(after.optimal_bits) - float(before.optimal_bits)) < 1e-6
    assert float(before.optimal_bits) > 0
    assert after.used_bits == before.used_bits
    assert FORGET_ONE == 1 << R_Z


def test_padded_memory_stats_optimal_bits_equal_the_unpadded_prefix():
    """End to end: padding steps add nothing to optimal_bits; normal_bits counts the padded batch."""
    torch.manual_seed(9)
    rnn = RevGRU(3, 4)
    x = torch.randn(12, 2, 3, requires_grad=True)
    rnn(x[:7])
    ref = rnn.memory_stats()
    rnn(x, keep=right_padded([7, 7], 12))
    padded = rnn.memory_stats()
    assert padded.optimal == pytest.approx(ref.optimal, abs=1e-6)
    assert padded.normal_bits == ref.normal_bits * 12 // 7


# ---------------------------------------------------------------------------------------- errors
def test_wrong_mask_dtype_shape_and_device_raise_with_a_fix():
    rnn = RevGRU(3, 4)
    x = torch.randn(5, 2, 3)
    with pytest.raises(ValueError, match=r"bool tensor.*Fix"):
        rnn(x, keep=torch.ones(5, 2))
    with pytest.raises(ValueError, match=r"\(5, 2\).*Fix"):
        rnn(x, keep=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool tensor"):
        rnn(x, keep=[[True, True]] * 5)
    if x.device.type == "cpu" and torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"Fix: keep\.to"):
            rnn(x, keep=torch.ones(5, 2, dtype=torch.bool, device="cuda"))
