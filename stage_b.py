"""Stage B: the semantic compressor and the diffusion decoder that expands its latent into Stage A's latent.

Paper: Würstchen (arXiv 2306.00637), Sec. 3.2 and Fig. 3.
- The semantic compressor is EfficientNetV2-S's feature extractor (stride 32) on a 0.75× copy of the image, then a
  1×1 conv to 16 channels and a BatchNorm: a 1024² image gives a 16×24×24 "semantic latent". It is trained jointly
  with the decoder. Stage C later learns to generate this latent from text.
- The decoder, "DiffNeXt", is a U-Net of ConvNeXt-style blocks that denoises Stage A's 4×256×256 latent, with the
  semantic latent injected at every level below the first and CLIP ViT-H text tokens attended to.

It mirrors the released `model_v2_stage_b.pt` (DiffNeXt in `state_dict`, the compressor in `effnet_state_dict`)
and diffusers' `WuerstchenDiffNeXt`, parameter for parameter (1,055,365,280 at the `paper` preset). The
compressor is our own EfficientNetV2 code (no torchvision) laid out like torchvision's, so that the published
`effnet_state_dict` loads unchanged. Deliberate choices:
- levels are described by booleans (`attention`, `inject_semantic`), not the released "CT"/"CTA" strings;
- semantic-latent and caption dropout for classifier-free guidance are drawn per sample.
"""
import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoints import CheckpointError, load_strict, read_checkpoint, read_diffusers_folder, with_saved_fields
from schedule import add_noise, p2_weight, sample_t, timestep_embedding

# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------
# EfficientNetV2 stages after the stem (Tan & Le 2021, Table 4):
# (block, expand ratio, kernel, stride, channels in, channels out, layers); "fused" = Fused-MBConv, "mb" = MBConv.
EFFNET_V2_S = (
    ("fused", 1, 3, 1, 24, 24, 2),
    ("fused", 4, 3, 2, 24, 48, 4),
    ("fused", 4, 3, 2, 48, 64, 4),
    ("mb", 4, 3, 2, 64, 128, 6),
    ("mb", 6, 3, 1, 128, 160, 9),
    ("mb", 6, 3, 2, 160, 256, 15),
)
# A small EfficientNetV2 of the same kinds of blocks, stride 16 (stem 2 × three stride-2 stages), for the tiny preset.
EFFNET_TINY = (
    ("fused", 1, 3, 1, 16, 16, 1),
    ("fused", 4, 3, 2, 16, 24, 1),
    ("mb", 4, 3, 2, 24, 32, 1),
    ("mb", 4, 3, 2, 32, 48, 1),
)


@dataclass(frozen=True)
class StageBConfig:
    # --- decoder (DiffNeXt) ---
    c_in: int = 4                                   # Stage A latent channels (released: 4)
    c_r: int = 64                                   # timestep embedding width (released: 64)
    patch_size: int = 2                             # pixel-unshuffle of the input (released: 2)
    c_cond: int = 1024                              # width of the attention conditioning (released: 1024)
    c_hidden: tuple = (320, 640, 1280, 1280)        # width per level (released)
    nhead: tuple = (0, 10, 20, 20)                  # heads per level; 0 where there is no attention (released -1)
    blocks: tuple = (4, 4, 14, 4)                   # [ResBlock, TimestepBlock, (AttnBlock)] groups per level
    attention: tuple = (False, True, True, True)    # released level_config ["CT", "CTA", "CTA", "CTA"]
    inject_semantic: tuple = (False, True, True, True)  # levels that see the semantic latent (released inject_effnet)
    c_semantic: int = 16                            # semantic latent channels (released effnet_embd: 16)
    c_text: int = 1024                              # text token width (released clip_embd: 1024, CLIP ViT-H)
    kernel_size: int = 3                            # depthwise conv kernel (released: 3)
    dropout: float = 0.1                            # in the residual MLPs and on attention weights (released: 0.1)
    # --- semantic compressor ---
    effnet_stem: int = 24                           # stem channels (EfficientNetV2-S: 24)
    effnet_stages: tuple = EFFNET_V2_S              # stage table, see above
    effnet_width: int = 1280                        # final 1×1 conv channels (EfficientNetV2-S: 1280)
    effnet_resize: float = 0.75                     # the compressor sees a 0.75× copy (1024² → 768² → 24²)
    effnet_drop_path: float = 0.2                   # stochastic depth, rising linearly to this (torchvision: 0.2)
    # --- sizes at sampling time (released pipelines) ---
    resolution_multiple: float = 42.67              # image side / semantic side: 1024 / 24, rounded as released
    latent_dim_scale: float = 10.67                 # Stage A latent side / semantic side: 256 / 24, as released

    def __post_init__(self):
        n = len(self.c_hidden)
        if not all(len(v) == n for v in (self.nhead, self.blocks, self.attention, self.inject_semantic)):
            raise ValueError(f"StageBConfig: c_hidden, nhead, blocks, attention and inject_semantic need one entry "
                             f"per level ({n})")
        for c, h, a in zip(self.c_hidden, self.nhead, self.attention):
            if a and (h <= 0 or c % h):
                raise ValueError(f"StageBConfig: a level of width {c} with attention needs nhead dividing it, got {h}")

    @property
    def latent_multiple(self) -> int:
        """Stage A latent sides must be divisible by this: the patch, then a stride-2 conv per extra level."""
        return self.patch_size * 2 ** (len(self.c_hidden) - 1)

    @property
    def effnet_stride(self) -> int:
        return 2 * math.prod(stage[3] for stage in self.effnet_stages)


