"""Writes the teaching notebooks from the cells below, runs them with nbclient and saves them with their outputs.

    bash scripts/notebooks.sh                                  # all four, with the shipped weights (weights/shapes)
    WUERSTCHEN_RUN=runs/tiny bash scripts/notebooks.sh         # use the checkpoints `bash scripts/demo.sh` wrote
    .venv/bin/python notebooks/build.py --only 02 --no-execute # write one notebook without running it

The notebooks are authored here, as code, so that a change to them is a reviewable diff of Python strings; the
.ipynb files are outputs of this script (tests/test_notebooks.py checks that they match it). Executed notebooks
have their pictures re-encoded, downsized where wide, so that each file stays under MAX_BYTES.
The kernel is the Python that runs this script (.venv's), through a kernelspec written to a temporary folder:
nothing needs registering, and a `python3` kernelspec elsewhere on the machine cannot take its place.
"""
import argparse
import base64
import contextlib
import io
import json
import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MAX_BYTES = 300_000          # per committed notebook
MAX_IMAGE_WIDTH = 900        # px; wider pictures are downsized
KERNEL = "wuerstchen-notebooks"
CELL_TIMEOUT = 1800          # s per cell: training a stage (WUERSTCHEN_RUN=train) takes a few minutes


def md(text: str):
    return nbformat.v4.new_markdown_cell(textwrap.dedent(text).strip())


def code(text: str):
    return nbformat.v4.new_code_cell(textwrap.dedent(text).strip())


def setup(stages: str, extra: str):
    """The first code cell of every notebook: where the checkpoints come from, and the imports."""
    head = textwrap.dedent('''
        # Where the checkpoints come from: a folder of train.py checkpoints, e.g. "../runs/tiny" after
        # `bash scripts/demo.sh`. None: the WUERSTCHEN_RUN environment variable if it is set, otherwise the shipped
        # weights (weights/shapes/); "train" trains tiny models here, minutes per stage (see notebooks/README.md).
        RUN = None

        import sys
        from pathlib import Path
        sys.path.insert(0, str(Path.cwd() if Path("nbtools.py").exists() else Path.cwd() / "notebooks"))
        import nbtools as nb   # notebooks/nbtools.py: set-up, checkpoints, pictures, tables; no model code
        ''').strip()
    return code(head + "\n" + textwrap.dedent(extra).strip() + f'\n\nfolder = nb.prepare_run("{stages}", RUN)')


