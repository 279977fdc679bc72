"""Module-level parity with diffusers' Würstchen port, through our checkpoint loaders.

For each diffusers module (PaellaVQModel, WuerstchenDiffNeXt, WuerstchenPrior) and two small configs each:
- re-randomise every parameter and BatchNorm statistic (fresh models prove nothing: DiffNeXt starts at exactly 2·x,
  GRN and mixing-block gammas at 0), save as a diffusers folder, load with our `load_pretrained(folder)`, compare;
- rename the same weights to the official `.pt` layout (nn.MultiheadAttention in_proj/out_proj, `codebook`), save
  as the official files are saved, load with `load_pretrained(path.pt)` (the `paper` preset monkeypatched to the
  small config), compare.
Without diffusers, tests/fixtures/parity_golden.safetensors (made by tests/make_goldens.py with diffusers 0.42.1)
keeps the same check alive, and a perturbation test proves the comparison can fail.

Agreement: max|ours − diffusers| <= 1e-5 · max(1, max|diffusers|), fp32, eval mode, ≥ 3 input draws of batch 2.
"""
import dataclasses
import json

import pytest
import torch

from conftest import FIXTURES, randomize

import stage_a
import stage_b
import stage_c

TOL = 1e-5
DRAWS = 3
GOLDEN = FIXTURES / "parity_golden.safetensors"


def max_err(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max |ours − ref|, the allowed bound for it)."""
    assert ours.shape == ref.shape, f"shape {tuple(ours.shape)} vs reference {tuple(ref.shape)}"
    assert torch.isfinite(ref).all()
    return (ours.double() - ref.double()).abs().max().item(), TOL * max(1.0, ref.abs().max().item())


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str):
    err, bound = max_err(ours, ref)
    assert err <= bound, f"{what}: max |ours − reference| = {err:.3e} > {bound:.3e}"


@pytest.fixture(scope="module")
def dw():
    """diffusers' deprecated Würstchen modules; only the tests that take this fixture need diffusers."""
    return pytest.importorskip("diffusers.pipelines.deprecated.wuerstchen")


def public_config(model) -> dict:
    return {k: v for k, v in dict(model.config).items() if not k.startswith("_")}


def to_official(state: dict) -> dict:
    """diffusers key layout → the official .pt layout (dome272/Wuerstchen): the reverse of the released renames."""
    out = {}
    for k, v in state.items():
        if ".attention.to_q." in k:
            prefix, kind = k.split(".attention.to_q.")                   # kind: "weight" or "bias"
            q, k_, v_ = (state[f"{prefix}.attention.{n}.{kind}"] for n in ("to_q", "to_k", "to_v"))
            out[f"{prefix}.attention.attn.in_proj_{kind}"] = torch.cat([q, k_, v_], dim=0).clone()
        elif ".attention.to_k." in k or ".attention.to_v." in k:
            continue
        elif ".attention.to_out.0." in k:
            out[k.replace(".attention.to_out.0.", ".attention.attn.out_proj.")] = v.clone()
        elif k == "vquantizer.embedding.weight":
            out["vquantizer.codebook.weight"] = v.clone()
        else:
            out[k] = v.clone()
    assert not any(".to_q." in k or ".to_out." in k or "vquantizer.embedding" in k for k in out)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Stage A: PaellaVQModel
# ----------------------------------------------------------------------------------------------------------------
# Each config: (diffusers kwargs, image size, weight scale for conftest.randomize). The first config of each module
# uses conftest's default scale 0.1; the second 0.25, where every path moves the outputs far more than the tolerance.
VQ_CONFIGS = {
    "vq-l2": (dict(levels=2, bottleneck_blocks=1, embed_dim=16, latent_channels=4, num_vq_embeddings=8), (16, 24),
              0.1),
    "vq-l3": (dict(levels=3, bottleneck_blocks=2, embed_dim=32, latent_channels=3, num_vq_embeddings=16,
                   scale_factor=0.5), (24, 32), 0.25),
}


def make_vq(dw, name, seed=11):
    cfg, _, scale = VQ_CONFIGS[name]
    return randomize(dw.PaellaVQModel(**cfg).eval(), seed=seed, scale=scale)


