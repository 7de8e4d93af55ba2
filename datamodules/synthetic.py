"""A seeded Markov source as an embedded language-modelling corpus with a known best perplexity."""

from __future__ import annotations

import bisect
import math
from functools import cached_property

import torch

from .corpus import Vocabulary
from .seeding import generator
from .streams import TokenStreamDataModule

MAX_TABLE_ENTRIES = 1 << 22
"""Largest transition table (``vocab_size ** (order + 1)`` entries) a :class:`MarkovSource` may have."""

_DENSE_STATIONARY_MAX = 2048


def sample_gamma(shape: tuple[int, ...], concentration: float, gen: torch.Generator) -> torch.Tensor:
    """``log`` of Gamma(``concentration``, 1) samples (float64), drawn only from ``gen``.

    Marsaglia-Tsang rejection for shape >= 1; for shape < 1, ``Gamma(a) = Gamma(a+1) * U**(1/a)`` (in log space,
    so tiny values never underflow to zero).
    """
    if concentration <= 0:
        raise ValueError(f"concentration must be > 0, got {concentration}")
    a = concentration if concentration >= 1 else concentration + 1.0
    d = a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    n = math.prod(shape)
    out = torch.empty(n, dtype=torch.float64)
    todo = torch.arange(n)
    while todo.numel():
        x = torch.randn(todo.numel(), generator=gen, dtype=torch.float64)
        u = torch.rand(todo.numel(), generator=gen, dtype=torch.float64)
        v = (1.0 + c * x) ** 3
        ok = v > 0
        log_v = torch.log(torch.where(ok, v, torch.ones_like(v)))
        ok &= torch.log(u) < 0.5 * x * x + d - d * v + d * log_v
        out[todo[ok]] = math.log(d) + log_v[ok]
        todo = todo[~ok]
    if concentration < 1:
        u = torch.rand(n, generator=gen, dtype=torch.float64)
        out += torch.log(u) / concentration
    return out.view(shape)


def sample_dirichlet(rows: int, size: int, concentration: float, gen: torch.Generator) -> torch.Tensor:
    """``rows`` independent draws from a symmetric Dirichlet(``concentration``) over ``size`` outcomes."""
    return torch.softmax(sample_gamma((rows, size), concentration, gen), dim=-1)