# ================================================================================================================
# 1. Stage A
# ================================================================================================================
def stage_a_notebook():
    return [
        md('''
        # 1 · Stage A: the f4 VQGAN

        Würstchen makes an image in three stages, **C → B → A**. This notebook is about the last one, Stage A
        (`stage_a.py`): an autoencoder that turns an image into a latent 4× smaller per side, and back. Stage B will
        *generate* in this latent space, and Stage A's decoder turns what it generates into pixels.

        - The encoder is small and the decoder heavy, by design: the decoder must turn Stage B's latents into sharp
          pixels.
        - It is trained as a VQGAN (each latent vector is snapped to the nearest entry of a learned codebook), but
          Würstchen v2 *decodes the latent un-quantized* at inference, as a "pseudo-VAE".

        Paper: Würstchen (Pernias et al., ICLR 2024, arXiv 2306.00637), Sec. 3.1. Everything here runs on a laptop
        CPU with the `tiny` preset on the project's built-in 64×64 shapes; the `paper` preset (the released model) is
        built on PyTorch's *meta* device, which gives shapes and parameter counts without memory or arithmetic.
        '''),
        setup("a", '''
            import math
            import torch
            import stage_a
            from data import render_sample, to_tensor
            from experiments.evaluate import EVAL_SEED, psnr
            '''),
        code('''
        vqgan = nb.load("a", folder)      # sample.load_stage: the EMA weights of a train.py checkpoint
        cfg = vqgan.config
        with torch.device("meta"):        # the released size, for comparison: no memory, no arithmetic
            paper = stage_a.StageA(stage_a.PRESETS["paper"])

        def parts(m):
            encoder = nb.count(m.in_block) + nb.count(m.down_blocks)
            decoder = nb.count(m.up_blocks) + nb.count(m.out_block)
            return [f"{encoder:,}", f"{decoder:,}", f"{nb.count(m.vquantizer):,}", f"{nb.count(m):,}"]

        print(f"this notebook's Stage A: {nb.checkpoint_step(folder, 'a'):,} training steps")
        nb.table([["tiny (this notebook)", cfg.c_latent, f"{cfg.codebook_size:,}", *parts(vqgan)],
                  ["paper (released)", paper.config.c_latent, f"{paper.config.codebook_size:,}", *parts(paper)]],
                 ["preset", "latent channels", "codebook entries", "encoder params", "decoder params",
                  "codebook params", "total"])
        '''),
        md('''
        ## 1. An image goes to its f4 latent and back

        The images below come from the built-in shapes data set with `experiments/evaluate.py`'s `EVAL_SEED`, a seed training never
        uses. `encode` gives the latent Stage B works in (the un-quantized encoder output ÷ the scale factor) and
        `decode` turns it back into pixels.
        '''),
        code('''
        N = nb.pick(8, 4)
        samples = [render_sample(EVAL_SEED, i) for i in range(N)]
        images = torch.stack([to_tensor(s.image) for s in samples])         # (N, 3, 64, 64) in [0, 1]
        with torch.no_grad():
            latents = vqgan.encode(images)                                   # (N, 4, 16, 16)
            recon = vqgan.decode(latents).clamp(0, 1)                        # (N, 3, 64, 64)
        print("image", nb.shape(images.shape[1:]), "→ latent", nb.shape(latents.shape[1:]), "→ image",
              nb.shape(recon.shape[1:]))
        print(f"latent values: mean {latents.mean():.2f}, std {latents.std():.2f} (the encoder ends in a BatchNorm)")
        nb.show_images([images, recon], ["image", "decoded"])
        for i, s in enumerate(samples):
            print(f"{i + 1}. {s.caption}")
        '''),
        md('''
        The latent of the first image, channel by channel. At f4 the latent is still a picture: each position
        covers a 4×4 patch of pixels, and the shapes can be made out in the channels.
        '''),
        code('''
        nb.show_images([images[:1]], size=1.2)
        nb.show_maps(latents[0], title=f"its latent: {cfg.c_latent} channels of {nb.shape(latents.shape[-2:])}",
                     labels=[f"channel {c}" for c in range(cfg.c_latent)], size=1.2)
        '''),
        md('''
        ## 2. Sizes and element counts

        An image has 3·H·W numbers; its latent has 4·(H/4)·(W/4). The ratio does not depend on the size:
        3·16 / 4 = 12 numbers of image per number of latent. The table takes the shapes from the models themselves:
        this notebook's tiny model on real images, the `small` and `paper` presets on the meta device.
        '''),
        code('''
        def size_row(name, side, model):
            with torch.no_grad():
                z = model.encode(torch.zeros(1, 3, side, side, device=next(model.parameters()).device))
            pixels, elements = 3 * side * side, math.prod(z.shape[1:])
            return [name, f"3×{side}×{side}", f"{pixels:,}", nb.shape(z.shape[1:]), f"{elements:,}",
                    f"{side / z.shape[-1]:g}×", nb.ratio(pixels / elements)], pixels / elements

        with torch.device("meta"):
            small = stage_a.StageA(stage_a.PRESETS["small"])
        rows = [size_row("this notebook (tiny)", images.shape[-1], vqgan), size_row("small preset", 256, small),
                size_row("paper preset", 1024, paper)]
        nb.table([r for r, _ in rows], ["model", "image", "numbers", "latent", "numbers", "per side", "by elements"])
        ratio_1024 = rows[-1][1]
        assert ratio_1024 == 3 * 4 * 4 / cfg.c_latent == 12
        print(f"At 1024²: {3 * 1024 ** 2:,} numbers become {3 * 1024 ** 2 / ratio_1024:,.0f}, {ratio_1024:g}:1.")
        '''),
        md('''
        ## 3. What quantization does

        During training, `forward` snaps every 4-number latent vector to its nearest entry in a codebook
        (`vquantizer`, nearest by L2, with the straight-through estimator), and the decoder learns to decode
        those snapped latents. So a quantized latent is a grid of codebook *indices*, a far smaller description
        than the image. How much of the codebook does the model actually use?
        '''),
        code('''
        M = nb.pick(256, 8)
        more = torch.stack([to_tensor(render_sample(EVAL_SEED, i).image) for i in range(M)])
        with torch.no_grad():
            z = vqgan.encode_raw(more)                     # un-quantized, un-scaled: (M, 4, 16, 16)
            z_q, _, codes = vqgan.vquantizer(z)            # nearest codebook entries, and their indices (M, 16, 16)
        counts = torch.bincount(codes.flatten(), minlength=cfg.codebook_size)
        used = int((counts > 0).sum())
        p = counts[counts > 0].double() / counts.sum()
        perplexity = float(torch.exp(-(p * p.log()).sum()))     # the number of equally used codes with this entropy
        relative_error = float(((z_q - z) ** 2).mean() / z.var())
        bits_image = 3 * more.shape[-1] ** 2 * 8
        bits_codes = codes[0].numel() * math.log2(cfg.codebook_size)
        nb.table([["latent vectors encoded", f"{codes.numel():,} ({M} images × {codes[0].numel()} positions)"],
                  ["codebook entries used", f"{used:,} of {cfg.codebook_size:,} ({used / cfg.codebook_size:.0%})"],
                  ["perplexity of the code usage", f"{perplexity:,.0f}"],
                  ["quantization error ‖z_q − z‖² / var(z)", f"{relative_error:.3f}"],
                  ["one image as 8-bit pixels / as code indices",
                   f"{bits_image:,} bits / {bits_codes:,.0f} bits ({bits_image / bits_codes:.0f}:1)"]],
                 ["", "value"])

        fig, (ax1, ax2) = nb.plt.subplots(1, 2, figsize=(9, 3))
        ax1.semilogy(counts.sort(descending=True).values[:used].numpy() / counts.sum().item())
        ax1.set(xlabel="codebook entries, most used first", ylabel="share of latent vectors",
                title="codebook usage")
        flat = z.permute(0, 2, 3, 1).reshape(-1, cfg.c_latent)[:4000]
        book = vqgan.vquantizer.embedding.weight.detach()
        ax2.scatter(flat[:, 0], flat[:, 1], s=2, alpha=0.3, color="grey", label="encoder outputs z")
        ax2.scatter(book[counts > 0, 0], book[counts > 0, 1], s=6, color="crimson", label="codebook entries in use")
        ax2.set(xlabel="channel 0", ylabel="channel 1", title="latent vectors and codebook (2 of 4 channels)")
        ax2.legend(loc="upper right", fontsize=7)
        fig.tight_layout()
        nb.plt.show()
        '''),
        md('''
        Quantized against un-quantized decodes. Würstchen v2 decodes the *un-quantized* latent (what `decode`
        does, and what Stage B generates); the quantized decode is what the decoder saw during training.
        '''),
        code('''
        with torch.no_grad():
            plain = vqgan.decode_raw(z).clamp(0, 1)
            quantized = vqgan.decode_raw(z_q).clamp(0, 1)
        nb.show_images([more[:N], plain[:N], quantized[:N], ((quantized[:N] - plain[:N]).abs() * 4).clamp(0, 1)],
                       ["image", "un-quantized", "quantized", "|difference| ×4"])
        nb.table([["un-quantized (Würstchen v2)", f"{psnr(plain, more).mean():.2f}"],
                  ["quantized (as in training)", f"{psnr(quantized, more).mean():.2f}"]],
                 [f"decode of {M} images", "mean PSNR (dB)"])
        '''),
        md('''
        ## 4. Reconstructions side by side with their errors

        Where does Stage A lose information? The error maps below are |reconstruction − image|, amplified 4×,
        for the best and the worst reconstructions among the images above (un-quantized, as v2 uses it).
        '''),
        code('''
        scores = psnr(plain, more)
        order = scores.argsort()
        for name, idx in (("best", order[::-1][:N]), ("worst", order[:N])):
            idx = list(idx)
            nb.show_images([more[idx], plain[idx], ((plain[idx] - more[idx]).abs() * 4).clamp(0, 1)],
                           ["image", "reconstruction", "|error| ×4"],
                           [f"{scores[i]:.1f} dB" for i in idx], title=f"the {len(idx)} {name} of {M}")
        print(f"PSNR over {M} images: mean {scores.mean():.2f} dB, worst {scores.min():.2f}, best {scores.max():.2f}")
        '''),
        md('''
        The errors sit on the edges of the shapes, where a 4×4 patch mixes two colours; flat areas come back
        almost exactly. PSNR is a blunt yardstick here: a small shape on a flat background scores well even when it
        is smeared, because its few pixels barely count. How the errors fell during training (`train.py` logs
        every few steps):
        '''),
        code('''
        log = nb.training_log(folder, "a")
        if log:
            steps = [r["step"] for r in log]
            fig, (ax1, ax2) = nb.plt.subplots(1, 2, figsize=(9, 2.8))
            ax1.semilogy(steps, [r["mse"] for r in log])
            ax1.set(xlabel="step", ylabel="reconstruction MSE", title="Stage A training")
            ax2.plot(steps, [r["codebook_usage"] for r in log])
            ax2.set(xlabel="step", ylabel="share of codebook used in a batch", title="codebook usage per batch")
            fig.tight_layout()
            nb.plt.show()
        else:
            print("no training log in", nb.shown(folder))
        '''),
        md('''
        **Summary.** Stage A is a mild compression, 12:1 at any size, that keeps nearly everything: it is the
        "pixels" layer of Würstchen. The heavy lifting is in the next step, the semantic compressor of Stage B,
        which goes much further (notebook 2).
        '''),
    ]


