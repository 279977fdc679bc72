"""Helpers shared by the benchmarks: threads, synchronised clocks, peak memory, random weights, tables.

Peak memory is measured two ways, and each row says which:
- CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus what was allocated before (tensors
  only; the caching allocator's reserve is not counted);
- CPU: the process's peak resident set (VmHWM in /proc/self/status), reset to the current RSS by writing 5 to
  /proc/self/clear_refs, minus the RSS before. tracemalloc would see none of torch's allocations. Memory that glibc
  kept from earlier work is reused without growing RSS, so callers measure in a fresh process, or after
  malloc_trim, to get an honest number.
"""
import ctypes
import json
import math
import os
import re
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def set_threads(threads: int | None) -> int:
    """Intra-op threads, set explicitly so that every report can state it (default: all cores)."""
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def start(args, script: str, argv: list[str]) -> torch.device:
    """What every benchmark does first: records its command line and thread count in `args` (both go into the
    report), and on CUDA checks that the card is there and turns on TF32, as train.py and sample.py do."""
    args.command = " ".join([Path(script).name, *argv])
    args.threads = set_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {args.device}: CUDA is not available here; use --device cpu")
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return device


def synced(device) -> float:
    """perf_counter after the device has finished its queued work."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def median(values) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


# ----------------------------------------------------------------------------------------------------------------
# Peak memory
# ----------------------------------------------------------------------------------------------------------------
def _proc_status_kib() -> dict:
    text = Path("/proc/self/status").read_text()
    return {k: int(v) for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", text, re.M)}


def trim_heap():
    """Give freed heap memory back to the OS, so that a later RSS baseline is not inflated by it (glibc only)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak extra memory of the code inside `with PeakMemory(device) as m:`, in MiB, as `m.mib`; `m.how` says how."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.mib, self.how = float("nan"), "n/a"

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            self.how = "torch.cuda.max_memory_allocated − allocated before"
        else:
            trim_heap()
            try:
                Path("/proc/self/clear_refs").write_text("5")          # VmHWM := VmRSS
                self.before = _proc_status_kib()["VmRSS"]
                self.how = "peak RSS (VmHWM after clear_refs) − RSS before"
            except (OSError, KeyError):
                self.before = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = (torch.cuda.max_memory_allocated(self.device) - self.before) / 2 ** 20
        elif self.before is not None:
            self.mib = (_proc_status_kib()["VmHWM"] - self.before) / 1024
        return False


# ----------------------------------------------------------------------------------------------------------------
# Random weights
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int, small: tuple = ()) -> torch.nn.Module:
    """Overwrite every parameter and BatchNorm statistic with seeded random values, so that no path is trivial.

    Fresh models prove nothing when comparing outputs: DiffNeXt starts at exactly 2·x and every GRN or mixing-block
    gamma at 0. Matrices get std 1/√fan-in, so activations stay O(1) at any width (tests/conftest.py's fixed 0.1
    would blow up at the paper preset); vectors (biases, norms' gammas) std 0.1. Names starting with a prefix in
    `small` get a tenth of that (the prior's head, so that |1 − b| stays away from 0). Drawn on the parameter's
    device, so the paper preset is quick to fill on a GPU.
    """
    gens = {}

    def gen(device):
        if device not in gens:
            gens[device] = torch.Generator(device).manual_seed(seed)
        return gens[device]

    for name, p in module.named_parameters():
        matrix = p.dim() > 1 and p.shape[0] > 1                           # not GRN's (1, 1, 1, C) gamma/beta
        std = 1 / math.sqrt(p[0].numel()) if matrix else 0.1
        std = std / 10 if name.startswith(small) else std
        p.copy_(torch.randn(p.shape, generator=gen(p.device), device=p.device, dtype=torch.float32) * std)
    for name, b in module.named_buffers():
        if name.endswith("running_mean"):
            b.copy_(torch.randn(b.shape, generator=gen(b.device), device=b.device) * 0.1)
        elif name.endswith("running_var"):
            b.copy_(torch.rand(b.shape, generator=gen(b.device), device=b.device) + 0.5)
    return module


# ----------------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------------
def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    model = ""
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()}-core CPU{f' ({model})' if model else ''}"


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path, data: dict):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=1, default=str))
