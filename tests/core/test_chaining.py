"""Chaining: a decoder starts from an encoder's final state, with gradient, the two reversible modules joined
by ordinary autograd (the decoder's reverse sweep returns the gradient of its initial state, which becomes
the encoder sweep's final-state gradient). ``mode="reverse"`` must equal ``mode="store"`` for the
parameters of both modules, the encoder's input and the decoder's input, also with a padded encoder batch
(each example's encoder state after its own last token) and a padded decoder with a head.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_revrnn import RevGRU, RevLSTM, StepHead

IDS = lambda v: getattr(v, "__name__", str(v))  # noqa: E731


class MaskedDecoder(StepHead):
    """Linear decoder + cross-entropy, its loss masked at padded steps."""

    def __init__(self, hidden: int, vocab: int, targets: Tensor, keep: Tensor) -> None:
        super().__init__()
        self.lin = nn.Linear(hidden, vocab)
        self.targets, self.keep = targets, keep

    def forward(self, output: Tensor, start: int) -> Tensor:
        stop = start + output.shape[0]
        losses = F.cross_entropy(self.lin(output).flatten(0, 1), self.targets[start:stop].flatten(), reduction="none")
        return (losses * self.keep[start:stop].flatten()).sum()


def _pad(lengths: list[int], T: int) -> Tensor:
    return torch.arange(T)[:, None] < torch.tensor(lengths)[None, :]


def _chain(cls, modes: tuple[str, str], padded: bool, with_head: bool) -> tuple[Tensor, list[Tensor]]:
    """Encoder → decoder from its final state; returns the loss and the gradients of (encoder input,
    decoder input, encoder parameters, decoder parameters, head parameters)."""
    torch.manual_seed(0)
    Te, Td, B, V = 17, 13, 3, 7
    enc = cls(3, 8, 2, max_forget_bits=2, dropout=0.2, dropconnect=0.3, mode=modes[0])
    dec = cls(4, 8, 2, max_forget_bits=3, dropout=0.2, dropconnect=0.3, mode=modes[1])
    x_enc = torch.randn(Te, B, 3, requires_grad=True)
    x_dec = torch.randn(Td, B, 4, requires_grad=True)
    enc_keep = _pad([17, 9, 3], Te) if padded else None
    dec_keep = _pad([13, 13, 5], Td) if padded else torch.ones(Td, B, dtype=torch.bool)
    head = MaskedDecoder(8, V, torch.randint(0, V, (Td, B)), dec_keep) if with_head else None
    torch.manual_seed(1)  # the same dropout masks in both modes
    _, h_enc = enc(x_enc, keep=enc_keep)
    out, h_dec = dec(x_dec, h_enc, head=head, keep=dec_keep if padded else None)
    g = torch.Generator(torch.get_default_device()).manual_seed(2)
    loss = out if head is not None else (out * torch.randn(out.shape, generator=g)).sum()
    final = h_dec[0] if isinstance(h_dec, tuple) else h_dec
    loss = loss + (final * torch.randn(final.shape, generator=g)).sum()
    params = [*enc.parameters(), *dec.parameters(), *([] if head is None else head.parameters())]
    return loss.detach(), list(torch.autograd.grad(loss, [x_enc, x_dec, *params]))


@pytest.mark.parametrize("cls", [RevGRU, RevLSTM], ids=IDS)
@pytest.mark.parametrize(("padded", "with_head"), [(False, False), (True, True)], ids=["plain", "padded-head"])
@pytest.mark.parametrize("modes", [("reverse", "reverse"), ("reverse", "store"), ("store", "reverse")], ids="-".join)
def test_decoder_from_encoder_state_reverse_equals_store(cls, padded, with_head, modes):
    """Encoder and decoder modes (reverse/store, independently) against both in store."""
    loss_r, grads_r = _chain(cls, modes, padded, with_head)
    loss_s, grads_s = _chain(cls, ("store", "store"), padded, with_head)
    torch.testing.assert_close(loss_r, loss_s, rtol=1e-6, atol=0.0)
    assert len(grads_r) == len(grads_s)
    for i, (a, b) in enumerate(zip(grads_r, grads_s)):
        scale = b.abs().max().item()

        def msg(m: str, i: int = i) -> str:
            return f"grad {i}: {m}"

        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * max(scale, 1e-12), msg=msg)
    assert grads_r[0].abs().sum() > 0, "no gradient reached the encoder input through the decoder"
    enc_weight_ih = grads_r[2]
    assert enc_weight_ih.abs().sum() > 0
