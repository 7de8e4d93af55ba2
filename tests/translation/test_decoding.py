"""Greedy and beam search (lightning_revrnn.translation.decoding) on small table models whose every output can be scored
exactly: beam 1 equals greedy, batch independence, the exact best output when the beam holds every
hypothesis, the length penalty, the state reordering, max_len and argument errors."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
from torch import Tensor

from lightning_revrnn.translation.decoding import beam_search, greedy_search

EOS = 3


class TableModel:
    """A decoder whose next-token log-probabilities are a fixed table row chosen by the whole prefix.

    The state is a code per row: ``code' = (code * (V + 2) + token + 1) % rows``, so, without wrap-around,
    every (start code, prefix) pair has its own row; the start code differs per sentence. ``table`` holds
    log-probabilities ``(rows, V)``.
    """

    def __init__(self, table: Tensor) -> None:
        self.table = table
        self.base = table.shape[1] + 2
        self.calls: list[int] = []  # rows per step call

    def step(self, tokens: Tensor, code: Tensor) -> tuple[Tensor, Tensor]:
        self.calls.append(tokens.shape[0])
        code = (code * self.base + tokens + 1) % self.table.shape[0]
        return self.table[code], code

    def score(self, start: int, bos: int, output: list[int], max_len: int, alpha: float = 0.0) -> float:
        """The judged score of ``output`` (with EOS unless it has ``max_len`` tokens), replayed one row at a
        time in float64."""
        ids = output if len(output) == max_len else [*output, EOS]
        code, token, total = torch.tensor([start]), torch.tensor([bos]), 0.0
        for nxt in ids:
            log_probs, code = self.step(token, code)
            total += float(log_probs[0, nxt].double())
            token = torch.tensor([nxt])
        return total / len(ids) ** alpha


def reorder(state: Tensor, index: Tensor) -> Tensor:
    return state.index_select(0, index)


def random_table(rows: int, vocab: int, seed: int, dtype: torch.dtype = torch.float32, ties: bool = False) -> Tensor:
    """Random next-token log-probabilities; with ``ties`` the logits are small integers, so equal
    log-probabilities (exact ties) are common."""
    g = torch.Generator().manual_seed(seed)  # drawn on the CPU, so the same table on any test device
    logits = (
        torch.randint(0, 3, (rows, vocab), generator=g, device="cpu").to(dtype)
        if ties
        else torch.randn(rows, vocab, generator=g, dtype=dtype, device="cpu") * 2
    )
    return torch.log_softmax(logits, dim=-1).to(torch.get_default_device())


def starts(batch: int) -> Tensor:
    return torch.arange(batch, dtype=torch.long) * 7 + 1


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_one_equals_greedy(ties: bool, length_penalty: float) -> None:
    bos, batch, max_len = 2, 24, 15
    for seed in range(3):
        model = TableModel(random_table(997, 8, seed, ties=ties))
        greedy = greedy_search(model.step, starts(batch), reorder, batch, bos, EOS, max_len=max_len)
        beam = beam_search(
            model.step, starts(batch), reorder, batch, bos, EOS, beam=1, max_len=max_len, length_penalty=length_penalty
        )
        assert beam == greedy
        lengths = {len(out) for out in greedy}
        assert len(lengths) > 2 and max(lengths) <= max_len  # sentences end at different steps
        assert all(EOS not in out for out in greedy)


@pytest.mark.parametrize("length_penalty", [0.0, 0.8])
def test_sentence_decodes_the_same_alone_and_in_a_batch(length_penalty: float) -> None:
    bos, batch, max_len = 2, 9, 12
    model = TableModel(random_table(991, 10, seed=5))
    together = beam_search(
        model.step, starts(batch), reorder, batch, bos, EOS, beam=4, max_len=max_len, length_penalty=length_penalty
    )
    alone = [
        beam_search(
            model.step,
            starts(batch)[b : b + 1],
            reorder,
            1,
            bos,
            EOS,
            beam=4,
            max_len=max_len,
            length_penalty=length_penalty,
        )[0]
        for b in range(batch)
    ]
    assert together == alone
    greedy_together = greedy_search(model.step, starts(batch), reorder, batch, bos, EOS, max_len=max_len)
    greedy_alone = [
        greedy_search(model.step, starts(batch)[b : b + 1], reorder, 1, bos, EOS, max_len)[0] for b in range(batch)
    ]
    assert greedy_together == greedy_alone
    assert together != greedy_together  # the beam did search


def all_outputs(words: list[int], max_len: int) -> list[list[int]]:
    """Every output of at most ``max_len`` decoding steps: ``L < max_len`` words then EOS, or ``max_len``
    words."""
    return [list(seq) for n in range(max_len + 1) for seq in itertools.product(words, repeat=n)]


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_full_beam_finds_the_best_output_of_an_enumerable_model(length_penalty: float) -> None:
    """Vocabulary 3 words + EOS, max_len 3: 40 outputs; a beam of 40 prunes nothing, so beam search must
    return the best-scoring one (brute force over all of them)."""
    bos, max_len, batch = 4, 3, 5  # BOS is an input-only id
    outputs = all_outputs([0, 1, 2], max_len)
    assert len(outputs) == 40
    for seed in range(4):
        model = TableModel(random_table(6 * 6**3 * 8, 4, seed, dtype=torch.float64))  # no wrap-around
        found = beam_search(
            model.step,
            starts(batch),
            reorder,
            batch,
            bos,
            EOS,
            beam=len(outputs),
            max_len=max_len,
            length_penalty=length_penalty,
        )
        for b in range(batch):
            scores = [model.score(int(starts(batch)[b]), bos, out, max_len, length_penalty) for out in outputs]
            best = outputs[max(range(len(outputs)), key=scores.__getitem__)]
            assert found[b] == best, (seed, b)


def prefix_table(probs: dict[tuple[int, ...], list[float]], vocab: int, max_len: int, start: int) -> Tensor:
    """A :class:`TableModel` table with given next-token probabilities after given prefixes (uniform
    elsewhere), for the start code ``start`` and BOS 4 (prefix ``()`` is BOS alone)."""
    rows = start * 6 ** (max_len + 1) * 2
    table = torch.full((rows, vocab), 1.0 / vocab, dtype=torch.float64)
    for prefix, p in probs.items():
        code = start
        for token in (4, *prefix):
            code = code * (vocab + 2) + token + 1
        table[code] = torch.tensor(p, dtype=torch.float64)
    return table.log()


def test_length_penalty_prefers_the_longer_hypothesis() -> None:
    """EOS first scores log 0.4 = -0.92 (length 1); word 0 then EOS scores log 0.58 + log 0.55 = -1.14 but
    -0.57 per token: raw sums pick the empty output, score / len picks [0]."""
    start, bos, max_len = 1, 4, 3
    table = prefix_table({(): [0.58, 0.01, 0.01, 0.40], (0,): [0.15, 0.15, 0.15, 0.55]}, 4, max_len, start)
    model = TableModel(table)
    state = torch.tensor([start])
    assert beam_search(model.step, state, reorder, 1, bos, EOS, beam=2, max_len=max_len) == [[]]
    assert beam_search(model.step, state, reorder, 1, bos, EOS, beam=2, max_len=max_len, length_penalty=1.0) == [[0]]
    assert model.score(start, bos, [], max_len) > model.score(start, bos, [0], max_len)
    assert model.score(start, bos, [], max_len, 1.0) < model.score(start, bos, [0], max_len, 1.0)


class TrackedModel:
    """A decoder whose state is a tuple (history ``(N, 1 + max_len)`` int64: a per-sentence seed then the
    tokens fed so far, -1 after them; steps taken ``(N,)`` float64): each step appends its input token to
    its row's history and reads log-probabilities from a table row chosen by a hash of that history.
    Records every call's histories and every reorder index."""

    def __init__(self, table: Tensor) -> None:
        self.table = table
        self.histories: list[Tensor] = []
        self.indexes: list[Tensor] = []

    def step(self, tokens: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        history, taken = state
        t = len(self.histories)
        assert torch.equal(taken, torch.full_like(taken, float(t)))  # the float64 part was carried along
        history = history.clone()
        history[:, t + 1] = tokens
        self.histories.append(history)
        weights = torch.arange(1, history.shape[1] + 1) ** 3
        code = ((history + 2) * weights).sum(dim=1) % self.table.shape[0]
        return self.table[code], (history, taken + 1)

    def reorder(self, state: tuple[Tensor, Tensor], index: Tensor) -> tuple[Tensor, Tensor]:
        self.indexes.append(index)
        return tuple(s.index_select(0, index) for s in state)  # type: ignore[return-value]


def test_reorder_carries_each_hypothesis_state() -> None:
    bos, batch, beam, max_len = 2, 4, 3, 10
    model = TrackedModel(random_table(1009, 7, seed=11))
    history = torch.full((batch, 1 + max_len), -1, dtype=torch.long)
    history[:, 0] = torch.arange(batch) + 10  # the seed: sentences differ
    state = (history, torch.zeros(batch, dtype=torch.float64))
    found = beam_search(model.step, state, model.reorder, batch, bos, EOS, beam=beam, max_len=max_len)

    assert [h.shape[0] for h in model.histories] == [batch] + [batch * beam] * (len(model.histories) - 1)
    assert torch.equal(model.indexes[0], torch.arange(batch).repeat_interleave(beam))
    for index in model.indexes[1:]:  # rows stay within their sentence
        assert torch.equal(index // beam, torch.arange(batch).repeat_interleave(beam))
    assert len(model.indexes) == len(model.histories) - 1
    finished = [b for b in range(batch) if len(found[b]) < max_len]
    assert finished
    for b in finished:  # EOS was scored on the state whose history is exactly this hypothesis
        history_at_eos = model.histories[len(found[b])][b * beam : (b + 1) * beam, : len(found[b]) + 2]
        expected = torch.tensor([b + 10, bos, *found[b]])
        assert any(torch.equal(row, expected) for row in history_at_eos), b


def test_max_len_cuts_hypotheses_that_never_emit_eos() -> None:
    bos, batch, max_len = 2, 3, 5
    table = random_table(499, 6, seed=2)
    table[:, EOS] = -math.inf
    for search in ("greedy", "beam"):
        model = TableModel(table)
        if search == "greedy":
            found = greedy_search(model.step, starts(batch), reorder, batch, bos, EOS, max_len=max_len)
        else:
            found = beam_search(model.step, starts(batch), reorder, batch, bos, EOS, beam=3, max_len=max_len)
        assert [len(out) for out in found] == [max_len] * batch
        assert len(model.calls) == max_len


def test_beam_search_stops_once_every_sentence_is_decided() -> None:
    """EOS almost surely first: the finished empty output beats every live hypothesis after one step."""
    bos, batch = 2, 3
    table = torch.full((499, 6), math.log(0.01 / 5))
    table[:, EOS] = math.log(0.99)
    model = TableModel(table)
    assert beam_search(model.step, starts(batch), reorder, batch, bos, EOS, beam=4) == [[]] * batch
    assert model.calls == [batch]


def test_bad_arguments_name_the_fix() -> None:
    model = TableModel(random_table(97, 5, seed=0))
    with pytest.raises(ValueError, match="beam width"):
        beam_search(model.step, starts(2), reorder, 2, 2, EOS, beam=0)
    with pytest.raises(ValueError, match="max_len >= 1"):
        greedy_search(model.step, starts(2), reorder, 2, 2, EOS, max_len=0)
    with pytest.raises(ValueError, match="alpha"):
        beam_search(model.step, starts(2), reorder, 2, 2, EOS, length_penalty=-1.0)
    with pytest.raises(ValueError, match=r"expected \(2, V\)"):
        greedy_search(lambda tokens, s: (torch.zeros(3, 5), s), starts(2), reorder, 2, 2, EOS)
    assert beam_search(model.step, starts(0), reorder, 0, 2, EOS) == []


@dataclasses.dataclass(frozen=True)
class PairState:
    """A frozen dataclass state (an LSTM's (h, c) might be one): the searches may reach it only through
    step and reorder (rebuilding it, e.g. with apply_to_collection, fails on a frozen dataclass)."""

    code: Tensor
    exact: Tensor


def test_structured_states_go_through_reorder_only() -> None:
    bos, batch, max_len = 2, 5, 8
    model = TableModel(random_table(503, 6, seed=3))

    def step(tokens: Tensor, state: PairState) -> tuple[Tensor, PairState]:
        log_probs, code = model.step(tokens, state.code)
        return log_probs, PairState(code, state.exact + 1)

    def reorder_pair(state: PairState, index: Tensor) -> PairState:
        return PairState(state.code.index_select(0, index), state.exact.index_select(0, index))

    state = PairState(starts(batch), torch.zeros(batch, 2, dtype=torch.float64))
    plain = beam_search(model.step, starts(batch), reorder, batch, bos, EOS, beam=3, max_len=max_len)
    assert beam_search(step, state, reorder_pair, batch, bos, EOS, beam=3, max_len=max_len) == plain
    plain = greedy_search(model.step, starts(batch), reorder, batch, bos, EOS, max_len=max_len)
    assert greedy_search(step, state, reorder_pair, batch, bos, EOS, max_len=max_len) == plain
