"""``revrnn translate``: translate a file of raw sentences with a trained TranslationModel checkpoint.

    revrnn translate --ckpt_path logs/multi30k-revgru/version_0/checkpoints/last.ckpt --input in.en --output out.de
    echo "A man is riding a bike." | revrnn translate --ckpt_path model.ckpt      # - (default): stdin / stdout

One sentence per input line, one detokenised translation per output line, in order. The checkpoint brings the
vocabularies and the preprocessing of the training corpus (:meth:`TranslationModel.translate_text`), so no
DataModule or config is needed: a checkpoint written by ``revrnn fit`` works as one saved from Python
(``trainer.save_checkpoint``). Sentences are translated in batches; inputs longer than a few batches show a
progress bar on stderr. An empty input line is an error naming it.
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import torch
from tqdm import tqdm  # type: ignore[import-untyped]  # no stubs in the dependencies

from lightning_revrnn.translation.model import TranslationModel

#: Inputs with at least this many sentences show a progress bar (stderr), unless ``--no_progress``.
PROGRESS_MIN = 200
#: Batches translated between two writes (and progress updates): sentences of similar length batch together.
BATCHES_PER_CHUNK = 4


def parser() -> argparse.ArgumentParser:
    """The ``revrnn translate`` arguments."""
    p = argparse.ArgumentParser(
        prog="revrnn translate",
        description="Translate raw sentences (one per line) with a TranslationModel checkpoint. The checkpoint keeps "
        "its vocabularies and its corpus's preprocessing (e.g. Multi30K: lower-case, Moses tokens), so no "
        "DataModule or config is needed.",
    )
    p.add_argument(
        "--ckpt_path", required=True, help="a TranslationModel checkpoint (revrnn fit, or saved from Python)"
    )
    p.add_argument("--input", default="-", help="source sentences, one per line (default -: stdin)")
    p.add_argument("--output", default="-", help="translations, one per line (default -: stdout)")
    p.add_argument("--beam", type=int, default=None, help="beam size (1: greedy; default: the model's, 5)")
    p.add_argument("--max_decode_len", type=int, default=None, help="most target tokens per sentence (default 100)")
    p.add_argument("--batch_size", type=int, default=32, help="sentences decoded at once (default 32)")
    p.add_argument(
        "--no_replace_unk",
        action="store_true",
        help="keep <unk> in translations (default: replace it by the most-attended source word)",
    )
    p.add_argument("--device", default="auto", help="torch device (default auto: cuda if available, else cpu)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar on stderr")
    return p


def main(args: Sequence[str]) -> None:
    """Run ``revrnn translate`` with ``args`` (the words after ``translate``); exits with status 2 on bad input."""
    p = parser()
    opts = p.parse_args(list(args))
    if opts.batch_size < 1:
        p.error(f"--batch_size must be at least 1, got {opts.batch_size}")
    if opts.beam is not None and opts.beam < 1:
        p.error(f"--beam must be at least 1, got {opts.beam}")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if opts.device == "auto" else opts.device)
    overrides: dict[str, Any] = {}
    if opts.max_decode_len is not None:
        overrides["max_decode_len"] = opts.max_decode_len
    model = load_model(opts.ckpt_path, device, overrides, p)  # before reading stdin: a wrong checkpoint fails fast
    lines = read_lines(opts.input, p)
    empty = [n for n, line in enumerate(lines, 1) if not line.strip()]
    if empty:
        name = "stdin" if opts.input == "-" else opts.input
        p.error(
            f"line {empty[0]} of {name} is empty ({len(empty)} empty lines in all); every line must hold a "
            "sentence to translate: remove the empty lines"
        )
    chunk = opts.batch_size * BATCHES_PER_CHUNK
    progress = tqdm(
        total=len(lines),
        unit="sent",
        file=sys.stderr,
        desc="translating",
        disable=opts.no_progress or len(lines) < PROGRESS_MIN,
    )
    with open_output(opts.output) as out, progress:
        for start in range(0, len(lines), chunk):
            part = lines[start : start + chunk]
            translations = model.translate_text(
                part, beam=opts.beam, replace_unk=not opts.no_replace_unk, batch_size=opts.batch_size
            )
            out.write("".join(f"{t}\n" for t in translations))
            out.flush()
            progress.update(len(part))


def read_lines(name: str, p: argparse.ArgumentParser) -> list[str]:
    """The lines of file ``name`` (``-``: stdin), UTF-8, without line ends."""
    try:
        data = sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
        return data.decode("utf-8").splitlines()
    except OSError as error:
        p.error(f"cannot read --input {name}: {error}")
    except UnicodeDecodeError as error:
        p.error(f"--input {name} is not UTF-8 text: {error}")


def open_output(name: str) -> IO[str]:
    """A UTF-8 text stream to file ``name`` (``-``: stdout, left open)."""
    if name == "-":
        return io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", newline="\n", write_through=True)
    return open(name, "w", encoding="utf-8", newline="\n")  # the caller's `with` closes it


def load_model(
    path: str, device: torch.device, overrides: dict[str, Any], p: argparse.ArgumentParser
) -> TranslationModel:
    """The TranslationModel of checkpoint ``path`` on ``device``, in evaluation mode; a clear error otherwise."""
    if not Path(path).is_file():
        p.error(f"--ckpt_path {path}: no such file")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, dict) or "revrnn_vocab" not in checkpoint:
        p.error(
            f"--ckpt_path {path} is not a TranslationModel checkpoint with its vocabularies (written by "
            "`revrnn fit` or `trainer.save_checkpoint` with a translation DataModule)"
        )
    del checkpoint
    model = TranslationModel.load_from_checkpoint(path, map_location="cpu", weights_only=False, **overrides)
    if model.preprocessing is None:
        p.error(
            f"--ckpt_path {path} does not record how its training text was preprocessed (written before "
            "checkpoints kept it); translate from Python instead, setting model.preprocessing (see translate_text)"
        )
    model.to(device).eval()
    return model


if __name__ == "__main__":  # python -m lightning_revrnn.translation.translate_cli ...
    main(sys.argv[1:])
