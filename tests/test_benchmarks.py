"""The benchmarks run end to end in a minimal CPU mode and write what they claim: a table and JSON whose ratios are
finite and whose images are the ones diffusers makes (max abs difference below 1e-4), so that a benchmark cannot
silently time two different computations. In-process (main(argv)), to stay within seconds."""
import dataclasses
import json
import math
import sys

import pytest
import torch

import stage_c
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.fixture
def threads():
    """The benchmarks set torch's thread count; give them the current one and restore it whatever happens."""
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


def test_bench_sample_tiny_matches_diffusers(tmp_path, threads):
    pytest.importorskip("diffusers")
    import bench_sample
    out = tmp_path / "sample.json"
    bench_sample.main(["--preset", "tiny", "--threads", str(threads), "--runs", "1", "--warmup", "0",
                       "--prior-steps", "3", "--decoder-steps", "2", "--decoder-guidance", "2",
                       "--no-memory", "--json", str(out)])
    data = json.loads(out.read_text())
    (result,) = data["results"]
    assert result["max_abs_diff"]["ours"] < 1e-4
    assert result["image_stats"]["std"] > 1e-3, "flat images: the comparison would prove nothing"
    for key in ("stage C", "stage B", "stage A", "total", "cpu total"):
        assert math.isfinite(result["ratio"]["ours"][key]) and result["ratio"]["ours"][key] > 0
    assert result["gflop_per_image"] > 0
    table = out.with_suffix(".md").read_text()
    assert "| tiny | 64² | 1 | total |" in table and "max abs diff" in table


def test_bench_train_tiny_reports_every_stage(tmp_path, threads):
    import bench_train
    out = tmp_path / "train.json"
    bench_train.main(["--preset", "tiny", "--threads", str(threads), "--steps", "1", "--warmup", "0",
                      "--batch-a", "2", "--batch-b", "2", "--batch-c", "2", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["stage"] for r in rows] == ["A", "B", "C"]
    for r in rows:
        assert math.isfinite(r["samples_per_s"]) and r["samples_per_s"] > 0
        assert r["gflop_per_sample"] > 0
    assert "| tiny | C | 2 |" in out.with_suffix(".md").read_text()


def test_bench_finetune_reports_full_and_lora(tmp_path, threads):
    import bench_finetune
    out = tmp_path / "finetune.json"
    bench_finetune.main(["--depth", "1", "--c", "128", "--side", "256", "--batch", "1", "2", "--steps", "1",
                         "--warmup", "0", "--threads", str(threads), "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["mode"], r["grad_checkpoint"], r["batch"]) for r in rows] == [
        (m, c, b) for m in ("full", "lora") for c in (False, True) for b in (1, 2)]
    full, adapters = rows[0], rows[4]
    assert adapters["trainable_M"] < full["trainable_M"] / 10 and adapters["state_mib"] < full["state_mib"]
    assert all(math.isfinite(r["step_ms"]) and r["step_ms"] > 0 for r in rows)
    assert "| lora | yes | 2 | 16×6×6 |" in out.with_suffix(".md").read_text()
    # Scaled up to the paper's 32 blocks from depths 1 and 2: the state is counted.
    deeper = tmp_path / "finetune2.json"
    bench_finetune.main(["--depth", "2", "--c", "128", "--side", "256", "--batch", "1", "2", "--steps", "1",
                         "--warmup", "0", "--threads", str(threads), "--json", str(deeper)])
    scaled = tmp_path / "scaled.json"
    bench_finetune.main(["--scale", str(deeper), str(out), "--json", str(scaled)])
    big = json.loads(scaled.read_text())["rows"]
    paper_at_128 = dataclasses.replace(stage_c.PRESETS["paper"], c=128, nhead=2)
    params = sum(p.numel() for p in stage_c.Prior(paper_at_128).parameters())
    assert big[0]["state_mib"] == pytest.approx(20 * params / 2 ** 20)       # weights, gradients, AdamW, EMA
    # The extrapolation is right: scaled to depth 3, it gives what a run at depth 3 keeps (with checkpointing, plus
    # one triple's insides, which backward recomputes and that run's count leaves out).
    three = tmp_path / "finetune3.json"
    bench_finetune.main(["--depth", "3", "--c", "128", "--side", "256", "--batch", "1", "2", "--steps", "1",
                         "--warmup", "0", "--threads", str(threads), "--json", str(three)])
    bench_finetune.main(["--scale", str(out), str(deeper), "--depth", "3", "--json", str(scaled)])
    two = json.loads(deeper.read_text())["rows"]
    triple = {(a["mode"], a["batch"]): b["saved_mib"] - a["saved_mib"]
              for a, b in zip(rows, two) if not a["grad_checkpoint"]}
    for r, m in zip(json.loads(scaled.read_text())["rows"], json.loads(three.read_text())["rows"]):
        recomputed = triple[r["mode"], r["batch"]] if r["grad_checkpoint"] else 0.0
        assert r["kept_mib"] - recomputed == pytest.approx(m["saved_mib"], rel=1e-6), r
    # What backward keeps: less with checkpointing, more with the batch, and less with LoRA (a frozen layer's input
    # is not needed for its weight's gradient).
    at = {(r["mode"], r["grad_checkpoint"], r["batch"]): r["saved_mib"] for r in rows}
    assert at["full", True, 2] < at["full", False, 2] and at["full", False, 1] < at["full", False, 2]
    assert at["lora", False, 2] < at["full", False, 2]
