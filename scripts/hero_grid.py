"""Usage:
    python scripts/hero_grid.py --out docs/shipped_grid.png                      # the shipped weights
    python scripts/hero_grid.py --world emoji --out docs/emoji_grid.png          # the shipped emoji weights
    python scripts/hero_grid.py --run runs/tiny --out docs/demo_grid.png         # a demo run

The README's figures: each demo prompt beside the images a run draws for it (4 seeds in a row, upscaled 2×). For
the emoji world, the emoji the prompt names comes first, as OpenMoji draws it (CC BY-SA 4.0), so that a reader can
compare.

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
from data import DEMO_PROMPTS, EMOJI_DEMO_PROMPTS  # noqa: E402  (the project's root, added above)
from data import draw_emoji, emoji_named, to_tensor  # noqa: E402
from checkpoints import SHIPPED, SHIPPED_EMOJI, load_stage, run_paths  # noqa: E402
from sample import encode_prompts, generate, valid_side  # noqa: E402
from text import TextEncoder  # noqa: E402

SCALE, PAD, TEXT_WIDTH, HEADER = 2, 4, 330, 16


def draw(run: Path, prompts: list[str], seeds: int, references: list[torch.Tensor] | None = None) -> Image.Image:
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
        for prompt in prompts:
            text_c, uncond_c = encode_prompts(enc_c, [prompt])
            text_b, uncond_b = encode_prompts(enc_b, [prompt])
            row.append(generate(prior, stage_b_model.decoder, vqgan, text_c, uncond_c, text_b, uncond_b, side, side,
                                generator=torch.Generator().manual_seed(seed)))
        rows.append(torch.cat(row))
    images = torch.stack(rows, 1)      # (prompts, seeds, 3, side, side)
    if references is not None:         # a column of the real emoji, then a gap
        images = torch.cat([torch.stack(references)[:, None], images], 1)
    columns = ([("OpenMoji", 0)] if references is not None else []) + \
              [(f"seed {j}", 4 * PAD if references is not None else 0) for j in range(seeds)]
    cell = side * SCALE + PAD
    width = TEXT_WIDTH + len(columns) * cell + columns[-1][1] + PAD
    canvas = Image.new("RGB", (width, HEADER + len(prompts) * cell + PAD), "white")
    pen, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for j, (label, gap) in enumerate(columns):
        pen.text((TEXT_WIDTH + j * cell + gap, 2), label, fill="black", font=font)
    for i, prompt in enumerate(prompts):
        y = HEADER + PAD + i * cell
        pen.text((PAD, y + side * SCALE // 2 - 6), f"{i + 1}. {prompt}", fill="black", font=font)
        for j, (_, gap) in enumerate(columns):
            pixels = (images[i, j].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            tile = Image.fromarray(pixels).resize((side * SCALE,) * 2, Image.NEAREST)
            canvas.paste(tile, (TEXT_WIDTH + j * cell + gap, y))
    return canvas


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    p.add_argument("--world", choices=["shapes", "emoji"], default="shapes",
                   help="whose demo prompts, and whose shipped weights when no --run is given")
    p.add_argument("--run", help="folder of checkpoints (default: the world's shipped weights)")
    p.add_argument("--seeds", type=int, default=4, help="images per prompt")
    p.add_argument("--out", required=True, help="PNG to write")
    args = p.parse_args(argv)
    try:
        with torch.inference_mode():
            run = Path(args.run or (SHIPPED_EMOJI if args.world == "emoji" else SHIPPED))
            prompts = EMOJI_DEMO_PROMPTS if args.world == "emoji" else DEMO_PROMPTS
            references = ([to_tensor(draw_emoji(emoji_named(p).sequence, 64)) for p in prompts]
                          if args.world == "emoji" else None)
            draw(run, prompts, args.seeds, references).save(args.out)
    except (ValueError, OSError) as e:      # a damaged or missing checkpoint, an unwritable --out: one line
        raise SystemExit(f"error: {e}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
