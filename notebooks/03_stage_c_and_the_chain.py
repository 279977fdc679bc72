# %% [markdown]
# # 3 · Stage C and the whole chain
#
# Stage C (`stage_c.py`, the *prior*) is the text-conditional model: it generates the 16-channel semantic
# latent from a caption's text tokens. Then Stage B expands that latent into Stage A's latent, and Stage A
# decodes it into pixels. `sample.generate` runs the chain; here it is taken apart, step by step.
#
# **Status.** The shipped tiny models (`weights/shapes/`) draw a one-object prompt's colour and shape in most
# images, also for colour–shape pairs they never saw; two objects are their weak point, and a third object
# or a wrong shape is common. The figures are in the README's
# [Results](../README.md#results) and in the [model card](../weights/shapes/README.md). The chain itself is exact,
# and matches diffusers' `WuerstchenCombinedPipeline` bit for bit (tests/test_pipeline_parity.py).

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
from data import DEMO_PROMPTS
from experiments.evaluate import AnalyticDetector, parse_caption, score
from sample import encode_prompts, generate, latent_sizes
from schedule import STAGE_B_STEPS, STAGE_C_TIMESTEPS, alpha_bar, linear_timesteps, p2_weight, sample
from schedule import sample_t

folder = nb.prepare_run("abc", RUN)

# %%
vqgan, model_b, prior = nb.load("a", folder), nb.load("b", folder), nb.load("c", folder)
decoder = model_b.decoder
text_c, text_b = nb.text_encoder(prior), nb.text_encoder(model_b)   # the release: CLIP bigG and ViT-H
side = prior.train_side or 64
print(f"Stage C: {nb.checkpoint_step(folder, 'c'):,} training steps, {nb.count(prior):,} parameters; "
      f"images of {side}×{side}")

# %% [markdown]
# ## 1. Text → semantic latent → Stage A latent → image
#
# One prompt (the second demo prompt; all eight follow below, as they come), one seed, every intermediate.
# The chain is written out with `schedule.sample`, the sampler both diffusion stages share, and checked against
# `sample.generate`.

# %%
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

# %%
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


# %% [markdown]
# **Inside Stage C.** The sampler starts from noise at t = 1 and steps down the timestep list. Running it on
# the first k+1 times of the list, with the same seed, stops it at t_k: the same path, cut short. Each
# latent is drawn as a mosaic of its 16 channels (4 × 4 tiles of hc×wc).

# %%
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

# %% [markdown]
# **Inside Stage B.** The same trick on the decoder's 12 steps, continuing from the random-number state the
# prior left. Each intermediate Stage A latent x_t is decoded by Stage A, so the image can be seen forming
# out of noise, guided by the semantic latent above.

# %%
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

# %% [markdown]
# ### All the demo prompts
#
# `data.DEMO_PROMPTS`, one image each, with the released defaults (29 prior calls at guidance 4, 12 decoder
# steps). The table reads each image back with the analytic oracle: does it show what the caption asks?

# %%
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

# %% [markdown]
# ## 2. Guidance scale × step count
#
# Two knobs of Stage C: the guidance scale w (classifier-free guidance: ε̂ = ε̂_uncond + w·(ε̂_cond −
# ε̂_uncond); it is on only for w > 1, so 0 and 1 are the same, unguided) and the timestep list (linear lists of
# a few steps, against the released 29-call list, dense at high noise). Same seed in every cell; the decoder
# keeps its defaults.

# %%
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

# %% [markdown]
# ## 3. The noise schedule
#
# Both diffusion stages share `schedule.py`: a continuous time t ∈ [0, 1] with the cosine schedule
# ᾱ(t) (the share of signal variance left at time t), a p2 loss weight that is 1 − ᾱ(t) at the released
# settings (it takes weight off the nearly clean times, where the task is easy), and the timestep lists the
# samplers walk down.

# %%
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

