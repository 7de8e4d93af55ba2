"""BLEU (lightning_revrnn.translation.bleu): multi-bleu.perl's formula against sacreBLEU and against counts worked
out by hand, the zero-match and brevity cases, and the two torchmetrics metrics against ``sacrebleu.corpus_bleu``,
accumulated over updates and summed (not averaged) over simulated DDP ranks."""

from __future__ import annotations

import math
import pickle
from collections.abc import Iterator

import pytest
import sacrebleu
import torch
from torch import Tensor

from lightning_revrnn.translation.bleu import DetokenizedBLEU, TokenizedBLEU, detokenize, multi_bleu

# Lower-cased, Moses-tokenised German (as the Multi30K tok/ files): hypotheses and their references.
HYPOTHESES = [
    "ein mann mit einem orangefarbenen hut starrt auf etwas .",
    "ein boston terrier läuft auf grünem gras vor einem weißen zaun .",
    "ein mädchen im karateanzug bricht ein brett mit einem tritt .",
    "fünf leute in winterjacken und helmen stehen im schnee .",
    "eine frau auf einem boot namens &quot; el corazon &quot; lässt gewichte ins wasser fallen .",
    "zwei männer , die ein t-shirt tragen , spielen fußball .",
    "ein kind sagt : &quot; wie geht &apos;s ? &quot;",
]
REFERENCES = [
    "ein mann mit einem orangefarbenen hut , der etwas anstarrt .",
    "ein boston terrier läuft über saftig-grünes gras vor einem weißen zaun .",
    "ein mädchen in einem karateanzug bricht ein brett mit einem tritt .",
    "fünf leute in winterjacken und mit helmen stehen im schnee mit schneemobilen im hintergrund .",
    "eine frau auf einem boot namens &quot; el corazon &quot; lässt schwarze gewichte ins wasser fallen .",
    "zwei männer in t-shirts spielen fußball auf einem platz .",
    "ein kind fragt : &quot; wie geht &apos;s dir ? &quot;",
]


def sacre(hypotheses: list[str], references: list[str], **kwargs: object) -> float:
    return sacrebleu.corpus_bleu(hypotheses, [references], **kwargs).score


def test_fixture_matches_at_every_order() -> None:
    """The comparisons below are only as good as the fixture: every n-gram order has matches and the
    hypotheses are shorter than the references (a brevity penalty applies)."""
    stats = sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES], tokenize="none")
    assert min(stats.counts) > 0 and stats.sys_len < stats.ref_len


def test_multi_bleu_equals_sacrebleu_on_lowercased_tokenised_text() -> None:
    expected = sacre(HYPOTHESES, REFERENCES, tokenize="none", lowercase=True)
    assert abs(multi_bleu(HYPOTHESES, REFERENCES) - expected) < 1e-6
    assert 20 < expected < 90


def test_multi_bleu_by_hand() -> None:
    """Sentence 1 (7 tokens each): matches 6/7, 4/6, 2/5, 1/4. Sentence 2 (3 vs 4 tokens): 'the' three
    times is clipped to the reference's two, 2/3 unigrams, 0/2 bigrams, 0/1 trigrams. Corpus: 8/10, 4/8,
    2/6, 1/4; c = 10 < r = 11."""
    hypotheses = ["the cat sat on the mat today", "the the the"]
    references = ["the cat is on the mat today", "the cat the end"]
    expected = 100 * math.exp(1 - 11 / 10) * (8 / 10 * 4 / 8 * 2 / 6 * 1 / 4) ** 0.25
    assert multi_bleu(hypotheses, references) == pytest.approx(expected, rel=1e-12)
    assert multi_bleu(hypotheses, references) == pytest.approx(sacre(hypotheses, references, tokenize="none"), abs=1e-9)


def test_zero_matches_at_one_order_give_zero() -> None:
    """No common 4-gram: multi-bleu's log 0 makes BLEU 0 (sacreBLEU's default 'exp' smoothing would not)."""
    hypotheses, references = ["a b c x d e f"], ["a b c y d e f"]
    assert multi_bleu(hypotheses, references) == 0.0
    assert sacre(hypotheses, references, tokenize="none", smooth_method="none") == 0.0
    assert sacre(hypotheses, references, tokenize="none") > 0.0
    assert multi_bleu(["p q r s"], ["a b c d"]) == 0.0
    assert multi_bleu([""], ["a b c d"]) == 0.0
    assert multi_bleu([], []) == 0.0


def test_brevity_penalty() -> None:
    """A 5-token prefix of an 8-token reference matches everything: BLEU is the brevity penalty alone;
    a longer hypothesis gets none."""
    reference = "a b c d e f g h"
    assert multi_bleu(["a b c d e"], [reference]) == pytest.approx(100 * math.exp(1 - 8 / 5), rel=1e-12)
    longer = "a b c d e f g h i"  # precisions 8/9, 7/8, 6/7, 5/6, no penalty
    assert multi_bleu([longer], [reference]) == pytest.approx(100 * (5 / 9) ** 0.25, rel=1e-12)


