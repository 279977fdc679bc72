"""Shared test set-up: the repository root on sys.path, and a re-randomiser for parity tests."""
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int = 0, scale: float = 0.1, small: tuple = ()) -> torch.nn.Module:
    """Overwrite every parameter and BatchNorm statistic with seeded random values.

    Fresh models prove nothing in a parity test: DiffNeXt starts at exactly 2·x and every GRN or mixing-block gamma
    at 0. Parameters whose name starts with a prefix in `small` get 1/10 of the scale (the prior's head, so that
    |1 − b| stays away from 0).
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        s = scale / 10 if name.startswith(small) else scale
        p.copy_(torch.randn(p.shape, generator=g) * s)
    for name, b in module.named_buffers():
        if name.endswith("running_mean"):
            b.copy_(torch.randn(b.shape, generator=g) * 0.1)
        elif name.endswith("running_var"):
            b.copy_(torch.rand(b.shape, generator=g) + 0.5)
    return module