# ================================================================================================================
# 2. The semantic compressor and Stage B
# ================================================================================================================
def stage_b_notebook():
    return [
        md('''
        # 2 · The semantic compressor and Stage B

        Stage B (`stage_b.py`) has two parts, trained together:
        - the **semantic compressor**: EfficientNetV2 features, then a 1×1 conv to **16 channels** and a BatchNorm.
          For a 1024² image it gives a 16×24×24 *semantic latent*;
        - the **decoder** (DiffNeXt): a diffusion U-Net that generates Stage A's 4×256×256 latent from noise, given
          the semantic latent (and the caption's text tokens).

        The semantic latent is the space Stage C learns to generate from text (notebook 3). The point of Würstchen
        is that this space is tiny: the expensive text-conditional model works 42.67× smaller per side than the
        image, and Stage B fills the detail back in. This notebook measures what that costs in fidelity.
        '''),
        setup("ab", '''
            import math
            import torch
            import torch.nn.functional as F
            import stage_b
            from data import render_sample, to_tensor
            from experiments.evaluate import EVAL_SEED, AnalyticDetector, decode_semantic, parse_caption, psnr, score
            from sample import encode_prompts, latent_sizes
            from schedule import STAGE_B_STEPS, linear_timesteps
            '''),
        code('''
        vqgan, model_b = nb.load("a", folder), nb.load("b", folder)
        compressor, decoder = model_b.compressor, model_b.decoder
        text_b = nb.text_encoder(model_b)       # Stage B also reads the caption (the release: CLIP ViT-H)
        with torch.device("meta"):
            paper_b = stage_b.StageB(stage_b.PRESETS["paper"])
            small_b = stage_b.StageB(stage_b.PRESETS["small"])
        print(f"this notebook's Stage B: {nb.checkpoint_step(folder, 'b'):,} training steps; text encoder "
              f"{text_b.name}")
        nb.table([[name, f"{nb.count(m.compressor):,}", f"{nb.count(m.decoder):,}",
                   f"stride {m.config.effnet_stride}, input ×{m.config.effnet_resize:g}"]
                  for name, m in (("tiny (this notebook)", model_b), ("paper (released)", paper_b))],
                 ["preset", "compressor params", "decoder params", "compressor"])
        '''),
        md('''
        ## 1. The 16-channel semantic latent

        The compressor's output for a few held-out images. At the tiny preset a 64² image becomes 16×4×4: each of
        the 16 channels is a 4×4 map, one number per 16×16-pixel region.
        '''),
        code('''
        N = nb.pick(8, 4)
        samples = [render_sample(EVAL_SEED, i) for i in range(N)]
        images = torch.stack([to_tensor(s.image) for s in samples])
        captions = [s.caption for s in samples]
        with torch.no_grad():
            semantic = compressor(images)                      # (N, 16, 4, 4)
            stage_a_latents = vqgan.encode(images)             # (N, 4, 16, 16), for comparison
        print("image", nb.shape(images.shape[1:]), "→ semantic latent", nb.shape(semantic.shape[1:]),
              f"(Stage A's latent: {nb.shape(stage_a_latents.shape[1:])})")
        print("1.", captions[0])
        nb.show_images([images[:1]], size=1.2)
        nb.show_maps(semantic[0], title="its semantic latent: 16 channels", cols=8,
                     labels=[f"ch {c}" for c in range(semantic.shape[1])])
        '''),
        md('''
        **Sizes.** Per side, the image is `resolution_multiple` = 42.67 times larger than the semantic latent at the
        paper's settings (1024 px → 24: the compressor sees a 0.75× copy, 768 px, and has stride 32). By element
        count that is 3·1024² / (16·24²). The released pipelines size the latents with `sample.latent_sizes`;
        the compressor's actual output is checked against it on the meta device. The notebook's own (tiny) size
        gets its own numbers: its compressor has stride 16 and no resize.
        '''),
        code('''
        def sizes(name, side, model):
            device = next(model.parameters()).device
            with torch.no_grad():
                s = model.compressor(torch.zeros(1, 3, side, side, device=device))
            (hc, wc), (hb, wb) = latent_sizes(side, side, model.config)
            assert (hc, wc) == tuple(s.shape[-2:]), "the pipeline's sizes match the compressor's output"
            sem, pixels, a = math.prod(s.shape[1:]), 3 * side * side, 4 * hb * wb
            return dict(name=name, side=side, semantic=s.shape[1:], per_side=side / hc, by_elements=pixels / sem,
                        from_a=a / sem, a=(4, hb, wb))

        rows = [sizes("this notebook (tiny)", images.shape[-1], model_b), sizes("small preset", 256, small_b),
                sizes("paper preset", 1024, paper_b)]
        nb.table([[r["name"], f"3×{r['side']}×{r['side']}", nb.shape(r["a"]), nb.shape(r["semantic"]),
                   f"{r['per_side']:.2f}×", nb.ratio(r["by_elements"]), nb.ratio(r["from_a"])] for r in rows],
                 ["", "image", "Stage A latent", "semantic latent", "image / semantic per side",
                  "by elements (pixels)", "by elements (Stage A latent)"])
        paper_row, tiny_row = rows[-1], rows[0]
        assert round(paper_row["per_side"], 2) == 42.67 and round(paper_row["by_elements"]) == 341
        print(f"At 1024²: 1024 / {paper_row['semantic'][-1]} = {paper_row['per_side']:.2f} per side, and "
              f"{3 * 1024 ** 2:,} / {math.prod(paper_row['semantic']):,} = {paper_row['by_elements']:.0f}:1 by "
              f"elements ({paper_row['from_a']:.1f}:1 from Stage A's latent).")
        print(f"In this notebook, at {tiny_row['side']}²: {tiny_row['per_side']:g}× per side, "
              f"{tiny_row['by_elements']:.0f}:1 by elements ({tiny_row['from_a']:g}:1 from Stage A's latent).")
        '''),
        md('''
        ## 2. What the latent keeps, and what it loses

        Stage B decodes from the semantic latent: it denoises a Stage A latent from pure noise, guided by the 16×4×4
        numbers (and the caption), and Stage A turns it into pixels (`decode_semantic` in experiments/evaluate.py, the second half of
        `sample.generate`). Against it: **naive downsampling** of the image to about as many values as the semantic
        latent has (a k×k RGB thumbnail with 3·k² at most that many), scaled back up with bicubic interpolation.

        Two yardsticks: PSNR against the original (pixel fidelity), and whether the caption still holds for the
        result, as read by the project's analytic oracle (`AnalyticDetector` in experiments/evaluate.py: background, colour, shape
        and grid cell of each shape).
        '''),
        code('''
        M = nb.pick(48, 6)
        test = [render_sample(EVAL_SEED, i) for i in range(M)]
        real = torch.stack([to_tensor(s.image) for s in test])
        with torch.no_grad():
            sem = compressor(real)
            values = math.prod(sem.shape[1:])
            k = int(math.sqrt(values / 3))                                      # 3·k² ≤ values
            tokens, tokens_uncond = encode_prompts(text_b, [s.caption for s in test])
            decoded = decode_semantic(decoder, vqgan, sem, tokens, tokens_uncond, real.shape[-1],
                                      linear_timesteps(STAGE_B_STEPS), 0.0, torch.Generator().manual_seed(0), "cpu")
            stage_a_only = vqgan.decode(vqgan.encode(real)).clamp(0, 1)
        small = F.interpolate(real, size=(k, k), mode="area")
        naive = F.interpolate(small, size=real.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)
        blocky = F.interpolate(small, size=real.shape[-2:], mode="nearest")
        nb.show_images([real[:N], stage_a_only[:N], decoded[:N], naive[:N], blocky[:N]],
                       ["image", "Stage A only", f"Stage B from {values} values", f"naive {3 * k * k} values",
                        f"the naive {k}×{k}"])

        detector = AnalyticDetector(real.shape[-1])
        requests = [parse_caption(s.caption) for s in test]

        def holds(images):
            results = [score(r, scene) for r, scene in zip(requests, detector(images))]
            rate = lambda c: sum(r[c] for r in results if c in r) / max(1, sum(c in r for r in results))
            return [f"{rate(c):.0%}" for c in ("background", "colour", "shape", "position")]

        nb.table([["the image itself", "", f"{3 * real.shape[-1] ** 2:,}", *holds(real)],
                  ["Stage A only", f"{psnr(stage_a_only, real).mean():.1f}",
                   f"{math.prod(vqgan.encode(real[:1]).shape[1:]):,}", *holds(stage_a_only)],
                  ["Stage B from the semantic latent", f"{psnr(decoded, real).mean():.1f}", f"{values}",
                   *holds(decoded)],
                  [f"naive {k}×{k} downsampling", f"{psnr(naive, real).mean():.1f}", f"{3 * k * k}", *holds(naive)]],
                 [f"{M} held-out images", "PSNR (dB)", "values", "background", "colour", "shape", "position"])
        '''),
        md('''
        **How to read this.** The paper's Stage B, from a 16×24×24 latent, redraws 1024² images with their content
        and layout intact. The tiny Stage B here (the shipped weights: 16,000 steps on a CPU) keeps the background
        and the colour, most positions, and the form of many shapes, where naive downsampling to as many values
        keeps fewer; its shapes are soft, and Stage A's own are not perfect either (first rows). Two things make the
        naive baseline strong at this size: at 64² the semantic latent compresses far less than at 1024² (the sizes
        table above; at 1024² the naive baseline would be a 55×55 thumbnail), and a shape on a flat background
        survives as a coloured blob in 9×9 pixels. This notebook's shape reading is strict about corners; the
        evaluation's CNN oracle, trained with blur, finds the asked shape in about 9 of 10 Stage B decodes (README,
        Results). And what no naive baseline offers is the next step of Würstchen: Stage C learns to *generate* the
        semantic latent, a space trained for Stage B to decode.

        What the latent leaves out, Stage B makes up, and a different seed makes it up differently: four decodes of
        the same semantic latent.
        '''),
        code('''
        S, n = nb.pick(4, 2), nb.pick(4, 2)
        with torch.no_grad():
            rows = [decode_semantic(decoder, vqgan, sem[:n], tokens[:n], tokens_uncond[:n], real.shape[-1],
                                    linear_timesteps(STAGE_B_STEPS), 0.0, torch.Generator().manual_seed(seed), "cpu")
                    for seed in range(S)]
        nb.show_images([torch.stack(col) for col in zip(real[:n], *rows)],
                       col_labels=["image"] + [f"seed {seed}" for seed in range(S)])
        spread = torch.stack(rows).std(0).mean().item()
        print(f"mean per-pixel std across the {S} seeds: {spread:.3f} (pixel values in [0, 1])")
        '''),
        md('''
        ## 3. The decoder's step count

        Stage B samples with the ancestral DDPM sampler of `schedule.py`, on `linear_timesteps(n)`: n model calls
        from t = 1 (pure noise) to t = 0. The release uses 12 steps and no guidance. One step cannot work: it must
        jump from ᾱ(1) = 10⁻⁴ straight to the clean latent, dividing the model's estimate by √ᾱ = 0.01, so every
        error comes out 100× larger. A few steps fix that; beyond a dozen little changes, while the time grows with
        the steps.
        '''),
        code('''
        import time
        STEPS = nb.pick([1, 2, 4, 8, 12, 24], [1, 4, 12])
        grid, rows = [], []
        for n in STEPS:
            start = time.perf_counter()
            with torch.no_grad():
                out = decode_semantic(decoder, vqgan, sem, tokens, tokens_uncond, real.shape[-1],
                                      linear_timesteps(n), 0.0, torch.Generator().manual_seed(0), "cpu")
            seconds = time.perf_counter() - start
            grid.append(out[:N])
            rows.append([n, f"{psnr(out, real).mean():.2f}", *holds(out)[1:], f"{1000 * seconds / M:.1f}"])
        nb.show_images([real[:N], *grid], ["image"] + [f"{n} steps" for n in STEPS])
        nb.table(rows, ["decoder steps", "PSNR (dB)", "colour", "shape", "position", "ms per image (CPU)"])

        fig, ax = nb.plt.subplots(figsize=(4.5, 2.8))
        ax.plot(STEPS, [float(r[1]) for r in rows], "o-")
        ax.set(xscale="log", xlabel="decoder steps", ylabel="PSNR (dB)", title="Stage B: steps against fidelity")
        ax.set_xticks(STEPS, [str(n) for n in STEPS])
        fig.tight_layout()
        nb.plt.show()
        '''),
        md('''
        **Summary.** The semantic latent is a drastic compression: 341:1 by elements at 1024² (asserted above),
        against Stage A's 12:1. The released model shows that this is enough to keep a picture's content and layout
        and to leave the exact pixels to Stage B; the tiny models here, trained for about 80 minutes on a CPU, do so
        for shapes on a flat background, with soft edges (section 2). It is what makes Stage C cheap: notebook 3 generates this latent from text.
        '''),
    ]


