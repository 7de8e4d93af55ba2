"""An independent float64 reference of the cells, written from the spec, against RevGRU and RevLSTM.

The reference below implements ``/work/shared/reference/reversible-rnn.md`` sections 2-3 directly: float64
gates from the spec's equations, the forget limit ``z = (1 - 2^-k)·σ(a) + 2^-k``, ``z* = round(z·2^R_Z)``
(at least ``2^(R_Z-k)``, or 1 without a limit), additive terms rounded to ``R_H = 23`` fractional bits, and
the exactly reversible multiplication on one Python integer per unit (one buffer integer per (example, unit)
shared by all of a layer's multiplications, as in the spec). It imports nothing of the project's cell code:
only the public model classes, to copy their parameters and to compare with.

The one thing the spec leaves to the implementation is when bits leave a word that must stay below
``2^(63 - R_Z)`` (the spec's reference pushes snapshots; "a tighter encoding is welcome"). That choice
changes the bits a multiplication injects into ``h``, so the reference models the project's documented rule
(``lightning_revrnn/buffer.py``, written out again here): before multiplication ``m`` of a layer with
``m % (1 + 21 // k_bits) == 0``, every example whose largest buffer integer has more than 32 bits moves the
low 32 bits of each of its integers out (they would be stored; the forward never reads them again).

The comparison has a tolerance, derived in :data:`ATOL`; three mutations of the reference (the spec
misread in three plausible ways) must fail it, which shows the comparison has teeth.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_revrnn import RevGRU, RevLSTM

R_H = 23  # spec: fractional bits of hidden and cell values
R_Z = 10  # spec: fractional bits of forget values
DRAIN_BITS = 32

#: Tolerance on outputs and final states (absolute, in state units; |h| ≲ 1).
#: The project computes its gates in float32, the reference in float64: they differ by a few float32 ulps
#: (≲ 1e-6). Three effects follow, all bounded per multiplication:
#:  * an additive term may round to a neighbouring fixed-point value: 1 unit of 2^-23;
#:  * once the low bits of ``h`` differ by one unit, the two buffers hold different integers, and the
#:    ``B mod z*`` that a multiplication injects into ``h`` differs by anything in ``[0, z*)`` units,
#:    i.e. by less than ``2^R_Z · 2^-R_H = 2^-13 ≈ 1.2e-4``; this now happens at every multiplication;
#:  * rarely (when ``z·2^10`` is within ~1e-3 of a rounding boundary) ``z*`` itself differs by one, which
#:    changes that update by ``|h_old - g|·2^-10 ≤ 2·2^-10`` for the GRU (|h|, |g| ≤ 1).
#: The differences injected at earlier steps are damped by later forgetting (each is multiplied by z < 1
#: and by gate derivatives below 1 for these small random weights), so at any step only the last few
#: multiplications' worth matter. 2^-8 ≈ 3.9e-3 allows 32 multiplications' worth of injected-bit
#: differences, or one z* flip with margin; measured: ≤ 1e-3 on these cases (see the test). The mutations
#: below change a gate by O(0.1) and move the trajectory by far more than this.
ATOL = 2.0**-8


# ------------------------------------------------------------------------------ the reference (spec)
def _sigmoid(a: torch.Tensor) -> torch.Tensor:
    return 1.0 / (1.0 + torch.exp(-a))


def _forget_star(z: torch.Tensor, k: int | None, limit: bool) -> list[list[int]]:
    """``z* = round(z·2^R_Z)`` with ``z = (1 - 2^-k)·σ + 2^-k``, clamped to ``[2^(R_Z-k), 2^R_Z]`` (no limit:
    a ``z*`` that rounds to 0 is 1)."""
    if k is not None and limit:
        z = (1.0 - 2.0**-k) * z + 2.0**-k
    low = 1 if k is None else 2 ** (R_Z - k)
    return [[min(max(round(float(v) * 2**R_Z), low), 2**R_Z) for v in row] for row in z.tolist()]


def _fixed(values: torch.Tensor) -> list[list[int]]:
    """Round float64 values to fixed point (R_H fractional bits), as Python ints."""
    return [[round(float(v) * 2**R_H) for v in row] for row in values.tolist()]


def _floats(ints: list[list[int]]) -> torch.Tensor:
    """Fixed point (Python ints) to float64 (exact for |h*| < 2^53)."""
    return torch.tensor(ints, dtype=torch.float64) / 2**R_H


class ReferenceBuffer:
    """One layer's buffer integers ``B[b][j] ≥ 0`` (Python ints) with the spec's reversible multiply."""

    def __init__(self, batch: int, units: int, k: int | None) -> None:
        self.ints = [[0] * units for _ in range(batch)]
        self.drains = 0

    def multiply(self, h: list[list[int]], z: list[list[int]]) -> list[list[int]]:
        """Spec: ``B ← B·2^R_Z + (h* mod 2^R_Z); h* ← ⌊h*/2^R_Z⌋·z* + (B mod z*); B ← ⌊B/z*⌋``, after the
        project's drain rule: a unit whose integer is at least ``z*·2^32`` first moves its low 32 bits out."""
        out = []
        for b, (hrow, zrow) in enumerate(zip(h, z)):
            new = []
            for j, (hv, zv) in enumerate(zip(hrow, zrow)):
                if self.ints[b][j] >= zv << DRAIN_BITS:  # this unit drains
                    self.ints[b][j] >>= DRAIN_BITS
                    self.drains += 1
                buf = self.ints[b][j] * 2**R_Z + hv % 2**R_Z
                new.append(hv // 2**R_Z * zv + buf % zv)
                self.ints[b][j] = buf // zv
                assert 0 <= self.ints[b][j] < 2 ** (DRAIN_BITS + R_Z)
            out.append(new)
        return out


def _add(a: list[list[int]], b: list[list[int]]) -> list[list[int]]:
    return [[x + y for x, y in zip(ra, rb)] for ra, rb in zip(a, b)]


def reference_layer(
    kind: str,
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    state: list[list[list[int]]],
    k: int | None,
    mutation: str | None,
) -> tuple[torch.Tensor, list[list[list[int]]], int]:
    """Run one layer over ``x`` (T, B, I) float64 from fixed-point ``state`` ([h1, h2] or [h1, h2, c1, c2]).

    Parameter layout (the public modules'): ``weight_ih`` (2·rows, I) and ``bias`` (2·rows) hold group 1's
    rows then group 2's, ``weight_hh`` (2·rows, H/2) likewise; per group the rows are ``z, r, g`` (GRU) or
    ``f, i, o, p, g`` (LSTM), H/2 each. Returns (outputs (T, B, H) float64, final state, drains).
    """
    w_ih, bias, w_hh = params["weight_ih"], params["bias"], params["weight_hh"]
    n = w_hh.shape[1]
    rows = w_hh.shape[0] // 2
    buf = ReferenceBuffer(x.shape[1], n, k)
    limit = mutation != "no_forget_limit"
    outs = []
    for xt in x:
        old_h1 = state[0]
        for g in (0, 1):
            Wx, b, Wh = (w[g * rows : (g + 1) * rows] for w in (w_ih, bias, w_hh))
            other = _floats(state[1 - g] if not (g == 1 and mutation == "old_h1") else old_h1)
            if kind == "gru":
                # [z; r] = σ(W [x; h_other]);  g = tanh(U [x; r ∘ h_other]);  h ← z ∘ h + (1 − z) ∘ g
                zr = _sigmoid(xt @ Wx[: 2 * n].T + b[: 2 * n] + other @ Wh[: 2 * n].T)
                z, r = zr[:, :n], zr[:, n:]
                if mutation == "swap_zr":
                    z, r = r, z
                cand = torch.tanh(xt @ Wx[2 * n :].T + b[2 * n :] + (r * other) @ Wh[2 * n :].T)
                zq = _forget_star(z, k, limit)
                zs = torch.tensor(zq, dtype=torch.float64) / 2**R_Z
                state[g] = _add(buf.multiply(state[g], zq), _fixed((1.0 - zs) * cand))
            else:
                # [f; i; o; p] = σ(W [x; h_other]);  g = tanh(U [x; h_other]);
                # c ← f ∘ c + i ∘ g;  h ← p ∘ h + o ∘ tanh(c)   (order c1, h1, then c2, h2)
                pre = xt @ Wx.T + b + other @ Wh.T
                f, i, o, p = _sigmoid(pre[:, : 4 * n]).split(n, 1)
                if mutation == "swap_zr":
                    f, i = i, f
                cand = torch.tanh(pre[:, 4 * n :])
                state[2 + g] = _add(buf.multiply(state[2 + g], _forget_star(f, k, limit)), _fixed(i * cand))
                c_new = _floats(state[2 + g])
                state[g] = _add(buf.multiply(state[g], _forget_star(p, k, limit)), _fixed(o * torch.tanh(c_new)))
        outs.append(torch.cat([_floats(state[0]), _floats(state[1])], 1))
    return torch.stack(outs), state, buf.drains


def reference_run(
    kind: str,
    layer_params: list[dict[str, torch.Tensor]],
    x: torch.Tensor,
    h0: list[torch.Tensor],
    c0: list[torch.Tensor] | None,
    k: int | None,
    mutation: str | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], int]:
    """All layers: (top outputs, final h per layer, final c per layer (LSTM), drains)."""
    inp, hs, cs, drains = x, [], [], 0
    for l, params in enumerate(layer_params):
        n = params["weight_hh"].shape[1]
        halves = [_fixed(h0[l][:, :n]), _fixed(h0[l][:, n:])]
        if c0 is not None:
            halves += [_fixed(c0[l][:, :n]), _fixed(c0[l][:, n:])]
        inp, state, d = reference_layer(kind, params, inp, halves, k, mutation)
        drains += d
        hs.append(inp[-1])
        if c0 is not None:
            cs.append(torch.cat([_floats(state[2]), _floats(state[3])], 1))
    return inp, hs, cs, drains


