"""The float settings forward and the reverse sweep must share: the caller's autocast (re-entered around the
stem and head) and the float32 matmul precision (recorded in forward, checked in backward). The cells always
compute with autocast off (:func:`cells_context`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AutocastState:
    """The caller's autocast for one device type, recorded in forward and re-entered by the reverse sweep
    around the stem and the head (the cells always compute with autocast off)."""

    device_type: str
    enabled: bool
    dtype: torch.dtype

    @classmethod
    def capture(cls, device: torch.device) -> AutocastState:
        """The autocast state in effect now for ``device``'s type."""
        kind = device.type
        return cls(kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))

    def enter(self) -> contextlib.AbstractContextManager[None]:
        """A context that re-enters this state (nothing to do when autocast was off)."""
        if not self.enabled:
            return torch.autocast(self.device_type, enabled=False)
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=True)


def matmul_precision_state() -> tuple[str, ...]:
    """The float32 matmul precision settings, read with the per-backend API where it exists (reading the
    legacy global after the new API was used raises "mix of the legacy and new APIs")."""
    backends = torch.backends
    try:
        return (
            str(backends.fp32_precision),  # type: ignore[attr-defined]  # newer than torch's stubs
            str(backends.cuda.matmul.fp32_precision),
            str(backends.mkldnn.matmul.fp32_precision),  # type: ignore[attr-defined]  # newer than torch's stubs
        )
    except AttributeError:  # a torch without the per-backend API
        return (torch.get_float32_matmul_precision(),)


@contextlib.contextmanager
def cells_context(device: torch.device) -> Iterator[None]:
    """Autocast off: the cells compute in float32, so forward and reverse round alike. (The float32 matmul
    precision is not touched: forward records it and backward checks it, see :class:`ReverseSweep`.)"""
    with torch.autocast(device_type=device.type, enabled=False):
        yield
