"""How a translation corpus's raw sentences became the tokens of its vocabulary, and how tokens become text again.

A translation DataModule declares its :class:`TextPreprocessing`
(:attr:`~.translation_datamodule.TranslationDataModule.preprocessing`) and a
:class:`~lightning_revrnn.translation.model.TranslationModel` keeps it in its checkpoint, so a loaded model prepares
a user's own sentences exactly as its training text was prepared, without the DataModule:

- Multi30K (:data:`MULTI30K_PREPROCESSING`): the official ``*.lc.norm.tok.*`` files, i.e. lower-cased, then
  Moses' ``normalize-punctuation.perl``, then Moses' ``tokenizer.perl`` (escapes such as ``&apos;`` kept, no
  aggressive dash splits). Detokenising a line of those files and preparing it again gives the line back.
- IWSLT 2016 (:data:`IWSLT_PREPROCESSING`): Moses-tokenised without escaping, then lower-cased (:mod:`.iwslt_text`).
- Synthetic data and any DataModule that declares nothing: the sentences are split at whitespace as they are.

Moses steps run with ``sacremoses``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from functools import cache
from typing import Any

from sacremoses import MosesDetokenizer, MosesPunctNormalizer, MosesTokenizer

TOKENIZERS = ("whitespace", "moses")
LOWERCASE = ("no", "before", "after")


@cache
def _moses_tokenizer(lang: str) -> MosesTokenizer:
    return MosesTokenizer(lang=lang)


@cache
def _moses_detokenizer(lang: str) -> MosesDetokenizer:
    return MosesDetokenizer(lang=lang)


@cache
def _moses_normalizer(lang: str) -> MosesPunctNormalizer:
    return MosesPunctNormalizer(lang=lang)


@dataclass(frozen=True)
class TextPreprocessing:
    """The preparation of one corpus's text, source and target side alike (each with its own language).

    Args:
        tokenizer: ``"whitespace"`` (split at whitespace; detokenise by joining with spaces) or ``"moses"``
            (sacremoses' Moses tokeniser and detokeniser for the side's language, no aggressive dash splits).
        lowercase: ``"no"``, ``"before"`` tokenising (Multi30K) or ``"after"`` it (IWSLT).
        normalize_punctuation: Moses' punctuation normaliser before tokenising (Multi30K).
        escape: the tokeniser writes Moses' escapes (``&apos;``, ``&quot;``, ``&amp;``, ...) and the detokeniser
            undoes them.
        src_lang, tgt_lang: the languages of the two sides (they pick the Moses rules).
    """

    tokenizer: str = "whitespace"
    lowercase: str = "no"
    normalize_punctuation: bool = False
    escape: bool = False
    src_lang: str = "en"
    tgt_lang: str = "de"

    def __post_init__(self) -> None:
        """Refuse settings this class cannot apply, naming the choices."""
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {self.tokenizer!r}")
        if self.lowercase not in LOWERCASE:
            raise ValueError(f"lowercase must be one of {LOWERCASE}, got {self.lowercase!r}")

    def with_languages(self, src_lang: str, tgt_lang: str) -> TextPreprocessing:
        """The same preparation for another language pair."""
        return replace(self, src_lang=src_lang, tgt_lang=tgt_lang)

    def tokenize(self, sentence: str, side: str = "src") -> list[str]:
        """The tokens of a raw ``sentence`` of ``side`` (``"src"`` or ``"tgt"``), as the corpus's files hold them."""
        lang = self._lang(side)
        text = sentence.lower() if self.lowercase == "before" else sentence
        if self.normalize_punctuation:
            text = _moses_normalizer(lang).normalize(text)
        if self.tokenizer == "moses":
            text = _moses_tokenizer(lang).tokenize(
                text, aggressive_dash_splits=False, escape=self.escape, return_str=True
            )
        if self.lowercase == "after":
            text = text.lower()
        return text.split()

    def detokenize(self, tokens: Sequence[str], side: str = "tgt") -> str:
        """Plain text of ``tokens`` of ``side`` (default the target: a translation)."""
        if self.tokenizer == "whitespace":
            return " ".join(tokens)
        return str(_moses_detokenizer(self._lang(side)).detokenize(list(tokens), unescape=self.escape))

    def _lang(self, side: str) -> str:
        if side not in ("src", "tgt"):
            raise ValueError(f"side must be 'src' or 'tgt', got {side!r}")
        return self.src_lang if side == "src" else self.tgt_lang

    def state_dict(self) -> dict[str, Any]:
        """The settings as a plain dict (for checkpoints)."""
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> TextPreprocessing:
        """The preparation saved by :meth:`state_dict`."""
        return cls(**state)


WHITESPACE = TextPreprocessing()
"""Sentences split at whitespace, as given (the synthetic task; the default of a DataModule that declares nothing)."""
MULTI30K_PREPROCESSING = TextPreprocessing("moses", lowercase="before", normalize_punctuation=True, escape=True)
"""Multi30K's ``lc.norm.tok`` files: lower-cased, punctuation normalised, Moses-tokenised with escapes."""
IWSLT_PREPROCESSING = TextPreprocessing("moses", lowercase="after")
"""The IWSLT DataModule's own tokenisation (:func:`.iwslt_text.moses_tokenize`): Moses without escapes, then
lower-cased."""