# ----------------------------------------------------------------------------------- the comparison
def _case(cls: type, layers: int, k: int | None, seed: int = 0, T: int = 24, B: int = 3, H: int = 8):
    """The project's run and what the reference needs: (outputs, h_n, c_n or None, params, x, h0, c0)."""
    torch.manual_seed(seed)
    rnn = cls(4, H, num_layers=layers, max_forget_bits=k).eval()
    x = torch.randn(T, B, 4)
    h0 = torch.randn(layers, B, H) * 0.5
    c0 = torch.randn(layers, B, H) * 0.5 if cls is RevLSTM else None
    with torch.no_grad():
        out, h_n = rnn(x, h0 if c0 is None else (h0, c0))
    h_n, c_n = (h_n, None) if c0 is None else h_n
    params = [{name: p.detach().cpu().double() for name, p in cell.named_parameters()} for cell in rnn.cells]
    x64, h64 = x.cpu().double(), [h.cpu().double() for h in h0]
    c64 = None if c0 is None else [c.cpu().double() for c in c0]
    return out.cpu().double(), h_n.cpu().double(), None if c_n is None else c_n.cpu().double(), params, x64, h64, c64


def _max_difference(cls: type, case, k: int | None, mutation: str | None = None) -> tuple[float, int]:
    out, h_n, c_n, params, x, h0, c0 = case
    kind = "gru" if cls is RevGRU else "lstm"
    ref_out, ref_h, ref_c, drains = reference_run(kind, params, x, h0, c0, k, mutation)
    diffs = [(ref_out - out).abs().max()] + [(r - h).abs().max() for r, h in zip(ref_h, h_n)]
    if c_n is not None:
        diffs += [(r - c).abs().max() for r, c in zip(ref_c, c_n)]
    return float(max(diffs)), drains


