"""Lightning callbacks of lightning-revrnn (installed as ``lightning_revrnn.callbacks``)."""

from lightning_revrnn.callbacks.memory_report import MemoryReport

__all__ = ["MemoryReport"]
