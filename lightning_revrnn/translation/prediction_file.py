"""Where ``predict`` writes translations: one line per sentence, one file per process."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import IO


class PredictionFile:
    """A text file written line by line during one predict epoch.

    With several processes each rank writes its own share to ``name.rank<r>.ext`` (ranks see different
    sentences; one process writes ``path`` itself). Folders are created as needed.
    """

    def __init__(self, path: str, rank: int = 0, world_size: int = 1) -> None:
        if world_size > 1:
            stem, ext = os.path.splitext(path)
            path = f"{stem}.rank{rank}{ext}"
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._file: IO[str] | None = open(path, "w", encoding="utf-8")  # noqa: SIM115  # open across predict batches until close()

    def write(self, lines: Iterable[str]) -> None:
        """Append ``lines``, one per line."""
        assert self._file is not None, "PredictionFile.write() after close()"
        self._file.writelines(line + "\n" for line in lines)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
