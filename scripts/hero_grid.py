"""Usage:
    python scripts/hero_grid.py --out docs/shipped_grid.png                      # the shipped weights
    python scripts/hero_grid.py --run runs/tiny --out docs/demo_grid.png         # a demo run

The README's figure: each demo prompt beside the images a run draws for it (4 seeds in a row, upscaled 2×).

Images come from sample.generate with sample.py's defaults (released timesteps, prior guidance 4); image j of a
row is the one `sample.py PROMPT --seed j` makes.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data import DEMO_PROMPTS  # noqa: E402  (the project's root, added above)
from checkpoints import SHIPPED, load_stage, run_paths  # noqa: E402
from sample import encode_prompts, generate, valid_side  # noqa: E402
from text import TextEncoder  # noqa: E402

SCALE, PAD, TEXT_WIDTH = 2, 4, 330


def draw(run: Path, seeds: int) -> Image.Image:
    paths = run_paths(run)
    vqgan, stage_b_model, prior = (load_stage(s, paths[s]) for s in "abc")
    encoders = {model.text_encoder_spec: None for model in (prior, stage_b_model)}
    for spec, length in encoders:
        encoders[(spec, length)] = TextEncoder.from_name_or_path(spec, max_length=length)
    enc_c, enc_b = encoders[prior.text_encoder_spec], encoders[stage_b_model.text_encoder_spec]
    side = valid_side(prior.train_side, stage_b_model.decoder.config)
    rows = []
    for seed in range(seeds):          # one prompt at a time, as `sample.py PROMPT --seed j` draws it
        row = []
        for prompt in DEMO_PROMPTS:
            text_c, uncond_c = encode_prompts(enc_c, [prompt])
            text_b, uncond_b = encode_prompts(enc_b, [prompt])
            row.append(generate(prior, stage_b_model.decoder, vqgan, text_c, uncond_c, text_b, uncond_b, side, side,
                                generator=torch.Generator().manual_seed(seed)))
        rows.append(torch.cat(row))
    images = torch.stack(rows, 1)      # (prompts, seeds, 3, side, side)
    cell = side * SCALE + PAD
    canvas = Image.new("RGB", (TEXT_WIDTH + seeds * cell + PAD, len(DEMO_PROMPTS) * cell + PAD), "white")
    pen, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for i, prompt in enumerate(DEMO_PROMPTS):
        y = PAD + i * cell
        pen.text((PAD, y + side * SCALE // 2 - 6), f"{i + 1}. {prompt}", fill="black", font=font)
        for j in range(seeds):
            pixels = (images[i, j].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            tile = Image.fromarray(pixels).resize((side * SCALE,) * 2, Image.NEAREST)
            canvas.paste(tile, (TEXT_WIDTH + j * cell, y))
    return canvas


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    p.add_argument("--run", default=str(SHIPPED), help="folder of checkpoints (default: the shipped weights)")
    p.add_argument("--seeds", type=int, default=4, help="images per prompt")
    p.add_argument("--out", required=True, help="PNG to write")
    args = p.parse_args(argv)
    try:
        with torch.inference_mode():
            draw(Path(args.run), args.seeds).save(args.out)
    except (ValueError, OSError) as e:      # a damaged or missing checkpoint, an unwritable --out: one line
        raise SystemExit(f"error: {e}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
