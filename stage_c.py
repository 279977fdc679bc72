"""Stage C: the text-conditional prior that generates Würstchen's 16×24×24 semantic latent.

Paper: Würstchen (arXiv 2306.00637), Sec. 3.3 and Fig. 3. For a 1024² image, Stage C denoises a 16×24×24 latent,
42.67× smaller per side than the image, conditioned on CLIP ViT-bigG text tokens. It is a stack of ConvNeXt-style
residual blocks, timestep blocks and attention blocks at one resolution: there is no down-sampling.

It mirrors the released `model_v3_stage_c.pt` (dome272/Wuerstchen `modules.py`, class `Prior`) and diffusers'
`WuerstchenPrior`, parameter for parameter (993,636,896 at the `paper` preset), and loads both checkpoints.
Deliberate choices:
- the attention is written out with q/k/v projections (diffusers' key names); the official `nn.MultiheadAttention`
  keys are renamed on load;
- caption dropout for classifier-free guidance is drawn per sample (the official script drops the whole batch);
- the tiny preset mixes neighbouring caption tokens with two 1-D convolutions (`text_conv`) before the attention
  reads them; the released prior has none, and neither do the paper and small presets.
"""
import dataclasses
import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from checkpoints import CheckpointError, load_strict, read_checkpoint, read_diffusers_folder, with_saved_fields
from schedule import add_noise, p2_weight, sample_t, timestep_embedding


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageCConfig:
    c_in: int = 16        # channels of the semantic latent (released: 16)
    c: int = 1536         # width of every block (released: 1536)
    c_cond: int = 1280    # width of the text tokens (released: 1280, CLIP ViT-bigG's last_hidden_state)
    c_r: int = 64         # width of the timestep embedding (released: 64)
    depth: int = 32       # number of [ResBlock, TimestepBlock, AttnBlock] triples (released: 32)
    nhead: int = 24       # attention heads, head dim = c / nhead (released: 24)
    dropout: float = 0.1  # in the residual MLPs and on the attention weights (released: 0.1)
    # Stage C does not model the semantic latent z itself but (z + shift) / scale. The released prior pipeline maps
    # its output back with × 42 − 1 (its config calls these latent_mean 42 and latent_std 1), fitted to the released
    # compressor's output. Our own compressors end in a fresh BatchNorm, so their z has about unit scale already:
    # the tiny and small presets use the identity, since ÷ 42 would leave a 1/42-std signal under unit noise and
    # amplify the prior's errors 42× on the way back.
    semantic_shift: float = 1.0
    semantic_scale: float = 42.0
    # Ours, not released (the paper preset has none): residual 1-D convolutions over the mapped caption tokens, so
    # that each token takes in its neighbours before the image attends to it. The prior's attention never lets
    # caption tokens mix, so binding "purple" to "star" in "a purple star left of a red circle" is left to the text
    # encoder; in all-MiniLM-L6-v2's last layer only 3% of the "star" token's variance follows its colour word
    # (experiments/text_binding.py).
    text_conv: int = 0

    def __post_init__(self):
        if self.c % self.nhead:
            raise ValueError(f"StageCConfig: c={self.c} is not divisible by nhead={self.nhead}")


PRESETS = {
    "paper": StageCConfig(),
    # One consumer GPU. c_cond 384 is the width of all-MiniLM-L6-v2, the project's offline text encoder.
    "small": StageCConfig(c=768, c_cond=384, depth=12, nhead=12, semantic_shift=0.0, semantic_scale=1.0),
    # Tests and the CPU demo. text_conv 2, ours: the caption tokens mix with their neighbours, for colour binding
    # (docs/shipped.md#stage-c-mixes-neighbouring-caption-tokens).
    "tiny": StageCConfig(c=64, c_cond=384, c_r=32, depth=4, nhead=4, dropout=0.0, semantic_shift=0.0,
                         semantic_scale=1.0, text_conv=2),
}
# The emoji world (train.py --preset emoji): tiny at twice the width, to hold 3,496 emoji rather than 30 colour-shape
# pairs (docs/emoji.md#the-emoji-recipe).
PRESETS["emoji"] = dataclasses.replace(PRESETS["tiny"], c=128)

# ----------------------------------------------------------------------------------------------------------------
# Layers. LayerNorm2d, GlobalResponseNorm, TimestepBlock and AttnBlock have identical copies in stage_b.py, so that
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


