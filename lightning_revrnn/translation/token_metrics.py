"""Per-token cross-entropy and perplexity from summed losses, correct under DDP.

A translation batch's loss is a sum over its real target tokens; averaging per-batch (or per-rank) means
would weight short batches like long ones. These metrics keep the two sums (loss and token count),
reduce each by summation across ranks, and divide once.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from typing_extensions import override


class TokenCrossEntropy(Metric):
    """Mean cross-entropy per token (``perplexity=True``: its exponential) over everything updated.

    ``update(total, count)``: a batch's summed cross-entropy (nats) and its number of target tokens. Both sums
    are states reduced by summation across DDP ranks, so ``compute()`` is the mean over every token seen, not a
    mean of per-batch means.

    Args:
        perplexity: report ``exp`` of the mean (perplexity) instead of the mean cross-entropy.

    Example::

        >>> ce = TokenCrossEntropy()
        >>> ce.update(torch.tensor(6.0), torch.tensor(3))  # a batch: 6 nats over 3 target tokens (mean 2)
        >>> ce.update(torch.tensor(4.0), torch.tensor(1))  # 4 nats over 1 token (mean 4)
        >>> ce.compute()  # 10 nats / 4 tokens, not the mean of the batch means (3)
        tensor(2.5000)
        >>> ppl = TokenCrossEntropy(perplexity=True)
        >>> ppl.update(torch.tensor(10.0), torch.tensor(4))
        >>> ppl.compute()  # exp(2.5)
        tensor(12.1825)
    """

    full_state_update = False
    higher_is_better = False
    total: Tensor
    count: Tensor

    def __init__(self, perplexity: bool = False) -> None:
        super().__init__()
        self.perplexity = perplexity
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    @override
    def update(self, total: Tensor, count: Tensor) -> None:
        self.total += total.detach().to(torch.float64)
        self.count += count.detach().to(torch.int64)

    @override
    def compute(self) -> Tensor:
        mean = self.total / self.count.clamp_min(1)
        return (mean.exp() if self.perplexity else mean).float()
