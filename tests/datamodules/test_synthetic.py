"""The seeded Markov corpus: exact entropy rate, achievable perplexity, determinism, batch contract."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lightning_revrnn.datamodules import MarkovSource, SyntheticLMDataModule, markov_entropy_rate
from lightning_revrnn.datamodules.synthetic import sample_gamma, stationary_distribution


def _h(*p: float) -> float:
    return -sum(x * math.log(x) for x in p if x > 0)


def test_entropy_rate_of_a_hand_made_two_state_chain() -> None:
    p = torch.tensor([[0.9, 0.1], [0.4, 0.6]], dtype=torch.float64)
    # stationary: pi0 * 0.1 = pi1 * 0.4  ->  pi = (0.8, 0.2)
    assert torch.allclose(stationary_distribution(p), torch.tensor([0.8, 0.2], dtype=torch.float64))
    expected = 0.8 * _h(0.9, 0.1) + 0.2 * _h(0.4, 0.6)
    assert markov_entropy_rate(p) == pytest.approx(expected, rel=1e-12)
    assert MarkovSource(p).entropy_rate == pytest.approx(expected, rel=1e-12)
    # periodic and deterministic: a unique stationary distribution, zero entropy
    flip = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    assert markov_entropy_rate(flip) == 0.0
    assert torch.allclose(stationary_distribution(flip), torch.tensor([0.5, 0.5], dtype=torch.float64))
    # an order-2 table that ignores the older token has the same entropy rate
    p2 = p.unsqueeze(0).expand(2, 2, 2)
    assert markov_entropy_rate(p2) == pytest.approx(expected, rel=1e-12)


def test_bigram_counts_reach_the_optimal_perplexity() -> None:
    dm = SyntheticLMDataModule()
    dm.setup()
    train, valid = dm.token_ids("train"), dm.token_ids("valid")
    assert (train.numel(), valid.numel()) == (200_000, 20_000)
    counts = torch.full((32, 32), 0.01, dtype=torch.float64)
    counts.index_put_((train[:-1], train[1:]), torch.ones(train.numel() - 1, dtype=torch.float64), accumulate=True)
    probs = counts / counts.sum(1, keepdim=True)
    ppl = math.exp(-torch.log(probs[valid[:-1], valid[1:]]).mean().item())
    assert dm.optimal_perplexity == pytest.approx(math.exp(dm.entropy_rate))
    assert 1.0 < dm.optimal_perplexity < 32.0
    assert ppl == pytest.approx(dm.optimal_perplexity, rel=0.03)
    # the trajectory is stationary from its first token
    freq = torch.bincount(train, minlength=32).double() / train.numel()
    assert torch.allclose(freq, dm.source.stationary, atol=0.01)


def test_determinism_and_seed_dependence() -> None:
    kwargs = dict(train_tokens=3000, val_tokens=500, test_tokens=500)
    a, b, c = (SyntheticLMDataModule(seed=s, **kwargs) for s in (0, 0, 1))  # type: ignore[arg-type]
    for dm in (a, b, c):
        dm.setup()
    assert torch.equal(a.source.transition, b.source.transition)
    assert all(torch.equal(a.token_ids(s), b.token_ids(s)) for s in ("train", "valid", "test"))
    assert not torch.equal(a.source.transition, c.source.transition)
    assert not torch.equal(a.token_ids("train"), a.token_ids("valid"))
    assert a.entropy_rate == b.entropy_rate != c.entropy_rate


def test_higher_order_and_dirichlet_sampling() -> None:
    src = MarkovSource.random(vocab_size=6, order=2, concentration=0.5, seed=4)
    assert src.transition.shape == (6, 6, 6) and src.order == 2
    assert torch.allclose(src.transition.sum(-1), torch.ones(6, 6, dtype=torch.float64))
    assert 0 < src.entropy_rate < math.log(6)
    toks = src.sample(50, torch.Generator().manual_seed(0))
    assert toks.shape == (50,) and int(toks.max()) < 6
    gen = torch.Generator().manual_seed(0)
    for a in (0.3, 2.5):
        x = sample_gamma((40_000,), a, gen).exp()
        assert x.mean().item() == pytest.approx(a, rel=0.05) and x.var().item() == pytest.approx(a, rel=0.1)
    with pytest.raises(ValueError, match="exceed"):
        MarkovSource.random(vocab_size=64, order=4, concentration=0.3, seed=0)


def test_synthetic_batch_contract() -> None:
    dm = SyntheticLMDataModule(train_tokens=5000, val_tokens=2000, test_tokens=2000)
    assert dm.vocab_size == 32 and dm.eos_index is None  # known before setup
    dm.setup("fit")
    windows = list(dm.train_dataloader())
    assert windows[0]["inputs"].shape == (35, 16) and windows[0]["reset"]
    assert not any(w["reset"] for w in windows[1:])
    for prev, nxt in itertools.pairwise(windows):
        assert torch.equal(prev["targets"][-1], nxt["inputs"][0])
    assert all(torch.equal(w["targets"][:-1], w["inputs"][1:]) for w in windows)
    assert next(iter(dm.val_dataloader()))["inputs"].shape == (35, 16)
    with pytest.raises(RuntimeError, match="not loaded"):
        dm.test_dataloader()
