"""Parameter counts of the released configs, and the semantic compressor against torchvision's EfficientNetV2-S.

No diffusers or torchvision needed. The paper-size models are built on the meta device (no memory, no init cost);
the reference numbers come from REFERENCE.md §2 (counted by instantiating the released modules) and from
tests/fixtures/effnet_v2_s_{meta,keys}.json and effnet_v2_s_golden.safetensors, made with torchvision's
`efficientnet_v2_s().features` wrapped as `backbone` + a `mapper` (Conv1×1 1280→16 no bias, BatchNorm2d(16)).
"""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES

import stage_a
import stage_b
import stage_c


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------------------------
# Exact parameter counts of the paper presets
# ----------------------------------------------------------------------------------------------------------------
EFFNET_META = json.loads((FIXTURES / "effnet_v2_s_meta.json").read_text())


@pytest.mark.parametrize("build, expected", [
    (lambda: stage_a.StageA(stage_a.PRESETS["paper"]), 18_406_894),       # PaellaVQModel defaults
    (lambda: stage_b.DiffNeXt(stage_b.PRESETS["paper"]), 1_055_365_280),  # released decoder config
    (lambda: stage_c.Prior(stage_c.PRESETS["paper"]), 993_636_896),       # released prior config
], ids=["stage_a", "stage_b_decoder", "stage_c_prior"])
def test_paper_preset_parameter_count(build, expected):
    with torch.device("meta"):
        model = build()
    assert n_params(model) == expected


def test_paper_compressor_parameter_count():
    with torch.device("meta"):
        comp = stage_b.SemanticCompressor(stage_b.PRESETS["paper"])
        full = stage_b.StageB(stage_b.PRESETS["paper"])
    assert n_params(comp.backbone) == EFFNET_META["backbone_params"] == 20_177_488
    assert n_params(comp.mapper) == EFFNET_META["mapper_params"] == 20_512     # 1280·16 + BatchNorm 2·16
    assert n_params(comp) == 20_198_000                                         # ≈ 20.2M
    assert n_params(full) == 1_055_365_280 + 20_198_000                         # decoder + compressor


# ----------------------------------------------------------------------------------------------------------------
# The compressor's state dict is torchvision's, key for key (so the released effnet_state_dict loads unchanged)
# ----------------------------------------------------------------------------------------------------------------
def test_compressor_state_dict_layout_matches_torchvision():
    expected = [(k, list(shape)) for k, shape in json.loads((FIXTURES / "effnet_v2_s_keys.json").read_text())]
    with torch.device("meta"):
        comp = stage_b.SemanticCompressor(stage_b.PRESETS["paper"])
    ours = [(k, list(v.shape)) for k, v in comp.state_dict().items()]
    assert len(ours) == len(expected)
    for i, (a, b) in enumerate(zip(ours, expected)):
        assert a == b, f"state dict entry {i}: ours {a} vs torchvision {b}"


# ----------------------------------------------------------------------------------------------------------------
# Forward golden against torchvision
# ----------------------------------------------------------------------------------------------------------------
def golden_fill(sd: dict) -> dict:
    """The deterministic weights the golden was computed with (the same procedure, run on torchvision's model)."""
    g = torch.Generator().manual_seed(1234)
    new = {}
    for key in sorted(sd):
        v = sd[key]
        if key.endswith("num_batches_tracked"):
            new[key] = v.clone()
            continue
        if key.endswith("running_var"):
            new[key] = torch.rand(v.shape, generator=g) + 0.5
        elif key.endswith("running_mean"):
            new[key] = torch.randn(v.shape, generator=g) * 0.1
        elif key.endswith(".weight") and v.dim() == 1:
            new[key] = 1.0 + 0.1 * torch.randn(v.shape, generator=g)
        else:
            fan_in = v[0].numel() if v.dim() > 1 else 1
            new[key] = torch.randn(v.shape, generator=g) / math.sqrt(fan_in)
    return new


@pytest.fixture(scope="module")
def golden_compressor():
    comp = stage_b.SemanticCompressor(stage_b.PRESETS["paper"])
    comp.load_state_dict(golden_fill(comp.state_dict()), strict=True)
    return comp.eval()


