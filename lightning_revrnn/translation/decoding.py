"""Greedy and beam search over any step-wise decoder, batched over sentences (spec sections 5-6: the paper
decodes with beam 5).

The searches see a model only through two callables, so any decoder state works (a tensor, tuples of
tensors, float64 exact reversible states, a NamedTuple or dataclass of them):

- ``step(tokens, state) -> (log_probs, state)``: ``tokens`` is ``(N,)`` int64 (the previous token of every
  row), ``log_probs`` is ``(N, V)`` log-probabilities of the next token (a ``log_softmax``);
- ``reorder(state, index) -> state``: the state with its rows ``index_select``-ed by ``index`` ``(M,)``.

``reorder`` is the only way the searches touch the state. Rows never move between sentences: the state of
row ``b * beam + k`` is always drawn from rows ``b * beam .. b * beam + beam - 1`` (and at the expansion
after the first step from row ``b``), so per-sentence constants expanded the same way (e.g. the encoder
memory, ``repeat_interleave(beam, dim=batch)``) may stay outside the state.

Length conventions (both searches): at most ``max_len`` decoding steps, one token per step. A hypothesis
ends when it emits EOS (its score includes EOS's log-probability and its length counts EOS) or when it
reaches ``max_len`` tokens without EOS (cut there, scored as it stands, length ``max_len``). Returned
token ids leave out the BOS fed first and the EOS that ended the hypothesis, so they hold at most ``max_len``
ids; a model that must never emit BOS or PAD gives them log-probability ``-inf`` in ``step``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
from torch import Tensor

S = TypeVar("S")
#: ``(tokens (N,) int64, state) -> (log_probs (N, V) float, new state)``
StepFn = Callable[[Tensor, S], tuple[Tensor, S]]
#: ``(state, row index (M,) int64) -> state with its rows index_selected``
ReorderFn = Callable[[S, Tensor], S]


def first_tensor(state: Any) -> Tensor | None:
    """The first tensor inside ``state`` (a tensor, or tuples, lists, dicts and dataclasses of them, nested),
    read without rebuilding the state; ``None`` if it holds none."""
    if isinstance(state, Tensor):
        return state
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        state = [getattr(state, field.name) for field in dataclasses.fields(state)]
    elif isinstance(state, Mapping):
        state = list(state.values())
    if isinstance(state, (tuple, list)):
        for item in state:
            if (found := first_tensor(item)) is not None:
                return found
    return None


def state_device(state: Any) -> torch.device:
    """The device the searches create their BOS tokens on: that of the first tensor in ``state`` (the CPU
    if it holds none)."""
    tensor = first_tensor(state)
    return torch.device("cpu") if tensor is None else tensor.device


def score_dtype(device: torch.device) -> torch.dtype:
    """Beam scores are summed in float64 (float32 and bfloat16 log-probabilities are exact in it, and long
    sums lose less); float32 on MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def check_search_args(batch: int, max_len: int, beam: int = 1, length_penalty: float = 0.0) -> None:
    """Reject arguments the searches cannot honour, naming the fix."""
    if batch < 0:
        raise ValueError(f"batch={batch}: the number of sentences (rows of the initial state) must be >= 0.")
    if max_len < 1:
        raise ValueError(f"max_len={max_len}: the searches need at least one decoding step; pass max_len >= 1.")
    if beam < 1:
        raise ValueError(f"beam={beam}: the beam width must be >= 1 (beam=1 is greedy search).")
    if not length_penalty >= 0.0 or math.isinf(length_penalty):
        raise ValueError(
            f"length_penalty={length_penalty}: the exponent alpha of score / len**alpha must be finite and >= 0 "
            "(0 = raw log-probability sum)."
        )


