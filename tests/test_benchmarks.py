"""The benchmarks run end to end in a minimal CPU mode and write what they claim: a table and JSON whose ratios are
finite and whose images are the ones diffusers makes (max abs difference below 1e-4), so that a benchmark cannot
silently time two different computations. In-process (main(argv)), to stay within seconds."""
import json
import math
import sys

import pytest
import torch

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
