"""DDP sharding: rank/world from a Trainer or torch.distributed, disjoint equal shards, global batch sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed
from dm_helpers import fake_trainer

from lightning_revrnn.datamodules import PTBDataModule, SyntheticLMDataModule, batchify
from lightning_revrnn.datamodules.distributed import rank_and_world_size, shard_range
from lightning_revrnn.datamodules.streams import TokenStreamDataModule


def test_rank_and_world_size_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    assert rank_and_world_size(None) == (0, 1)
    assert rank_and_world_size(fake_trainer(3, 4)) == (3, 4)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, **k: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 2)
    assert rank_and_world_size(None) == (1, 2)
    assert rank_and_world_size(fake_trainer(0, 8)) == (0, 8)  # an attached trainer wins

    dm = SyntheticLMDataModule(train_tokens=2000, val_tokens=500, test_tokens=500, batch_size=4, eval_batch_size=4)
    dm.setup("fit")
    assert (dm.rank, dm.world_size) == (1, 2)
    assert dm.streams("train").shape[1] == 2


def test_shard_range_and_divisibility_errors() -> None:
    assert [shard_range(8, r, 4) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    with pytest.raises(ValueError, match=r"batch_size=20 is the global batch.*world size 3.*18 or 21"):
        shard_range(20, 0, 3)
    dm = SyntheticLMDataModule(train_tokens=2000, val_tokens=500, test_tokens=500, batch_size=8, eval_batch_size=10)
    dm.trainer = fake_trainer(0, 4)  # type: ignore[assignment]
    with pytest.raises(ValueError, match=r"eval_batch_size=10 .* world size 4"):
        dm.setup("fit")


def _rank_runs(make_dm, world_size: int, split: str) -> list[list[dict]]:
    runs = []
    for rank in range(world_size):
        dm: TokenStreamDataModule = make_dm()
        dm.trainer = fake_trainer(rank, world_size, epoch=0)  # type: ignore[assignment]
        dm.setup("fit")
        loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
        runs.append(list(loader))
    return runs


def _check_shards(make_dm, split: str, global_batch: int) -> None:
    reference = make_dm()
    reference.setup("fit")
    full = batchify(reference.token_ids(split), global_batch)  # the single-process (L, B) streams
    single = _rank_runs(make_dm, 1, split)[0]
    for world_size in (1, 2, 4):
        runs = _rank_runs(make_dm, world_size, split)
        assert len({len(r) for r in runs}) == 1  # every rank: the same number of windows ...
        assert [w["inputs"].shape[0] for w in runs[0]] == [w["inputs"].shape[0] for w in single]  # ... and lengths
        seen = torch.zeros_like(full)
        for rank, windows in enumerate(runs):
            assert all(w["inputs"].shape[1] == global_batch // world_size for w in windows)
            rebuilt = torch.cat([w["inputs"] for w in windows] + [windows[-1]["targets"][-1:]])
            lo = rank * global_batch // world_size
            hi = lo + global_batch // world_size
            assert torch.equal(rebuilt, full[:, lo:hi])  # this rank's streams, in order
            seen[:, lo:hi] += 1
        assert bool((seen == 1).all())  # union = the single-process stream, no token twice


@pytest.mark.parametrize("variable_bptt", [False, True])
def test_text_sharding_over_1_2_4_ranks(small_corpus: Path, variable_bptt: bool) -> None:
    def make() -> PTBDataModule:
        return PTBDataModule(small_corpus, batch_size=8, eval_batch_size=4, bptt=7, variable_bptt=variable_bptt)

    _check_shards(make, "train", 8)
    _check_shards(make, "valid", 4)


def test_synthetic_sharding_over_1_2_4_ranks() -> None:
    def make() -> SyntheticLMDataModule:
        return SyntheticLMDataModule(
            train_tokens=3000,
            val_tokens=800,
            test_tokens=800,
            batch_size=8,
            eval_batch_size=8,
            bptt=9,
            variable_bptt=True,
        )

    _check_shards(make, "train", 8)
