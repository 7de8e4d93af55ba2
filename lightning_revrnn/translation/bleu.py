"""BLEU as the paper computed it and as sacreBLEU reports it (spec section 6).

The paper scored its NMT models with Moses' ``multi-bleu.perl`` on the lower-cased, Moses-tokenised
references. :func:`multi_bleu` is that script's formula; :class:`TokenizedBLEU` is the same number as a
torchmetrics ``Metric`` (sacreBLEU with ``tokenize="none"``, lower-cased, no smoothing, which is
multi-bleu's formula on whitespace tokens). :class:`DetokenizedBLEU` is the sacreBLEU figure one reports
today: the 13a tokeniser on Moses-detokenised hypotheses and references.

The two metrics hold BLEU's sufficient statistics (clipped n-gram matches and n-gram totals for n = 1..4,
hypothesis and reference lengths) as int64 states summed over updates and, under DDP, over ranks, so
``compute()`` is the corpus BLEU of every sentence seen on every rank, never an average of per-batch or
per-rank scores. Statistics and score come from sacreBLEU itself (its tokenisers, n-gram clipping and
``BLEU.compute_bleu``), so they equal ``sacrebleu.corpus_bleu`` with the same settings.

Why not torchmetrics' ``SacreBLEUScore``: its statistics agree with sacreBLEU's (checked on Multi30K
test2016) and are summed under DDP, but it scores on a 0..1 scale from float32 states in float32
arithmetic (about 5e-6 BLEU points off sacreBLEU), has no sacreBLEU ``exp`` smoothing (sacreBLEU's
default) and re-implements the tokenisers; taking statistics and formula from sacreBLEU avoids all four.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from functools import cache
from typing import Any

import torch
from sacrebleu.metrics import BLEU
from sacremoses import MosesDetokenizer
from torch import Tensor
from torchmetrics import Metric
from typing_extensions import override

#: BLEU's n-gram orders 1..MAX_ORDER.
MAX_ORDER = 4


def check_corpus(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    """One reference per hypothesis, both given as sequences of sentences (not one string)."""
    if isinstance(hypotheses, str) or isinstance(references, str):
        raise ValueError("BLEU takes sequences of sentences; wrap a single sentence in a list: [sentence].")
    if len(hypotheses) != len(references):
        raise ValueError(
            f"got {len(hypotheses)} hypotheses and {len(references)} references: pass exactly one reference "
            "sentence per hypothesis, in the same order."
        )


def ngram_counts(tokens: Sequence[str]) -> Counter[tuple[str, ...]]:
    """How often each n-gram of ``tokens`` occurs, for n = 1..MAX_ORDER."""
    return Counter(tuple(tokens[i : i + n]) for n in range(1, MAX_ORDER + 1) for i in range(len(tokens) - n + 1))


def multi_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (0..100) by the formula of Moses' ``multi-bleu.perl`` on whitespace tokens, one reference
    per hypothesis, case-sensitive (the script without ``-lc``; the paper's text is lower-cased already).

    Per order n = 1..4: the corpus sum of each hypothesis's n-gram counts clipped to the reference's, over
    the corpus sum of hypothesis n-grams; BLEU = 100 * BP * exp(mean of the four log precisions), with
    BP = exp(1 - r / c) when the hypotheses' length c is below the references' length r, else 1. A zero
    match count at any order gives 0 (the script's log of 0 is -9999999999), as do empty hypotheses or
    references (where the script divides by zero or stops). Unlike the script's printout, not rounded to
    two decimals.

    Example::

        >>> round(multi_bleu(["the cat sat on a mat"], ["the cat sat on the mat"]), 2)  # (5/6·3/5·2/4·1/3)^¼
        53.73
        >>> multi_bleu(["a cat"], ["the cat sat"])  # no 4-gram at all: 0, as the script
        0.0
    """
    check_corpus(hypotheses, references)
    matches, totals = [0] * MAX_ORDER, [0] * MAX_ORDER
    hyp_len = ref_len = 0
    for hypothesis, reference in zip(hypotheses, references):
        hyp_tokens, ref_tokens = hypothesis.split(), reference.split()
        hyp_len, ref_len = hyp_len + len(hyp_tokens), ref_len + len(ref_tokens)
        ref_ngrams = ngram_counts(ref_tokens)
        for ngram, count in ngram_counts(hyp_tokens).items():
            totals[len(ngram) - 1] += count
            matches[len(ngram) - 1] += min(count, ref_ngrams[ngram])
    if hyp_len == 0 or ref_len == 0 or min(matches) == 0:
        return 0.0
    brevity_penalty = math.exp(1.0 - ref_len / hyp_len) if hyp_len < ref_len else 1.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / MAX_ORDER
    return 100.0 * brevity_penalty * math.exp(log_precision)


@cache
def moses_detokenizer(lang: str) -> MosesDetokenizer:
    """One (stateless) Moses detokeniser per language, built once."""
    return MosesDetokenizer(lang=lang)


def detokenize(sentence: str, lang: str) -> str:
    """A Moses-tokenised, space-joined sentence as plain text (sacremoses' Moses detokeniser for ``lang``,
    e.g. ``"de"``): punctuation re-attached and Moses' escapes (``&quot;``, ``&apos;``, ...) undone.

    Example::

        >>> detokenize("er sagte &quot; hallo &quot; .", "de")
        'er sagte "hallo".'
    """
    text: str = moses_detokenizer(lang).detokenize(sentence.split())
    return text