# ================================================================================================================
# 3. Stage C and the whole chain
# ================================================================================================================
def stage_c_notebook():
    return [
        md('''
        # 3 · Stage C and the whole chain

        Stage C (`stage_c.py`, the *prior*) is the text-conditional model: it generates the 16-channel semantic
        latent from a caption's text tokens. Then Stage B expands that latent into Stage A's latent, and Stage A
        decodes it into pixels. `sample.generate` runs the chain; here it is taken apart, step by step.

        **Status.** The shipped tiny models (`weights/shapes/`; README, Results) draw a one-object prompt's colour
        and shape in 90% of images by the evaluation's CNN oracle (54% by its strict analytic oracle, which Stage A's
        soft corners cap at 74%), in the asked cell in about 55%, and as well for colour–shape pairs they never saw.
        Two objects are their weak point: both asked colour–shape pairs appear in 15–32% of images, and extra objects
        are common. The chain itself is exact, and matches diffusers' `WuerstchenCombinedPipeline` bit for bit
        (tests/test_pipeline_parity.py).
        '''),
        setup("abc", '''
            import math
            import torch
            from data import DEMO_PROMPTS
            from experiments.evaluate import AnalyticDetector, parse_caption, score
            from sample import encode_prompts, generate, latent_sizes
            from schedule import STAGE_B_STEPS, STAGE_C_TIMESTEPS, alpha_bar, linear_timesteps, p2_weight, sample
            from schedule import sample_t
            '''),
        code('''
        vqgan, model_b, prior = nb.load("a", folder), nb.load("b", folder), nb.load("c", folder)
        decoder = model_b.decoder
        text_c, text_b = nb.text_encoder(prior), nb.text_encoder(model_b)   # the release: CLIP bigG and ViT-H
        side = prior.train_side or 64
        print(f"Stage C: {nb.checkpoint_step(folder, 'c'):,} training steps, {nb.count(prior):,} parameters; "
              f"images of {side}×{side}")
        '''),
        md('''
        ## 1. Text → semantic latent → Stage A latent → image

        One prompt (the second demo prompt; all eight follow below, as they come), one seed, every intermediate.
        The chain is written out with `schedule.sample`, the sampler both diffusion stages share, and checked against
        `sample.generate`.
        '''),
        code('''
        prompt, SEED = DEMO_PROMPTS[1], 0
        c_tokens, c_uncond = encode_prompts(text_c, [prompt])     # (1, L, width) each: caption and empty caption
        b_tokens, b_uncond = encode_prompts(text_b, [prompt])
        (hc, wc), (hb, wb) = latent_sizes(side, side, decoder.config)
        real_tokens = int(text_c.tokenize([prompt])[1].sum())

        fig, ax = nb.plt.subplots(figsize=(8, 1.8))
        ax.imshow(c_tokens[0].T[:64], aspect="auto", cmap="RdBu_r", interpolation="nearest")
        ax.axvline(real_tokens - 0.5, color="k", lw=1)
        ax.set(xlabel=f"token position ({real_tokens} tokens of the prompt, then padding)",
               ylabel="features 0–63", title=f"text tokens of {prompt!r}: {nb.shape(c_tokens.shape[1:])}")
        nb.plt.show()
        '''),
        code('''
        # Stage C: denoise a 16×hc×wc latent from noise, with classifier-free guidance 4 on the released 29-call list.
        generator = torch.Generator().manual_seed(SEED)
        shape_c = (1, prior.config.c_in, hc, wc)
        with torch.inference_mode():
            x_c = sample(prior, shape_c, cond={"text": c_tokens}, uncond={"text": c_uncond}, guidance=4.0,
                         timesteps=STAGE_C_TIMESTEPS, generator=generator)
            semantic = prior.from_prior_space(x_c)               # the prior's space → the semantic latent
        after_prior = generator.get_state()

        # Stage B: denoise Stage A's 4×hb×wb latent, given the semantic latent and the caption; 12 steps, no guidance.
        shape_b = (1, decoder.config.c_in, hb, wb)
        b_cond = {"semantic": semantic, "text": b_tokens}
        b_free = {"semantic": torch.zeros_like(semantic), "text": b_uncond}
        with torch.inference_mode():
            latents = sample(decoder, shape_b, cond=b_cond, uncond=b_free, guidance=0.0,
                             timesteps=linear_timesteps(STAGE_B_STEPS), generator=generator)
            image = vqgan.decode(latents).clamp(0, 1)            # Stage A: latent → pixels

            same = generate(prior, decoder, vqgan, c_tokens, c_uncond, b_tokens, b_uncond, side, side,
                            generator=torch.Generator().manual_seed(SEED))
        assert torch.equal(image, same), "the chain written out is sample.generate, draw for draw"
        nb.table([["text tokens (Stage C reads)", nb.shape(c_tokens.shape[1:]), f"{c_tokens[0].numel():,}"],
                  ["Stage C output: semantic latent", nb.shape(semantic.shape[1:]), f"{semantic[0].numel():,}"],
                  ["Stage B output: Stage A latent", nb.shape(latents.shape[1:]), f"{latents[0].numel():,}"],
                  ["Stage A output: image", nb.shape(image.shape[1:]), f"{image[0].numel():,}"]],
                 ["step", "shape", "numbers"])
        print("identical to sample.generate with the same seed:", torch.equal(image, same))
        '''),
        md('''
        **Inside Stage C.** The sampler starts from noise at t = 1 and steps down the timestep list. Running it on
        the first k+1 times of the list, with the same seed, stops it at t_k: the same path, cut short. Each
        latent is drawn as a mosaic of its 16 channels (4 × 4 tiles of hc×wc).
        '''),
        code('''
        def mosaic(latent, cols=4):
            """(C, h, w) → (rows·(h+1), cols·(w+1)) with NaN separators, for one picture of all channels."""
            C, h, w = latent.shape
            rows = math.ceil(C / cols)
            out = torch.full((rows * (h + 1) - 1, cols * (w + 1) - 1), float("nan"))
            for c in range(C):
                r, q = divmod(c, cols)
                out[r * (h + 1):r * (h + 1) + h, q * (w + 1):q * (w + 1) + w] = latent[c]
            return out

        def prior_at(k):
            """x at STAGE_C_TIMESTEPS[k] on the path above (k = 0: the starting noise)."""
            g = torch.Generator().manual_seed(SEED)
            if k == 0:
                return torch.randn(shape_c, generator=g)
            with torch.inference_mode():
                return sample(prior, shape_c, cond={"text": c_tokens}, uncond={"text": c_uncond}, guidance=4.0,
                              timesteps=STAGE_C_TIMESTEPS[:k + 1], generator=g)

        ks = [0, 5, 10, 19, 24, len(STAGE_C_TIMESTEPS) - 1]
        xs = [prior.from_prior_space(prior_at(k))[0] for k in ks]
        lim = max(float(x.abs().max()) for x in xs)
        fig, axes = nb.plt.subplots(1, len(ks), figsize=(1.5 * len(ks), 1.9))
        for ax, k, x in zip(axes, ks, xs):
            ax.imshow(mosaic(x), cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
            ax.set(xticks=[], yticks=[], title=f"t = {STAGE_C_TIMESTEPS[k]:.2f}" + (" (noise)" if k == 0 else ""))
        fig.suptitle("Stage C: the semantic latent emerging (16 channels each)")
        nb.plt.show()
        assert torch.equal(xs[-1], semantic[0])
        '''),
        md('''
        **Inside Stage B.** The same trick on the decoder's 12 steps, continuing from the random-number state the
        prior left. Each intermediate Stage A latent x_t is decoded by Stage A, so the image can be seen forming
        out of noise, guided by the semantic latent above.
        '''),
        code('''
        decoder_ts = linear_timesteps(STAGE_B_STEPS)

        def decoder_at(k):
            g = torch.Generator()
            g.set_state(after_prior)
            if k == 0:
                return torch.randn(shape_b, generator=g)
            with torch.inference_mode():
                return sample(decoder, shape_b, cond=b_cond, uncond=b_free, guidance=0.0,
                              timesteps=decoder_ts[:k + 1], generator=g)

        ks = [0, 3, 6, 9, 11, 12]
        with torch.inference_mode():
            frames = [vqgan.decode(decoder_at(k)).clamp(0, 1)[0] for k in ks]
        assert torch.equal(frames[-1], image[0])
        nb.show_images([frames], col_labels=[f"t = {decoder_ts[k]:.2f}" for k in ks], size=1.2,
                       title="Stage B's latent at each t, decoded by Stage A")
        '''),
        md('''
        ### All the demo prompts

        `data.DEMO_PROMPTS`, one image each, with the released defaults (29 prior calls at guidance 4, 12 decoder
        steps). The table reads each image back with the analytic oracle: does it show what the caption asks?
        '''),
        code('''
        prompts = list(DEMO_PROMPTS)
        with torch.inference_mode():
            c_all, c_all_uncond = encode_prompts(text_c, prompts)
            b_all, b_all_uncond = encode_prompts(text_b, prompts)
            timings = {}
            demo = generate(prior, decoder, vqgan, c_all, c_all_uncond, b_all, b_all_uncond, side, side,
                            generator=torch.Generator().manual_seed(SEED), timings=timings)
        nb.show_images([demo], col_labels=[str(i + 1) for i in range(len(prompts))], size=1.0)
        detector = AnalyticDetector(side)
        rows = []
        for i, (p, scene) in enumerate(zip(prompts, detector(demo))):
            s = score(parse_caption(p), scene)
            mark = lambda c: "–" if c not in s else ("yes" if s[c] else "no")
            rows.append([i + 1, p, mark("background"), mark("colour"), mark("shape"), mark("position"),
                         mark("everything")])
        nb.table(rows, ["", "prompt", "background", "colour", "shape", "position", "everything"])
        print("seconds per stage for the batch:", " · ".join(f"{k} {v:.2f}" for k, v in timings.items()))
        '''),
        md('''
        ## 2. Guidance scale × step count

        Two knobs of Stage C: the guidance scale w (classifier-free guidance: ε̂ = ε̂_uncond + w·(ε̂_cond −
        ε̂_uncond); it is on only for w > 1, so 0 and 1 are the same, unguided) and the timestep list (linear lists of
        a few steps, against the released 29-call list, dense at high noise). Same seed in every cell; the decoder
        keeps its defaults.
        '''),
        code('''
        GUIDANCE = nb.pick([0.0, 2.0, 4.0, 8.0], [0.0, 4.0])
        LISTS = {"4 linear steps": linear_timesteps(4), "10 linear steps": linear_timesteps(10),
                 "released, 29 calls": STAGE_C_TIMESTEPS}
        if nb.SMOKE:
            LISTS.pop("10 linear steps")
        for p in prompts[:nb.pick(2, 1)]:
            with torch.inference_mode():
                c1, c1u = encode_prompts(text_c, [p])
                b1, b1u = encode_prompts(text_b, [p])
                rows = [torch.cat([generate(prior, decoder, vqgan, c1, c1u, b1, b1u, side, side, prior_timesteps=ts,
                                            prior_guidance=w, generator=torch.Generator().manual_seed(SEED))
                                   for w in GUIDANCE]) for ts in LISTS.values()]
            nb.show_images(rows, list(LISTS), [f"w = {w:g}" for w in GUIDANCE], title=repr(p), size=1.0)
        '''),
        md('''
        ## 3. The noise schedule

        Both diffusion stages share `schedule.py`: a continuous time t ∈ [0, 1] with the cosine schedule
        ᾱ(t) (the share of signal variance left at time t), a p2 loss weight that is 1 − ᾱ(t) at the released
        settings (it takes weight off the nearly clean times, where the task is easy), and the timestep lists the
        samplers walk down.
        '''),
        code('''
        t = torch.linspace(0, 1, 501)
        a = alpha_bar(t)
        fig, axes = nb.plt.subplots(1, 3, figsize=(12, 3))
        axes[0].plot(t, a, label="ᾱ(t)")
        axes[0].plot(t, p2_weight(t), label="p2 weight = 1 − ᾱ(t)")
        axes[0].plot(t, a.sqrt(), "--", label="signal scale √ᾱ")
        axes[0].plot(t, (1 - a).sqrt(), "--", label="noise scale √(1 − ᾱ)")
        axes[0].set(xlabel="t", title="cosine schedule and loss weight")
        axes[0].legend(fontsize=7)
        axes[1].plot(t, torch.log(a / (1 - a)))
        axes[1].set(xlabel="t", ylabel="log SNR = log(ᾱ / (1 − ᾱ))", title="signal-to-noise ratio")
        for y, (name, ts) in enumerate((("Stage C (released, 29 calls)", STAGE_C_TIMESTEPS),
                                        ("Stage B (12 linear steps)", linear_timesteps(STAGE_B_STEPS)))):
            axes[2].plot(ts[:-1], [y] * (len(ts) - 1), "o", ms=4, label=name)
            axes[2].plot(ts[-1:], [y], "x", color="k", ms=6)
        axes[2].set(xlabel="t (× = the final t = 0, no model call)", yticks=[0, 1], ylim=(-0.5, 1.5),
                    yticklabels=["C", "B"], title="timestep lists: one dot per model call")
        axes[2].invert_xaxis()
        axes[2].legend(fontsize=7, loc="center left")
        fig.tight_layout()
        nb.plt.show()

        train_t = sample_t(100_000, generator=torch.Generator().manual_seed(0))
        dense = int((STAGE_C_TIMESTEPS[:-1] >= 2 / 3 - 1e-6).sum())
        nb.table([[f"ᾱ(t) at t = {name}", f"{alpha_bar(torch.tensor([x])).item():.4f}"]
                  for name, x in (("0", 0.0), ("0.5", 0.5), ("2/3", 2 / 3), ("0.9", 0.9), ("1", 1.0))]
                 + [["Stage C calls at t ≥ 2/3 (high noise, where the layout is decided)",
                     f"{dense} of {len(STAGE_C_TIMESTEPS) - 1}"],
                    ["training t drawn exactly at 1 (`schedule.sample_t`)", f"{(train_t == 1).float().mean():.1%}"]],
                 ["", "value"])
        '''),
        md('''
        **Summary.** Text becomes a small semantic latent in Stage C's 29 guided calls, Stage B expands it in 12
        unguided calls and Stage A decodes once. Notebook 4 counts what each of these costs, and why generating
        in the 16×24×24 space is the cheap part at 1024².
        '''),
    ]


