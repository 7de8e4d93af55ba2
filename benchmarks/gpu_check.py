"""One-shot GPU check (``make gpu-check``): exactness on CUDA, host syncs, and the benchmarks against cuDNN.

Runs, each as a subprocess with its own time limit so one failure does not hide the others:

1. the exactness and gradient tests (``tests/core/test_cells.py``, ``tests/core/test_sweep.py``, ...) with every tensor
   created on the GPU (``REVRNN_TEST_DEVICE=cuda``, ``CUBLAS_WORKSPACE_CONFIG=:4096:8``);
2. a count of host-device synchronisations (``torch.cuda.set_sync_debug_mode``) and of CUDA kernels
   (``torch.profiler``) of a reverse-mode forward and backward, at two window lengths, so the per-step and
   per-window counts separate, for the default backend (``fused="auto"``: the fused one on CUDA) and the eager
   reference;
3. ``benchmarks/lm_step.py`` on CUDA, side by side with the nn.GRU / nn.LSTM LM (cuDNN), T 70 (1 and 2
   layers) and 1000, eager and fused rows; ``benchmarks/nmt_step.py`` at Multi30K sizes against the cuDNN
   baseline (the default backend).

Prints a summary table and writes ``benchmarks/results/gpu-check-<card>.json`` (the benchmarks write their own
JSON beside it). Without a GPU it says so and runs the CPU parts (the syncs are not counted: the CPU has none).
The whole check is sized to finish in under 8 minutes on one H100 (``--budget``, seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from lightning_revrnn.core.backend import Fused

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
#: Test files whose every test compares reconstructed states or gradients (the ones that must hold on CUDA).
EXACTNESS_TESTS = [
    "tests/core/test_fixed_point.py",
    "tests/core/test_buffer.py",
    "tests/core/test_cells.py",
    "tests/core/test_sweep.py",
    "tests/core/test_stem.py",
    "tests/core/test_errors.py",
    "tests/core/test_reference.py",
    "tests/core/test_protocol.py",
    "tests/core/test_rnn.py",
    "tests/core/test_autocast.py",
    "tests/core/test_masks.py",
    "tests/core/test_chaining.py",
    "tests/core/test_stored_units.py",
    "tests/translation/test_decoding.py",
    "tests/translation/test_seq2seq.py",
    "tests/fused/test_fused.py",
    "tests/fused/test_triton_kernels.py",
    "tests/core/test_capture_safety.py",
]
#: Test files whose tests are marked ``compile`` (left out of the default run): run with ``-m compile`` added.
COMPILE_TESTS = {"tests/fused/test_fused.py", "tests/fused/test_triton_kernels.py"}


def card_slug() -> str:
    """``nvidia-h100-80gb-hbm3`` for the current GPU, ``cpu`` without one."""
    if not torch.cuda.is_available():
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def run_step(name: str, command: list[str], timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one part as a subprocess, echoing its output; returns its exit code, time and output tail."""
    print(f"\n=== {name}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            command,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            timeout=timeout,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        rc, output = proc.returncode, proc.stdout
    except subprocess.TimeoutExpired as exc:
        rc, output = 124, (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
    print(output[-6000:], flush=True)
    return {"name": name, "rc": rc, "seconds": round(time.perf_counter() - start, 1), "tail": output[-2000:]}


def pytest_summary(tail: str) -> str:
    """The closing ``N passed, M failed`` line of a pytest run."""
    lines = [ln for ln in tail.splitlines() if re.search(r"\d+ (passed|failed|error|skipped)", ln)]
    return lines[-1].strip("= ") if lines else "no summary line"


def window_counts(cell: str, seq_len: int, device: torch.device, fused: Fused) -> dict[str, int]:
    """Host syncs (``set_sync_debug_mode``) and CUDA kernels (``torch.profiler``) of one reverse-mode forward and
    one backward: one layer 650, batch 20, 3 bits."""
    from torch.profiler import ProfilerActivity, profile

    from lightning_revrnn import RevGRU, RevLSTM

    torch.manual_seed(0)
    rnn = {"gru": RevGRU, "lstm": RevLSTM}[cell](650, 650, 1, max_forget_bits=3, fused=fused).to(device)
    x = torch.randn(seq_len, 20, 650, device=device, requires_grad=True)
    rnn(x)[0].sum().backward()  # warm-up: compiles, first-call allocations and library loading
    counts: dict[str, int] = {}
    for phase in ("forward", "backward"):
        torch.cuda.synchronize(device)
        with warnings.catch_warnings(record=True) as caught, profile(activities=[ProfilerActivity.CUDA]) as prof:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                if phase == "forward":
                    out = rnn(x)[0].sum()
                else:
                    out.backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize(device)
        counts[f"{phase}_syncs"] = sum("synchroniz" in str(w.message) for w in caught)
        counts[f"{phase}_kernels"] = sum(
            1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and e.name != "Memcpy"
        )
    return counts


def sync_report(device: torch.device) -> dict[str, Any]:
    """Syncs and kernels per window at T and 2T, per backend; their difference divided by T is the count per
    step and layer."""
    report: dict[str, Any] = {}
    backends: tuple[Fused, ...] = ("auto", False)
    for fused in backends:
        for cell in ("gru", "lstm"):
            short, long = window_counts(cell, 70, device, fused), window_counts(cell, 140, device, fused)
            report[f"{cell}-{'default' if fused == 'auto' else 'eager'}"] = {
                "T70": short,
                "T140": long,
                "per_step": {k: (long[k] - short[k]) / 70 for k in short},
                "per_window": {k: short[k] - 70 * (long[k] - short[k]) / 70 for k in short},
            }
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--skip-tests", action="store_true", help="only the sync count and the benchmarks")
    p.add_argument("--skip-bench", action="store_true", help="only the tests and the sync count")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per benchmark row (median reported)")
    p.add_argument("--bench-reserve", type=float, default=200, help="seconds of the budget kept for the benchmarks")
    p.add_argument("--budget", type=float, default=480, help="seconds for the whole check; parts past it are cut short")
    args = p.parse_args(argv)
    deadline = time.monotonic() + args.budget

    def left(limit: float) -> float:
        """A part's time limit: its own, or what is left of the budget if less (at least 1 s)."""
        return max(1.0, min(limit, deadline - time.monotonic()))

    has_gpu = torch.cuda.is_available()
    slug = card_slug()
    device = torch.device("cuda" if has_gpu else "cpu")
    where = torch.cuda.get_device_name() if has_gpu else "no GPU: CPU parts only"
    print(f"gpu-check on {where}, torch {torch.__version__}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    steps: list[dict[str, Any]] = []
    py = sys.executable
    if not args.skip_tests:
        # One pytest run per file, each with its share of the time, so a slow file cannot hide the others'
        # results and every failure is named (one line each).
        env = {"REVRNN_TEST_DEVICE": device.type, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
        missing = [t for t in EXACTNESS_TESTS if not (ROOT / t).exists()]
        if missing:  # a stale list would otherwise skip those tests without a word
            steps.append(
                {
                    "name": "missing test files",
                    "rc": 1,
                    "seconds": 0.0,
                    "tail": " ".join(missing),
                    "summary": f"not found: {' '.join(missing)}",
                }
            )
            print(f"\n=== missing test files (fix EXACTNESS_TESTS): {' '.join(missing)}", flush=True)
        tests = [t for t in EXACTNESS_TESTS if t not in missing]
        for i, test in enumerate(tests):
            # A file may use all the test time that is left, less 15 s for each file still to come.
            limit = deadline - time.monotonic() - args.bench_reserve - 15 * (len(tests) - 1 - i)
            marker = ["-m", "compile or not compile"] if test in COMPILE_TESTS else []
            step = run_step(
                test,
                [py, "-m", "pytest", "-q", "--tb=line", "-rfE", "-p", "no:cacheprovider", *marker, test],
                max(10.0, limit),
                env,
            )
            step["summary"] = pytest_summary(step["tail"])
            steps.append(step)
    syncs = sync_report(device) if has_gpu else None
    if syncs:
        print("\n=== host syncs (set_sync_debug_mode) and CUDA kernels (profiler), one layer 650, batch 20, 3 bits")
        print(json.dumps(syncs, indent=1))
    bench = ["--device", device.type, "--bits", "3", "--ckpt-chunks", "--fused", "--interleave"]
    if args.skip_bench:
        pass
    elif has_gpu:
        # The LM step is the figure users care about: T 70 at 1 and 2 layers (the cuDNN 2x650 reference),
        # then T 1000 at 1 layer with one timed repeat (a reverse step there is seconds of launches).
        steps.append(
            run_step(
                "LM step T70",
                [
                    py,
                    "benchmarks/lm_step.py",
                    *bench,
                    "--repeats",
                    str(args.repeats),
                    "--layers",
                    "1",
                    "2",
                    "--seq-lens",
                    "70",
                    "--out",
                    str(RESULTS / f"lm_step-{slug}-T70.json"),
                ],
                left(90),
            )
        )
        steps.append(
            run_step(
                "LM step T1000",
                [
                    py,
                    "benchmarks/lm_step.py",
                    *bench,
                    "--repeats",
                    "1",
                    "--layers",
                    "1",
                    "--seq-lens",
                    "1000",
                    "--out",
                    str(RESULTS / f"lm_step-{slug}-T1000.json"),
                ],
                left(170),
            )
        )
        steps.append(
            run_step(
                "translation step Multi30K",
                [
                    py,
                    "benchmarks/nmt_step.py",
                    "--device",
                    "cuda",
                    "--sizes",
                    "multi30k",
                    "--out",
                    str(RESULTS / f"nmt_step-{slug}-multi30k.json"),
                ],
                left(90),
            )
        )
    else:
        steps.append(
            run_step(
                "LM step benchmark (small, CPU)", [py, "benchmarks/lm_step.py", "--small", "--device", "cpu"], left(240)
            )
        )
    summary = {
        "card": torch.cuda.get_device_name() if has_gpu else "cpu",
        "torch": torch.__version__,
        "steps": [{k: v for k, v in s.items() if k != "tail"} for s in steps],
        "syncs": syncs,
    }
    out = RESULTS / f"gpu-check-{slug}.json"
    out.write_text(json.dumps(summary, indent=1) + "\n")
    print("\n| part | exit | seconds | result |\n|---|---|---|---|")
    for s in steps:
        print(f"| {s['name']} | {s['rc']} | {s['seconds']} | {s.get('summary', 'ok' if s['rc'] == 0 else 'FAILED')} |")
    print(f"wrote {out}")
    return 0 if all(s["rc"] == 0 for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