CELLS = [pytest.param(RevGRU, id="RevGRU"), pytest.param(RevLSTM, id="RevLSTM")]
KS = [pytest.param(k, id=f"k{k}") for k in (1, 2, 3, 5, None)]


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("cls", CELLS)
def test_cells_follow_the_float64_reference(cls: type, k: int | None, layers: int) -> None:
    case = _case(cls, layers, k)
    diff, drains = _max_difference(cls, case, k)
    assert diff <= ATOL, f"{cls.__name__} k={k} layers={layers}: max difference {diff:.3g} > {ATOL:.3g}"
    if k is None:  # up to 10 bits per multiplication: the 48-96 multiplications per layer must drain
        assert drains > 0


def test_the_reference_drains_and_matches_over_a_long_window() -> None:
    """Many drains (T 120, no limit): the per-unit drain rule is what the project does."""
    case = _case(RevLSTM, 1, None, seed=3, T=120, B=4)
    diff, drains = _max_difference(RevLSTM, case, None)
    assert drains >= 20 and diff <= ATOL, (drains, diff)


MUTATIONS = [
    pytest.param(cls, k, m, id=f"{cls.__name__}-k{k}-{m}")
    for cls in (RevGRU, RevLSTM)
    for k, m in [
        (3, "swap_zr"),
        (None, "swap_zr"),
        (3, "old_h1"),
        (None, "old_h1"),
        (1, "no_forget_limit"),
        (3, "no_forget_limit"),
        (5, "no_forget_limit"),
    ]
]


@pytest.mark.parametrize(("cls", "k", "mutation"), MUTATIONS)
def test_a_misread_spec_fails_the_comparison(cls: type, k: int | None, mutation: str) -> None:
    """z and r swapped (f and i for the LSTM), group 2 reading the old h1, or the forget limit dropped:
    each must move the reference well beyond the tolerance, so the comparison above would catch it."""
    case = _case(cls, 1, k)
    assert _max_difference(cls, case, k)[0] <= ATOL
    diff, _ = _max_difference(cls, case, k, mutation)
    assert diff > 4 * ATOL, f"mutation {mutation} stayed within {diff:.3g}: the comparison has no teeth"
    assert math.isfinite(diff)