# ================================================================================================================
# 4. The cost story
# ================================================================================================================
def cost_notebook():
    return [
        md('''
        # 4 · The cost story

        Why three stages? Because the expensive part, the text-conditional model, then works on a latent that is
        tiny: 16×24×24 for a 1024² image. This notebook counts it: compression ratios, parameters and FLOPs per
        image for the `tiny`, `small` and `paper` presets (all computed here, the large ones on PyTorch's meta
        device, which runs the models on shapes alone), the paper's headline numbers, and this project's own
        small-scale measurements.
        '''),
        setup("abc", '''
            import dataclasses
            import math
            import statistics
            import time
            import torch
            from torch.utils.flop_counter import FlopCounterMode
            import stage_a, stage_b, stage_c
            from sample import generate, latent_sizes
            from schedule import STAGE_B_STEPS, STAGE_C_TIMESTEPS
            '''),
        code('''
        PRESETS = {"tiny": 64, "small": 256, "paper": 1024}     # the image side each preset is made for
        if nb.SMOKE:
            del PRESETS["small"]                                # the test suite: the extremes are enough
        TEXT_TOKENS = {"tiny": 32, "small": 32, "paper": 77}    # train.py's --text-length default; CLIP's 77
        models = {}
        with torch.device("meta"):
            for p in PRESETS:
                models[p] = dict(a=stage_a.StageA(stage_a.PRESETS[p]), b=stage_b.StageB(stage_b.PRESETS[p]),
                                 c=stage_c.Prior(stage_c.PRESETS[p]))

        def sizes(p):
            side = PRESETS[p]
            (hc, wc), (hb, wb) = latent_sizes(side, side, models[p]["b"].config)
            return side, (16, hc, wc), (4, hb, wb)
        '''),
        md('''
        ## 1. Compression ratios
        '''),
        code('''
        rows = []
        for p in PRESETS:
            side, sem, lat = sizes(p)
            pixels = 3 * side * side
            rows.append([p, f"3×{side}×{side}", nb.shape(lat), nb.ratio(pixels / math.prod(lat)), nb.shape(sem),
                         f"{side / sem[-1]:.2f}×", nb.ratio(pixels / math.prod(sem)),
                         nb.ratio(math.prod(lat) / math.prod(sem))])
        nb.table(rows, ["preset", "image", "Stage A latent", "pixels : Stage A", "semantic latent",
                        "per side", "pixels : semantic", "Stage A : semantic"])
        side, sem, lat = sizes("paper")
        print(f"At 1024²: Stage A {3 * side ** 2 / math.prod(lat):g}:1; the semantic latent {side / sem[-1]:.2f}:1 "
              f"per side and {3 * side ** 2 / math.prod(sem):.0f}:1 by elements.")
        '''),
        md('''
        ## 2. Parameters

        Counted on models built from each preset's config. The paper preset's counts are those of the released
        modules (checked against the reference in `tests/test_params_and_effnet.py`). The released text encoders
        (CLIP ViT-bigG for Stage C, ViT-H for Stage B) come on top; the tiny and small presets use the offline
        all-MiniLM-L6-v2.
        '''),
        code('''
        RELEASED = {"Stage A": 18_406_894, "Stage B decoder": 1_055_365_280, "Stage C": 993_636_896}
        rows = []
        for p, m in models.items():
            counts = {"Stage A": nb.count(m["a"]), "compressor": nb.count(m["b"].compressor),
                      "Stage B decoder": nb.count(m["b"].decoder), "Stage C": nb.count(m["c"])}
            rows.append([p] + [f"{v:,}" for v in counts.values()] + [f"{sum(counts.values()):,}"])
        for name, n in RELEASED.items():
            assert nb.count({"Stage A": models["paper"]["a"], "Stage B decoder": models["paper"]["b"].decoder,
                             "Stage C": models["paper"]["c"]}[name]) == n, name
        nb.table(rows, ["preset", "Stage A", "compressor", "Stage B decoder", "Stage C", "total"])
        '''),
        md('''
        ## 3. FLOPs per image

        `torch.utils.flop_counter` counts the matrix multiplications and convolutions (elementwise work is left
        out) of one forward pass of each stage at its latent size. Sampling one image takes Stage C's 29 calls,
        each on a batch of 2 (the caption and the empty caption, for classifier-free guidance), Stage B's 12 calls
        (no guidance) and one Stage A decode. A training step on one image is a forward and a backward pass, counted
        as 3 forwards (a backward costs about 2; section 6 measures it on the tiny network); Stage B's also runs the
        compressor (trained jointly) and the frozen Stage A encoder, Stage C's the frozen compressor. Text encoders
        are left out.
        '''),
        code('''
        def count_flops(fn, backward=False):
            with FlopCounterMode(display=False) as counter:
                if backward:
                    fn().float().sum().backward()
                else:
                    with torch.no_grad():
                        fn()
            return counter.get_total_flops()

        def per_call(p):
            """FLOPs of one forward pass of each stage, on one image of preset p."""
            side, sem, lat = sizes(p)
            m, L = models[p], TEXT_TOKENS[p]
            z = lambda *s: torch.zeros(*s, device="meta")
            return {"C": count_flops(lambda: m["c"](z(1, *sem), z(1), z(1, L, m["c"].config.c_cond))),
                    "B": count_flops(lambda: m["b"].decoder(z(1, *lat), z(1), z(1, *sem),
                                                            z(1, L, m["b"].config.c_text))),
                    "A decode": count_flops(lambda: m["a"].decode(z(1, *lat))),
                    "A encode": count_flops(lambda: m["a"].encode(z(1, 3, side, side))),
                    "compressor": count_flops(lambda: m["b"].compressor(z(1, 3, side, side)))}

        CALLS_C, CALLS_B = 2 * (len(STAGE_C_TIMESTEPS) - 1), STAGE_B_STEPS
        BACKWARD = 2      # a backward costs about 2 forwards (two matmuls per forward one); section 6 measures it
        forward, inference, training = {}, {}, {}
        for p in PRESETS:
            f = forward[p] = per_call(p)
            inference[p] = {"Stage C": CALLS_C * f["C"], "Stage B": CALLS_B * f["B"], "Stage A": f["A decode"]}
            training[p] = {"Stage C": (1 + BACKWARD) * f["C"] + f["compressor"],
                           "Stage B": (1 + BACKWARD) * (f["B"] + f["compressor"]) + f["A encode"]}
        rows = []
        for p in PRESETS:
            total = sum(inference[p].values())
            rows.append([p] + [f"{nb.flops(v)} ({v / total:.0%})" for v in inference[p].values()]
                        + [nb.flops(total)] + [nb.flops(v) for v in training[p].values()])
        nb.table(rows, ["preset", f"Stage C ({CALLS_C} passes)", f"Stage B ({CALLS_B})", "Stage A (1)",
                        "sampling, per image", "training step, Stage C", "training step, Stage B"])

        fig, ax = nb.plt.subplots(figsize=(7, 2.2))
        left = [0.0] * len(PRESETS)
        for name, colour in (("Stage C", "tab:red"), ("Stage B", "tab:blue"), ("Stage A", "tab:green")):
            shares = [inference[p][name] / sum(inference[p].values()) for p in PRESETS]
            ax.barh(list(PRESETS), shares, left=left, color=colour, label=name)
            left = [l + s for l, s in zip(left, shares)]
        ax.set(xlabel="share of the sampling FLOPs per image", xlim=(0, 1))
        ax.invert_yaxis()
        ax.legend(ncol=3, fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
        fig.tight_layout()
        nb.plt.show()
        '''),
        md('''
        ## 4. What the 42:1 buys

        The same Stage C network (paper preset) run on latents of other sizes for a 1024² image: its own 24×24, a
        128×128 latent (an f8 autoencoder's, Stable Diffusion's space) and Stage A's 256×256. (It keeps its 16 input
        channels; an f8 autoencoder's 4 would change only its first layer.) Its cost grows with the number of
        positions, and its attention with their square. This is the comparison behind the paper's design, not a
        model anyone trained.
        '''),
        code('''
        cfg = models["paper"]["c"].config
        rows, points = [], []
        net = models["paper"]["c"]
        for name, side in (("semantic latent (Würstchen)", sizes("paper")[1][-1]),
                           ("f8 latent (SD's space)", 1024 // 8), ("f4 latent (Stage A's)", 1024 // 4)):
            if side == sizes("paper")[1][-1]:
                f = forward["paper"]["C"]                         # counted in section 3
            else:
                f = count_flops(lambda: net(torch.zeros(1, 16, side, side, device="meta"),
                                            torch.zeros(1, device="meta"),
                                            torch.zeros(1, TEXT_TOKENS["paper"], cfg.c_cond, device="meta")))
            points.append((side, f))
            rows.append([name, f"{side}×{side}", f"{side * side:,}", nb.flops(f),
                         f"{f / points[0][1]:,.0f}×"])
        nb.table(rows, ["Stage C's network on", "latent", "positions", "FLOPs per call", "relative"])

        fig, ax = nb.plt.subplots(figsize=(4.5, 3))
        sides = [s for s, _ in points]
        ax.loglog(sides, [f for _, f in points], "o-")
        ax.set_xticks(sides, [f"{s}×{s}" for s in sides], minor=False)
        ax.xaxis.set_minor_locator(nb.matplotlib.ticker.NullLocator())
        ax.set(xlim=(sides[0] / 1.5, sides[-1] * 1.5), xlabel="latent (positions per side)", ylabel="FLOPs per call",
               title="Stage C's network, by latent size")
        fig.tight_layout()
        nb.plt.show()
        '''),
        md('''
        ## 5. The paper's headline

        From the paper (Pernias et al., ICLR 2024): training Würstchen's Stage C took **24,602 A100-hours**, against
        **200,000** for Stable Diffusion 2.1, and Würstchen samples **more than twice as fast**. These are the
        paper's measurements, quoted, not reproduced here; the ratio is computed.
        '''),
        code('''
        WURSTCHEN_C_HOURS, SD21_HOURS = 24_602, 200_000           # A100-hours, as reported in the paper
        nb.table([["Würstchen, Stage C", f"{WURSTCHEN_C_HOURS:,}", "1×"],
                  ["Stable Diffusion 2.1", f"{SD21_HOURS:,}", f"{SD21_HOURS / WURSTCHEN_C_HOURS:.1f}×"]],
                 ["training", "A100-hours (paper)", "relative"])
        print(f"Stable Diffusion 2.1 took {SD21_HOURS / WURSTCHEN_C_HOURS:.1f}× the GPU hours "
              f"(Würstchen used {WURSTCHEN_C_HOURS / SD21_HOURS:.0%} of them).")
        '''),
        md('''
        ## 6. This project's own small-scale numbers

        Measured here, on this machine's CPU with the tiny preset. First, one training step (forward and backward,
        batch of 16) of the tiny Stage C network on its own 16×4×4 latent, against the same network on a 64² image's
        f8 latent (4×8×8) and on Stage A's f4 latent (4×16×16): the section above, at the size a laptop can time.
        '''),
        code('''
        tiny_c = stage_c.PRESETS["tiny"]
        REPEATS = nb.pick(5, 1)
        rows, base, step_ms = [], None, {}
        for name, side, channels in (("semantic latent", 4, 16), ("f8 latent", 8, 4), ("f4 latent (Stage A)", 16, 4)):
            torch.manual_seed(0)
            net = stage_c.Prior(dataclasses.replace(tiny_c, c_in=channels))
            x, t = torch.randn(16, channels, side, side), torch.rand(16)
            text = torch.randn(16, TEXT_TOKENS["tiny"], tiny_c.c_cond)
            times = []
            for _ in range(REPEATS + 1):                              # the first run warms up
                start = time.perf_counter()
                net(x, t, text).square().mean().backward()
                times.append(time.perf_counter() - start)
            ms = step_ms[name] = 1000 * statistics.median(times[1:])
            f_forward = count_flops(lambda: net(x, t, text))
            f_step = count_flops(lambda: net(x, t, text), backward=True)
            base = base or (ms, f_step)
            rows.append([name, f"{channels}×{side}×{side}", nb.flops(f_step), f"{f_step / base[1]:.1f}×",
                         f"{(f_step - f_forward) / f_forward:.1f}", f"{ms:.1f}", f"{ms / base[0]:.1f}×"])
        nb.table(rows, ["tiny Stage C network on", "latent", "FLOPs per step (batch 16)", "relative",
                        "backward ÷ forward FLOPs", f"ms per step, CPU ({torch.get_num_threads()} thread)",
                        "relative"])

        fig, ax = nb.plt.subplots(figsize=(5.5, 2.6))
        names, x = [r[0] for r in rows], range(len(rows))
        ax.bar([i - 0.2 for i in x], [float(r[3].rstrip("×")) for r in rows], 0.4, label="FLOPs")
        ax.bar([i + 0.2 for i in x], [float(r[6].rstrip("×")) for r in rows], 0.4, label="measured time")
        ax.set_xticks(list(x), [f"{n}\\n{r[1]}" for n, r in zip(names, rows)])
        ax.set(ylabel="relative to the semantic latent", title="one training step of the tiny Stage C network")
        ax.legend(fontsize=7)
        fig.tight_layout()
        nb.plt.show()
        '''),
        md('''
        Then the tiny models these notebooks load: how long each stage took to train (from train.py's logs) and to
        sample. Text encoding is left out of the sampling times: the stages read the same number of tokens whatever
        they say.
        '''),
        code('''
        rows = []
        for s in "abc":
            log = nb.training_log(folder, s)
            if log:
                last = log[-1]
                rows.append([f"Stage {s.upper()}", f"{last['step']:,}", f"{last['time']:.0f}",
                             f"{1000 * last['time'] / last['step']:.0f}"])
        if rows:
            nb.table(rows, ["training (tiny)", "steps", "seconds", "ms per step"])
            print(f"logs from {nb.shown(folder)}; the times include the grids train.py draws along the way")

        vqgan, model_b, prior = nb.load("a", folder), nb.load("b", folder), nb.load("c", folder)
        B, side = 8, prior.train_side or 64
        L = TEXT_TOKENS["tiny"]
        tc, tb = torch.randn(B, L, prior.config.c_cond), torch.randn(B, L, model_b.decoder.config.c_text)
        runs = []
        for _ in range(nb.pick(3, 1)):
            timings = {}
            generate(prior, model_b.decoder, vqgan, tc, torch.zeros_like(tc), tb, torch.zeros_like(tb), side, side,
                     generator=torch.Generator().manual_seed(0), timings=timings)
            runs.append(timings)
        median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        total = sum(median.values())
        share = {k: inference["tiny"][k.replace("stage", "Stage")] / sum(inference["tiny"].values()) for k in median}
        nb.table([[k, f"{1000 * v / B:.1f}", f"{v / total:.0%}", f"{share[k]:.0%}"] for k, v in median.items()],
                 [f"sampling {B} images of {side}² (tiny)", "ms per image", "share of time", "share of FLOPs"])
        '''),
        md('''
        **Summary**, from the numbers above:
        '''),
        code('''
        paper_c, (f8, f4) = forward["paper"]["C"], [f for _, f in points[1:]]
        sampling = inference["paper"]
        print(f"- At 1024², the text-conditional Stage C works on {sizes('paper')[1][-1]}×{sizes('paper')[1][-1]} "
              f"positions: a call costs {nb.flops(paper_c)}, where the same network would cost {f8 / paper_c:.0f}× "
              f"as much on an f8 latent and {f4 / paper_c:,.0f}× on Stage A's.")
        print(f"- A training step of Stage C costs {nb.flops(training['paper']['Stage C'])} per image, Stage B's "
              f"{nb.flops(training['paper']['Stage B'])}, though the two networks are about the same size.")
        print(f"- Sampling one 1024² image costs {nb.flops(sum(sampling.values()))}; Stage C's {CALLS_C} passes are "
              f"{sampling['Stage C'] / sum(sampling.values()):.0%} of it, each cheap because its latent is small.")
        print(f"- The paper: Stable Diffusion 2.1 took {SD21_HOURS / WURSTCHEN_C_HOURS:.1f}× the A100-hours of "
              f"Würstchen's Stage C, and Würstchen samples more than twice as fast.")
        tiny_gain = step_ms["f4 latent (Stage A)"] / step_ms["semantic latent"]
        print(f"- Here, at the tiny preset, a Stage C training step on the semantic latent ran {tiny_gain:.1f}× "
              f"faster than the same network on Stage A's latent of the same 64² images.")
        '''),
    ]


