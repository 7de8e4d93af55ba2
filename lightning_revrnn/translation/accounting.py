"""The paper's accounting of a reversible translation model: one :class:`~lightning_revrnn.core.accounting.
MemoryAccounting` per side (the encoder's includes its stored attention units)."""

from __future__ import annotations

from dataclasses import dataclass

from lightning_revrnn.core.accounting import MemoryAccounting


@dataclass(frozen=True)
class TranslationAccounting:
    """The paper's accounting of a reversible translation model's last training window, per side."""

    encoder: MemoryAccounting
    decoder: MemoryAccounting

    def sides(self) -> tuple[tuple[str, MemoryAccounting], tuple[str, MemoryAccounting]]:
        """``(("encoder", ...), ("decoder", ...))``."""
        return ("encoder", self.encoder), ("decoder", self.decoder)

    def as_dict(self) -> dict[str, dict[str, object]]:
        """``{"encoder": ..., "decoder": ...}``, each :meth:`MemoryAccounting.as_dict`, for logs and JSON."""
        return {side: s.as_dict() for side, s in self.sides()}