def stationary_distribution(transition: torch.Tensor) -> torch.Tensor:
    """Stationary distribution over the contexts of an order-``k`` chain, shaped like ``transition[..., 0]``.

    ``transition`` has shape ``(V,) * k + (V,)``: ``transition[x1, ..., xk, v] = P(v | x1..xk)``; the context
    after emitting ``v`` is ``(x2, ..., xk, v)``. Solved exactly (linear system) for up to 2048 contexts, by
    power iteration on the lazy chain beyond. The chain must have a unique stationary distribution.
    """
    p = transition.to(torch.float64)
    vocab = p.shape[-1]
    order = p.dim() - 1
    n = vocab**order
    rows = p.reshape(n, vocab)
    if n <= _DENSE_STATIONARY_MAX:
        nxt = (torch.arange(n).unsqueeze(1) * vocab + torch.arange(vocab)) % n
        m = torch.zeros(n, n, dtype=torch.float64)
        m.scatter_add_(1, nxt, rows)
        a = m.t() - torch.eye(n, dtype=torch.float64)
        a[-1] = 1.0
        b = torch.zeros(n, dtype=torch.float64)
        b[-1] = 1.0
        pi = torch.linalg.solve(a, b)
    else:
        pi = torch.full((n,), 1.0 / n, dtype=torch.float64)
        split = p.reshape(vocab, n // vocab, vocab)
        for _ in range(1_000_000):
            step = (pi.view(vocab, n // vocab, 1) * split).sum(0).reshape(n)
            new = 0.5 * (pi + step)
            if (new - pi).abs().sum().item() < 1e-15:
                pi = new
                break
            pi = new
    pi = pi.clamp_min(0.0)
    out: torch.Tensor = (pi / pi.sum()).reshape(p.shape[:-1])
    return out


def markov_entropy_rate(transition: torch.Tensor) -> float:
    """Entropy rate in nats/token: ``-sum_c pi(c) sum_v P(v|c) log P(v|c)`` (``0 log 0 = 0``)."""
    p = transition.to(torch.float64)
    pi = stationary_distribution(p)
    plogp = torch.where(p > 0, p * torch.log(torch.where(p > 0, p, torch.ones_like(p))), torch.zeros_like(p))
    return float(-(pi * plogp.sum(-1)).sum())


class MarkovSource:
    """An order-``k`` Markov chain over ``V`` tokens with an exactly known entropy rate.

    ``transition[x1, ..., xk, v] = P(v | x1..xk)``; the entropy rate (nats/token) is the lowest cross-entropy
    any model of its samples can reach.

    Example::

        >>> coin = MarkovSource(torch.full((2, 2), 0.5))  # order 1, every row a fair coin
        >>> coin.order, coin.vocab_size, round(coin.entropy_rate, 4)  # log 2 nats per token
        (1, 2, 0.6931)
        >>> source = MarkovSource.random(vocab_size=4, order=2, concentration=0.3, seed=0)
        >>> source.transition.shape, source.sample(10, torch.Generator().manual_seed(0)).shape
        (torch.Size([4, 4, 4]), torch.Size([10]))
        >>> source.entropy_rate < math.log(4)  # more predictable than uniform tokens
        True
    """

    def __init__(self, transition: torch.Tensor) -> None:
        """``transition``: shape ``(V,) * k + (V,)``, rows non-negative and summing to 1."""
        p = transition.to(torch.float64)
        if p.dim() < 1 or any(s != p.shape[-1] for s in p.shape):
            raise ValueError(f"transition must have shape (V,)*order + (V,), got {tuple(p.shape)}")
        if (p < 0).any() or not torch.allclose(p.sum(-1), torch.ones((), dtype=p.dtype), atol=1e-9, rtol=0):
            raise ValueError("transition rows must be non-negative and sum to 1")
        self.transition = p

    @classmethod
    def random(cls, vocab_size: int, order: int, concentration: float, seed: int) -> MarkovSource:
        """Rows drawn from a symmetric Dirichlet(``concentration``) with a generator seeded from ``seed``."""
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        if order < 0:
            raise ValueError(f"order must be >= 0, got {order}")
        if vocab_size ** (order + 1) > MAX_TABLE_ENTRIES:
            raise ValueError(
                f"vocab_size**(order+1) = {vocab_size ** (order + 1)} transition entries exceed {MAX_TABLE_ENTRIES}; "
                "use a smaller vocab_size or order"
            )
        rows = sample_dirichlet(vocab_size**order, vocab_size, concentration, generator(seed, "transition"))
        return cls(rows.view((vocab_size,) * (order + 1)))

    @property
    def vocab_size(self) -> int:
        """Number of tokens ``V``."""
        return self.transition.shape[-1]

    @property
    def order(self) -> int:
        """Context length ``k``."""
        return self.transition.dim() - 1

    @cached_property
    def stationary(self) -> torch.Tensor:
        """Stationary distribution over contexts (see :func:`stationary_distribution`)."""
        return stationary_distribution(self.transition)

    @cached_property
    def entropy_rate(self) -> float:
        """Entropy rate in nats/token (the best achievable cross-entropy)."""
        return markov_entropy_rate(self.transition)

    def sample(self, num_tokens: int, gen: torch.Generator) -> torch.Tensor:
        """A stationary trajectory of ``num_tokens`` tokens (the first context drawn from :attr:`stationary`)."""
        vocab, order = self.vocab_size, self.order
        n_ctx = vocab**order
        ctx = int(torch.multinomial(self.stationary.reshape(-1), 1, generator=gen).item())
        first = [(ctx // vocab ** (order - 1 - i)) % vocab for i in range(order)]
        cum = torch.cumsum(self.transition.reshape(n_ctx, vocab), dim=-1)
        rows: dict[int, list[float]] = {}
        uniforms = torch.rand(max(num_tokens - order, 0), dtype=torch.float64, generator=gen).tolist()
        out = first[:num_tokens]
        last = vocab - 1
        for u in uniforms:
            row = rows.get(ctx)
            if row is None:
                row = rows[ctx] = cum[ctx].tolist()
            tok = min(bisect.bisect_right(row, u), last)
            out.append(tok)
            ctx = (ctx * vocab + tok) % n_ctx
        return torch.tensor(out, dtype=torch.long)


class SyntheticLMDataModule(TokenStreamDataModule):
    """Language modelling on token streams from a seeded :class:`MarkovSource` (no download).

    Train/validation/test are independent stationary trajectories of the same chain. :attr:`entropy_rate`
    (nats/token) and :attr:`optimal_perplexity` give the best any model can reach, to print next to a model's.
    Same batch contract, sharding and BPTT handling as the text corpora; the vocabulary is ``["0", ..., "V-1"]``
    (no ``<eos>``).

    Args:
        vocab_size: tokens ``V``.
        order: context length ``k`` of the chain.
        concentration: Dirichlet concentration of the transition rows (smaller: more predictable).
        train_tokens: length of the training split in tokens.
        val_tokens: length of the validation split.
        test_tokens: length of the test split.
        batch_size: training streams over all ranks (``eval_batch_size``, ``bptt`` and ``variable_bptt`` as in
            :class:`~.streams.TokenStreamDataModule`).
        seed: seeds the chain and every split.

    Example::

        >>> dm = SyntheticLMDataModule(vocab_size=8, train_tokens=1000, val_tokens=200, test_tokens=200,
        ...                            batch_size=4, eval_batch_size=4, bptt=10)
        >>> dm.setup("fit")
        >>> window = next(iter(dm.train_dataloader()))
        >>> window["inputs"].shape, dm.vocab_size
        (torch.Size([10, 4]), 8)
        >>> dm.optimal_perplexity < 8  # the best any model can reach, below a uniform guess's 8
        True
    """

    def __init__(
        self,
        vocab_size: int = 32,
        order: int = 1,
        concentration: float = 0.3,
        train_tokens: int = 200_000,
        val_tokens: int = 20_000,
        test_tokens: int = 20_000,
        batch_size: int = 16,
        eval_batch_size: int = 16,
        bptt: int = 35,
        seed: int = 0,
        variable_bptt: bool = False,
    ) -> None:
        """See the class docstring."""
        super().__init__(batch_size, eval_batch_size, bptt, variable_bptt, seed)
        self.save_hyperparameters()
        self.source = MarkovSource.random(vocab_size, order, concentration, seed)
        self.num_tokens = {"train": int(train_tokens), "valid": int(val_tokens), "test": int(test_tokens)}
        for split, count in self.num_tokens.items():
            if count < 2:
                raise ValueError(f"{split} token count must be >= 2, got {count}")
        self.vocab = Vocabulary(str(i) for i in range(vocab_size))

    @property
    def entropy_rate(self) -> float:
        """Entropy rate of the source in nats/token."""
        return self.source.entropy_rate

    @property
    def optimal_perplexity(self) -> float:
        """``exp(entropy_rate)``: the lowest expected perplexity any model can achieve."""
        return math.exp(self.entropy_rate)

    def load_splits(self, splits: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """Generate the requested splits (deterministic in ``seed``)."""
        return {s: self.source.sample(self.num_tokens[s], generator(self.seed, "tokens", s)) for s in splits}
