# %% [markdown]
# # 2 · The semantic compressor and Stage B
#
# Stage B (`stage_b.py`) has two parts, trained together:
# - the **semantic compressor**: EfficientNetV2 features, then a 1×1 conv to **16 channels** and a BatchNorm.
#   For a 1024² image it gives a 16×24×24 *semantic latent*;
# - the **decoder** (DiffNeXt): a diffusion U-Net that generates Stage A's 4×256×256 latent from noise, given
#   the semantic latent (and the caption's text tokens).
#
# The semantic latent is the space Stage C learns to generate from text (notebook 3). The point of Würstchen
# is that this space is tiny: the expensive text-conditional model works 42.67× smaller per side than the
# image, and Stage B fills the detail back in. This notebook measures what that costs in fidelity.

# %%
# Where the checkpoints come from: a folder of train.py checkpoints, e.g. "../runs/tiny" after
# `bash scripts/demo.sh`. None: the WUERSTCHEN_RUN environment variable if it is set, otherwise the shipped
# weights (weights/shapes/); "train" trains tiny models here, minutes per stage (see notebooks/README.md).
RUN = None

import sys
from pathlib import Path
sys.path.insert(0, str(Path.cwd() if Path("nbtools.py").exists() else Path.cwd() / "notebooks"))
import nbtools as nb   # notebooks/nbtools.py: set-up, checkpoints, pictures, tables; no model code
import math
import torch
import torch.nn.functional as F
import stage_b
from data import render_sample, to_tensor
from experiments.evaluate import EVAL_SEED, AnalyticDetector, decode_semantic, parse_caption, psnr, score
from sample import encode_prompts, latent_sizes
from schedule import STAGE_B_STEPS, linear_timesteps

folder = nb.prepare_run("ab", RUN)

# %%
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

# %% [markdown]
# ## 1. The 16-channel semantic latent
#
# The compressor's output for a few held-out images. At the tiny preset a 64² image becomes 16×4×4: each of
# the 16 channels is a 4×4 map, one number per 16×16-pixel region.

# %%
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


# %% [markdown]
# **Sizes.** Per side, the image is `resolution_multiple` = 42.67 times larger than the semantic latent at the
# paper's settings (1024 px → 24: the compressor sees a 0.75× copy, 768 px, and has stride 32). By element
# count that is 3·1024² / (16·24²). The released pipelines size the latents with `sample.latent_sizes`;
# the compressor's actual output is checked against it on the meta device. The notebook's own (tiny) size
# gets its own numbers: its compressor has stride 16 and no resize.

# %%
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

# %% [markdown]
# ## 2. What the latent keeps, and what it loses
#
# Stage B decodes from the semantic latent: it denoises a Stage A latent from pure noise, guided by the 16×4×4
# numbers (and the caption), and Stage A turns it into pixels (`decode_semantic` in experiments/evaluate.py, the
# second half of `sample.generate`). Against it: **naive downsampling** of the image to about as many values as the semantic
# latent has (a k×k RGB thumbnail with 3·k² at most that many), scaled back up with bicubic interpolation.
#
# Two yardsticks: PSNR against the original (pixel fidelity), and whether the caption still holds for the
# result, as read by the project's analytic oracle (`AnalyticDetector` in experiments/evaluate.py: background,
# colour, shape and grid cell of each shape).

# %%
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

# %% [markdown]
# **How to read this.** The paper's Stage B, from a 16×24×24 latent, redraws 1024² images with their content
# and layout intact. The tiny Stage B here (the shipped weights: 18,000 steps on a CPU) keeps the background
# and the colour, most positions, and the form of many shapes, where naive downsampling to as many values
# keeps fewer; its shapes are soft, and Stage A's own are soft too (first rows). Two things make the
# naive baseline strong at this size: at 64² the semantic latent compresses far less than at 1024² (the sizes
# table above; at 1024² the naive baseline would be a 55×55 thumbnail), and a shape on a flat background
# survives as a coloured blob in 9×9 pixels. The analytic oracle used here reads a shape by its symmetry and
# forgives a decoder's blur, yet still misses some small stars that Stage B blurs; the evaluation's CNN oracle
# finds the asked shape in about 19 of 20 Stage B decodes (README,
# Results). And what no naive baseline offers is the next step of Würstchen: Stage C learns to *generate* the
# semantic latent, a space trained for Stage B to decode.
#
# What the latent leaves out, Stage B makes up, and a different seed makes it up differently: four decodes of
# the same semantic latent.

# %%
S, n = nb.pick(4, 2), nb.pick(4, 2)
with torch.no_grad():
    rows = [decode_semantic(decoder, vqgan, sem[:n], tokens[:n], tokens_uncond[:n], real.shape[-1],
                            linear_timesteps(STAGE_B_STEPS), 0.0, torch.Generator().manual_seed(seed), "cpu")
            for seed in range(S)]
nb.show_images([torch.stack(col) for col in zip(real[:n], *rows)],
               col_labels=["image"] + [f"seed {seed}" for seed in range(S)])
spread = torch.stack(rows).std(0).mean().item()
print(f"mean per-pixel std across the {S} seeds: {spread:.3f} (pixel values in [0, 1])")

# %% [markdown]
# ## 3. The decoder's step count
#
# Stage B samples with the ancestral DDPM sampler of `schedule.py`, on `linear_timesteps(n)`: n model calls
# from t = 1 (pure noise) to t = 0. The release uses 12 steps and no guidance. One step cannot work: it must
# jump from ᾱ(1) = 10⁻⁴ straight to the clean latent, dividing the model's estimate by √ᾱ = 0.01, so every
# error comes out 100× larger. A few steps fix that; beyond a dozen little changes, while the time grows with
# the steps.

# %%
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

# %% [markdown]
# **Summary.** The semantic latent is a drastic compression: 341:1 by elements at 1024² (asserted above),
# against Stage A's 12:1. The released model shows that this is enough to keep a picture's content and layout
# and to leave the exact pixels to Stage B; the tiny models here, trained on a CPU (their model card says how
# long), do so for shapes on a flat background, with soft edges (section 2). It is what makes Stage C cheap: notebook 3
# generates this latent from text.
