"""benchmarks/gpu_smoke.py (the GPU check of issue 3) runs as a CPU dry run: each row is measured and written."""
import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import ROOT


def test_gpu_smoke_dry_run_on_cpu(tmp_path):
    out = tmp_path / "smoke.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_smoke.py"), "--preset", "tiny",
                          "--device", "cpu", "--precision", "fp32", "--batch", "2", "--steps", "1", "--warmup", "0",
                          "--json", str(out)], capture_output=True, text=True, timeout=300,
                         env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert run.returncode == 0, run.stderr
    info = json.loads(out.read_text())
    assert [r["what"].split()[:2] for r in info["rows"]] == [["train", "A"], ["train", "B"], ["train", "C"],
                                                               ["sample", "64²"]]
    assert all(math.isfinite(r["it/s"]) and r["it/s"] > 0 for r in info["rows"])
    assert run.stdout.strip().splitlines()[-1].startswith("sample 64²")       # the table comes last


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_gpu_smoke_refuses_missing_cuda():
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_smoke.py"), "--device", "cuda"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert run.stderr.strip().splitlines() == [
        "error: --device cuda: CUDA is not available here; use --device cpu for a dry run"]