PRESETS = {
    "paper": StageBConfig(),
    # One consumer GPU. c_text 384 is the width of all-MiniLM-L6-v2, the project's offline text encoder.
    "small": StageBConfig(c_hidden=(160, 320, 640, 640), nhead=(0, 5, 10, 10), blocks=(2, 2, 6, 2), c_cond=512,
                          c_text=384),
    # Tests and the CPU demo: a 64² image, 16² Stage A latent, 4² semantic latent from the stride-16 tiny backbone.
    # patch_size 1, not the released 2: a small shape covers about 3×3 of the 16² latent, which a 2× unshuffle
    # leaves 1.5 tokens wide (docs/tiny_recipe.md#stage-b-at-patch-size-1-and-small-shapes-of-14-px).
    "tiny": StageBConfig(c_r=32, patch_size=1, c_hidden=(32, 64, 64), nhead=(0, 4, 4), blocks=(1, 1, 1),
                         attention=(False, True, True), inject_semantic=(False, True, True), c_cond=64, c_text=384,
                         dropout=0.0, effnet_stem=16, effnet_stages=EFFNET_TINY, effnet_width=128,
                         effnet_resize=1.0, effnet_drop_path=0.0, resolution_multiple=16.0, latent_dim_scale=4.0),
}
# The emoji world (train.py --preset emoji): the tiny model as it is.
PRESETS["emoji"] = PRESETS["tiny"]


# ----------------------------------------------------------------------------------------------------------------
# Layers. LayerNorm2d, GlobalResponseNorm, TimestepBlock and AttnBlock have identical copies in stage_c.py, so that
# each stage file reads alone; tests/test_standalone.py keeps the copies identical.
# ----------------------------------------------------------------------------------------------------------------
class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) tensor. Released: no affine parameters, eps 1e-6."""

    def __init__(self, c: int):
        super().__init__(c, elementwise_affine=False, eps=1e-6)

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2 GRN on a (B, H, W, C) tensor: each channel is scaled by its spatial L2 norm over the mean norm."""

    def __init__(self, c: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, c))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, c))

    def forward(self, x):
        g = torch.norm(x, p=2, dim=(1, 2), keepdim=True)                  # (B, 1, 1, C)
        n = g / (g.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * n) + self.beta + x


class TimestepBlock(nn.Module):
    """FiLM by the timestep embedding: x·(1 + a) + b, with (a, b) = Linear(t_emb)."""

    def __init__(self, c: int, c_r: int):
        super().__init__()
        self.mapper = nn.Linear(c_r, c * 2)

    def forward(self, x, t_emb):
        a, b = self.mapper(t_emb)[:, :, None, None].chunk(2, dim=1)      # 2 × (B, C, 1, 1)
        return x * (1 + a) + b


