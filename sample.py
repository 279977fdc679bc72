"""Text → image with the three stages: Stage C → Stage B → Stage A (Würstchen, arXiv 2306.00637, Fig. 2).

1. Stage C denoises a 16×(H/42.67)×(W/42.67) latent from the caption (CLIP ViT-bigG tokens for the release),
   which maps back to the semantic latent with × 42 − 1.
2. Stage B denoises Stage A's 4×(H/4)×(W/4) latent, given that semantic latent and the caption (CLIP ViT-H).
3. Stage A decodes the latent to pixels, clamped to [0, 1].

`generate` follows the released diffusers pipelines step for step, random draws included, so that the same seed
gives the same image as `WuerstchenCombinedPipeline` (tests/test_pipeline_parity.py).
"""
import math

import torch

from schedule import STAGE_B_STEPS, STAGE_C_TIMESTEPS, linear_timesteps, sample
from stage_c import from_prior_space


def encode_text(tokenizer, text_encoder, prompts: list[str], device=None) -> torch.Tensor:
    """Token-level last hidden states (B, L, C), padded to the tokenizer's max length, with the attention mask:
    what the released Würstchen reads from CLIP (not pooled, not the penultimate layer)."""
    tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
    out = text_encoder(tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device))
    return out.last_hidden_state


def latent_sizes(height: int, width: int, stage_b_config) -> tuple[tuple[int, int], tuple[int, int]]:
    """(Stage C side, Stage B side) for an image size, as the released pipelines compute them:
    C = ceil(side / 42.67), B = int(C × 10.67) (1024 → 24 → 256)."""
    c = (math.ceil(height / stage_b_config.resolution_multiple), math.ceil(width / stage_b_config.resolution_multiple))
    b = (int(c[0] * stage_b_config.latent_dim_scale), int(c[1] * stage_b_config.latent_dim_scale))
    return c, b


@torch.inference_mode()
def generate(prior, decoder, vqgan, text_c, text_c_uncond, text_b, text_b_uncond, height: int, width: int,
             prior_timesteps=STAGE_C_TIMESTEPS, decoder_timesteps=None, prior_guidance: float = 4.0,
             decoder_guidance: float = 0.0, generator: torch.Generator | None = None, device=None,
             dtype=torch.float32) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] from encoded captions.

    prior: Stage C `Prior`; decoder: Stage B `DiffNeXt`; vqgan: `StageA`. text_c / text_b: (B, L, C) caption tokens
    for Stage C / Stage B, and *_uncond the empty caption's tokens, (B, L, C). Guidance is on for w > 1 (released
    defaults: 4.0 for the prior, off for the decoder).
    """
    B = text_c.shape[0]
    (hc, wc), (hb, wb) = latent_sizes(height, width, decoder.config)
    x = sample(prior, (B, prior.config.c_in, hc, wc), cond={"text": text_c}, uncond={"text": text_c_uncond},
               guidance=prior_guidance, timesteps=prior_timesteps, generator=generator, device=device, dtype=dtype)
    semantic = from_prior_space(x)                                        # (B, 16, hc, wc)
    # Stage B's unconditional inputs are a zero semantic latent and the empty caption.
    latents = sample(decoder, (B, decoder.config.c_in, hb, wb), cond={"semantic": semantic, "text": text_b},
                     uncond={"semantic": torch.zeros_like(semantic), "text": text_b_uncond},
                     guidance=decoder_guidance,
                     timesteps=linear_timesteps(STAGE_B_STEPS) if decoder_timesteps is None else decoder_timesteps,
                     generator=generator, device=device, dtype=dtype)
    return vqgan.decode(latents).clamp(0, 1)
