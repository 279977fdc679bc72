# %% [markdown]
# # 4 · The cost story
#
# Why three stages? Because the expensive part, the text-conditional model, then works on a latent that is
# tiny: 16×24×24 for a 1024² image. This notebook counts it: compression ratios, parameters and FLOPs per
# image for the `tiny`, `small` and `paper` presets (all computed here, the large ones on PyTorch's meta
# device, which runs the models on shapes alone), the paper's headline numbers, and this project's own
# small-scale measurements.

# %%
# Where the checkpoints come from: a folder of train.py checkpoints, e.g. "../runs/tiny" after
# `bash scripts/demo.sh`. None: the WUERSTCHEN_RUN environment variable if it is set, otherwise the shipped
# weights (weights/shapes/); "train" trains tiny models here, minutes per stage (see notebooks/README.md).
RUN = None

import sys
from pathlib import Path
sys.path.insert(0, str(Path.cwd() if Path("nbtools.py").exists() else Path.cwd() / "notebooks"))
import nbtools as nb   # notebooks/nbtools.py: set-up, checkpoints, pictures, tables; no model code
import dataclasses
import math
import statistics
import time
import torch
from torch.utils.flop_counter import FlopCounterMode
import stage_a, stage_b, stage_c
from sample import generate, latent_sizes
from schedule import STAGE_B_STEPS, STAGE_C_TIMESTEPS

folder = nb.prepare_run("abc", RUN)

# %%
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


# %% [markdown]
# ## 1. Compression ratios

# %%
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

# %% [markdown]
# ## 2. Parameters
#
# Counted on models built from each preset's config. The paper preset's counts are those of the released
# modules (checked against the reference in `tests/test_params_and_effnet.py`). The released text encoders
# (CLIP ViT-bigG for Stage C, ViT-H for Stage B) come on top; the tiny and small presets use the offline
# all-MiniLM-L6-v2.

# %%
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


# %% [markdown]
# ## 3. FLOPs per image
#
# `torch.utils.flop_counter` counts the matrix multiplications and convolutions (elementwise work is left
# out) of one forward pass of each stage at its latent size. Sampling one image takes Stage C's 29 calls,
# each on a batch of 2 (the caption and the empty caption, for classifier-free guidance), Stage B's 12 calls
# (no guidance) and one Stage A decode. A training step on one image is a forward and a backward pass, counted
# as 3 forwards (a backward costs about 2; section 6 measures it on the tiny network); Stage B's also runs the
# compressor (trained jointly) and the frozen Stage A encoder, Stage C's the frozen compressor. Text encoders
# are left out.

# %%
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

# %% [markdown]
# ## 4. What the 42:1 buys
#
# The same Stage C network (paper preset) run on latents of other sizes for a 1024² image: its own 24×24, a
# 128×128 latent (an f8 autoencoder's, Stable Diffusion's space) and Stage A's 256×256. (It keeps its 16 input
# channels; an f8 autoencoder's 4 would change only its first layer.) Its cost grows with the number of
# positions, and its attention with their square. This is the comparison behind the paper's design, not a
# model anyone trained.

# %%
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

# %% [markdown]
# ## 5. The paper's headline
#
# From the paper (Pernias et al., ICLR 2024): training Würstchen's Stage C took **24,602 A100-hours**, against
# **200,000** for Stable Diffusion 2.1, and Würstchen samples **more than twice as fast**. These are the
# paper's measurements, quoted, not reproduced here; the ratio is computed.

# %%
WURSTCHEN_C_HOURS, SD21_HOURS = 24_602, 200_000           # A100-hours, as reported in the paper
nb.table([["Würstchen, Stage C", f"{WURSTCHEN_C_HOURS:,}", "1×"],
          ["Stable Diffusion 2.1", f"{SD21_HOURS:,}", f"{SD21_HOURS / WURSTCHEN_C_HOURS:.1f}×"]],
         ["training", "A100-hours (paper)", "relative"])
print(f"Stable Diffusion 2.1 took {SD21_HOURS / WURSTCHEN_C_HOURS:.1f}× the GPU hours "
      f"(Würstchen used {WURSTCHEN_C_HOURS / SD21_HOURS:.0%} of them).")

# %% [markdown]
# ## 6. This project's own small-scale numbers
#
# Measured here, on this machine's CPU with the tiny preset. First, one training step (forward and backward,
# batch of 16) of the tiny Stage C network on its own 16×4×4 latent, against the same network on a 64² image's
# f8 latent (4×8×8) and on Stage A's f4 latent (4×16×16): the section above, at the size a laptop can time.

# %%
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
ax.set_xticks(list(x), [f"{n}\n{r[1]}" for n, r in zip(names, rows)])
ax.set(ylabel="relative to the semantic latent", title="one training step of the tiny Stage C network")
ax.legend(fontsize=7)
fig.tight_layout()
nb.plt.show()

# %% [markdown]
# Then the tiny models these notebooks load: how long each stage took to train (from train.py's logs) and to
# sample. Text encoding is left out of the sampling times: the stages read the same number of tokens whatever
# they say.

# %%
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

# %% [markdown]
# **Summary**, from the numbers above:

# %%
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
