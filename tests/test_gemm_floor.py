"""benchmarks/gemm_floor.py records a step's matrix products as they ran and replays exactly those."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from test_step_parts import _load

gemm_floor = _load("gemm_floor")


def test_recorder_keeps_products_in_order_and_counts_the_other_ops() -> None:
    w, x, acc = torch.randn(6, 4), torch.randn(3, 4), torch.zeros(6, 4)
    with gemm_floor.ProductRecorder() as rec:
        y = torch.addmm(torch.zeros(6), x, w.t())  # zeros: an op; t(): a view
        acc.addmm_(y.t(), x)
        z = torch.tanh(y @ w)
    names = [p.func.overloadpacket.__name__ for p in rec.products]
    assert names == ["addmm", "addmm_", "mm"]
    assert rec.other_ops == 2  # zeros and tanh
    weight = rec.products[0].args[2]
    assert weight.shape == (4, 6) and weight.stride == (1, 4)  # the transposed view, as it was read
    assert rec.products[2].args[1].storage == weight.storage  # the same weight, read twice
    assert z.shape == (3, 4)


def test_replay_lays_operands_out_as_recorded_and_shares_storages() -> None:
    w, x = torch.randn(6, 4), torch.randn(3, 4)
    with gemm_floor.ProductRecorder() as rec:
        torch.mm(x, w.t())
        torch.mm(torch.mm(x, w.t()), w)
    replay = gemm_floor.ProductReplay(rec)
    (_, first, _), _, (_, last, _) = replay.calls
    assert first[1].stride() == (1, 4) and last[1].stride() == (4, 1)
    assert first[1].untyped_storage().data_ptr() == last[1].untyped_storage().data_ptr()  # one weight
    assert first[0].untyped_storage().data_ptr() != first[1].untyped_storage().data_ptr()
    assert replay.shapes() == [[(3, 4), (4, 6)], [(3, 4), (4, 6)], [(3, 6), (6, 4)]]
    out = torch.empty(3, 6)
    with gemm_floor.ProductRecorder() as rec_out:
        torch.mm(x, w.t(), out=out)
    ((_, _, named),) = gemm_floor.ProductReplay(rec_out).calls
    assert named["out"].shape == (3, 6)
    assert named["out"].untyped_storage().data_ptr() != out.untyped_storage().data_ptr()  # replayed, not the step's
    only_last = gemm_floor.ProductReplay(rec, lambda p: p.args[1].shape == (6, 4))
    assert only_last.shapes() == [[(3, 6), (6, 4)]]
    replay.run()


def test_reversible_lm_step_records_its_head_products_and_the_table_is_written(tmp_path: Path) -> None:
    out = tmp_path / "floor.json"
    argv = ["--small", "--cells", "lstm", "--seq-lens", "8", "--repeats", "1", "--out", str(out)]
    (group,) = gemm_floor.main(argv)
    # T 8 in 4-step chunks: the head's logits GEMM on one step (the check for undeclared tensors), in forward
    # (2 chunks) and in the sweep (2 chunks), each there with its 2 gradients
    assert group["head_products"] == 1 + 2 + 2 * 3
    assert group["products"] > group["head_products"] and group["other_ops"] > 0
    saved = json.loads(out.read_text())
    assert saved["groups"][0]["median_ms"].keys() == {"baseline", "reversible", "floor", "floor_head"}