NOTEBOOKS = {
    "01_stage_a.ipynb": stage_a_notebook,
    "02_semantic_compressor_and_stage_b.ipynb": stage_b_notebook,
    "03_stage_c_and_the_chain.ipynb": stage_c_notebook,
    "04_cost.ipynb": cost_notebook,
}


# ================================================================================================================
# Building, running and shrinking
# ================================================================================================================
def make(name: str):
    """The notebook `name` without outputs."""
    nb = nbformat.v4.new_notebook()
    nb.cells = NOTEBOOKS[name]()
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                   "language_info": {"name": "python"}}
    for i, cell in enumerate(nb.cells):
        cell.id = f"{Path(name).stem[:2]}-{i:02d}"        # stable ids: regenerating gives small diffs
    return nb


@contextlib.contextmanager
def kernel_manager():
    """A kernel manager for this very Python, from a kernelspec in a temporary folder (nothing is registered)."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "kernels" / KERNEL
        spec.mkdir(parents=True)
        (spec / "kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": f"Python ({sys.executable})", "language": "python"}))
        yield KernelManager(kernel_name=KERNEL, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(spec.parent)]))


def execute(nb, timeout: int = CELL_TIMEOUT):
    """Run every cell in a fresh kernel, in notebooks/ as Jupyter would. Raises nbclient's CellExecutionError
    (with the cell and its traceback) on the first failing cell."""
    from nbclient import NotebookClient
    with kernel_manager() as km:
        NotebookClient(nb, km=km, timeout=timeout, record_timing=False, allow_errors=False,
                       resources={"metadata": {"path": str(HERE)}}).execute()
    return nb


def shrink(nb):
    """Re-encode every picture among the outputs, downsized to MAX_IMAGE_WIDTH where wider. Plots become palette
    PNGs where 256 colours render them all but invisibly (mean error ≤ 0.25 of 255, 99.9% of pixels within 16);
    pictures of samples, where PNG compresses badly, become JPEGs (quality 85, full-resolution colour) when that
    saves 40% or more; everything else stays a PNG."""
    import numpy as np
    from PIL import Image
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if "image/png" not in data:
                continue
            image = Image.open(io.BytesIO(base64.b64decode(data["image/png"]))).convert("RGB")
            if image.width > MAX_IMAGE_WIDTH:
                image = image.resize((MAX_IMAGE_WIDTH, round(image.height * MAX_IMAGE_WIDTH / image.width)),
                                     Image.LANCZOS)
            palette = image.quantize(256, method=Image.MEDIANCUT, dither=Image.Dither.NONE)
            error = np.abs(np.asarray(palette.convert("RGB"), np.int16) - np.asarray(image, np.int16)).max(-1)
            faithful = error.mean() <= 0.25 and np.percentile(error, 99.9) <= 16
            buffer = io.BytesIO()
            (palette if faithful else image).save(buffer, format="PNG", optimize=True)
            mime, encoded = "image/png", buffer.getvalue()
            if not faithful and len(encoded) > 20_000:
                jpeg = io.BytesIO()
                image.save(jpeg, format="JPEG", quality=85, subsampling=0, optimize=True)
                if jpeg.tell() <= 0.6 * len(encoded):
                    mime, encoded = "image/jpeg", jpeg.getvalue()
            del data["image/png"]
            data[mime] = base64.b64encode(encoded).decode("ascii") + "\n"
            output.setdefault("metadata", {}).pop("image/png", None)
    return nb


def images(nb) -> list[tuple[str, bytes]]:
    """(mime type, bytes) of every picture among the outputs."""
    return [(mime, base64.b64decode(output["data"][mime])) for cell in nb.cells for output in cell.get("outputs", [])
            for mime in ("image/png", "image/jpeg") if mime in output.get("data", {})]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--only", nargs="*", default=None, help="notebooks whose name starts with these, e.g. 01 03")
    p.add_argument("--no-execute", action="store_true", help="write the notebooks without running them")
    p.add_argument("--out", default=str(HERE), help="folder to write them to (default: notebooks/)")
    args = p.parse_args(argv)
    names = [n for n in NOTEBOOKS if not args.only or any(n.startswith(o) for o in args.only)]
    if not names:
        p.error(f"--only {args.only}: no notebook matches; expected prefixes of {', '.join(NOTEBOOKS)}")
    if os.environ.get("WUERSTCHEN_RUN", "") not in ("", "train"):   # the kernel runs in notebooks/: make it absolute
        os.environ["WUERSTCHEN_RUN"] = str(Path(os.environ["WUERSTCHEN_RUN"]).resolve())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        nb, start = make(name), time.perf_counter()
        if not args.no_execute:
            print(f"running {name} ...", flush=True)
            execute(nb)
            shrink(nb)
        nbformat.validate(nb)
        nbformat.write(nb, out / name)
        size = (out / name).stat().st_size
        print(f"wrote {out / name}: {size / 1000:.0f} KB" + ("" if args.no_execute else
                                                              f", ran in {time.perf_counter() - start:.0f} s"))
        if size > MAX_BYTES:
            print(f"warning: {name} is over {MAX_BYTES / 1000:.0f} KB; tests/test_notebooks.py will fail",
                  file=sys.stderr)


if __name__ == "__main__":
    main()
