"""Usage:
    python sample.py "a red star on the left"                     # the shipped weights (weights/shapes/)
    python sample.py "red apple" "thumbs up: dark skin tone" --world emoji              # weights/emoji/
    python sample.py "a small red circle at the top left" --run runs/tiny
    python sample.py "an astronaut" --stage-c wuerstchen-prior/prior --stage-b wuerstchen/decoder \\
        --stage-a wuerstchen/vqgan --text-encoder-c wuerstchen-prior --text-encoder-b wuerstchen --size 1024

Text → image with the three stages: Stage C → Stage B → Stage A (Würstchen, arXiv 2306.00637, Fig. 2).

1. Stage C denoises a 16×(H/42.67)×(W/42.67) latent from the caption (CLIP ViT-bigG tokens for the release),
   which maps back to the semantic latent (released: × 42 − 1).
2. Stage B denoises Stage A's 4×(H/4)×(W/4) latent, given that semantic latent and the caption (CLIP ViT-H).
3. Stage A decodes the latent to pixels, clamped to [0, 1].

`generate` follows the released diffusers pipelines step for step, random draws included, so that the same seed
gives the same image as `WuerstchenCombinedPipeline` (tests/test_pipeline_parity.py). Checkpoints are those that
train.py writes (EMA weights by default), the shipped ones that scripts/export_weights.py wrote, or the published
ones (official .pt or diffusers folders).
"""
import argparse
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import checkpoints
from checkpoints import first_line, load_stage, run_paths
from cli import OneLineParser, device_value, guidance_value, positive_int, seed_value, timestep_list
from schedule import STAGE_B_STEPS, STAGE_C_TIMESTEPS, linear_timesteps, sample