# %% [markdown]
# ## 4. A real emoji through the chain
#
# The same chain on the second built-in world: OpenMoji emoji (CC BY-SA 4.0, by the OpenMoji project,
# openmoji.org), named by their Unicode CLDR names, with its shipped weights (`weights/emoji/`). First the way
# down, as training sees it: pixels → Stage A's f4 latent → Stage B's semantic latent, which is what Stage C
# learns to generate. Then the way back up: Stage B decodes the semantic latent (with the caption) and Stage A
# turns that into pixels. Last, Stage C makes a semantic latent from the name alone.

# %%
from checkpoints import SHIPPED_EMOJI
from data import draw_emoji, emoji_catalogue
from data import to_tensor

e_vqgan, e_model_b, e_prior = (nb.load(s, SHIPPED_EMOJI) for s in "abc")
e_text_c, e_text_b = nb.text_encoder(e_prior), nb.text_encoder(e_model_b)
by_name = {e.name: e for e in emoji_catalogue()}
names = ["red apple", "thumbs up: dark skin tone", "rocket", "flag: Germany"][:nb.pick(4, 2)]
pixels = torch.stack([to_tensor(draw_emoji(by_name[n].sequence, 64)) for n in names])     # (n, 3, 64, 64)
with torch.inference_mode():
    f4 = e_vqgan.encode(pixels)                                   # (n, 4, 16, 16): Stage A's latent
    semantic_real = e_model_b.compressor(pixels)                  # (n, 16, 4, 4): the semantic latent
    tb, tbu = encode_prompts(e_text_b, names)
    tc, tcu = encode_prompts(e_text_c, names)
    g = torch.Generator().manual_seed(SEED)
    up = sample(e_model_b.decoder, (len(names), *f4.shape[1:]), cond={"semantic": semantic_real, "text": tb},
                uncond={"semantic": torch.zeros_like(semantic_real), "text": tbu}, guidance=0.0,
                timesteps=linear_timesteps(STAGE_B_STEPS), generator=g)
    from_semantic = e_vqgan.decode(up).clamp(0, 1)                # Stage B then Stage A, from the real latent
    from_text = generate(e_prior, e_model_b.decoder, e_vqgan, tc, tcu, tb, tbu, 64, 64,
                         generator=torch.Generator().manual_seed(SEED))
nb.show_images([pixels, e_vqgan.decode(f4).clamp(0, 1), from_semantic, from_text],
               ["emoji", "Stage A: f4 latent, decoded", "Stage B + A: from the semantic latent",
                "Stage C + B + A: from the name"], names)
n_pixels, n_f4, n_sem = pixels[0].numel(), f4[0].numel(), semantic_real[0].numel()
nb.table([["image", nb.shape(pixels.shape[1:]), f"{n_pixels:,}", "1:1"],
          ["Stage A latent (f4)", nb.shape(f4.shape[1:]), f"{n_f4:,}", nb.ratio(n_pixels / n_f4)],
          ["semantic latent (Stage C's space)", nb.shape(semantic_real.shape[1:]), f"{n_sem:,}",
           nb.ratio(n_pixels / n_sem)]],
         ["", "shape", "numbers", "compression from pixels"])
print(f"{64 // semantic_real.shape[-1]}× per side from pixels to the semantic latent here; at 1024² the released "
      f"model goes 42.67× per side (16×24×24)")

# %% [markdown]
# The semantic latent keeps what the emoji is (an apple, a raised thumb, a flag's stripes) and its colours, but
# not its exact outlines: Stage B redraws those, so its decodes are close relatives of the real emoji rather than
# copies. That is the ceiling for text → image, and Stage C's images reach for it from the name alone.
# `experiments/evaluate_emoji.py` measures both (the model card, `weights/emoji/README.md`).

# %% [markdown]
# **Summary.** Text becomes a small semantic latent in Stage C's 29 guided calls, Stage B expands it in 12
# unguided calls and Stage A decodes once. Notebook 4 counts what each of these costs, and why generating
# in the 16×24×24 space is the cheap part at 1024².
