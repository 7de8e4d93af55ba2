"""A fit from a shipped config, stopped or killed in the middle of an epoch, resumes with ``--ckpt_path last`` and
ends with the weights of an uninterrupted fit, bit for bit (same process count, one thread: the same arithmetic).

Run as a user runs it: ``revrnn fit`` subprocesses, for two epochs of a small task: the synthetic LM config, and
the Multi30K translation config on the embedded reordering task with a tiny model. The configs' ``last.ckpt`` is
written every 200 steps; here every 3, so that a killed fit has one to go back to.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from cli_helpers import CONFIGS, EXIT_CODE, QUIET, revrnn, state_dict

EVERY = 3
#: config, its arguments for a small task, whether to kill it too (else: only stopped by max_steps)
CASES = {
    "lm": (
        "synthetic-revgru",
        ["--data.train_tokens", "6000", "--data.val_tokens", "700", "--data.test_tokens", "700"],
        True,
    ),
    "translation": (
        "multi30k-revgru",
        [
            "--data",
            "lightning_revrnn.datamodules.SyntheticTranslationDataModule",
            "--data.train_size",
            "160",
            "--data.val_size",
            "16",
            "--data.test_size",
            "16",
            "--data.batch_size",
            "16",
            "--data.max_len",
            "12",
            "--model.hidden_size",
            "16",
            "--model.embedding_size",
            "8",
            "--model.slice_dim",
            "4",
            "--model.max_decode_len",
            "6",
            "--trainer.max_epochs",
            "2",
        ],
        False,
    ),
}


def _config(name: str, path: Path, *extra_callbacks: dict[str, Any]) -> Path:
    """The shipped config with last.ckpt every EVERY steps (and the extra callbacks)."""
    config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    callbacks = config["trainer"]["callbacks"]
    for callback in callbacks:
        if callback["class_path"].endswith("ResumeCheckpoint"):
            callback["init_args"]["every_n_train_steps"] = EVERY
    callbacks.extend(extra_callbacks)
    path.write_text(yaml.safe_dump(config))
    return path


def _last_path(cwd: Path, name: str) -> Path:
    path = cwd / "logs" / name / "checkpoints" / "last.ckpt"
    assert path.is_file(), f"no {path}"
    return path


def _last(cwd: Path, name: str) -> dict[str, Any]:
    return dict(torch.load(_last_path(cwd, name), weights_only=False, map_location="cpu"))


def _position(checkpoint: dict[str, Any]) -> tuple[int, int, int, int]:
    """(global step, epochs the fit loop counts as completed, epoch and windows of the training loader)."""
    fit_loop = checkpoint["loops"]["fit_loop"]
    (loader,) = fit_loop["state_dict"]["combined_loader"]
    return (
        checkpoint["global_step"],
        fit_loop["epoch_progress"]["current"]["completed"],
        loader["epoch"],
        loader["windows"],
    )


@pytest.mark.parametrize("case", CASES)
def test_a_stopped_or_killed_fit_resumes_mid_epoch_to_the_uninterrupted_weights(tmp_path: Path, case: str) -> None:
    name, task, kill = CASES[case]
    args = [*task, "--trainer.limit_val_batches", "1", *QUIET]
    config = _config(name, tmp_path / "config.yaml")
    whole, run = tmp_path / "whole", tmp_path / "run"
    whole.mkdir()
    run.mkdir()

    revrnn("fit", "--config", str(config), *args, cwd=whole)
    final = _last(whole, name)  # written after the last batch of the last epoch
    steps = final["global_step"]
    assert steps >= 16 and _position(final)[2:] == (1, steps // 2)  # two epochs of the same number of batches

    # stopped by max_steps in the middle of epoch 0: last.ckpt is that step, inside the epoch (not a finished one)
    revrnn("fit", "--config", str(config), *args, "--trainer.max_steps", "4", cwd=run)
    assert _position(_last(run, name)) == (4, 0, 0, 4)

    if kill:  # resumed, then killed before step 8: last.ckpt is step 6 (every 3), still in epoch 0
        crash = _config(name, tmp_path / "crash.yaml", {"class_path": "cli_helpers.ExitAt", "init_args": {"at": 7}})
        killed = revrnn("fit", "--config", str(crash), *args, "--ckpt_path", "last", cwd=run, check=False)
        assert killed.returncode == EXIT_CODE, (killed.stdout + killed.stderr)[-3000:]
        assert _position(_last(run, name)) == (6, 0, 0, 6)

    # resumed: the rest of epoch 0, its validation and learning-rate update, epoch 1
    revrnn("fit", "--config", str(config), *args, "--ckpt_path", "last", cwd=run)
    resumed = _last(run, name)
    assert _position(resumed) == _position(final)
    weights, expected = resumed["state_dict"], state_dict(_last_path(whole, name))
    for key, value in expected.items():
        assert torch.equal(weights[key], value), f"{key}: max |diff| {float((weights[key] - value).abs().max())}"
    lr = [c["optimizer_states"][0]["param_groups"][0]["lr"] for c in (resumed, final)]
    assert lr[0] == lr[1]


@pytest.mark.parametrize("config", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_config_keeps_a_resume_point_inside_the_epoch(config: Path) -> None:
    """last.ckpt every 200 steps (and where max_steps stops) in a folder that is the same on every run, so that
    ``--ckpt_path last`` finds it; the best-by-validation checkpoint is saved after validation."""
    callbacks = {
        c["class_path"].rpartition(".")[2]: c.get("init_args", {})
        for c in yaml.safe_load(config.read_text())["trainer"]["callbacks"]
    }
    folder = f"logs/{config.stem}/checkpoints"
    assert callbacks["ResumeCheckpoint"] == {"dirpath": folder, "every_n_train_steps": 200}
    best = callbacks["ModelCheckpoint"]
    assert best["dirpath"] == folder and best["save_on_train_epoch_end"] is False and "save_last" not in best