def check_log_probs(log_probs: Tensor, rows: int) -> None:
    """The step function must return ``(rows, V)`` scores; say what came back otherwise."""
    if log_probs.dim() != 2 or log_probs.shape[0] != rows:
        raise ValueError(
            f"step returned log_probs of shape {tuple(log_probs.shape)}, expected ({rows}, V): one row of "
            "next-token log-probabilities per input token."
        )


def greedy_search(
    step: StepFn[S], state: S, reorder: ReorderFn[S], batch: int, bos: int, eos: int, max_len: int = 100
) -> list[list[int]]:
    """Greedy decoding of ``batch`` sentences at once: each step takes every sentence's most likely token
    (the first one on ties, as ``argmax``).

    ``state`` holds ``batch`` rows, row ``b`` for sentence ``b``; rows never move, so ``reorder`` is not
    called (it is taken for symmetry with :func:`beam_search`). Finished sentences keep being fed EOS
    until all are finished (one host read per step checks that) or ``max_len`` steps have run.

    Returns, per sentence, the generated token ids without BOS and EOS.
    """
    del reorder  # rows never move in greedy search
    check_search_args(batch, max_len)
    if batch == 0:
        return []
    device = state_device(state)
    tokens = torch.full((batch,), bos, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    generated: list[Tensor] = []
    for _ in range(max_len):
        log_probs, state = step(tokens, state)
        check_log_probs(log_probs, batch)
        tokens = log_probs.argmax(dim=-1).masked_fill(finished, eos)
        generated.append(tokens)
        finished = finished | (tokens == eos)
        if bool(finished.all()):
            break
    return [cut_at_eos(row, eos) for row in torch.stack(generated, dim=1).tolist()]


def cut_at_eos(ids: list[int], eos: int) -> list[int]:
    """The ids before the first EOS (all of them if there is none)."""
    return ids[: ids.index(eos)] if eos in ids else ids


def beam_search(
    step: StepFn[S],
    state: S,
    reorder: ReorderFn[S],
    batch: int,
    bos: int,
    eos: int,
    beam: int = 5,
    max_len: int = 100,
    length_penalty: float = 0.0,
) -> list[list[int]]:
    """Beam search over ``batch`` sentences at once; returns per sentence the best hypothesis's token ids
    without BOS and EOS.

    Scores are summed log-probabilities; a hypothesis is judged by ``score / len**length_penalty`` (``len``
    counts generated tokens including EOS; 0 = the raw sum, the paper's setting).

    The first step runs on the ``batch`` BOS rows of ``state``; each sentence keeps its ``beam`` best
    distinct continuations (fewer if the vocabulary is smaller) and the state is expanded with
    ``reorder(state, repeat_interleave(arange(batch), beam))`` to ``batch * beam`` rows (row
    ``b * beam + k``). Every later step advances all sentences' beams in one ``step`` call and keeps, per
    sentence, the ``beam`` best of its ``beam * V`` continuations. A kept continuation that is EOS becomes a
    finished hypothesis (its score includes EOS's log-probability) and frees its slot; only the best finished
    hypothesis of each sentence is kept. At ``max_len`` the live hypotheses end without EOS.

    Stopping rule, per sentence: it stops (its best finished hypothesis is final, its slots go dead) once no
    live hypothesis can beat that hypothesis. With ``length_penalty == 0`` this is exact: log-probabilities
    are <= 0, so a live score can only fall, and the sentence stops when its best finished score is at least
    its best live score. With ``length_penalty > 0`` a live hypothesis's judged score can still rise as it
    grows; the exact bound (its score over ``max_len**length_penalty``) is used, and, as fairseq does, a
    sentence also stops once ``beam`` of its hypotheses have finished (otherwise nearly every sentence would
    run to ``max_len``). The whole search stops when every sentence has stopped (one host read per step) or
    after ``max_len`` steps. A stopped sentence's result never changes, so a sentence decodes the same alone
    as in a batch.

    ``beam=1`` equals :func:`greedy_search` exactly: one slot, its best continuation (the first on ties),
    and a sentence stops as soon as that slot emits EOS.
    """
    check_search_args(batch, max_len, beam, length_penalty)
    if batch == 0:
        return []
    device = state_device(state)
    search = BeamState(batch, beam, max_len, length_penalty, eos, device)
    tokens = torch.full((batch,), bos, dtype=torch.long, device=device)
    rows = torch.arange(batch, device=device)
    for t in range(max_len):
        if t > 0:  # the first step runs on the BOS rows as given; no reorder after the last step
            state = reorder(state, rows)
        log_probs, state = step(tokens, state)
        check_log_probs(log_probs, batch if t == 0 else batch * beam)
        rows, tokens = search.advance(log_probs, t)
        if bool(search.stopped.all()):
            break
    else:
        search.end_live_at_max_len()
    return search.best_hypotheses()


class BeamState:
    """The bookkeeping of :func:`beam_search`, all in tensors on the model's device.

    Holds per sentence ``b`` and slot ``k``: ``scores[b, k]`` the live hypothesis's summed log-probability
    (``-inf`` for a dead slot), ``history[b, k]`` its tokens so far; per sentence: the best finished
    hypothesis (``best_score`` as judged with the length penalty, ``best_tokens[:best_len]``), how many
    hypotheses have finished (``n_finished``) and whether the sentence has stopped (``stopped``).
    """

    def __init__(
        self, batch: int, beam: int, max_len: int, length_penalty: float, eos: int, device: torch.device
    ) -> None:
        self.batch, self.beam, self.max_len, self.alpha, self.eos = batch, beam, max_len, length_penalty, eos
        dtype = score_dtype(device)
        self.scores = torch.zeros(batch, 1, dtype=dtype, device=device)  # one BOS row per sentence
        self.history = torch.zeros(batch, 1, 0, dtype=torch.long, device=device)
        self.best_score = torch.full((batch,), -math.inf, dtype=dtype, device=device)
        self.best_tokens = torch.zeros(batch, max_len, dtype=torch.long, device=device)
        self.best_len = torch.zeros(batch, dtype=torch.long, device=device)
        self.n_finished = torch.zeros(batch, dtype=torch.long, device=device)
        self.stopped = torch.zeros(batch, dtype=torch.bool, device=device)
        self.sentence = torch.arange(batch, device=device)

    def judged(self, scores: Tensor, length: int) -> Tensor:
        """Scores of hypotheses of ``length`` generated tokens as compared: ``score / length**alpha``."""
        return scores if self.alpha == 0.0 else scores / float(length) ** self.alpha

    def advance(self, log_probs: Tensor, t: int) -> tuple[Tensor, Tensor]:
        """Extend every live hypothesis by the step-``t`` log-probabilities (``(batch * slots, V)``), keep each
        sentence's ``beam`` best continuations, record those that are EOS as finished and update which
        sentences have stopped. Returns the state rows each new slot continues (``(batch * beam,)``, for
        ``reorder``) and the tokens to feed next (``(batch * beam,)``, EOS in dead slots)."""
        slots = self.scores.shape[1]
        # A sentence's best `beam` continuations are among each slot's best `beam` tokens (a slot adds the
        # same score to all of its tokens), so only batch * slots * k candidates are summed and ranked.
        k = min(self.beam, log_probs.shape[1])
        slot_log_probs, slot_tokens = best_k(log_probs, k)  # (batch * slots, k)
        live = self.scores.unsqueeze(-1) > -math.inf
        extended = self.scores.unsqueeze(-1) + slot_log_probs.view(self.batch, slots, k).to(self.scores.dtype)
        candidates = extended.masked_fill(~live, -math.inf).view(self.batch, slots * k)
        top_scores, top_index = best_k(candidates, min(self.beam, slots * k))
        top_scores, top_index = pad_slots(top_scores, top_index, self.beam)
        origin, tokens = top_index // k, slot_tokens.view(self.batch, slots * k).gather(1, top_index)
        self.history = torch.cat([self.history[self.sentence[:, None], origin], tokens.unsqueeze(-1)], dim=-1)
        is_eos = (tokens == self.eos) & (top_scores > -math.inf) & ~self.stopped[:, None]
        self.record_finished(top_scores, is_eos, t)
        self.scores = top_scores.masked_fill(is_eos, -math.inf)
        self.update_stopped()
        self.scores = self.scores.masked_fill(self.stopped[:, None], -math.inf)
        rows = (self.sentence[:, None] * slots + origin).flatten()
        return rows, tokens.masked_fill(self.scores == -math.inf, self.eos).flatten()  # dead slots are fed EOS

    def record_finished(self, scores: Tensor, finished: Tensor, t: int) -> None:
        """Take each sentence's best hypothesis among ``finished`` (``(batch, beam)``; hypotheses of
        ``t + 1`` tokens, the last of them EOS) as its best if it beats the best so far (earlier ones win
        ties)."""
        judged = self.judged(scores, t + 1).masked_fill(~finished, -math.inf)
        step_best, step_slot = judged.max(dim=-1)
        better = step_best > self.best_score
        self.best_score = torch.where(better, step_best, self.best_score)
        words = self.history[self.sentence, step_slot, :t]  # without the EOS
        self.best_tokens[:, :t] = torch.where(better[:, None], words, self.best_tokens[:, :t])
        self.best_len = torch.where(better, t, self.best_len)
        self.n_finished = self.n_finished + finished.sum(dim=-1)

    def update_stopped(self) -> None:
        """Stop the sentences whose best finished hypothesis no live one can beat (see
        :func:`beam_search`)."""
        best_live = self.scores.max(dim=-1).values
        reachable = best_live if self.alpha == 0.0 else self.judged(best_live, self.max_len)
        done = (self.best_score >= reachable) | (best_live == -math.inf)
        if self.alpha > 0.0:
            done = done | (self.n_finished >= self.beam)
        self.stopped = self.stopped | done

    def end_live_at_max_len(self) -> None:
        """After ``max_len`` steps the live hypotheses end without EOS: judge them with length
        ``max_len``."""
        judged = self.judged(self.scores, self.max_len)
        step_best, step_slot = judged.max(dim=-1)
        better = step_best > self.best_score
        self.best_score = torch.where(better, step_best, self.best_score)
        words = self.history[self.sentence, step_slot]
        self.best_tokens = torch.where(better[:, None], words, self.best_tokens)
        self.best_len = torch.where(better, self.max_len, self.best_len)

    def best_hypotheses(self) -> list[list[int]]:
        """Each sentence's best hypothesis as token ids (an empty list if it has none, e.g. all scores
        were ``-inf``)."""
        lengths = self.best_len.tolist()
        return [ids[:n] for ids, n in zip(self.best_tokens.tolist(), lengths)]


def best_k(candidates: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` best entries of each row, best first. ``k == 1`` uses ``max`` (the first index on ties, as
    greedy's ``argmax``), so beam 1 picks greedy's token even among exactly tied log-probabilities."""
    if k == 1:
        values, index = candidates.max(dim=-1, keepdim=True)
        return values, index
    values, index = candidates.topk(k, dim=-1)
    return values, index


def pad_slots(scores: Tensor, index: Tensor, beam: int) -> tuple[Tensor, Tensor]:
    """Fill a sentence's slots up to ``beam`` with dead ones (score ``-inf``, continuing candidate 0) when
    fewer candidates than ``beam`` exist (a first step with ``V < beam``)."""
    missing = beam - scores.shape[1]
    if missing == 0:
        return scores, index
    return (
        torch.cat([scores, scores.new_full((scores.shape[0], missing), -math.inf)], dim=1),
        torch.cat([index, index.new_zeros(index.shape[0], missing)], dim=1),
    )
