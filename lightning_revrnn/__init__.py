"""lightning-revrnn: reversible RNNs that reconstruct hidden states exactly instead of storing them.

The public names live here: the sequence modules and cells, the head/stem protocol, the two LightningModules,
the accounting and the errors. The layers below: :mod:`lightning_revrnn.core` (the exact reversible core),
:mod:`lightning_revrnn.fused` (its fast backend), :mod:`lightning_revrnn.lm` and :mod:`lightning_revrnn.translation`
(the model families), :mod:`lightning_revrnn.shared` (what both families use).
"""

from lightning_revrnn.core.accounting import MemoryAccounting
from lightning_revrnn.core.backend import Backend, EagerBackend
from lightning_revrnn.core.buffer import InformationBuffer
from lightning_revrnn.core.cell_base import ReversibleCell
from lightning_revrnn.core.cells import NFRevGRUCell, NFRevLSTMCell, RevGRUCell, RevLSTMCell
from lightning_revrnn.core.errors import FixedPointOverflowError, FusedPathError, ReconstructionError
from lightning_revrnn.core.protocol import StepHead, StepStem
from lightning_revrnn.core.rnn import NFRevGRU, NFRevLSTM, ReversibleRNN, RevGRU, RevLSTM
from lightning_revrnn.lm import DecoderHead, LanguageModel
from lightning_revrnn.shared import BaselineRNN, EmbeddingStem, NonFiniteLossError
from lightning_revrnn.translation import (
    AttentionHead,
    DetokenizedBLEU,
    LuongAttention,
    TokenizedBLEU,
    TranslationModel,
    beam_search,
    detokenize,
    greedy_search,
    multi_bleu,
)

__all__ = [
    "AttentionHead",
    "Backend",
    "BaselineRNN",
    "DecoderHead",
    "DetokenizedBLEU",
    "EagerBackend",
    "EmbeddingStem",
    "FixedPointOverflowError",
    "FusedPathError",
    "InformationBuffer",
    "LanguageModel",
    "LuongAttention",
    "MemoryAccounting",
    "NFRevGRU",
    "NFRevGRUCell",
    "NFRevLSTM",
    "NFRevLSTMCell",
    "NonFiniteLossError",
    "ReconstructionError",
    "RevGRU",
    "RevGRUCell",
    "RevLSTM",
    "RevLSTMCell",
    "ReversibleCell",
    "ReversibleRNN",
    "StepHead",
    "StepStem",
    "TokenizedBLEU",
    "TranslationModel",
    "beam_search",
    "detokenize",
    "greedy_search",
    "multi_bleu",
]
__version__ = "0.1.0"
