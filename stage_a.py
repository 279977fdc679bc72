"""Stage A: the f4 VQGAN ("Paella VQ") that turns pixels into Stage B's 4×256×256 latent and back.

Paper: Würstchen (arXiv 2306.00637), Sec. 3.1. A 1024² RGB image becomes a 4×256×256 latent: 4× smaller per side,
12:1 by element count. The encoder is tiny and the decoder heavy (12 bottleneck blocks), by design: the decoder
must turn Stage B's latents back into sharp pixels. Images are in [0, 1], not [-1, 1].

It mirrors the released `vqgan_f4_v1_500k.pt` (dome272/Wuerstchen `vqgan.py`, class `VQModel`) and diffusers'
`PaellaVQModel`, parameter for parameter (18,406,894 at the `paper` preset), and loads both checkpoints.
Würstchen v2 uses this model *without* quantization at inference ("a pseudo-VAE"): `encode` returns the
un-quantized encoder output divided by the scale factor (released: 0.3764), the space Stage B works in, and
`decode` undoes the scale.
Deliberate choices:
- no official training recipe was published. Our loss is MSE + the VQ terms + an optional patch-GAN term after a
  warm-up; the perceptual term of the author's related recipe needs downloaded weights, so it is left out;
- training may start the codebook from encoder outputs (`VectorQuantizer.init_from`), as small codebooks collapse
  from the released ±1/K initialisation.
"""
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoints import CheckpointError, load_strict, read_checkpoint, read_diffusers_folder, with_saved_fields


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageAConfig:
    levels: int = 2                # resolution levels; the f4 comes from a 2× pixel-unshuffle and one stride-2 conv
    bottleneck_blocks: int = 12    # decoder blocks at the latent resolution (released: 12)
    c_hidden: int = 384            # width at the deepest level; each level above halves it (released: [192, 384])
    c_latent: int = 4              # latent channels (released: 4)
    codebook_size: int = 8192      # VQ codebook entries, each c_latent wide (released: 8192)
    # Stage B works on the un-quantized latent ÷ scale_factor. Released: 0.3764, fitted to the released encoder's
    # output. Ours end in a fresh BatchNorm, so their latent already has about unit std: the tiny and small presets
    # use 1. (At 0.3764 the tiny Stage B's latents had std 2.1, and its samples from pure noise drifted to blotches.)
    scale_factor: float = 0.3764
    commitment: float = 0.25       # weight of the commitment term (released: 0.25)
    adversarial_weight: float = 0.1  # patch-GAN term weight once on (the author's related recipe: 0.1)
    adversarial_start: int = 10_000  # steps of reconstruction-only training before the GAN term switches on
    disc_c_hidden: int = 512       # discriminator width at its last conv (official vqgan.py: 512)
    disc_depth: int = 6            # stride-2 convs; the patch map is (H/2^depth)², so keep 2^depth < image side

    def __post_init__(self):
        if self.c_hidden % 2 ** (self.levels - 1):
            raise ValueError(f"StageAConfig: c_hidden={self.c_hidden} must be divisible by 2^(levels-1)")


PRESETS = {
    "paper": StageAConfig(),
    "small": StageAConfig(bottleneck_blocks=6, c_hidden=256, codebook_size=4096, scale_factor=1.0),
    "tiny": StageAConfig(bottleneck_blocks=2, c_hidden=64, codebook_size=1024, scale_factor=1.0,
                         adversarial_start=2_000, disc_c_hidden=128, disc_depth=4),
}
# The emoji world (train.py --preset emoji): the tiny model as it is.
PRESETS["emoji"] = PRESETS["tiny"]


