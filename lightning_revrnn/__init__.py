"""lightning-revrnn: reversible RNNs that reconstruct hidden states exactly instead of storing them."""

from lightning_revrnn.bleu import DetokenizedBLEU, TokenizedBLEU, detokenize, multi_bleu
from lightning_revrnn.buffer import BufferStats, InformationBuffer
from lightning_revrnn.cells import NFRevGRUCell, NFRevLSTMCell, ReversibleCell, RevGRUCell, RevLSTMCell
from lightning_revrnn.decoding import beam_search, greedy_search
from lightning_revrnn.errors import FixedPointOverflowError, ReconstructionError
from lightning_revrnn.rnn import NFRevGRU, NFRevLSTM, ReversibleRNN, RevGRU, RevLSTM
from lightning_revrnn.sweep import StepHead, StepStem

__all__ = [
    "BufferStats",
    "DetokenizedBLEU",
    "FixedPointOverflowError",
    "InformationBuffer",
    "NFRevGRU",
    "NFRevGRUCell",
    "NFRevLSTM",
    "NFRevLSTMCell",
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
    "beam_search",
    "detokenize",
    "greedy_search",
    "multi_bleu",
]
__version__ = "0.1.0"
