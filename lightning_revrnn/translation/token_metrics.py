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

    ``update(total, count)``: a batch's summed cross-entropy (nats) and its number of target tokens.
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