def assert_close(ours, ref, what, tol=1e-4):
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    err, bound = (ours - ref).abs().max().item(), tol * max(1.0, ref.abs().max().item())
    assert err <= bound, f"{what}: max |ours − torchvision| = {err:.3e} > {bound:.3e}"


@torch.no_grad()
def test_compressor_matches_torchvision_golden(golden_compressor):
    golden = load_file(str(FIXTURES / "effnet_v2_s_golden.safetensors"))
    x = golden["x"]                                                        # (2, 3, 96, 128)
    # backbone and mapper directly: `forward` also normalises with ImageNet statistics and resizes by 0.75.
    features = golden_compressor.backbone(x)
    assert features.shape == (2, 1280, 3, 4)
    assert_close(features[:, :4], golden["backbone_first4"], "backbone output, first 4 channels")
    assert_close(golden_compressor.mapper(features), golden["y"], "semantic latent")


@torch.no_grad()
def test_compressor_golden_detects_a_perturbed_weight(golden_compressor):
    """The golden comparison can fail: one BatchNorm weight deep in the backbone, nudged by 1e-2."""
    golden = load_file(str(FIXTURES / "effnet_v2_s_golden.safetensors"))
    bn = golden_compressor.backbone[6][14].block[3][1]                   # last MBConv's projection BatchNorm
    original = bn.weight[0].item()
    try:
        bn.weight[0] += 1e-2
        y = golden_compressor.mapper(golden_compressor.backbone(golden["x"]))
        with pytest.raises(AssertionError):
            assert_close(y, golden["y"], "semantic latent")
    finally:
        bn.weight[0] = original


@torch.no_grad()
def test_compressor_forward_resizes_and_normalises(golden_compressor):
    """A real forward through `forward` (bilinear 0.75× resize, ImageNet normalisation): shape and finiteness."""
    images = torch.rand(2, 3, 128, 192)                                   # → 96×144 → 3×5
    y = golden_compressor(images)
    assert y.shape == (2, 16, *golden_compressor.latent_size(128, 192)) == (2, 16, 3, 5)
    assert torch.isfinite(y).all()


def test_compressor_1024_gives_24x24():
    comp_cfg = stage_b.PRESETS["paper"]
    with torch.device("meta"):
        comp = stage_b.SemanticCompressor(comp_cfg).eval()
        assert comp.latent_size(1024, 1024) == (24, 24)
        assert comp(torch.empty(2, 3, 1024, 1024)).shape == (2, 16, 24, 24)
        # Other sizes: the real output side is what latent_size predicts (ceil at each stride-2 conv).
        for h, w in [(768, 1280), (1000, 1024), (512, 896), (1100, 640)]:
            assert tuple(comp(torch.empty(1, 3, h, w)).shape[-2:]) == comp.latent_size(h, w), (h, w)


# ----------------------------------------------------------------------------------------------------------------
# The smaller presets build; the tiny ones stay small enough for the CPU demo
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["small", "tiny"])
def test_smaller_presets_build(preset, record_property):
    with torch.device("meta"):
        a = stage_a.StageA(stage_a.PRESETS[preset])
        b = stage_b.StageB(stage_b.PRESETS[preset])
        c = stage_c.Prior(stage_c.PRESETS[preset])
        latent = b.compressor.latent_size(1024, 1024) if preset == "small" else b.compressor.latent_size(64, 64)
    counts = {"stage_a": n_params(a), "stage_b_decoder": n_params(b.decoder),
              "stage_b_compressor": n_params(b.compressor), "stage_c": n_params(c)}
    for k, v in counts.items():
        record_property(k, v)
    print(f"\n{preset}: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()) + f"; semantic latent {latent}")
    assert all(v > 0 for v in counts.values())
    if preset == "tiny":
        assert n_params(b) < 1_000_000, f"tiny Stage B (decoder + compressor) has {n_params(b):,} parameters"
        assert n_params(c) < 1_000_000, f"tiny Prior has {n_params(c):,} parameters"
        assert latent == (4, 4)                                           # 64² image → 4² (stride 16, no resize)
    else:
        assert n_params(b.decoder) < n_params(stage_b_paper_decoder_meta())
        assert n_params(c) < 993_636_896


def stage_b_paper_decoder_meta():
    with torch.device("meta"):
        return stage_b.DiffNeXt(stage_b.PRESETS["paper"])