class TokenConv(nn.Module):
    """Residual 1-D convolution over caption tokens (B, L, C): each token mixes with the one before and after it.
    Not in the released model (StageCConfig.text_conv)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv1d(c, c, kernel_size=3, padding=1)

    def forward(self, x):
        return x + self.conv(F.gelu(x).transpose(1, 2)).transpose(1, 2)          # (B, L, C) ↔ (B, C, L)


class ResBlock(nn.Module):
    """ConvNeXt-V2 block: depthwise 3×3 conv → LN → MLP(4×) with GELU and GRN → residual."""

    def __init__(self, c: int, dropout: float):
        super().__init__()
        self.depthwise = nn.Conv2d(c, c, kernel_size=3, padding=1, groups=c)
        self.norm = LayerNorm2d(c)
        self.channelwise = nn.Sequential(
            nn.Linear(c, c * 4), nn.GELU(), GlobalResponseNorm(c * 4), nn.Dropout(dropout), nn.Linear(c * 4, c))

    def forward(self, x):
        h = self.norm(self.depthwise(x)).permute(0, 2, 3, 1)             # (B, H, W, C)
        # branch + x, not x + branch: the sum takes the first operand's memory layout, and the released order keeps
        # the branch's, so every later kernel rounds exactly as in the released model.
        return self.channelwise(h).permute(0, 3, 1, 2) + x


# ----------------------------------------------------------------------------------------------------------------
# The prior
# ----------------------------------------------------------------------------------------------------------------
class Prior(nn.Module):
    """ε-prediction network on the (B, 16, h, w) prior-space latent, conditioned on (B, L, c_cond) text tokens."""

    def __init__(self, config: StageCConfig = PRESETS["paper"]):
        super().__init__()
        self.config = cfg = config
        self.projection = nn.Conv2d(cfg.c_in, cfg.c, kernel_size=1)
        # Token-wise text mapper; "cond_mapper" is its released name.
        self.cond_mapper = nn.Sequential(nn.Linear(cfg.c_cond, cfg.c), nn.LeakyReLU(0.2), nn.Linear(cfg.c, cfg.c))
        self.token_convs = nn.Sequential(*[TokenConv(cfg.c) for _ in range(cfg.text_conv)])   # empty as released
        self.blocks = nn.ModuleList()
        for _ in range(cfg.depth):
            self.blocks.append(ResBlock(cfg.c, cfg.dropout))
            self.blocks.append(TimestepBlock(cfg.c, cfg.c_r))
            self.blocks.append(AttnBlock(cfg.c, cfg.c, cfg.nhead, cfg.dropout))
        # The head ("out" in the release) predicts (a, b) with 16 channels each.
        self.out = nn.Sequential(LayerNorm2d(cfg.c), nn.Conv2d(cfg.c, cfg.c_in * 2, kernel_size=1))
        self.grad_checkpoint = False      # train.py --grad-checkpoint: recompute each block triple in backward
        self.initialize_weights()

    def initialize_weights(self):
        for m in self.modules():                                          # xavier weights, zero biases
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.projection.weight, std=0.02)                 # input projection
        for layer in (self.cond_mapper[0], self.cond_mapper[2]):          # text mapper
            nn.init.normal_(layer.weight, std=0.02)
        nn.init.zeros_(self.out[1].weight)                                # head: starts at ε̂ = x_t
        for block in self.token_convs:                                    # token mixing starts as the identity
            nn.init.zeros_(block.conv.weight)
            nn.init.zeros_(block.conv.bias)
        for block in self.blocks:
            if isinstance(block, ResBlock):                               # residual branches start small
                block.channelwise[-1].weight.data *= math.sqrt(1 / self.config.depth)
            elif isinstance(block, TimestepBlock):                        # FiLM starts as the identity
                nn.init.zeros_(block.mapper.weight)

    def condition(self, text: torch.Tensor) -> dict:
        """forward's keyword arguments for caption tokens `text` (B, L, c_cond), with what depends on the text alone
        already computed: every attention block's text keys and values. schedule.sample calls this once per run
        instead of redoing it in each of the 29 prior calls."""
        cond = self.token_convs(self.cond_mapper(text))                   # (B, L, c)
        return {"text_kv": [block.cond_kv(cond) for block in self.blocks if isinstance(block, AttnBlock)]}

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor | None = None,
                text_kv: list | None = None) -> torch.Tensor:
        """x: (B, 16, h, w) noised latent, t: (B,) in [0, 1], text: (B, L, c_cond) caption tokens, or instead
        `text_kv` from `condition`. Returns ε̂: (B, 16, h, w)."""
        t_emb = timestep_embedding(t, self.config.c_r)                   # (B, c_r)
        text_kv = self.condition(text)["text_kv"] if text_kv is None else text_kv
        h = self.projection(x)                                            # (B, c, h, w)
        for i, kv in enumerate(text_kv):                                  # the [ResBlock, TimestepBlock, AttnBlock]s
            if self.grad_checkpoint and torch.is_grad_enabled():
                # Keep only each triple's input for the backward pass and recompute the rest there: activation
                # memory falls from all 3·depth blocks' to one triple's, for about one more forward pass of time.
                # Dropout draws again the same numbers (the RNG state is kept), so gradients are unchanged.
                h = torch.utils.checkpoint.checkpoint(self.triple, i, h, t_emb, kv, use_reentrant=False)
            else:
                h = self.triple(i, h, t_emb, kv)
        a, b = self.out(h).chunk(2, dim=1)                                # 2 × (B, 16, h, w)
        # The released head: x_t ≈ a + |1 − b|·ε, so ε̂ = (x_t − a)/|1 − b|. It is x0-like (a is a denoised guess),
        # which learns far faster than a plain ε head at small scale. 1e-5 keeps the division finite.
        return (x - a) / ((1 - b).abs() + 1e-5)

    def triple(self, i: int, h, t_emb, kv):
        """The i-th [ResBlock, TimestepBlock, AttnBlock] of the stack."""
        res, film, attn = self.blocks[3 * i: 3 * i + 3]
        return attn(film(res(h), t_emb), kv)

    def to_prior_space(self, semantic: torch.Tensor) -> torch.Tensor:
        """Semantic latent z → the space Stage C denoises: (z + shift) / scale (released: (z + 1) / 42)."""
        return (semantic + self.config.semantic_shift) / self.config.semantic_scale

    def from_prior_space(self, x: torch.Tensor) -> torch.Tensor:
        """Stage C's output → semantic latent: x · scale − shift (released: × 42 − 1)."""
        return x * self.config.semantic_scale - self.config.semantic_shift

    # ------------------------------------------------------------------------------------------------------------
    # Loss
    # ------------------------------------------------------------------------------------------------------------
    def loss(self, semantic: torch.Tensor, text: torch.Tensor, text_uncond: torch.Tensor,
             caption_dropout: float = 0.05, generator: torch.Generator | None = None):
        """P2-weighted ε-MSE on one batch. Returns (loss, parts).

        semantic: (B, 16, h, w) raw semantic latent from the frozen compressor; text: (B, L, c_cond) caption tokens;
        text_uncond: (1 or B, L, c_cond) tokens of the empty caption, used for the dropped captions so that
        classifier-free guidance works at sampling time.
        """
        B, device = semantic.shape[0], semantic.device
        x0 = self.to_prior_space(semantic)
        drop = torch.rand(B, generator=generator, device=device) < caption_dropout
        text = torch.where(drop[:, None, None], text_uncond.expand_as(text), text)
        t = sample_t(B, generator=generator, device=device)
        noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
        eps = self(add_noise(x0, noise, t), t, text)
        mse = ((eps.float() - noise.float()) ** 2).mean(dim=(1, 2, 3))   # (B,)
        loss = (mse * p2_weight(t)).mean()
        return loss, {"mse": mse.mean().detach(), "caption_dropped": drop.float().mean()}


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


def load_pretrained(path, device="cpu") -> Prior:
    """The released prior, from `model_v3_stage_c.pt` (its `ema_state_dict`) or a diffusers `prior/` folder.

    The load is strict: a truncated, mismatched or other-stage checkpoint raises CheckpointError naming the keys.
    """
    path = Path(path)
    if path.is_dir():
        raw, state = read_diffusers_folder(path)
        names = {f.name for f in fields(StageCConfig)}
        config = with_saved_fields(StageCConfig(**{k: v for k, v in raw.items() if k in names}), raw,
                                   ("semantic_shift", "semantic_scale", "text_conv"))
    else:
        ckpt = read_checkpoint(path)
        if "ema_state_dict" not in ckpt and "state_dict" not in ckpt:
            raise CheckpointError(f"checkpoint {path}: expected an 'ema_state_dict' (model_v3_stage_c.pt), "
                                  f"found keys {sorted(ckpt)[:5]}")
        state = ckpt.get("ema_state_dict", ckpt.get("state_dict"))
        config = PRESETS["paper"]
    model = Prior(config)
    load_strict(model, official_to_diffusers(state), "Stage C (prior)", path)
    return model.to(device).eval()
