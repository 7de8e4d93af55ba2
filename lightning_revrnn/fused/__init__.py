"""The fused backend: the exact half-steps of :mod:`lightning_revrnn.core` as a few compiled kernels.

It plugs into the core through the :class:`~lightning_revrnn.core.backend.Backend` seam and imports from the
core, never the reverse (the core imports it by name, on first use, in
:func:`~lightning_revrnn.core.backend.backend_for`).
"""

from lightning_revrnn.fused.backend import FusedBackend, default_backend
from lightning_revrnn.fused.stages import StageCounter, Stages

__all__ = ["FusedBackend", "StageCounter", "Stages", "default_backend"]