# ----------------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------------
class MixingResidualBlock(nn.Module):
    """Two residual branches, a depthwise 3×3 conv and a channel MLP, each after a LayerNorm. Six learned scalars
    (`gammas`, initialised to 0) modulate the norms and gate the branches, so every block starts as the identity:
        x = x + DW(LN(x)·(1 + g0) + g1)·g2
        x = x + MLP(LN(x)·(1 + g3) + g4)·g5
    """

    def __init__(self, c: int, c_mlp: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.depthwise = nn.Sequential(nn.ReplicationPad2d(1), nn.Conv2d(c, c, kernel_size=3, groups=c))
        self.norm2 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.channelwise = nn.Sequential(nn.Linear(c, c_mlp), nn.GELU(), nn.Linear(c_mlp, c))
        self.gammas = nn.Parameter(torch.zeros(6))

    def forward(self, x):
        g = self.gammas
        h = self.norm1(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) * (1 + g[0]) + g[1]  # (B, C, H, W)
        x = x + self.depthwise(h) * g[2]
        h = self.norm2(x.permute(0, 2, 3, 1)) * (1 + g[3]) + g[4]                      # (B, H, W, C)
        return x + self.channelwise(h).permute(0, 3, 1, 2) * g[5]


class VectorQuantizer(nn.Module):
    """Nearest-codebook-vector quantization with the straight-through estimator (van den Oord et al. 2017).

    No EMA: the codebook learns by gradient through the codebook term. The released initialisation is
    uniform(±1/K), and the codebook is `embedding` in diffusers' naming (`codebook` in the official checkpoint).
    """

    def __init__(self, codebook_size: int, c: int, commitment: float):
        super().__init__()
        self.commitment = commitment
        self.embedding = nn.Embedding(codebook_size, c)
        nn.init.uniform_(self.embedding.weight, -1 / codebook_size, 1 / codebook_size)

    @torch.no_grad()
    def init_from(self, z: torch.Tensor, generator: torch.Generator | None = None):
        """Set the codebook to randomly chosen encoder outputs z: (B, C, H, W). Not in the release: from the
        released ±1/K initialisation a small codebook collapses (9 of 1,024 codes in 250 steps at the tiny preset),
        and Würstchen v2 decodes *un-quantized* latents, so the decoder must not learn from a handful of codes."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])              # (BHW, C)
        n, k = flat.shape[0], self.embedding.num_embeddings
        picks = torch.randperm(n, generator=generator)[:k] if n >= k else torch.randint(n, (k,), generator=generator)
        self.embedding.weight.copy_(flat[picks.to(flat.device)])

    def forward(self, z: torch.Tensor):
        """z: (B, C, H, W) → (z_q with straight-through gradient, VQ loss, indices (B, H, W))."""
        B, C, H, W = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, C)                       # (BHW, C)
        indices = torch.cdist(flat, self.embedding.weight).argmin(dim=1)  # nearest code by L2
        e = self.embedding(indices).view(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W)
        # Codebook term pulls codes to encoder outputs; the commitment term (× 0.25) pulls outputs to their codes.
        loss = F.mse_loss(e, z.detach()) + self.commitment * F.mse_loss(z, e.detach())
        return z + (e - z).detach(), loss, indices.view(B, H, W)


# ----------------------------------------------------------------------------------------------------------------
# The autoencoder
# ----------------------------------------------------------------------------------------------------------------
class StageA(nn.Module):
    """(B, 3, H, W) image in [0, 1] ⇄ (B, 4, H/4, W/4) latent. H and W must be divisible by 4."""

    def __init__(self, config: StageAConfig = PRESETS["paper"]):
        super().__init__()
        self.config = cfg = config
        c_levels = [cfg.c_hidden // 2 ** i for i in reversed(range(cfg.levels))]  # paper: [192, 384]
        # Encoder: 2× pixel-unshuffle (3 → 12 channels), then per level a block, stride-2 convs in between.
        self.in_block = nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(3 * 4, c_levels[0], kernel_size=1))
        down = []
        for i, c in enumerate(c_levels):
            if i > 0:
                down.append(nn.Conv2d(c_levels[i - 1], c, kernel_size=4, stride=2, padding=1))
            down.append(MixingResidualBlock(c, c * 4))
        # The BatchNorm normalises the latent to mean 0 and std 1 over the training data.
        down.append(nn.Sequential(nn.Conv2d(c_levels[-1], cfg.c_latent, kernel_size=1, bias=False),
                                  nn.BatchNorm2d(cfg.c_latent)))
        self.down_blocks = nn.Sequential(*down)
        self.vquantizer = VectorQuantizer(cfg.codebook_size, cfg.c_latent, cfg.commitment)
        # Decoder: the heavy half. bottleneck_blocks at the deepest level, one block per level above it.
        up = [nn.Sequential(nn.Conv2d(cfg.c_latent, c_levels[-1], kernel_size=1))]
        for i, c in enumerate(reversed(c_levels)):
            up += [MixingResidualBlock(c, c * 4) for _ in range(cfg.bottleneck_blocks if i == 0 else 1)]
            if i < cfg.levels - 1:
                up.append(nn.ConvTranspose2d(c, c // 2, kernel_size=4, stride=2, padding=1))
        self.up_blocks = nn.Sequential(*up)
        # No output activation: the released decoder is unbounded and the pipeline clamps to [0, 1].
        self.out_block = nn.Sequential(nn.Conv2d(c_levels[0], 3 * 4, kernel_size=1), nn.PixelShuffle(2))
        self.initialize_weights()

    def initialize_weights(self):
        # Released: xavier weights and zero biases inside every mixing block; the other layers keep PyTorch's
        # defaults. The codebook was initialised in VectorQuantizer and the gammas at 0.
        for block in self.modules():
            if isinstance(block, MixingResidualBlock):
                for m in block.modules():
                    if isinstance(m, (nn.Linear, nn.Conv2d)):
                        nn.init.xavier_uniform_(m.weight)
                        nn.init.zeros_(m.bias)

    def encode_raw(self, images: torch.Tensor) -> torch.Tensor:
        """The un-quantized, un-scaled encoder output (diffusers' `PaellaVQModel.encode`). (B, 4, H/4, W/4)."""
        return self.down_blocks(self.in_block(images))

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        """Decode an un-scaled latent, quantized or not (diffusers' `PaellaVQModel.decode`). Unclamped."""
        return self.out_block(self.up_blocks(z))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Image in [0, 1] → the latent Stage B works in: un-quantized ÷ scale_factor (released 0.3764)."""
        return self.encode_raw(images) / self.config.scale_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Stage B's latent → image, unclamped (clamp to [0, 1] for display)."""
        return self.decode_raw(latents * self.config.scale_factor)

    def forward(self, images: torch.Tensor):
        """Training pass: encode → quantize → decode. Returns (reconstruction, VQ loss, code indices)."""
        z_q, vq_loss, indices = self.vquantizer(self.encode_raw(images))
        return self.decode_raw(z_q), vq_loss, indices

    # ------------------------------------------------------------------------------------------------------------
    # Loss
    # ------------------------------------------------------------------------------------------------------------
    def loss(self, images: torch.Tensor, discriminator: "Discriminator | None" = None, step: int = 0):
        """Generator-side loss: MSE reconstruction + VQ terms (+ adversarial term once step ≥ adversarial_start
        and a discriminator is given). Returns (loss, parts); the discriminator trains on `discriminator_loss`."""
        recon, vq_loss, indices = self(images)
        mse = F.mse_loss(recon, images)
        loss = mse + vq_loss
        parts = {"mse": mse.detach(), "vq": vq_loss.detach(),
                 "codebook_usage": torch.tensor(indices.unique().numel() / self.config.codebook_size)}
        if discriminator is not None and step >= self.config.adversarial_start:
            p_fake = discriminator(recon)
            adversarial = F.binary_cross_entropy(p_fake, torch.ones_like(p_fake))  # fool D into saying "real"
            loss = loss + self.config.adversarial_weight * adversarial
            parts["adversarial"] = adversarial.detach()
        return loss, parts | {"recon": recon.detach()}


# ----------------------------------------------------------------------------------------------------------------
# Patch discriminator (training only; official `vqgan.py`)
# ----------------------------------------------------------------------------------------------------------------
class Discriminator(nn.Module):
    """At the paper preset: 6 spectral-normed 3×3 stride-2 convs, 64 → 128 → 256 → 512 → 512 → 512, InstanceNorm +
    LeakyReLU(0.2) after all but the first, then a 1×1 conv and a sigmoid: a (B, 1, H/64, W/64) map of P(real)."""

    def __init__(self, config: StageAConfig = PRESETS["paper"]):
        super().__init__()
        c_hidden, depth = config.disc_c_hidden, config.disc_depth
        d = max(depth - 3, 3)                                             # channels start at c_hidden / 2^d
        sn = nn.utils.spectral_norm
        layers = [sn(nn.Conv2d(3, c_hidden // 2 ** d, kernel_size=3, stride=2, padding=1)), nn.LeakyReLU(0.2)]
        for i in range(depth - 1):
            c_in, c_out = c_hidden // 2 ** max(d - i, 0), c_hidden // 2 ** max(d - 1 - i, 0)
            layers += [sn(nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1)), nn.InstanceNorm2d(c_out),
                       nn.LeakyReLU(0.2)]
        self.encoder = nn.Sequential(*layers)
        self.shuffle = nn.Conv2d(c_hidden, 1, kernel_size=1)              # the released name of the 1×1 head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.shuffle(self.encoder(images)))


def discriminator_loss(discriminator: Discriminator, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy: real patches → 1, reconstructed patches → 0 (no gradient into Stage A)."""
    p_real, p_fake = discriminator(real), discriminator(fake.detach())
    return F.binary_cross_entropy(p_real, torch.ones_like(p_real)) + \
        F.binary_cross_entropy(p_fake, torch.zeros_like(p_fake))


# ----------------------------------------------------------------------------------------------------------------
# Loading published weights: this stage's key renames and configs. Safe reading and strict loading are shared
# (checkpoints.py).
# ----------------------------------------------------------------------------------------------------------------
def config_from_diffusers(raw: dict) -> StageAConfig:
    """Our config from a diffusers `PaellaVQModel` config.json."""
    fixed = {"in_channels": 3, "out_channels": 3, "up_down_scale_factor": 2}
    for key, value in fixed.items():
        if raw.get(key, value) != value:
            raise CheckpointError(f"{key}={raw[key]}: only {value} is supported (the released Stage A)")
    return StageAConfig(levels=raw.get("levels", 2), bottleneck_blocks=raw.get("bottleneck_blocks", 12),
                        c_hidden=raw.get("embed_dim", 384), c_latent=raw.get("latent_channels", 4),
                        codebook_size=raw.get("num_vq_embeddings", 8192),
                        scale_factor=raw.get("scale_factor", 0.3764))


def load_pretrained(path, device="cpu") -> StageA:
    """The released Stage A, from `vqgan_f4_v1_500k.pt` (its `state_dict`) or a diffusers `vqgan/` folder."""
    path = Path(path)
    if path.is_dir():
        raw, state = read_diffusers_folder(path)
        config = with_saved_fields(config_from_diffusers(raw), raw, ("commitment", "adversarial_weight",
                                                                     "adversarial_start", "disc_c_hidden",
                                                                     "disc_depth"))
    else:
        ckpt = read_checkpoint(path)
        if "state_dict" not in ckpt:
            raise CheckpointError(f"checkpoint {path}: expected a 'state_dict' (vqgan_f4_v1_500k.pt), "
                                  f"found keys {sorted(ckpt)[:5]}")
        state, config = ckpt["state_dict"], PRESETS["paper"]
    # The official checkpoint calls the codebook `codebook`; diffusers and we call it `embedding`.
    state = {k.replace("vquantizer.codebook.", "vquantizer.embedding."): v for k, v in state.items()}
    model = StageA(config)
    load_strict(model, state, "Stage A (VQGAN)", path)
    return model.to(device).eval()
