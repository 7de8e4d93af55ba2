"""Decoding with a translation model: greedy and beam search over the decoder's exact state, raw text in and out,
and the attention behind each output token. :class:`TranslationDecoding` is the half of
:class:`~lightning_revrnn.translation.model.TranslationModel` that decodes; the model builds and trains."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from lightning_revrnn.core.rnn import ReversibleRNN
from lightning_revrnn.datamodules.preprocessing import TextPreprocessing
from lightning_revrnn.datamodules.translation import BOS, EOS, PAD, TranslationVocabulary
from lightning_revrnn.shared import EmbeddingStem
from lightning_revrnn.translation.attention import AttentionHead
from lightning_revrnn.translation.checks import check_source_rows
from lightning_revrnn.translation.decoder_state import DecoderState
from lightning_revrnn.translation.decoding import beam_search, greedy_search
from lightning_revrnn.translation.encoder import StoredUnitsAccounting
from lightning_revrnn.translation.text import translate_text

#: Sentences :meth:`TranslationDecoding.translate_text` decodes at once.
TEXT_BATCH = 32


class TranslationDecoding:
    """Decoding methods of a translation model (a mixin of its LightningModule, which sets these attributes)."""

    encoder: nn.Module
    decoder: nn.Module
    head: AttentionHead
    tgt_stem: EmbeddingStem
    reversible: bool
    beam: int
    length_penalty: float
    max_decode_len: int
    training: bool
    src_vocab: TranslationVocabulary | None
    tgt_vocab: TranslationVocabulary | None
    preprocessing: TextPreprocessing | None

    if TYPE_CHECKING:  # provided by the LightningModule (and nn.Module); declared for the type checker only

        def _require_built(self) -> None: ...

        def encode(self, src: Tensor, src_keep: Tensor) -> tuple[Tensor | None, Any]: ...

        def eval(self) -> Any: ...

        def train(self, mode: bool = True) -> Any: ...

        @property
        def device(self) -> torch.device: ...

    def hypotheses(self, ids: Iterable[list[int]]) -> list[str]:
        """Token ids to tokenised, space-joined target sentences (the target vocabulary's ``decode``)."""
        if self.tgt_vocab is None:
            raise RuntimeError(
                "TranslationModel has no target vocabulary to turn ids into text. Fix: run it with a translation "
                "DataModule, load it from a checkpoint written by fit, or call set_vocabularies()."
            )
        return [" ".join(self.tgt_vocab.decode(i)) for i in ids]

    @torch.no_grad()
    def translate(self, src: Tensor, src_keep: Tensor, beam: int | None = None) -> list[list[int]]:
        """Translations of source ids ``(S, B)`` (right-padded, ``src_keep`` marking real tokens) as target ids
        without BOS/EOS: greedy for ``beam=1``, else beam search (default: the model's ``beam``). Runs in
        evaluation mode (no dropout) and restores the previous mode."""
        self._require_built()
        beam = self.beam if beam is None else beam
        was_training = self.training
        self.eval()
        try:
            state = self.initial_decoder_state(src, src_keep)
            common = dict(batch=src.shape[1], bos=BOS, eos=EOS, max_len=self.max_decode_len)
            if beam == 1:
                return greedy_search(self.decode_step, state, DecoderState.select, **common)
            return beam_search(
                self.decode_step, state, DecoderState.select, beam=beam, length_penalty=self.length_penalty, **common
            )
        finally:
            self.train(was_training)

    @torch.no_grad()
    def translate_text(
        self, sentences: Sequence[str], beam: int | None = None, replace_unk: bool = True, batch_size: int = TEXT_BATCH
    ) -> list[str]:
        """Translate raw sentences: one detokenised translation per sentence, in order (see
        :func:`~lightning_revrnn.translation.text.translate_text`: the training corpus's preprocessing, beam search
        in batches of similar length, ``<unk>`` replaced by the most-attended source word unless ``replace_unk`` is
        False).

        Example::

            >>> model = TranslationModel.load_from_checkpoint("last.ckpt")  # doctest: +SKIP
            >>> model.translate_text(["A man is riding a bike."], beam=5)  # doctest: +SKIP
            ['ein mann fährt fahrrad .']
        """
        self._require_built()
        return translate_text(self, sentences, beam, replace_unk, batch_size)

    @torch.no_grad()
    def attended_positions(self, src: Tensor, src_keep: Tensor, hypotheses: Sequence[list[int]]) -> Tensor:
        """For every token of each hypothesis (target ids without BOS/EOS, as :meth:`translate` returns them), the
        source position the decoder attended to most when emitting it: ``(T, B)`` int64, ``T`` the longest
        hypothesis (at least 1; positions past a hypothesis's end are meaningless). The decoder reruns the
        hypotheses teacher-forced from the encoder's state, in the decoding arithmetic (call it in evaluation
        mode; :meth:`translate_text` does)."""
        self._require_built()
        state = self.initial_decoder_state(src, src_keep)
        steps = max([1, *(len(h) for h in hypotheses)])
        tgt_in = torch.full((steps, len(hypotheses)), EOS, dtype=torch.long)
        tgt_in[0] = BOS
        for b, ids in enumerate(hypotheses):
            tgt_in[1 : len(ids), b] = torch.tensor(ids[:-1], dtype=torch.long)
        tgt_in = tgt_in.to(src.device)
        stem = self.tgt_stem.bind(training=False)
        if self.reversible:
            out, _ = self.decoder(tgt_in, state.hidden, stem=stem)
        else:
            out, _ = self.decoder(stem(tgt_in), state.hidden)
        return self.head.attention.weights(out, state.memory, state.memory_keep).argmax(-1)

    @torch.no_grad()
    def initial_decoder_state(self, src: Tensor, src_keep: Tensor) -> DecoderState:
        """Encode ``src`` and return the decoding state: the decoder starts from the encoder's final state
        (reversible: its exact float64 value, as training's chaining does).

        Raises:
            ValueError: a row of ``src_keep`` has no real token (naming it): it would decode to garbage.
        """
        check_source_rows(src_keep)
        stored, h_n = self.encode(src, src_keep)
        hidden = self.encoder.exact_state(h_n) if isinstance(self.encoder, StoredUnitsAccounting) else h_n
        return DecoderState(hidden, self.head.build_memory(src, stored), src_keep)

    @torch.no_grad()
    def decode_step(self, tokens: Tensor, state: DecoderState) -> tuple[Tensor, DecoderState]:
        """One decoder step for every row: log-probabilities ``(N, V)`` of the next token after ``tokens``
        ``(N,)``, and the new state (reversible: the exact final state, so beams continue bit for bit).
        PAD and BOS get log-probability ``-inf``: a translation never contains them."""
        x = tokens[None]
        stem = self.tgt_stem.bind(training=False)
        if self.reversible:
            decoder = cast(ReversibleRNN, self.decoder)
            out, h_n = decoder(x, state.hidden, stem=stem)
            hidden = decoder.exact_state(h_n)
        else:
            out, hidden = self.decoder(stem(x), state.hidden)
        log_probs = self.head.log_probs(out, state.memory, state.memory_keep)[0]
        log_probs[:, [PAD, BOS]] = float("-inf")  # never generated (the searches leave this to the model)
        return log_probs, DecoderState(hidden, state.memory, state.memory_keep)
