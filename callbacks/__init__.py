"""Lightning callbacks of lightning-revrnn (installed as ``lightning_revrnn.callbacks``)."""

from lightning_revrnn.callbacks.memory_report import MemoryReport
from lightning_revrnn.callbacks.resume_checkpoint import ResumeCheckpoint

__all__ = ["MemoryReport", "ResumeCheckpoint"]
