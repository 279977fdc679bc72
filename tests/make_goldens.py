"""Usage:
    .venv/bin/python tests/make_goldens.py         # from the repository root, with diffusers 0.42.1

Write tests/fixtures/parity_golden.safetensors: diffusers' own outputs for one small config of each Würstchen
module, so that tests/test_parity_modules.py keeps checking parity after diffusers drops these deprecated classes.

Run it by hand, with the diffusers version that parity was verified against (0.42.1).

The file holds, per module (prefix `vqgan/`, `decoder/`, `prior/`):
- `<prefix>sd/<key>`: the diffusers state dict after seeded re-randomisation (conftest.randomize);
- `<prefix>in/<name>`: the inputs;
- `<prefix>out/<name>`: diffusers' outputs, in fp32, in eval mode.
The metadata holds each module's diffusers config as JSON (`vqgan_config`, `decoder_config`, `prior_config`) and
the versions and seed that made the file.
"""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from conftest import FIXTURES, randomize  # noqa: E402

OUT = FIXTURES / "parity_golden.safetensors"
SEED = 2024
# Weight scale of the re-randomisation: 2× conftest's default, so that every path (the prior's text conditioning
# included) moves the outputs well above the 1e-5 tolerance and the perturbation test can see single weights.
SCALE = 0.2

VQGAN_CONFIG = dict(levels=2, bottleneck_blocks=1, embed_dim=16, latent_channels=4, num_vq_embeddings=8,
                    scale_factor=0.3764)
DECODER_CONFIG = dict(c_in=4, c_out=4, c_r=8, patch_size=2, c_cond=32, c_hidden=[16, 32, 32], nhead=[-1, 2, 2],
                      blocks=[1, 2, 1], level_config=["CT", "CTA", "CTA"], inject_effnet=[False, True, True],
                      effnet_embd=16, clip_embd=24, kernel_size=3, dropout=0.1)
PRIOR_CONFIG = dict(c_in=16, c=32, c_cond=24, c_r=8, depth=2, nhead=2, dropout=0.1)


def public_config(model) -> dict:
    """The diffusers config without its private bookkeeping keys (`_class_name`, `_use_default_values`, ...)."""
    return {k: v for k, v in dict(model.config).items() if not k.startswith("_")}


@torch.no_grad()
def main():
    from diffusers import __version__ as diffusers_version
    from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel, WuerstchenDiffNeXt, WuerstchenPrior

    torch.manual_seed(SEED)  # the diffusers inits draw from the global generator; randomize overwrites them anyway
    g = torch.Generator().manual_seed(SEED)
    tensors, meta = {}, {}

    def store(prefix, model, inputs, outputs):
        for k, v in model.state_dict().items():
            tensors[f"{prefix}/sd/{k}"] = v.detach().float().contiguous().clone()
        for k, v in inputs.items():
            tensors[f"{prefix}/in/{k}"] = v.contiguous().clone()
        for k, v in outputs.items():
            tensors[f"{prefix}/out/{k}"] = v.contiguous().clone()
        meta[f"{prefix}_config"] = json.dumps(public_config(model), sort_keys=True)

    # Stage A: encode, decode without and with quantization. 4 images (= 2 draws of batch 2).
    vq = randomize(PaellaVQModel(**VQGAN_CONFIG).eval(), seed=SEED + 1, scale=SCALE)
    images = torch.rand(4, 3, 16, 16, generator=g)
    latents = torch.randn(4, 4, 4, 4, generator=g)                        # raw (un-scaled) latents to decode
    to_quantize = torch.randn(4, 4, 4, 4, generator=g) * 0.3               # codebook scale: many distinct codes
    store("vqgan", vq, {"images": images, "latents": latents, "to_quantize": to_quantize}, {
        "encode": vq.encode(images).latents,
        "decode": vq.decode(latents).sample,
        "decode_quantized": vq.decode(to_quantize, force_not_quantize=False).sample,
    })

    # Stage B decoder. 4 samples, non-square, semantic latent of another size than any level (resized inside).
    dec = randomize(WuerstchenDiffNeXt(**DECODER_CONFIG).eval(), seed=SEED + 2, scale=SCALE)
    x = torch.randn(4, 4, 16, 24, generator=g)
    r = torch.rand(4, generator=g)
    effnet = torch.randn(4, 16, 3, 5, generator=g)
    clip = torch.randn(4, 7, 24, generator=g)
    store("decoder", dec, {"x": x, "r": r, "effnet": effnet, "clip": clip}, {"eps": dec(x, r, effnet, clip)})

    # Stage C prior. Head weights 10× smaller so that |1 − b| stays away from 0.
    prior = randomize(WuerstchenPrior(**PRIOR_CONFIG).eval(), seed=SEED + 3, scale=SCALE, small=("out.",))
    x = torch.randn(4, 16, 6, 5, generator=g)
    r = torch.rand(4, generator=g)
    c = torch.randn(4, 5, 24, generator=g)
    store("prior", prior, {"x": x, "r": r, "c": c}, {"eps": prior(x, r, c)})

    meta.update(diffusers=diffusers_version, torch=torch.__version__, seed=str(SEED), scale=str(SCALE),
                made_by="tests/make_goldens.py")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(OUT), metadata=meta)
    n = sum(v.numel() for v in tensors.values())
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.2f} MB, {len(tensors)} tensors, {n:,} values)")


if __name__ == "__main__":
    main()