@torch.no_grad()
def check_stage_a(ours: stage_a.StageA, ref, name, seed=0):
    _, (H, W), scale = VQ_CONFIGS[name]
    g = torch.Generator().manual_seed(seed)
    sf = ref.config.scale_factor
    assert ours.config.scale_factor == sf and not ours.training
    c_lat, f = ref.config.latent_channels, 2 ** ref.config.levels
    for draw in range(DRAWS):
        images = torch.rand(2, 3, H, W, generator=g)
        assert_close(ours.encode(images), ref.encode(images).latents / sf, f"encode, draw {draw}")
        assert_close(ours.encode_raw(images), ref.encode(images).latents, f"encode_raw, draw {draw}")
        latents = torch.randn(2, c_lat, H // f, W // f, generator=g)      # in Stage B's space (÷ scale_factor)
        assert_close(ours.decode(latents), ref.decode(latents * sf).sample, f"decode, draw {draw}")
        # Quantized decode. At the codebook's scale, so that many different codes are picked.
        raw = torch.randn(2, c_lat, H // f, W // f, generator=g) * 1.5 * scale
        z_q, loss, indices = ours.vquantizer(raw)
        ref_q, ref_loss, (_, _, ref_indices) = ref.vquantizer(raw)
        assert torch.equal(indices.flatten(), ref_indices.flatten()), f"codes differ, draw {draw}"
        assert indices.unique().numel() > 1
        assert_close(z_q, ref_q, f"quantized latent, draw {draw}")
        assert_close(loss, ref_loss, f"VQ loss, draw {draw}")
        quantized = ours.decode_raw(z_q)
        assert_close(quantized, ref.decode(raw, force_not_quantize=False).sample, f"quantized decode, draw {draw}")
        assert not torch.allclose(quantized, ours.decode_raw(raw)), "quantization changed nothing"


@pytest.mark.parametrize("name", VQ_CONFIGS)
def test_stage_a_matches_diffusers_via_folder(dw, name, tmp_path):
    ref = make_vq(dw, name)
    ref.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").exists() and list(tmp_path.glob("*.safetensors"))
    ours = stage_a.load_pretrained(tmp_path)
    check_stage_a(ours, ref, name)


@pytest.mark.parametrize("name", VQ_CONFIGS)
def test_stage_a_matches_diffusers_via_official_pt(dw, name, tmp_path, monkeypatch):
    ref = make_vq(dw, name, seed=12)
    official = to_official(ref.state_dict())
    assert "vquantizer.codebook.weight" in official
    torch.save({"state_dict": official}, tmp_path / "vqgan_f4_v1_500k.pt")
    monkeypatch.setitem(stage_a.PRESETS, "paper", stage_a.config_from_diffusers(public_config(ref)))
    ours = stage_a.load_pretrained(tmp_path / "vqgan_f4_v1_500k.pt")
    check_stage_a(ours, ref, name, seed=1)


# ----------------------------------------------------------------------------------------------------------------
# Stage B: WuerstchenDiffNeXt
# ----------------------------------------------------------------------------------------------------------------
DIFFNEXT_CONFIGS = {
    # 3 levels: the first up block of level 1 reads [x, U-Net skip, semantic]; level 0 ("CT", no injection) reads
    # [x, skip]; two groups at level 1.
    "dn-3lvl": (dict(c_in=4, c_out=4, c_r=8, patch_size=2, c_cond=32, c_hidden=[16, 32, 32], nhead=[-1, 2, 2],
                     blocks=[1, 2, 1], level_config=["CT", "CTA", "CTA"], inject_effnet=[False, True, True],
                     effnet_embd=16, clip_embd=24, dropout=0.0),
                (16, 24), (3, 5), 7, 0.1),
    # 4 levels: attention at the top level, a "CT" level with no injection in the middle, injection at level 0 (so
    # the last up level reads [x, skip, semantic]), none at the deepest; odd c_r, kernel 5, dropout 0.1 (eval).
    # The semantic latent is larger than the deep levels, so the antialiased bicubic resize also shrinks.
    "dn-4lvl": (dict(c_in=4, c_out=4, c_r=9, patch_size=2, c_cond=24, c_hidden=[8, 16, 24, 32], nhead=[2, -1, 3, 4],
                     blocks=[2, 1, 1, 1], level_config=["CTA", "CT", "CTA", "CTA"],
                     inject_effnet=[True, False, True, False], effnet_embd=8, clip_embd=20, kernel_size=5,
                     dropout=0.1),
                (32, 16), (6, 4), 5, 0.25),
}


def make_diffnext(dw, name, seed=21):
    cfg, *_, scale = DIFFNEXT_CONFIGS[name]
    return randomize(dw.WuerstchenDiffNeXt(**cfg).eval(), seed=seed, scale=scale)


def diffnext_inputs(cfg, size, sem_size, n_text, g):
    return (torch.randn(2, cfg["c_in"], *size, generator=g), torch.rand(2, generator=g),
            torch.randn(2, cfg["effnet_embd"], *sem_size, generator=g),
            torch.randn(2, n_text, cfg["clip_embd"], generator=g))


@torch.no_grad()
def check_diffnext(decoder: stage_b.DiffNeXt, ref, name, seed=0):
    cfg, size, sem_size, n_text, _ = DIFFNEXT_CONFIGS[name]
    assert not decoder.training
    g = torch.Generator().manual_seed(seed)
    for draw in range(DRAWS):
        x, t, semantic, text = diffnext_inputs(cfg, size, sem_size, n_text, g)
        assert_close(decoder(x, t, semantic, text), ref(x, t, semantic, text), f"DiffNeXt {name}, draw {draw}")


@pytest.mark.parametrize("name", DIFFNEXT_CONFIGS)
def test_stage_b_matches_diffusers_via_folder(dw, name, tmp_path):
    ref = make_diffnext(dw, name)
    ref.save_pretrained(tmp_path)
    model = stage_b.load_pretrained(tmp_path)
    assert isinstance(model, stage_b.StageB) and not model.training
    check_diffnext(model.decoder, ref, name)


@pytest.mark.parametrize("name", DIFFNEXT_CONFIGS)
def test_stage_b_matches_diffusers_via_official_pt(dw, name, tmp_path, monkeypatch):
    ref = make_diffnext(dw, name, seed=22)
    # The official file implies the paper preset; patch it to this decoder with a tiny compressor (the paper one
    # has 20M parameters, too slow to randomise and save in a unit test).
    config = dataclasses.replace(stage_b.config_from_diffusers(public_config(ref)), effnet_stem=16,
                                 effnet_stages=stage_b.EFFNET_TINY, effnet_width=128, effnet_resize=1.0,
                                 effnet_drop_path=0.0)
    monkeypatch.setitem(stage_b.PRESETS, "paper", config)
    compressor = randomize(stage_b.SemanticCompressor(config), seed=23).eval()
    effnet_state = {k: v.clone() for k, v in compressor.state_dict().items()}
    official = to_official(ref.state_dict())
    assert any(k.endswith(".attention.attn.in_proj_weight") for k in official)
    torch.save({"state_dict": official, "effnet_state_dict": effnet_state}, tmp_path / "model_v2_stage_b.pt")

    model = stage_b.load_pretrained(tmp_path / "model_v2_stage_b.pt")
    check_diffnext(model.decoder, ref, name, seed=1)
    loaded = model.compressor.state_dict()
    assert list(loaded) == list(effnet_state)
    for k, v in effnet_state.items():
        assert torch.equal(loaded[k], v), f"compressor weight {k} differs from effnet_state_dict"
    with torch.no_grad():
        images = torch.rand(2, 3, 64, 48)
        assert_close(model.compressor(images), compressor(images), "compressor output")


@torch.no_grad()
def test_stage_b_perturbed_weight_breaks_parity(dw, tmp_path):
    """The comparison above is sensitive: one weight of the up path's semantic mapper, nudged by 1e-3, fails it."""
    name = "dn-4lvl"
    ref = make_diffnext(dw, name)
    ref.save_pretrained(tmp_path)
    decoder = stage_b.load_pretrained(tmp_path).decoder
    check_diffnext(decoder, ref, name)
    decoder.effnet_mappers[-1].weight[0, 0, 0, 0] += 1e-3                  # level 0, up path
    with pytest.raises(AssertionError):
        check_diffnext(decoder, ref, name)


# ----------------------------------------------------------------------------------------------------------------
# Stage C: WuerstchenPrior
# ----------------------------------------------------------------------------------------------------------------
PRIOR_CONFIGS = {
    "prior-d2": (dict(c_in=16, c=32, c_cond=24, c_r=8, depth=2, nhead=2, dropout=0.0), (6, 6), 5, 0.1),
    # odd c_r (zero-padded embedding), 3 heads of 16, c_in 8, non-square latent, dropout 0.1 (eval).
    "prior-d3": (dict(c_in=8, c=48, c_cond=40, c_r=7, depth=3, nhead=3, dropout=0.1), (4, 7), 9, 0.25),
}


def make_prior(dw, name, seed=31):
    cfg, *_, scale = PRIOR_CONFIGS[name]
    # Head weights 10× smaller, so that |1 − b| stays away from 0.
    return randomize(dw.WuerstchenPrior(**cfg).eval(), seed=seed, scale=scale, small=("out.",))


@torch.no_grad()
def check_prior(prior: stage_c.Prior, ref, name, seed=0):
    cfg, size, n_text, _ = PRIOR_CONFIGS[name]
    assert not prior.training
    g = torch.Generator().manual_seed(seed)
    for draw in range(DRAWS):
        x = torch.randn(2, cfg["c_in"], *size, generator=g)
        t = torch.rand(2, generator=g)
        text = torch.randn(2, n_text, cfg["c_cond"], generator=g)
        ours, theirs = prior(x, t, text), ref(x, t, text)
        assert_close(ours, theirs, f"Prior {name}, draw {draw}")
        # The network's own contribution (x − ε̂, the head's a and b at work), at the same absolute tolerance.
        assert (x - theirs).abs().max() > 1e-2


@pytest.mark.parametrize("name", PRIOR_CONFIGS)
def test_stage_c_matches_diffusers_via_folder(dw, name, tmp_path):
    ref = make_prior(dw, name)
    ref.save_pretrained(tmp_path)
    prior = stage_c.load_pretrained(tmp_path)
    assert isinstance(prior, stage_c.Prior)
    check_prior(prior, ref, name)


@pytest.mark.parametrize("name", PRIOR_CONFIGS)
def test_stage_c_matches_diffusers_via_official_pt(dw, name, tmp_path, monkeypatch):
    ref = make_prior(dw, name, seed=32)
    fields = {f.name for f in dataclasses.fields(stage_c.StageCConfig)}
    monkeypatch.setitem(stage_c.PRESETS, "paper",
                        stage_c.StageCConfig(**{k: v for k, v in public_config(ref).items() if k in fields}))
    official = to_official(ref.state_dict())
    assert any(k.endswith(".attention.attn.out_proj.weight") for k in official)
    torch.save({"ema_state_dict": official}, tmp_path / "model_v3_stage_c.pt")
    prior = stage_c.load_pretrained(tmp_path / "model_v3_stage_c.pt")
    check_prior(prior, ref, name, seed=1)


# ----------------------------------------------------------------------------------------------------------------
# Golden tensors: parity without diffusers
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def golden():
    from safetensors import safe_open
    with safe_open(str(GOLDEN), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, meta


def golden_part(golden, prefix: str, kind: str) -> dict:
    tensors, _ = golden
    start = f"{prefix}/{kind}/"
    return {k[len(start):]: v for k, v in tensors.items() if k.startswith(start)}


def golden_model(golden, prefix: str):
    """Our module built from the stored diffusers config, loaded strictly with the stored weights, in eval mode."""
    raw = json.loads(golden[1][f"{prefix}_config"])
    if prefix == "vqgan":
        model = stage_a.StageA(stage_a.config_from_diffusers(raw))
    elif prefix == "decoder":
        model = stage_b.DiffNeXt(stage_b.config_from_diffusers(raw))
    else:
        fields = {f.name for f in dataclasses.fields(stage_c.StageCConfig)}
        model = stage_c.Prior(stage_c.StageCConfig(**{k: v for k, v in raw.items() if k in fields}))
    model.load_state_dict(golden_part(golden, prefix, "sd"), strict=True)
    return model.eval()


@torch.no_grad()
def golden_run(model, prefix: str, inputs: dict) -> dict:
    """Our outputs under the names make_goldens.py stored diffusers' outputs."""
    if prefix == "vqgan":
        return {"encode": model.encode_raw(inputs["images"]),
                "decode": model.decode_raw(inputs["latents"]),
                "decode_quantized": model.decode_raw(model.vquantizer(inputs["to_quantize"])[0])}
    if prefix == "decoder":
        return {"eps": model(inputs["x"], inputs["r"], inputs["effnet"], inputs["clip"])}
    return {"eps": model(inputs["x"], inputs["r"], inputs["c"])}


def test_golden_file_is_complete(golden):
    tensors, meta = golden
    assert GOLDEN.stat().st_size < 1.5e6
    for prefix in ("vqgan", "decoder", "prior"):
        assert f"{prefix}_config" in meta
        for kind in ("sd", "in", "out"):
            assert golden_part(golden, prefix, kind), f"{prefix}/{kind}/ missing"
    assert meta["diffusers"] and meta["torch"]


@pytest.mark.parametrize("prefix", ["vqgan", "decoder", "prior"])
def test_golden_parity_without_diffusers(golden, prefix):
    model = golden_model(golden, prefix)
    expected = golden_part(golden, prefix, "out")
    ours = golden_run(model, prefix, golden_part(golden, prefix, "in"))
    assert set(ours) == set(expected)
    for k, v in expected.items():
        assert_close(ours[k], v, f"golden {prefix}/{k}")
    if prefix == "vqgan":                                                  # the public, scaled API as well
        sf = model.config.scale_factor
        images, latents = golden_part(golden, prefix, "in")["images"], golden_part(golden, prefix, "in")["latents"]
        with torch.no_grad():
            assert_close(model.encode(images), expected["encode"] / sf, "golden vqgan encode (scaled)")
            assert_close(model.decode(latents / sf), expected["decode"], "golden vqgan decode (scaled)")


# One weight per (module, output); nudging a single element of it by NUDGE (5% of the golden weights' scale 0.2)
# must break that output's agreement.
NUDGE = 1e-2
PERTURB = [
    ("vqgan", "down_blocks.2.gammas", "encode"),
    ("vqgan", "up_blocks.1.channelwise.0.weight", "decode"),
    ("vqgan", "vquantizer.embedding.weight", "decode_quantized"),
    ("decoder", "effnet_mappers.4.weight", "eps"),                         # semantic latent, up path, level 1
    ("decoder", "up_blocks.1.0.channelwise.0.weight", "eps"),              # first up block of level 1 ...
    ("decoder", "down_blocks.1.3.attention.to_k.weight", "eps"),
    ("decoder", "clip_mapper.weight", "eps"),
    ("prior", "blocks.5.attention.to_v.weight", "eps"),
    ("prior", "blocks.0.channelwise.4.weight", "eps"),
    ("prior", "cond_mapper.2.weight", "eps"),
]


@pytest.mark.parametrize("prefix, key, output", PERTURB, ids=[f"{p}:{k}" for p, k, _ in PERTURB])
def test_golden_comparison_detects_a_perturbed_weight(golden, prefix, key, output):
    model = golden_model(golden, prefix)
    inputs, expected = golden_part(golden, prefix, "in"), golden_part(golden, prefix, "out")
    assert_close(golden_run(model, prefix, inputs)[output], expected[output], "before perturbation")
    weight = dict(model.named_parameters())[key]
    with torch.no_grad():
        index = (0,) * weight.dim()
        if key == "up_blocks.1.0.channelwise.0.weight":
            # ... in a column of the U-Net skip: input order [x (32), skip (32), semantic (32)].
            index = (0, 40)
        elif key == "vquantizer.embedding.weight":
            codes = model.vquantizer(inputs["to_quantize"])[2]
            index = (int(codes.flatten()[0]), 0)                           # a code that is used
        weight[index] += NUDGE
    err, bound = max_err(golden_run(model, prefix, inputs)[output], expected[output])
    assert err > bound, f"{prefix}: nudging {key}{list(index)} by {NUDGE} went unnoticed ({err:.2e} <= {bound:.2e})"
