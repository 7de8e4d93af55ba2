"""benchmarks/gemm_floor.py records a step's matrix products as they ran and replays exactly those."""

from __future__ import annotations

import doctest
import json
import statistics
from pathlib import Path

import torch
from test_step_parts import _load

gemm_floor = _load("gemm_floor")
#: Name parts of the ATen ops that multiply matrices or vectors (what the recorder must never count as "other").
PRODUCT_WORDS = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "mv", "addmv", "dot", "vdot", "addr", "matmul", "linear"}


def _product_like(name: str) -> bool:
    return bool(PRODUCT_WORDS & set(name.strip("_").split("_")))


def test_recorder_keeps_products_in_order_and_counts_the_other_ops() -> None:
    w, x, acc = torch.randn(6, 4), torch.randn(3, 4), torch.zeros(6, 4)
    with gemm_floor.ProductRecorder() as rec:
        y = torch.addmm(torch.zeros(6), x, w.t())  # zeros: an op; t(): a view
        acc.addmm_(y.t(), x)
        z = torch.tanh(y @ w)
    names = [p.func.overloadpacket.__name__ for p in rec.products]
    assert names == ["addmm", "addmm_", "mm"]
    assert rec.others == {"zeros": 1, "tanh": 1} and rec.other_ops == 2
    weight = rec.products[0].args[2]
    assert weight.shape == (4, 6) and weight.stride == (1, 4)  # the transposed view, as it was read
    assert rec.products[2].args[1].storage == weight.storage  # the same weight, read twice
    assert z.shape == (3, 4)


def test_in_place_and_vector_products_are_recorded_too() -> None:
    a, b3, v = torch.randn(4, 4), torch.randn(2, 4, 4), torch.randn(4)
    with gemm_floor.ProductRecorder() as rec:
        v.clone().addmv_(a, v)
        a.clone().addr_(v, v)
        b3.clone().baddbmm_(b3, b3)
        torch.nn.functional.linear(v, a)
        torch.matmul(b3, b3)
    assert not [n for n in rec.others if _product_like(n)], rec.others
    assert len(rec.products) == 5


def test_replay_lays_operands_out_as_recorded_and_shares_storages() -> None:
    w, x = torch.randn(6, 4), torch.randn(3, 4)
    out = torch.empty(3, 6)
    with gemm_floor.ProductRecorder() as rec:
        torch.mm(x, w.t(), out=out)
        torch.mm(out, w)
    replay = gemm_floor.ProductReplay(rec)
    (_, first, named), (_, second, _) = replay.calls
    assert first[1].stride() == (1, 4) and second[1].stride() == (4, 1)
    assert first[1].untyped_storage().data_ptr() == second[1].untyped_storage().data_ptr()  # one weight
    assert named["out"].stride() == (6, 1) and named["out"].storage_offset() == 0
    assert named["out"].untyped_storage().data_ptr() == second[0].untyped_storage().data_ptr()  # written, then read
    assert first[0].untyped_storage().data_ptr() != first[1].untyped_storage().data_ptr()
    assert replay.shapes() == [[(3, 4), (4, 6), (3, 6)], [(3, 6), (6, 4)]]
    only_second = gemm_floor.ProductReplay(rec, lambda p: p.args[1].shape == (6, 4))
    assert only_second.shapes() == [[(3, 6), (6, 4)]]
    replay.run()


def test_docstring_example() -> None:
    assert doctest.testmod(gemm_floor, raise_on_error=True).attempted > 0


def test_lm_steps_record_every_product_and_the_json_holds_the_reported_ratios(tmp_path: Path) -> None:
    out = tmp_path / "floor.json"
    groups = gemm_floor.main(["--small", "--seq-lens", "8", "--repeats", "3", "--out", str(out)])
    for group in groups:
        # T 8 in 4-step chunks: the head's logits GEMM on one step (the check for undeclared tensors), in forward
        # (2 chunks) and in the sweep (2 chunks), each there with its 2 gradients; the nn.* LM's: logits and 2
        assert group["head_products"] == 1 + 2 + 2 * 3 and group["baseline_head_products"] == 3
        s = group["samples_ms"]
        ratios = [r / b for r, b in zip(s["reversible"], s["baseline"])]
        assert group["step_ratio"] == statistics.median(ratios)
        assert group["step_ratio_range"] == [min(ratios), max(ratios)]
        per_op = [(r - f) * 1e3 / group["other_ops"] for r, f in zip(s["reversible"], s["floor"])]
        assert group["us_per_other_op"] == statistics.median(per_op)
    assert [g["cell"] for g in json.loads(out.read_text())["groups"]] == ["gru", "lstm"]


def test_reversible_steps_leave_no_product_uncounted() -> None:
    for cell in ("gru", "lstm"):
        config = gemm_floor.Config(cell=cell, layers=2, seq_len=6, batch=2, vocab=30, emb=8, hidden=8, variant="rev")
        model = gemm_floor.build_model(config, torch.device("cpu"))
        rec = gemm_floor.record_step(model, gemm_floor.make_batch(config, torch.device("cpu")))
        assert rec.products and not [n for n in rec.others if _product_like(n)], rec.others
