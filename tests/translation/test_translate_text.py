"""``TranslationModel.translate_text``: raw sentences in, detokenised translations out, prepared as the training
corpus was; ``<unk>`` replaced by the most-attended source word; empty sentences named."""

from __future__ import annotations

from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from seq2seq_helpers import synthetic_data, tiny_model

from lightning_revrnn.datamodules.translation import (
    BOS,
    PAD,
    SPECIALS,
    UNK,
    TextPreprocessing,
    TranslationVocabulary,
)
from lightning_revrnn.translation.bleu import multi_bleu
from lightning_revrnn.translation.model import TranslationModel

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*IterableDataset.*has `__len__` defined.*"),
]


@pytest.fixture
def trained(trained_translation: Any) -> Any:
    return trained_translation


def test_translates_the_test_split_as_predict_does(trained: Any) -> None:
    model, data, _ = trained
    data.setup("test")
    sources, references = data.pairs("test").text.sources, data.pairs("test").text.targets
    got = model.translate_text(sources)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    predictions = trainer.predict(model, data)
    assert predictions is not None
    assert got == [line for batch in predictions for line in batch]
    assert multi_bleu(got, references) > 15  # it translates (an untrained model scores 0)
    assert model.translate_text(sources, batch_size=5) == got  # batched internally, in the caller's order
    assert model.translate_text(["  " + "   ".join(sources[0].split()) + " "]) == got[:1]  # whitespace-split


def test_a_loaded_checkpoint_translates_without_its_datamodule(trained: Any) -> None:
    model, data, checkpoint = trained
    loaded = TranslationModel.load_from_checkpoint(checkpoint)
    assert loaded.preprocessing == data.preprocessing == TextPreprocessing("whitespace")
    sentences = ["s1 s2 s3", "s7 s0", "s4 s4 s5 s6 s1"]
    assert loaded.translate_text(sentences) == model.translate_text(sentences)
    assert loaded.translate_text(sentences, beam=1) == model.translate_text(sentences, beam=1)


def test_an_empty_sentence_is_named(trained: Any) -> None:
    model = trained[0]
    with pytest.raises(ValueError, match=r"sentence 1 \('   '\) is empty"):
        model.translate_text(["s1 s2", "   ", "s3"])
    with pytest.raises(TypeError, match="wrap a single sentence in a list"):
        model.translate_text("s1 s2")
    assert model.translate_text([]) == []


def test_attended_positions_are_the_attention_of_decoding(trained: Any) -> None:
    """The teacher-forced rerun that picks replacement words attends where greedy decoding attended when it emitted
    each token."""
    model, data, _ = trained
    data.setup("test")
    batch = next(iter(data.test_dataloader()))
    seen: list[torch.Tensor] = []

    def record(module: Any, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        seen.append(module.weights(*inputs).argmax(-1)[0])

    model.eval()
    handle = model.head.attention.register_forward_hook(record)
    try:
        hypotheses = model.translate(batch.src, batch.src_keep, beam=1)
    finally:
        handle.remove()
    attended = model.attended_positions(batch.src, batch.src_keep, hypotheses)
    compared = 0
    for b, ids in enumerate(hypotheses):
        for j in range(len(ids)):
            assert int(attended[j, b]) == int(seen[j][b]), (b, j)
            compared += 1
    assert compared > 20


# ------------------------------------------------------------------------- unknown words, by construction
def _always_unk_model(rnn: Any, sentences: list[str]) -> TranslationModel:
    """A model whose generator always emits <unk> (one token: max_decode_len=1) and whose attention goes to the
    unknown source words: context ``emb`` with only <unk>'s embedding nonzero (``5u``) and ``W_a = u vᵀ`` with
    ``v·h > 0`` for the first decoder output ``h`` of every sentence, so the score ``hᵀ W_a s`` is positive at an
    unknown word and 0 elsewhere."""
    torch.manual_seed(0)
    src, tgt = TranslationVocabulary([*SPECIALS, "a", "b", "c"]), TranslationVocabulary([*SPECIALS, "x", "y"])
    model = TranslationModel(
        rnn,
        hidden_size=8,
        embedding_size=6,
        context="emb",
        beam=2,
        max_decode_len=1,
        dropout=0.0,
        src_vocab_size=len(src),
        tgt_vocab_size=len(tgt),
    )
    model.set_vocabularies(src, tgt, preprocessing=TextPreprocessing())
    model.eval()
    u = torch.zeros(6)
    u[0] = 1.0
    with torch.no_grad():
        model.head.generator.weight.zero_()
        model.head.generator.bias.zero_()
        model.head.generator.bias[UNK] = 10.0
        model.src_embedding.weight.zero_()
        model.src_embedding.weight[UNK] = 5.0 * u
        ids = [src.encode(s.split()) for s in sentences]
        length = max(map(len, ids))
        src_ids = torch.tensor([row + [PAD] * (length - len(row)) for row in ids]).t()
        state = model.initial_decoder_state(src_ids, src_ids != PAD)
        bos = torch.full((1, len(sentences)), BOS)
        stem = model.tgt_stem.bind(training=False)
        out, _ = (
            model.decoder(bos, state.hidden, stem=stem) if model.reversible else model.decoder(stem(bos), state.hidden)
        )
        v = F.normalize(out[0], dim=-1).sum(0)
        assert bool((out[0] @ v > 0).all())  # the construction's premise
        model.head.attention.query.weight.copy_(torch.outer(u, v))
    return model


@pytest.mark.parametrize("rnn", ["revgru", "gru"])
def test_unk_is_replaced_by_the_most_attended_source_word(rnn: str) -> None:
    sentences = ["b zorro c", "c b a xena", "quux a"]
    model = _always_unk_model(rnn, sentences)
    assert model.translate_text(sentences) == ["zorro", "xena", "quux"]
    assert model.translate_text(sentences, replace_unk=False) == ["<unk>"] * 3
    assert model.translate_text(sentences[1:2], beam=1) == ["xena"]


def test_text_without_preprocessing_says_how_to_set_it() -> None:
    model = tiny_model(vocab=12)
    with pytest.raises(ValueError, match="no vocabularies"):
        model.translate_text(["s1"])
    data = synthetic_data()
    data.setup("fit")
    assert data.src_vocab is not None and data.tgt_vocab is not None
    model.set_vocabularies(data.src_vocab, data.tgt_vocab)
    with pytest.raises(ValueError, match=r"model\.preprocessing = "):
        model.translate_text(["s1"])