def test_bad_corpora_name_the_fix() -> None:
    with pytest.raises(ValueError, match="one reference"):
        multi_bleu(["a b"], ["a b", "c d"])
    with pytest.raises(ValueError, match="wrap a single sentence"):
        multi_bleu("a b", "a b")
    with pytest.raises(ValueError, match="one reference"):
        TokenizedBLEU().update(["a"], [])


def chunks(n: int) -> Iterator[slice]:
    """Uneven batches over the fixture."""
    yield from (slice(0, 1), slice(1, 4), slice(4, n))


def test_tokenized_bleu_equals_sacrebleu_and_accumulates() -> None:
    metric = TokenizedBLEU()
    for part in chunks(len(HYPOTHESES)):
        metric.update(HYPOTHESES[part], REFERENCES[part])
    expected = sacre(HYPOTHESES, REFERENCES, tokenize="none", lowercase=True)
    assert abs(float(metric.compute()) - expected) < 1e-9
    assert abs(float(metric.compute()) - multi_bleu(HYPOTHESES, REFERENCES)) < 1e-6
    per_batch = [sacre(HYPOTHESES[p], REFERENCES[p], tokenize="none") for p in chunks(len(HYPOTHESES))]
    assert abs(sum(per_batch) / len(per_batch) - expected) > 1  # a mean of batch scores would differ
    metric.reset()
    metric.update(["Ein Mann ."], ["ein mann ."])  # lower-cased before counting
    assert float(metric.compute()) == 0.0  # three tokens: no 4-gram, as multi-bleu
    metric.update(["EIN Mann Mit Hut ."], ["ein mann mit hut ."])
    assert float(metric.compute()) == pytest.approx(100.0)


def test_detokenized_bleu_equals_sacrebleu_13a_on_detokenised_german() -> None:
    plain_hypotheses = [detokenize(h, "de") for h in HYPOTHESES]
    plain_references = [detokenize(r, "de") for r in REFERENCES]
    assert plain_hypotheses[4] == 'eine frau auf einem boot namens "el corazon" lässt gewichte ins wasser fallen.'
    assert plain_hypotheses[5] == "zwei männer, die ein t-shirt tragen, spielen fußball."
    expected = sacre(plain_hypotheses, plain_references)  # sacreBLEU's defaults: 13a, exp smoothing
    assert abs(expected - sacre(HYPOTHESES, REFERENCES)) > 1  # 13a keeps "&apos;s" of tokenised text

    metric = DetokenizedBLEU(lang="de")  # takes tokenised text and detokenises it
    for part in chunks(len(HYPOTHESES)):
        metric.update(HYPOTHESES[part], REFERENCES[part])
    assert abs(float(metric.compute()) - expected) < 1e-9
    plain = DetokenizedBLEU(lang=None)  # takes detokenised text
    plain.update(plain_hypotheses, plain_references)
    assert abs(float(plain.compute()) - expected) < 1e-9
    assert metric.compute().dtype == torch.float64


def simulated_ranks(other: TokenizedBLEU) -> object:
    """A ``dist_sync_fn`` for a two-rank world whose other rank holds ``other``'s states: returns each
    state's per-rank values in the order torchmetrics gathers them (its registration order)."""
    states: Iterator[Tensor] = iter([getattr(other, name) for name in other._reductions])

    def gather(tensor: Tensor, group: object = None) -> list[Tensor]:
        return [tensor, next(states)]

    return gather


def test_ddp_sync_sums_statistics_over_ranks() -> None:
    """torchmetrics' DDP path (gather every state, then its dist_reduce_fx) on two simulated ranks gives
    the corpus BLEU of both ranks' sentences, not the mean of the two ranks' scores."""
    rank1 = TokenizedBLEU()
    rank1.update(HYPOTHESES[5:], REFERENCES[5:])
    rank0 = TokenizedBLEU(dist_sync_fn=simulated_ranks(rank1), distributed_available_fn=lambda: True)
    rank0.update(HYPOTHESES[:5], REFERENCES[:5])
    alone = [
        sacre(HYPOTHESES[:5], REFERENCES[:5], tokenize="none"),
        sacre(HYPOTHESES[5:], REFERENCES[5:], tokenize="none"),
    ]
    synced = float(rank0.compute())
    assert abs(synced - sacre(HYPOTHESES, REFERENCES, tokenize="none")) < 1e-9
    assert abs(synced - sum(alone) / 2) > 1
    assert int(rank0.hyp_len) == len(" ".join(HYPOTHESES[:5]).split())  # unsynced again after compute


def test_metrics_survive_pickling() -> None:
    """ddp_spawn pickles the LightningModule, metrics included."""
    for metric in (TokenizedBLEU(), DetokenizedBLEU()):
        metric.update(HYPOTHESES[:2], REFERENCES[:2])
        copy = pickle.loads(pickle.dumps(metric))
        copy.update(HYPOTHESES[2:], REFERENCES[2:])
        metric.update(HYPOTHESES[2:], REFERENCES[2:])
        assert float(copy.compute()) == float(metric.compute())