# ----------------------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------------------
def encode_prompts(encoder, prompts: list[str], device=None, repeat: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(caption tokens, empty-caption tokens), both (B·repeat, L, C): the conditional and unconditional inputs, each
    caption repeated `repeat` times in a row (images per prompt). Each caption and the empty caption go through the
    encoder once, as in the released pipelines (the empty caption's tokens are a broadcast view, not copies).
    encoder: a text.TextEncoder (token-level last hidden states with the attention mask, as Würstchen reads CLIP)."""
    text = encoder.encode(prompts, device).repeat_interleave(repeat, dim=0)
    return text, encoder.encode([""], device).expand(len(text), -1, -1)


def latent_sizes(height: int, width: int, stage_b_config) -> tuple[tuple[int, int], tuple[int, int]]:
    """(Stage C side, Stage B side) for an image size, as the released pipelines compute them:
    C = ceil(side / 42.67), B = int(C × 10.67) (1024 → 24 → 256)."""
    c = (math.ceil(height / stage_b_config.resolution_multiple), math.ceil(width / stage_b_config.resolution_multiple))
    b = (int(c[0] * stage_b_config.latent_dim_scale), int(c[1] * stage_b_config.latent_dim_scale))
    return c, b


def valid_side(side: int, stage_b_config) -> int:
    """The smallest image side ≥ `side` that the decoder can make: its latent side, 4 × smaller, must divide into
    the decoder's levels (the paper preset: multiples of 128 px; 1100 crashes the released pipeline)."""
    while True:
        _, (b, _) = latent_sizes(side, side, stage_b_config)
        if b % stage_b_config.latent_multiple == 0:
            return b * 4                                                  # ≥ side: 4 × 10.67 × ceil(side / 42.67)
        side += 1


def _synced_time(device) -> float:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.inference_mode()
def generate(prior, decoder, vqgan, text_c, text_c_uncond, text_b, text_b_uncond, height: int, width: int,
             prior_timesteps=STAGE_C_TIMESTEPS, decoder_timesteps=None, prior_guidance: float = 4.0,
             decoder_guidance: float = 0.0, generator: torch.Generator | None = None, device=None,
             dtype=torch.float32, timings: dict | None = None) -> torch.Tensor:
    """Images (B, 3, H', W') in [0, 1] from encoded captions; H', W' as the latent sizes give them.

    prior: Stage C `Prior`; decoder: Stage B `DiffNeXt`; vqgan: `StageA`. text_c / text_b: (B, L, C) caption tokens
    for Stage C / Stage B, and *_uncond the empty caption's tokens, (B, L, C). Guidance is on for w > 1 (released
    defaults: 4.0 for the prior, off for the decoder). `timings`, if given, receives seconds per stage.
    """
    B = text_c.shape[0]
    (hc, wc), (hb, wb) = latent_sizes(height, width, decoder.config)
    t0 = _synced_time(device or "cpu")
    x = sample(prior, (B, prior.config.c_in, hc, wc), cond={"text": text_c}, uncond={"text": text_c_uncond},
               guidance=prior_guidance, timesteps=prior_timesteps, generator=generator, device=device, dtype=dtype)
    semantic = prior.from_prior_space(x.float())                          # (B, 16, hc, wc)
    t1 = _synced_time(device or "cpu")
    # Stage B's unconditional inputs are a zero semantic latent and the empty caption.
    latents = sample(decoder, (B, decoder.config.c_in, hb, wb), cond={"semantic": semantic, "text": text_b},
                     uncond={"semantic": torch.zeros_like(semantic), "text": text_b_uncond},
                     guidance=decoder_guidance,
                     timesteps=linear_timesteps(STAGE_B_STEPS) if decoder_timesteps is None else decoder_timesteps,
                     generator=generator, device=device, dtype=dtype)
    t2 = _synced_time(device or "cpu")
    images = vqgan.decode(latents.float()).float().clamp(0, 1)
    t3 = _synced_time(device or "cpu")
    if timings is not None:
        timings.update({"stage C": t1 - t0, "stage B": t2 - t1, "stage A": t3 - t2})
    return images


def compile_models(prior, decoder, vqgan):
    """torch.compile, in place, what sampling runs: both denoisers and Stage A's decoder path (the models keep their
    type and methods). The first run compiles for each new shape (about 2 minutes per model on a CPU); later runs
    are faster (tiny prior on a CPU: 1.8×). Fused kernels round differently: the images move by up to ~2e-3 (tiny
    preset, random weights, short schedules), so the parity tests run uncompiled."""
    for module in (prior, decoder, vqgan.up_blocks, vqgan.out_block):
        module.compile()


def save_grid(rows: list[torch.Tensor], path, pad: int = 2):
    """Rows of (N, 3, H, W) images in [0, 1] as one PNG, white-padded."""
    n, (h, w) = max(r.shape[0] for r in rows), rows[0].shape[-2:]
    grid = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        pixels = (row.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
        for j, img in enumerate(pixels):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[y:y + h, x:x + w] = img
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------
def lora_value(text: str) -> tuple[str, float]:
    """FILE or FILE:SCALE; a path that itself holds ':' is read as FILE if it exists."""
    path, sep, scale = text.rpartition(":")
    if not sep or Path(text).exists():
        return text, 1.0
    try:
        value = float(scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected FILE or FILE:SCALE with a number for SCALE") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a finite SCALE")
    return path, value


def parse_args(argv=None):
    p = OneLineParser(description="Text → image with Würstchen's three stages.",
                      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n")[0])
    p.add_argument("prompts", nargs="*", help="captions to draw")
    p.add_argument("--demo-prompts", action="store_true",
                   help="also draw the fixed demo prompts of --world (data.DEMO_PROMPTS, data.EMOJI_DEMO_PROMPTS)")
    p.add_argument("--world", choices=["shapes", "emoji"], default="shapes",
                   help="which built-in world's shipped weights (weights/shapes/ or weights/emoji/) and demo\n"
                        "prompts to use")
    p.add_argument("--run", default=None,
                   help="folder with train.py's stage_a/b/c.pt or exported .safetensors (default: the shipped\n"
                        "weights of --world)")
    p.add_argument("--stage-a", help="Stage A checkpoint: train.py .pt, vqgan_f4_v1_500k.pt or a diffusers vqgan/")
    p.add_argument("--stage-b", help="Stage B checkpoint: train.py .pt, model_v2_stage_b.pt or a diffusers decoder/")
    p.add_argument("--stage-c", help="Stage C checkpoint: train.py .pt, model_v3_stage_c.pt or a diffusers prior/")
    p.add_argument("--lora", type=lora_value, default=None, metavar="FILE[:SCALE]",
                   help="apply a Stage C LoRA (train.py --lora-rank, or diffusers' layout), merged, scaled by SCALE\n"
                        "(default 1)")
    p.add_argument("--weights", choices=["ema", "model"], default="ema", help="which weights of train.py checkpoints")
    p.add_argument("--text-encoder-c", help="Stage C's text encoder: 'minilm' or a local CLIP folder "
                                            "(default: what the checkpoint was trained with)")
    p.add_argument("--text-encoder-b", help="Stage B's text encoder, likewise")
    p.add_argument("--seed", type=seed_value, default=0, help="same seed and flags → same images")
    p.add_argument("--prior-steps", type=positive_int, help="linear Stage C steps (default: the released 29-call list)")
    p.add_argument("--prior-timesteps", type=timestep_list, help="explicit Stage C list, e.g. 1,0.8,0.5,0")
    p.add_argument("--decoder-steps", type=positive_int, default=STAGE_B_STEPS, help="linear Stage B steps")
    p.add_argument("--decoder-timesteps", type=timestep_list, help="explicit Stage B list")
    p.add_argument("--prior-guidance", type=guidance_value, default=4.0, help="Stage C guidance (on for > 1)")
    p.add_argument("--decoder-guidance", type=guidance_value, default=0.0, help="Stage B guidance (on for > 1)")
    p.add_argument("--size", type=positive_int, help="image side (default: the size Stage C was trained at)")
    p.add_argument("--batch", type=positive_int, default=1, help="images per prompt")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 autocast on a capable GPU, fp32 on CPU (fp16 overflows in this model family)")
    p.add_argument("--device", type=device_value, default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the models: pays off over many images, not for one (see compile_models)")
    p.add_argument("--out", default=None,
                   help="output folder (default: RUN/samples; out/ for the shipped weights or with no --run)")
    args = p.parse_args(argv)
    if args.prior_steps and args.prior_timesteps is not None:
        p.error("give --prior-steps or --prior-timesteps, not both")
    return args


def main(argv=None):
    args = parse_args(argv)
    from data import DEMO_PROMPTS, EMOJI_DEMO_PROMPTS
    demo = EMOJI_DEMO_PROMPTS if args.world == "emoji" else DEMO_PROMPTS
    prompts = (list(demo) if args.demo_prompts else []) + [p.strip() for p in args.prompts]
    if not prompts:
        raise SystemExit("error: no prompt given; pass one or more captions, or --demo-prompts")
    for number, (given, prompt) in enumerate(zip(args.prompts, prompts[len(prompts) - len(args.prompts):]), 1):
        if not prompt:        # "" is the unconditional caption: sampling it silently would ignore the user
            raise SystemExit(f"error: prompt {number} ({given!r}) is empty; expected a caption with some text")
    device = args.device
    use_bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda"
                                            and torch.cuda.is_bf16_supported())
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
    run = Path(args.run) if args.run else (checkpoints.SHIPPED_EMOJI if args.world == "emoji" else checkpoints.SHIPPED)

    def text_encoder(flag, model):
        from text import TextEncoder      # imports transformers (seconds): not before the checks that need none
        spec, length = getattr(model, "text_encoder_spec", (None, None))
        spec = flag or spec
        if spec is None:
            raise SystemExit("error: published weights need their CLIP text encoders: pass --text-encoder-c and "
                             "--text-encoder-b (local folders)")
        return TextEncoder.from_name_or_path(spec, **({"max_length": length} if length else {})).to(device)

    try:                                    # checkpoint and text-encoder errors are one line, never a traceback
        paths = run_paths(run, {s: getattr(args, f"stage_{s}") for s in "abc"})
        vqgan, stage_b_model, prior = (load_stage(s, paths[s], device, args.weights) for s in "abc")
        if args.lora:
            import lora
            lora.apply_lora(prior, args.lora[0], scale=args.lora[1])      # merged: sampling costs what it did
        enc_c = text_encoder(args.text_encoder_c, prior)
        enc_b = text_encoder(args.text_encoder_b, stage_b_model)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    # A width mismatch would otherwise surface as a matmul error deep inside the first attention layer.
    for encoder, width, what in ((enc_c, prior.config.c_cond, "Stage C (--text-encoder-c)"),
                                 (enc_b, stage_b_model.decoder.config.c_text, "Stage B (--text-encoder-b)")):
        if encoder.width != width:
            raise SystemExit(f"error: {what} reads {width}-wide text tokens, but {encoder.name} from {encoder.source} "
                             f"gives {encoder.width}-wide ones; expected the text encoder it was trained with")
    counts = {what: encoder.token_counts(prompts) for encoder, what in ((enc_c, "Stage C"), (enc_b, "Stage B"))}
    for i, prompt in enumerate(prompts):
        cut = [f"{what}'s text encoder reads {encoder.max_length} of its {counts[what][i]} tokens"
               for encoder, what in ((enc_c, "Stage C"), (enc_b, "Stage B")) if counts[what][i] > encoder.max_length]
        if cut:                           # the tokenizers truncate silently
            print(f"warning: prompt {prompt[:40]!r}{'…' if len(prompt) > 40 else ''} is too long and is cut short: "
                  f"{'; '.join(cut)}", file=sys.stderr)
    side = args.size or getattr(prior, "train_side", None) or 1024      # published weights: 1024²
    made = valid_side(side, stage_b_model.decoder.config)
    if made != side:
        print(f"note: size {side} is not one the decoder can make; using {made} (the next valid size)")
    prior_ts = args.prior_timesteps if args.prior_timesteps is not None else \
        (linear_timesteps(args.prior_steps) if args.prior_steps else STAGE_C_TIMESTEPS)
    decoder_ts = args.decoder_timesteps if args.decoder_timesteps is not None else linear_timesteps(args.decoder_steps)

    all_prompts = [p for p in prompts for _ in range(args.batch)]
    if args.compile:
        compile_models(prior, stage_b_model.decoder, vqgan)
    try:
        with torch.inference_mode(), autocast:
            text_c, text_c_uncond = encode_prompts(enc_c, prompts, device, repeat=args.batch)
            text_b, text_b_uncond = encode_prompts(enc_b, prompts, device, repeat=args.batch)
            timings = {}
            images = generate(prior, stage_b_model.decoder, vqgan, text_c, text_c_uncond, text_b, text_b_uncond,
                              made, made, prior_timesteps=prior_ts, decoder_timesteps=decoder_ts,
                              prior_guidance=args.prior_guidance, decoder_guidance=args.decoder_guidance,
                              generator=torch.Generator(device).manual_seed(args.seed), device=device,
                              timings=timings)
    except RuntimeError as e:             # torch.OutOfMemoryError on CUDA; the CPU allocator raises RuntimeError
        if not isinstance(e, torch.OutOfMemoryError) and not any(
                words in str(e) for words in ("out of memory", "not enough memory", "can't allocate memory")):
            raise
        raise SystemExit(f"error: out of memory on {device} making {len(all_prompts)} images of {made}×{made} "
                         f"({first_line(e)}); expected a smaller --size or --batch") from None
    shipped = run.resolve() in (checkpoints.SHIPPED, checkpoints.SHIPPED_EMOJI)
    out = Path(args.out) if args.out else (run / "samples" if args.run and not shipped else Path("out"))
    try:
        out.mkdir(parents=True, exist_ok=True)
        for i, (img, prompt) in enumerate(zip(images, all_prompts)):
            name = "".join(c if c.isalnum() else "_" for c in prompt.lower())[:60].strip("_")
            save_grid([img[None]], out / f"{i:03d}_{name}.png", pad=0)
        rows = [images[i:i + 8] for i in range(0, len(images), 8)]
        save_grid(rows, out / "grid.png")
    except OSError as e:                  # disk full, read-only folder, a file where the folder should be
        raise SystemExit(f"error: cannot write the images to {out} ({e.strerror or e})")
    print(" · ".join(f"{k}: {v:.2f} s" for k, v in timings.items()) + f" · {len(images)} images of {made}×{made}")
    print(f"grid: {out / 'grid.png'}")


if __name__ == "__main__":
    main(sys.argv[1:])
