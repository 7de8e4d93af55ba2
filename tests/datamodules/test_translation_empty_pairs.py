"""Empty sentences in a user's TranslationDataModule: dropped from training with one counting warning, refused
in validation/test (naming the split, the pair and the fix) unless ``drop_empty_eval_pairs`` drops them with a
warning that the split changed size."""

from __future__ import annotations

import warnings
from typing import Any

import pytest

from lightning_revrnn.datamodules import CorpusFormatError
from lightning_revrnn.datamodules.translation import ParallelText, TranslationDataModule

GOOD = ParallelText(["a b", "b c", "c d", "d a"], ["x y", "y z", "z w", "w x"])


class _Pairs(TranslationDataModule):
    """A user's DataModule: fixed pairs per split."""

    def __init__(self, text: dict[str, ParallelText], **kwargs: Any) -> None:
        super().__init__(batch_size=2, **kwargs)
        self.text = text

    def read_split(self, split: str) -> ParallelText:
        return self.text[split]


def _with_empty(text: ParallelText, at: int, side: str, blank: str = "") -> ParallelText:
    sources, targets = list(text.sources), list(text.targets)
    (sources if side == "source" else targets)[at] = blank
    return ParallelText(sources, targets)


def test_empty_training_pairs_are_dropped_with_one_counting_warning() -> None:
    train = _with_empty(_with_empty(GOOD, 1, "source"), 3, "target", blank="  \t ")
    dm = _Pairs({"train": train, "valid": GOOD, "test": GOOD})
    with pytest.warns(UserWarning, match="empty") as record:
        dm.setup("fit")
    messages = [str(w.message) for w in record if "empty" in str(w.message)]
    assert len(messages) == 1, messages
    assert "'train' split (training) has 2 of 4" in messages[0] and "2 (source), 4 (target)" in messages[0]
    assert dm.pairs("train").text.sources == ["a b", "c d"] and dm.empty_pairs_dropped == {"train": 2}
    assert len(dm.pairs("valid")) == 4
    assert all(len(b) for b in dm.train_dataloader())  # every row of every batch has a source token
    assert all(bool(b.src_keep.any(0).all()) for b in dm.train_dataloader())


@pytest.mark.parametrize(
    ("stage", "split", "use"),
    [("fit", "valid", "validation"), ("test", "test", "test and predict"), ("predict", "test", "test and predict")],
)
def test_empty_evaluation_pairs_are_refused_naming_split_line_and_fix(stage: str, split: str, use: str) -> None:
    dm = _Pairs({"train": GOOD, "valid": GOOD, "test": GOOD, split: _with_empty(GOOD, 2, "source", blank=" ")})
    with pytest.raises(CorpusFormatError) as info:
        dm.setup(stage)
    message = str(info.value)
    assert (
        f"the {split!r} split ({use})" in message
        and "side, at pair 3 (source) (numbered from 1: the line in line-aligned files)" in message
    )
    assert "drop_empty_eval_pairs=True" in message and "remove those lines" in message


def test_drop_empty_eval_pairs_drops_them_saying_the_split_changed_size() -> None:
    test = _with_empty(_with_empty(GOOD, 0, "target"), 0, "source")
    dm = _Pairs({"train": GOOD, "valid": GOOD, "test": test}, drop_empty_eval_pairs=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning for the clean splits
        dm.setup("fit")
    with pytest.warns(UserWarning, match=r"1 \(source and target\).*the 'test' split has 3 pairs instead of 4"):
        dm.setup("test")
    assert len(dm.pairs("test")) == 3 and dm.empty_pairs_dropped == {"test": 1}
    assert dm.pairs("test").text.sources == GOOD.sources[1:]


def test_many_empty_pairs_are_listed_briefly() -> None:
    text = ParallelText([""] * 8 + ["a"], ["x"] * 9)
    with pytest.raises(CorpusFormatError, match=r"has 8 of 9 .*1 \(source\), 2 \(source\).*5 \(source\) and 3 more"):
        _Pairs({"train": GOOD, "valid": text, "test": GOOD}).setup("validate")