class Attention(nn.Module):
    """Multi-head attention with biased q/k/v/out projections (diffusers' key names: to_q, to_k, to_v, to_out.0)."""

    def __init__(self, c: int, nhead: int, dropout: float):
        super().__init__()
        self.nhead, self.dropout = nhead, dropout
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.to_out = nn.Sequential(nn.Linear(c, c))

    def forward(self, x, cond_kv: tuple):
        """x: (B, L, C) attends to [x, cond]; cond_kv: the conditioning tokens' (keys, values), (B, S, C) each."""
        B, L, C = x.shape

        def heads(z):                                                     # (B, S, C) → (B, nhead, S, C/nhead)
            return z.view(B, -1, self.nhead, C // self.nhead).transpose(1, 2)

        # Keys and values of [x, cond], projected piecewise: the same rows as to_k(cat([x, cond])), but the
        # conditioning's part can be computed once per sampling run (AttnBlock.cond_kv) instead of at every step.
        k, v = torch.cat([self.to_k(x), cond_kv[0]], dim=1), torch.cat([self.to_v(x), cond_kv[1]], dim=1)
        # Dropout on the attention weights, as the released model's nn.MultiheadAttention had in training.
        out = F.scaled_dot_product_attention(heads(self.to_q(x)), heads(k), heads(v),
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.to_out(out.transpose(1, 2).reshape(B, L, C))


class AttnBlock(nn.Module):
    """Image tokens attend to themselves and to the conditioning tokens: keys and values are [image, cond]."""

    def __init__(self, c: int, c_cond: int, nhead: int, dropout: float):
        super().__init__()
        self.norm = LayerNorm2d(c)
        self.attention = Attention(c, nhead, dropout)
        self.kv_mapper = nn.Sequential(nn.SiLU(), nn.Linear(c_cond, c))

    def cond_kv(self, cond: torch.Tensor) -> tuple:
        """(keys, values) of the conditioning tokens, (B, L, C) each. They do not depend on x, so sampling computes
        them once for all its steps (the models' `condition`): ~25% of the small prior's time on a CPU."""
        cond = self.kv_mapper(cond)
        return self.attention.to_k(cond), self.attention.to_v(cond)

    def forward(self, x, cond_kv: tuple):
        B, C, H, W = x.shape
        n = self.norm(x).view(B, C, H * W).transpose(1, 2)               # (B, HW, C)
        return x + self.attention(n, cond_kv).transpose(1, 2).reshape(B, C, H, W)


class ResBlockStageB(nn.Module):
    """ConvNeXt-V2 block whose MLP also reads extra channels (U-Net skip and/or semantic latent), concatenated
    after the norm: depthwise conv → LN → cat(extra) → MLP(4×) with GELU and GRN → residual."""

    def __init__(self, c: int, c_extra: int, kernel_size: int, dropout: float):
        super().__init__()
        self.depthwise = nn.Conv2d(c, c, kernel_size=kernel_size, padding=kernel_size // 2, groups=c)
        self.norm = LayerNorm2d(c)
        self.channelwise = nn.Sequential(nn.Linear(c + c_extra, c * 4), nn.GELU(), GlobalResponseNorm(c * 4),
                                         nn.Dropout(dropout), nn.Linear(c * 4, c))

    def forward(self, x, extra: torch.Tensor | None = None):
        h = self.norm(self.depthwise(x))
        if extra is not None:
            h = torch.cat([h, extra], dim=1)                              # (B, C + c_extra, H, W)
        # branch + x: the released order, which fixes the sum's memory layout and so the rounding downstream.
        return self.channelwise(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) + x


# ----------------------------------------------------------------------------------------------------------------
# Semantic compressor: EfficientNetV2 features → 1×1 conv → BatchNorm
# Module nesting and numbering follow torchvision's `efficientnet_v2_s().features`, which the released Stage B
# wrapped as `backbone`, so that `effnet_state_dict` loads without renames.
# ----------------------------------------------------------------------------------------------------------------
def conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True):
    """Conv (no bias) → BatchNorm (EfficientNetV2: eps 1e-3) → SiLU. Keys: 0 = conv, 1 = norm."""
    layers = [nn.Conv2d(c_in, c_out, kernel, stride, padding=(kernel - 1) // 2, groups=groups, bias=False),
              nn.BatchNorm2d(c_out, eps=1e-3)]
    return nn.Sequential(*layers, *([nn.SiLU()] if act else []))


class SqueezeExcitation(nn.Module):
    """Channel gating: global average → 1×1 conv down → SiLU → 1×1 conv up → sigmoid → scale."""

    def __init__(self, c: int, c_squeeze: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, c_squeeze, 1), nn.Conv2d(c_squeeze, c, 1)

    def forward(self, x):
        return x * self.fc2(F.silu(self.fc1(x.mean(dim=(2, 3), keepdim=True)))).sigmoid()


class EffNetBlock(nn.Module):
    """Fused-MBConv (3×3 expand conv → 1×1 project) or MBConv (1×1 expand → depthwise → SE → 1×1 project), with
    a residual and stochastic depth when the shape is kept."""

    def __init__(self, kind: str, expand: int, kernel: int, stride: int, c_in: int, c_out: int, drop_path: float):
        super().__init__()
        c_mid = c_in * expand
        if kind == "fused":
            layers = [conv_bn(c_in, c_mid, kernel, stride), conv_bn(c_mid, c_out, 1, act=False)] if expand != 1 \
                else [conv_bn(c_in, c_out, kernel, stride)]
        elif kind == "mb":
            layers = [conv_bn(c_in, c_mid, 1), conv_bn(c_mid, c_mid, kernel, stride, groups=c_mid),
                      SqueezeExcitation(c_mid, max(1, c_in // 4)), conv_bn(c_mid, c_out, 1, act=False)]
        else:
            raise ValueError(f"EfficientNet block kind {kind!r}: expected 'fused' or 'mb'")
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out
        self.drop_path = drop_path

    def forward(self, x):
        h = self.block(x)
        if not self.residual:
            return h
        if self.training and self.drop_path > 0:                          # drop the whole branch per sample
            keep = 1 - self.drop_path
            h = h * x.new_empty(x.shape[0], 1, 1, 1).bernoulli_(keep) / keep
        return x + h


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class SemanticCompressor(nn.Module):
    """(B, 3, H, W) image in [0, 1] → (B, 16, H·r/s, W·r/s) semantic latent (r = resize 0.75, s = stride 32)."""

    def __init__(self, config: StageBConfig):
        super().__init__()
        cfg = self.config = config
        n_blocks = sum(stage[-1] for stage in cfg.effnet_stages)
        layers, i = [conv_bn(3, cfg.effnet_stem, 3, stride=2)], 0
        for kind, expand, kernel, stride, c_in, c_out, n in cfg.effnet_stages:
            stage = []
            for j in range(n):                                            # stride and c_in apply to the first block
                stage.append(EffNetBlock(kind, expand, kernel, stride if j == 0 else 1, c_in if j == 0 else c_out,
                                         c_out, cfg.effnet_drop_path * i / n_blocks))
                i += 1
            layers.append(nn.Sequential(*stage))
        layers.append(conv_bn(cfg.effnet_stages[-1][5], cfg.effnet_width, 1))
        self.backbone = nn.Sequential(*layers)
        self.mapper = nn.Sequential(nn.Conv2d(cfg.effnet_width, cfg.c_semantic, kernel_size=1, bias=False),
                                    nn.BatchNorm2d(cfg.c_semantic))       # normalises the latent to mean 0, std 1
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        r, s = self.config.effnet_resize, self.config.effnet_stride
        return math.ceil(round(height * r) / s), math.ceil(round(width * r) / s)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        H, W = images.shape[-2:]
        if self.config.effnet_resize != 1:                                # released: bilinear, antialiased
            size = (round(H * self.config.effnet_resize), round(W * self.config.effnet_resize))
            images = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
        return self.mapper(self.backbone((images - self.mean) / self.std))


# ----------------------------------------------------------------------------------------------------------------
# The decoder, DiffNeXt
# ----------------------------------------------------------------------------------------------------------------
class DiffNeXt(nn.Module):
    """ε-prediction U-Net on the (B, 4, H, W) Stage A latent, given the (B, 16, h, w) semantic latent and
    (B, L, c_text) text tokens. Key names follow the release."""

    def __init__(self, config: StageBConfig = PRESETS["paper"]):
        super().__init__()
        self.config = cfg = config
        levels = len(cfg.c_hidden)
        # Conditioning. One 1×1 conv per injecting level, first for the down path (levels 0..n-1), then for the
        # up path (levels n-1..0); None where a level takes no semantic latent (no key in the state dict).
        self.clip_mapper = nn.Linear(cfg.c_text, cfg.c_cond)
        self.effnet_mappers = nn.ModuleList([
            nn.Conv2d(cfg.c_semantic, cfg.c_cond, kernel_size=1) if inject else None
            for inject in cfg.inject_semantic + cfg.inject_semantic[::-1]])
        self.seq_norm = nn.LayerNorm(cfg.c_cond, elementwise_affine=False, eps=1e-6)
        self.embedding = nn.Sequential(nn.PixelUnshuffle(cfg.patch_size),
                                       nn.Conv2d(cfg.c_in * cfg.patch_size ** 2, cfg.c_hidden[0], kernel_size=1),
                                       LayerNorm2d(cfg.c_hidden[0]))

        def level_blocks(i: int, skip: int):
            """blocks[i] groups of [ResBlock, TimestepBlock, (AttnBlock)]; the first ResBlock also reads `skip`."""
            out, sem = [], cfg.c_cond if cfg.inject_semantic[i] else 0
            for j in range(cfg.blocks[i]):
                out.append(ResBlockStageB(cfg.c_hidden[i], sem + (skip if j == 0 else 0), cfg.kernel_size,
                                          cfg.dropout))
                out.append(TimestepBlock(cfg.c_hidden[i], cfg.c_r))
                if cfg.attention[i]:
                    out.append(AttnBlock(cfg.c_hidden[i], cfg.c_cond, cfg.nhead[i], cfg.dropout))
            return out

        # Down path: each level after the first opens with LN → 2×2 stride-2 conv.
        self.down_blocks = nn.ModuleList()
        for i in range(levels):
            down = [nn.Sequential(LayerNorm2d(cfg.c_hidden[i - 1]),
                                  nn.Conv2d(cfg.c_hidden[i - 1], cfg.c_hidden[i], kernel_size=2, stride=2))] \
                if i > 0 else []
            self.down_blocks.append(nn.ModuleList(down + level_blocks(i, skip=0)))
        # Up path, deepest level first: each level but the first ends with LN → 2×2 stride-2 transposed conv. The
        # first ResBlock of every level but the deepest reads the down path's output at that level (U-Net skip).
        self.up_blocks = nn.ModuleList()
        for i in reversed(range(levels)):
            up = level_blocks(i, skip=cfg.c_hidden[i] if i < levels - 1 else 0)
            if i > 0:
                up.append(nn.Sequential(LayerNorm2d(cfg.c_hidden[i]),
                                        nn.ConvTranspose2d(cfg.c_hidden[i], cfg.c_hidden[i - 1], kernel_size=2,
                                                           stride=2)))
            self.up_blocks.append(nn.ModuleList(up))
        # The head ("clf" in the release) predicts (a, b), 4 channels each, back at full resolution.
        self.clf = nn.Sequential(LayerNorm2d(cfg.c_hidden[0]),
                                 nn.Conv2d(cfg.c_hidden[0], 2 * cfg.c_in * cfg.patch_size ** 2, kernel_size=1),
                                 nn.PixelShuffle(cfg.patch_size))
        self.initialize_weights()

    def initialize_weights(self):
        for m in self.modules():                                          # xavier weights, zero biases
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for mapper in [*self.effnet_mappers, self.clip_mapper]:           # conditioning mappers
            if mapper is not None:
                nn.init.normal_(mapper.weight, std=0.02)
        nn.init.xavier_uniform_(self.embedding[1].weight, gain=0.02)       # input embedding
        nn.init.zeros_(self.clf[1].weight)                                # head
        for block in self.modules():
            if isinstance(block, ResBlockStageB):                         # residual branches start small
                block.channelwise[-1].weight.data *= math.sqrt(1 / sum(self.config.blocks))
            elif isinstance(block, TimestepBlock):                        # FiLM starts as the identity
                nn.init.zeros_(block.mapper.weight)

    def _semantic(self, semantic: torch.Tensor, mapper_index: int, size) -> torch.Tensor | None:
        """The semantic latent resized to a level and mapped to c_cond channels, or None if the level takes none.
        Released: bicubic, antialiased, align_corners=True, computed in float32 whatever the autocast dtype."""
        mapper = self.effnet_mappers[mapper_index]
        if mapper is None:
            return None
        resized = F.interpolate(semantic.float(), size=size, mode="bicubic", antialias=True, align_corners=True)
        return mapper(resized.to(semantic.dtype))                         # (B, c_cond, h_level, w_level)

    def condition(self, semantic: torch.Tensor, text: torch.Tensor) -> dict:
        """forward's keyword arguments for `semantic` and caption tokens `text`, with what depends on the text alone
        already computed: every attention block's text keys and values, in forward's order. schedule.sample calls
        this once per run instead of redoing it at each step."""
        cond = self.seq_norm(self.clip_mapper(text))                      # (B, L, c_cond)
        blocks = [block for level in [*self.down_blocks, *self.up_blocks] for block in level]
        return {"semantic": semantic, "text_kv": [b.cond_kv(cond) for b in blocks if isinstance(b, AttnBlock)]}

    def forward(self, x: torch.Tensor, t: torch.Tensor, semantic: torch.Tensor, text: torch.Tensor | None = None,
                text_kv: list | None = None) -> torch.Tensor:
        """x: (B, 4, H, W) noised latent, t: (B,), semantic: (B, 16, h, w), text: (B, L, c_text) caption tokens, or
        instead `text_kv` from `condition`. Returns ε̂."""
        cfg, levels = self.config, len(self.config.c_hidden)
        t_emb = timestep_embedding(t, cfg.c_r)                           # (B, c_r)
        text_kv = iter(self.condition(semantic, text)["text_kv"] if text_kv is None else text_kv)
        h = self.embedding(x)                                             # (B, c_hidden[0], H/2, W/2)
        sizes = [(h.shape[-2] >> i, h.shape[-1] >> i) for i in range(levels)]

        def run(block, h, extra):
            if isinstance(block, ResBlockStageB):
                return block(h, extra)
            if isinstance(block, TimestepBlock):
                return block(h, t_emb)
            if isinstance(block, AttnBlock):
                return block(h, next(text_kv))
            return block(h)                                               # down- or up-sampling conv

        skips = []
        for i, blocks in enumerate(self.down_blocks):
            sem = self._semantic(semantic, i, sizes[i])
            for block in blocks:
                h = run(block, h, sem)
            skips.append(h)
        for k, blocks in enumerate(self.up_blocks):                       # k = 0 is the deepest level
            i = levels - 1 - k
            sem = self._semantic(semantic, levels + k, sizes[i])
            for j, block in enumerate(blocks):
                # The first block of a non-deepest level reads [U-Net skip, semantic]; the others [semantic].
                extra = [skips[i]] if j == 0 and k > 0 else []
                extra += [sem] if sem is not None else []
                h = run(block, h, torch.cat(extra, dim=1) if extra else None)
        a, b = self.clf(h).chunk(2, dim=1)                                # 2 × (B, 4, H, W)
        # The released head: x_t ≈ a + b·ε with b squashed into [1e-3, 1 − 1e-3], so ε̂ = (x_t − a)/b (x0-like).
        b = b.sigmoid() * (1 - 2e-3) + 1e-3
        return (x - a) / b


# ----------------------------------------------------------------------------------------------------------------
# Stage B = compressor + decoder, trained jointly
# ----------------------------------------------------------------------------------------------------------------
class StageB(nn.Module):
    def __init__(self, config: StageBConfig = PRESETS["paper"]):
        super().__init__()
        self.config = config
        self.compressor = SemanticCompressor(config)
        self.decoder = DiffNeXt(config)

    def loss(self, latents: torch.Tensor, images: torch.Tensor, text: torch.Tensor, text_uncond: torch.Tensor,
             semantic_dropout: float = 0.05, caption_dropout: float = 0.05,
             generator: torch.Generator | None = None):
        """P2-weighted ε-MSE, with gradients into the compressor. Returns (loss, parts).

        latents: (B, 4, H, W) Stage A latents (un-quantized, ÷ scale factor) of `images`: (B, 3, 4H, 4W) in [0, 1];
        text: (B, L, c_text) caption tokens; text_uncond: (1 or B, L, c_text) tokens of the empty caption.
        Dropped semantic latents become zeros and dropped captions the empty caption: the unconditional inputs
        used for classifier-free guidance at sampling time.
        """
        B, device = latents.shape[0], latents.device
        semantic = self.compressor(images)
        keep = torch.rand(B, generator=generator, device=device) >= semantic_dropout
        semantic = semantic * keep[:, None, None, None].to(semantic.dtype)
        drop_text = torch.rand(B, generator=generator, device=device) < caption_dropout
        text = torch.where(drop_text[:, None, None], text_uncond.expand_as(text), text)
        t = sample_t(B, generator=generator, device=device)
        noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
        eps = self.decoder(add_noise(latents, noise, t), t, semantic, text)
        mse = ((eps.float() - noise.float()) ** 2).mean(dim=(1, 2, 3))   # (B,)
        loss = (mse * p2_weight(t)).mean()
        return loss, {"mse": mse.mean().detach(), "semantic_std": semantic.detach().float().std()}


# ----------------------------------------------------------------------------------------------------------------
# Loading published weights: this stage's key renames and configs. Safe reading and strict loading are shared
# (checkpoints.py).
# ----------------------------------------------------------------------------------------------------------------
def official_to_diffusers(state: dict) -> dict:
    """Rename the official checkpoint's nn.MultiheadAttention keys to our q/k/v projections (released renames)."""
    out = {}
    for k, v in state.items():
        if k.endswith("attention.attn.in_proj_weight") or k.endswith("attention.attn.in_proj_bias"):
            prefix, kind = k.rsplit(".attn.in_proj_", 1)                  # kind: "weight" or "bias"
            for name, chunk in zip(("to_q", "to_k", "to_v"), v.chunk(3, dim=0)):  # 3c rows → 3 × c
                out[f"{prefix}.{name}.{kind}"] = chunk
        elif ".attention.attn.out_proj." in k:
            out[k.replace(".attention.attn.out_proj.", ".attention.to_out.0.")] = v
        else:
            out[k] = v
    return out


def config_from_diffusers(raw: dict) -> StageBConfig:
    """Our config from a diffusers `WuerstchenDiffNeXt` config.json; the compressor keeps the paper's table."""
    for level in raw["level_config"]:
        if level not in ("CT", "CTA"):
            raise CheckpointError(f"level_config entry {level!r}: only 'CT' and 'CTA' levels exist in DiffNeXt")
    if raw.get("c_in", 4) != raw.get("c_out", 4):
        raise CheckpointError(f"c_in {raw.get('c_in', 4)} != c_out {raw.get('c_out', 4)}: Stage B denoises its own "
                              f"input")
    names = {f.name for f in fields(StageBConfig)} - {"nhead"}
    kept = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in names}
    if isinstance(kept.get("dropout"), tuple):                            # a per-level list in some configs
        kept["dropout"] = kept["dropout"][0]
    return StageBConfig(**kept, nhead=tuple(max(h, 0) for h in raw["nhead"]),
                        attention=tuple(level == "CTA" for level in raw["level_config"]),
                        inject_semantic=tuple(raw["inject_effnet"]), c_semantic=raw["effnet_embd"],
                        c_text=raw["clip_embd"])


def load_pretrained(path, compressor_path=None, device="cpu") -> StageB:
    """The released Stage B, from `model_v2_stage_b.pt` (decoder `state_dict` + compressor `effnet_state_dict`)
    or a diffusers `decoder/` folder. A diffusers folder holds no compressor: pass `compressor_path` (the .pt) to
    load it too; otherwise the compressor keeps random weights (sampling from Stage C never uses it).
    """
    path = Path(path)
    if path.is_dir():
        raw, state = read_diffusers_folder(path)
        config, effnet_state = config_from_diffusers(raw), None
        config = with_saved_fields(config, raw, ("effnet_stem", "effnet_stages", "effnet_width", "effnet_resize",
                                                 "effnet_drop_path", "resolution_multiple", "latent_dim_scale"))
    else:
        ckpt = read_checkpoint(path)
        if "state_dict" not in ckpt:
            raise CheckpointError(f"checkpoint {path}: expected 'state_dict' and 'effnet_state_dict' "
                                  f"(model_v2_stage_b.pt), found keys {sorted(ckpt)[:5]}")
        state, effnet_state, config = ckpt["state_dict"], ckpt.get("effnet_state_dict"), PRESETS["paper"]
    if compressor_path is not None:
        ckpt = read_checkpoint(Path(compressor_path))
        if "effnet_state_dict" not in ckpt:
            raise CheckpointError(f"checkpoint {compressor_path}: no 'effnet_state_dict' (model_v2_stage_b.pt)")
        effnet_state = ckpt["effnet_state_dict"]
    model = StageB(config)
    load_strict(model.decoder, official_to_diffusers(state), "Stage B (decoder)", path)
    if effnet_state is not None:
        load_strict(model.compressor, effnet_state, "the semantic compressor", Path(compressor_path or path))
    return model.to(device).eval()