class CorpusBLEU(Metric):
    """Corpus BLEU (0..100) from sacreBLEU's sufficient statistics, summed over ``update`` calls and DDP
    ranks (``dist_reduce_fx="sum"``).

    States: ``matches`` and ``totals`` (``(4,)`` int64: clipped and total n-gram counts for n = 1..4),
    ``hyp_len`` and ``ref_len`` (int64 scalars: the hypotheses' length and the reference lengths).
    ``compute()`` returns a scalar float64 tensor (float32 on MPS), BLEU by ``sacrebleu``'s formula with
    ``smooth_method``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 100.0
    matches: Tensor
    totals: Tensor
    hyp_len: Tensor
    ref_len: Tensor

    def __init__(self, tokenize: str, lowercase: bool, smooth_method: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if smooth_method not in BLEU.SMOOTH_DEFAULTS:
            raise ValueError(f"smooth_method={smooth_method!r}: choose one of {sorted(BLEU.SMOOTH_DEFAULTS)}.")
        self.smooth_method = smooth_method
        # Counts only: no smoothing here (sacreBLEU's add-k would change the counts it returns).
        self.counter = BLEU(tokenize=tokenize, lowercase=lowercase, smooth_method="none", force=True)
        self.add_state("matches", torch.zeros(MAX_ORDER, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("totals", torch.zeros(MAX_ORDER, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("hyp_len", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("ref_len", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def prepare(self, sentences: Sequence[str]) -> list[str]:
        """The sentences as the tokeniser should see them (as given here)."""
        return list(sentences)

    @override
    def update(self, hypotheses: Sequence[str], references: Sequence[str]) -> None:
        """Add the statistics of ``hypotheses`` against ``references`` (one reference each)."""
        check_corpus(hypotheses, references)
        if len(hypotheses) == 0:
            return
        stats = self.counter.corpus_score(self.prepare(hypotheses), [self.prepare(references)])
        device = self.matches.device
        self.matches += torch.tensor(stats.counts, dtype=torch.long, device=device)
        self.totals += torch.tensor(stats.totals, dtype=torch.long, device=device)
        self.hyp_len += stats.sys_len
        self.ref_len += stats.ref_len

    @override
    def compute(self) -> Tensor:
        """The corpus BLEU of everything seen (on every rank), 0..100."""
        score = BLEU.compute_bleu(
            self.matches.tolist(),
            self.totals.tolist(),
            int(self.hyp_len),
            int(self.ref_len),
            smooth_method=self.smooth_method,
        ).score
        device = self.matches.device
        return torch.tensor(score, dtype=torch.float32 if device.type == "mps" else torch.float64, device=device)


class TokenizedBLEU(CorpusBLEU):
    """The paper's BLEU: ``multi-bleu.perl`` on lower-cased, Moses-tokenised text, i.e. sacreBLEU with
    ``tokenize="none"``, ``lowercase=True`` and no smoothing (0 when an n-gram order has no match, as the
    script). ``update(hypotheses, references)`` takes tokenised, space-joined sentences.

    Example::

        >>> bleu = TokenizedBLEU()
        >>> bleu.update(["The cat sat on a mat"], ["the cat sat on the mat"])  # lower-cased before counting
        >>> bleu.compute()  # equals multi_bleu on the lower-cased text
        tensor(53.7285, dtype=torch.float64)
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(tokenize="none", lowercase=True, smooth_method="none", **kwargs)


class DetokenizedBLEU(CorpusBLEU):
    """sacreBLEU's standard score: the 13a tokeniser on detokenised text, ``smooth_method="exp"`` by default,
    case-sensitive unless ``lowercase`` (so it equals ``sacrebleu.corpus_bleu(hyps, [refs])``).

    With ``lang`` (default ``"de"``, the target side of the paper's tasks) ``update`` takes Moses-tokenised,
    space-joined sentences, as :class:`TokenizedBLEU` does, and detokenises hypotheses and references with
    :func:`detokenize`; with ``lang=None`` it takes plain, already detokenised text.

    Example::

        >>> bleu = DetokenizedBLEU(lang="de")  # Moses-tokenised in, detokenised before scoring
        >>> bleu.update(["das ist ein haus , oder ?"], ["das ist ein haus , nicht ?"])
        >>> plain = DetokenizedBLEU(lang=None)  # the same sentences as plain text
        >>> plain.update(["das ist ein haus, oder?"], ["das ist ein haus, nicht?"])
        >>> bleu.compute(), plain.compute()
        (tensor(64.3459, dtype=torch.float64), tensor(64.3459, dtype=torch.float64))
    """

    def __init__(
        self, lang: str | None = "de", lowercase: bool = False, smooth_method: str = "exp", **kwargs: Any
    ) -> None:
        super().__init__(tokenize="13a", lowercase=lowercase, smooth_method=smooth_method, **kwargs)
        self.lang = lang

    @override
    def prepare(self, sentences: Sequence[str]) -> list[str]:
        """Detokenised sentences (unchanged with ``lang=None``)."""
        if self.lang is None:
            return list(sentences)
        return [detokenize(sentence, self.lang) for sentence in sentences]
