"""An embedded translation task that needs attention: word-by-word substitution in reversed order.

The source language has words ``s00 .. s{V-1}``, the target language ``t00 .. t{V-1}``; a fixed random
bijection (from ``seed``) maps each source word to its target word. A source sentence is ``L`` random words
(``L`` uniform in ``min_len..max_len``); its translation is the mapped words in *reverse* order::

    source: s03 s17 s08        (bijection: s03->t11, s17->t02, s08->t20)
    target: t20 t02 t11

Every target word is determined by one source word whose position depends on the sentence length, so an
encoder-decoder that attends to the right source position solves it exactly, while one that squeezes the
sentence into its final state must memorise ``L * log2(V)`` bits. Sentences are strings as for the real
corpora, so BLEU is computed the same way. No download; every split is a pure function of ``seed``; the
validation and test sentences never occur in the training split (nor in each other).
"""

from __future__ import annotations

import torch
from typing_extensions import override

from .parallel import ParallelText
from .seeding import generator
from .translation_datamodule import TranslationDataModule

DRAW_ROUNDS = 1000
"""Most rounds of drawing fresh (unseen) evaluation sentences before giving up."""


def _word(prefix: str, i: int, vocab: int) -> str:
    return f"{prefix}{i:0{len(str(vocab - 1))}d}"


class SyntheticTranslationDataModule(TranslationDataModule):
    """The reversed word-substitution task (module docstring): ``train_size`` / ``val_size`` / ``test_size``
    pairs, ``vocab`` words per language, sentences of ``min_len..max_len`` words, from ``seed``.

    Example::

        >>> dm = SyntheticTranslationDataModule(vocab=6, min_len=2, max_len=4, train_size=50, val_size=5,
        ...                                     test_size=5, batch_size=8)
        >>> dm.setup("fit")
        >>> dm.src_vocab_size, dm.tgt_vocab_size  # 6 words and the 4 specials per language
        (10, 10)
        >>> dm.translate("s0 s1") == f"{dm.mapping['s1']} {dm.mapping['s0']}"  # mapped, in reverse order
        True
        >>> batch = next(iter(dm.train_dataloader()))  # a TranslationBatch, time-major
        >>> len(batch), batch.src.shape[0] <= 4
        (8, True)
    """

    src_lang = "en"
    tgt_lang = "de"
    # The made-up languages stand in for English->German, so code that picks a tokeniser or detokeniser by
    # language (e.g. Moses detokenisation for sacreBLEU) treats this task like the real corpora.

    def __init__(
        self,
        vocab: int = 24,
        min_len: int = 3,
        max_len: int = 12,
        train_size: int = 4000,
        val_size: int = 200,
        test_size: int = 200,
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        """See the class docstring; ``batch_size`` is global (DDP) as for the real corpora."""
        for name, value, low in (
            ("vocab", vocab, 2),
            ("min_len", min_len, 1),
            ("max_len", max_len, 1),
            ("train_size", train_size, 1),
            ("val_size", val_size, 1),
            ("test_size", test_size, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if min_len > max_len:
            raise ValueError(f"min_len={min_len} must not exceed max_len={max_len}")
        super().__init__(batch_size=batch_size, max_len=max_len, seed=seed)
        self.save_hyperparameters()
        self.num_words, self.min_len, self.sentence_max_len = vocab, min_len, max_len
        self.sizes = {"train": train_size, "valid": val_size, "test": test_size}
        perm = torch.randperm(vocab, generator=generator(self.seed, "synthetic-translation", "bijection")).tolist()
        self.mapping: dict[str, str] = {_word("s", i, vocab): _word("t", perm[i], vocab) for i in range(vocab)}
        """Source word to target word (the fixed bijection)."""
        self._sentences: dict[str, list[tuple[str, ...]]] = {}

    def translate(self, source: str) -> str:
        """The reference translation of a source sentence: mapped words, reversed."""
        return " ".join(self.mapping[w] for w in reversed(source.split()))

    def _draw(self, split: str, rounds: int, count: int) -> list[tuple[str, ...]]:
        """``count`` random source sentences (round ``rounds`` of ``split``'s generator stream)."""
        gen = generator(self.seed, "synthetic-translation", split, rounds)
        lengths = torch.randint(self.min_len, self.sentence_max_len + 1, (count,), generator=gen).tolist()
        words = torch.randint(self.num_words, (count, self.sentence_max_len), generator=gen).tolist()
        return [tuple(_word("s", i, self.num_words) for i in row[:n]) for row, n in zip(words, lengths)]

    def _fresh(self, split: str, size: int, seen: set[tuple[str, ...]]) -> list[tuple[str, ...]]:
        """``size`` distinct sentences not in ``seen`` (which gains them)."""
        possible = sum(self.num_words**n for n in range(self.min_len, self.sentence_max_len + 1))
        if possible - len(seen) < size:
            raise ValueError(
                f"only {possible} distinct sentences exist with vocab={self.num_words} and lengths "
                f"{self.min_len}..{self.sentence_max_len}; {len(seen)} are taken, so {size} new {split} sentences "
                "cannot be drawn: use a larger vocab or max_len, or smaller splits"
            )
        out: list[tuple[str, ...]] = []
        for rounds in range(DRAW_ROUNDS):
            for sentence in self._draw(split, rounds, size):
                if sentence not in seen and len(out) < size:
                    seen.add(sentence)
                    out.append(sentence)
            if len(out) == size:
                return out
        raise ValueError(
            f"could not draw {size} unseen {split} sentences in {DRAW_ROUNDS} rounds; "
            "use a larger vocab or max_len, or smaller splits"
        )

    def _generate(self) -> None:
        train = self._draw("train", 0, self.sizes["train"])
        seen = set(train)
        self._sentences = {"train": train, "valid": self._fresh("valid", self.sizes["valid"], seen)}
        self._sentences["test"] = self._fresh("test", self.sizes["test"], seen)

    @override
    def read_split(self, split: str) -> ParallelText:
        """The generated pairs of ``split`` (the same for every process and run with this ``seed``)."""
        if split not in self.sizes:
            raise ValueError(f"unknown split {split!r}; expected 'train', 'valid' or 'test'")
        if not self._sentences:
            self._generate()
        sources = [" ".join(s) for s in self._sentences[split]]
        return ParallelText(sources, [self.translate(s) for s in sources])
