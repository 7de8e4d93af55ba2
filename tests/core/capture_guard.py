"""A CPU stand-in for CUDA-graph capture rules: :class:`NoHostRead` fails on every operation that would read a
device value on the host, or allocate a tensor whose size depends on values, outside the reads a test allows.

A CUDA graph replays kernels with fixed shapes and no host in the loop, so a window loop can be captured only if
it never synchronises (``.item()``, ``bool(t)``, ``.tolist()``, ``torch.equal``), never computes an output shape
from values (``nonzero``, ``masked_select``, boolean indexing, ``unique``, ``repeat_interleave`` by a tensor) and
never copies to the host. On the CPU nothing of that is an error, so the guard makes it one:

* a :class:`~torch.utils._python_dispatch.TorchDispatchMode` sees every ATen operation and raises on the ones
  above (boolean indexing reaches ATen as ``index.Tensor`` with a bool index);
* ``Tensor.tolist``, ``Tensor.numpy`` and ``Tensor.__array__`` read CPU memory without dispatching, so they are
  patched for the guard's lifetime.

:meth:`NoHostRead.capture` turns the guard on for the calls of one function (the region a CUDA graph would
capture: a window's forward, its reverse sweep); :meth:`NoHostRead.permit` marks a function whose reads the design
permits (the one read at the end of each); :attr:`NoHostRead.allowed_entries` counts those, so a test can also check
there is exactly one each. Reads of host-side values outside the captured functions (a dropout seed drawn while the
window is planned) are not the guard's business.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

#: Operations that read a device value on the host (a synchronisation on CUDA).
HOST_READS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default}
#: Operations whose output size depends on the values of their input (a host read to allocate).
VALUE_SHAPED = {
    aten.nonzero.default,
    aten.argwhere.default,
    aten.masked_select.default,
    aten._unique.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.repeat_interleave.Tensor,
    aten.repeat_interleave.self_Tensor,
}


class CaptureViolation(AssertionError):
    """An operation inside the guarded region that CUDA-graph capture would not allow."""


class NoHostRead(TorchDispatchMode):
    """Raise :class:`CaptureViolation` on host reads and value-shaped allocations, except inside :meth:`allowed`.

    Use as a context manager around the code that a CUDA graph would capture, or through :meth:`capture`."""

    def __init__(self) -> None:
        super().__init__()
        self.allowed_depth = 0
        self.allowed_entries: dict[str, int] = {}
        self._patches: contextlib.ExitStack | None = None

    @contextlib.contextmanager
    def allowed(self, name: str) -> Iterator[None]:
        """Inside: reads are permitted (counted under ``name``)."""
        self.allowed_entries[name] = self.allowed_entries.get(name, 0) + 1
        self.allowed_depth += 1
        try:
            yield
        finally:
            self.allowed_depth -= 1

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if self.allowed_depth == 0:
            if func in HOST_READS:
                raise CaptureViolation(f"host read inside the captured region: {func}")
            if func in VALUE_SHAPED:
                raise CaptureViolation(f"allocation sized by values inside the captured region: {func}")
            if func is aten.index.Tensor and any(
                i is not None and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else [])
            ):
                raise CaptureViolation("boolean indexing (an allocation sized by values) inside the captured region")
        return func(*args, **kwargs)

    def __enter__(self) -> NoHostRead:
        self._patches = contextlib.ExitStack()
        for name in ("tolist", "numpy", "__array__"):
            self._patches.enter_context(_patched(torch.Tensor, name, self._guarded(getattr(torch.Tensor, name))))
        super().__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        assert self._patches is not None
        self._patches.close()

    def _guarded(self, method: Callable[..., Any]) -> Callable[..., Any]:
        def guarded(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if self.allowed_depth == 0:
                raise CaptureViolation(f"host read inside the captured region: Tensor.{method.__name__}")
            return method(tensor, *args, **kwargs)

        return guarded

    def capture(self, module: Any, name: str) -> contextlib.AbstractContextManager[None]:
        """Patch ``module.name`` (a function) so that its calls run with the guard on."""
        original = getattr(module, name)

        def captured(*args: Any, **kwargs: Any) -> Any:
            with self:
                return original(*args, **kwargs)

        return _patched(module, name, captured)

    def permit(self, module: Any, name: str) -> contextlib.AbstractContextManager[None]:
        """Patch ``module.name`` (a function) so that its calls run inside :meth:`allowed` (counted by name)."""
        original = getattr(module, name)

        def permitted(*args: Any, **kwargs: Any) -> Any:
            with self.allowed(name):
                return original(*args, **kwargs)

        return _patched(module, name, permitted)


@contextlib.contextmanager
def _patched(owner: Any, name: str, value: Any) -> Iterator[None]:
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)
