"""Attention seq2seq translation: the :class:`TranslationModel` LightningModule, its attention head, decoding
and BLEU."""

from lightning_revrnn.translation.attention import AttentionHead, LuongAttention
from lightning_revrnn.translation.bleu import DetokenizedBLEU, TokenizedBLEU, detokenize, multi_bleu
from lightning_revrnn.translation.decoding import beam_search, greedy_search
from lightning_revrnn.translation.model import TranslationModel

__all__ = [
    "AttentionHead",
    "DetokenizedBLEU",
    "LuongAttention",
    "TokenizedBLEU",
    "TranslationModel",
    "beam_search",
    "detokenize",
    "greedy_search",
    "multi_bleu",
]
