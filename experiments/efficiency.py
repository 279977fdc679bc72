"""Usage:
    python experiments/efficiency.py --run runs/tiny              # CPU smoke run: ≤ 30 min on 2 cores, A and B given
    python experiments/efficiency.py --scale cpu --run weights/shapes --threads 1     # the deciding scale: 1.4 hours
    python experiments/efficiency.py --scale cpu --run weights/shapes --threads 1 --resume   # go on after a stop
    python experiments/efficiency.py --scale gpu --run runs/big       # the larger scale, for one GPU
    python experiments/efficiency.py --scale gpu --dry-run            # its code path with micro sizes, anywhere

The paper's central claim at small scale: is a text-conditional diffusion model cheaper to train in Würstchen's
compressed semantic space (Stage C, decoded by Stage B) than directly on Stage A's f4 latent, like a classic latent
diffusion model (LDM), for the same prompt alignment?

It prints the decision rule first, then trains every arm, evaluates each at four checkpoints, and prints the tables;
it writes OUT/efficiency.json, OUT/efficiency.md, the plot OUT/efficiency.png and sample images of each arm.

Arms. All of them train on the same stream of built-in shapes (one `data.Batches`: the same images, captions and
order; data.HELD_OUT_PAIRS held out), with the same frozen text encoder (one cache of its tokens), the same
TrainConfig (AdamW, warm-up, clipping, EMA, caption dropout for classifier-free guidance), the same per-step noise
generators, one training loop (`train_arm`, train.py's loop step for step) and one loss: stage_c.Prior.loss, the
P2-weighted ε-MSE. They differ only in the denoiser and the space it denoises:
- `stage_c`: Würstchen. stage_c.Prior on the frozen Stage B compressor's semantic latent (16×4×4 for a 64² image);
  sampled images go through the frozen Stage B decoder (12 steps) and Stage A.
- `ldm-prior` (the primary baseline): the *same* Prior class and config with c_in = 4 on Stage A's f4 latent
  (4×16×16), decoded by Stage A alone. One variable changes, the space, so the FLOP ratio measures what the paper
  credits its savings to: the text-conditional model sees 16× fewer positions.
- `ldm-unet`: a classic LDM denoiser: Stage B's DiffNeXt U-Net with no semantic latent injected (text is its only
  condition), on the same f4 latent. A U-Net shrinks its input internally (here 16² → 8² → 4²), so a step costs
  3.5× Stage C's, not 15.6× (the tiny Stage B's patch size 1; at patch size 2, in the first smoke run, 1.1×). It is
  there because the FLOP ratio depends on the baseline's architecture, and a reader should see by how much.
Both Prior-based arms have the same parameter count up to their 1×1 input and output convolutions; the U-Net's is
printed next to them.

Measured at each checkpoint (EMA weights, as experiments/evaluate.py): prompt alignment, the unweighted mean of its
six GenEval-style categories per image, by both oracles, with a 95% bootstrap interval over prompts (EVAL_SEED
prompts, which training never sees); KID-oracle, FD-oracle and precision/recall on the CNN oracle's features against
real renders of other prompts (REFERENCE_SEED). Calibration rows: real images (ceiling), real images with shuffled
captions (chance), Stage A reconstructions (the ceiling of the LDM arms' decoder) and Stage A+B decodes from real
semantic latents (the ceiling of Stage C's decoder). All arms sample alike: the released 29-call prior timestep
list with guidance 4 (Stage C's defaults), from the same seeds.

FLOPs come from torch.utils.flop_counter.FlopCounterMode on one real training step (forward + backward) per arm,
times the steps. It counts matrix products, convolutions and attention, not elementwise work, and not the
optimizer; attention runs on the math backend while counting, since the counter has no formula for the CPU flash
kernel and would count it as 0. Two views:
- generative stage: the denoiser's training steps alone (the paper's 24,602 vs 200,000 GPU-hours compares these);
- whole pipeline: plus the frozen encoders' forward passes during training (text encoder for every arm; Stage A's
  encoder for the LDM arms; the semantic compressor for Stage C), once per sample as train.py caches them, plus
  the autoencoders' own training: Stage A for every arm, and Stage B (its decoder and compressor, and its own
  frozen Stage A and text encoder passes) for Würstchen only. These come from the checkpoints' recorded training
  configs; for published weights they are unknown and the pipeline view is left out.

Decision rule, fixed before the deciding run (RULE below; printed before training and written into the results):
    Würstchen's claim holds at this scale if some Stage C checkpoint whose cumulative generative-stage training
    FLOPs are at most 1/4 of the primary baseline's (ldm-prior) final FLOPs reaches that baseline's final
    alignment within its 95% interval by both oracles at once: Stage C's mean ≥ the baseline's lower bound, by the
    CNN oracle and by the analytic one. Otherwise it fails. Alignment is the per-image headline mean. If the final
    checkpoint of either arm does not have its lower bound above chance (the shuffled-caption mean) by both oracles,
    the verdict is "inconclusive": matching a model that has learned nothing shows nothing.
The same rule is reported against ldm-unet, and with whole-pipeline FLOPs, as secondary verdicts; KID-oracle at the
matching checkpoint is compared with the baseline's final KID (no worse by more than the baseline's spread over
KID subsets) as a secondary check. None of these change the primary verdict.
Why both oracles: the first smoke run (CNN oracle alone) found that on near-noise samples (KID-oracle above
2 000 ×10³) the CNN oracle still scored 0.16–0.18 where the analytic detector scored 0, so a baseline whose final
checkpoint were such a spike would have passed a chance guard on the CNN oracle alone.

Scales (SCALES): `smoke` is a smoke run on a CPU (400 steps of batch 32, 100 prompts), to show that everything runs
and what the numbers look like, not to settle the question; `cpu` is 4,000 steps of batch 32 and 200 prompts, long
enough on a 2-core CPU for a verdict (issue 15); `gpu` is 20,000 steps of batch 128 with wider models
and 400 prompts. Without --run (or --stage-a/--stage-b) Stages A and B are first trained with train.py at the tiny
preset (the scale's steps), into OUT/autoencoders, and reused from there by later runs. --dry-run keeps the chosen
scale's models and code path with micro sizes: a test, not a measurement.
"""
import argparse
import copy
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageDraw, ImageFont
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

# Run as `python experiments/<name>.py` from anywhere: the project's root holds the stage files, data and sample.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import stage_a
import stage_b
import stage_c
from checkpoints import file_sha256, load_stage, read_checkpoint, run_paths
from data import Batches, FrozenFeatures
from sample import encode_prompts, save_grid
from schedule import STAGE_B_STEPS, STAGE_C_TIMESTEPS, linear_timesteps
from experiments import evaluate as ev
from schedule import sample as sample_loop
from train import TRAIN_PRESETS, TrainConfig, autocast_for, learning_rate, step_generator, update_ema
from train_state import atomic_save

# ----------------------------------------------------------------------------------------------------------------
# The decision rule. Changing it after seeing results defeats its purpose: it is printed before training starts.
# ----------------------------------------------------------------------------------------------------------------
# Both oracles decide together (changed before the deciding run, issue 15): the CNN oracle alone scored near-noise
# images at 0.16-0.18 in the first smoke run, so a verdict that rested on it could pass a model that draws nothing.
RULE = {"oracles": ("CNN", "analytic"), "metric": "per-image headline mean (six GenEval-style categories)",
        "level": 0.95, "flops_fraction": 0.25, "primary_baseline": "ldm-prior", "flops": "generative stage"}
RULE_TEXT = (f"Würstchen's claim holds at this scale if some Stage C checkpoint whose cumulative generative-stage "
             f"training FLOPs are ≤ {RULE['flops_fraction']:.2g} × the primary baseline's ({RULE['primary_baseline']}) "
             f"final FLOPs reaches that baseline's final alignment within its 95% interval by both oracles at once "
             f"(Stage C's mean ≥ the baseline's lower bound, by the CNN oracle and by the analytic one); otherwise "
             f"it fails. Alignment = {RULE['metric']}. If the final checkpoint of either arm, the baseline's or "
             f"Stage C's, does not have its lower bound above chance (shuffled captions) by both oracles, the "
             f"verdict is inconclusive. Secondary, not deciding: the same rule against ldm-unet and on "
             f"whole-pipeline FLOPs; KID-oracle at the matching checkpoint no worse than the baseline's final KID by "
             f"more than its spread.")

ARMS = ("stage_c", "ldm-prior", "ldm-unet")
ARM_LABELS = {"stage_c": "Würstchen: Stage C on the semantic latent (+ Stage B, A)",
              "ldm-prior": "LDM baseline: Stage C's Prior on the f4 latent (+ Stage A)",
              "ldm-unet": "LDM baseline: text-only DiffNeXt U-Net on the f4 latent (+ Stage A)"}
ARM_COLOURS = {"stage_c": (200, 60, 40), "ldm-prior": (40, 90, 200), "ldm-unet": (40, 150, 80)}


# ----------------------------------------------------------------------------------------------------------------
# Scales
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scale:
    name: str
    dataset_size: int             # built-in shapes, the first N of seed `--seed`, cached frozen features (train.py)
    batch_size: int
    steps: int                    # every arm trains this many steps: the same samples in the same order
    stops: tuple                  # checkpoints (steps) evaluated; the last is `steps`
    ema_start: int
    warmup: int
    prompts: int                  # evaluation prompts (EVAL_SEED), one image each
    prior_steps: int | None       # None: the released 29-call Stage C list, for every arm
    decoder_steps: int = STAGE_B_STEPS
    prior: dict = field(default_factory=dict)     # StageCConfig overrides (tiny preset) for stage_c and ldm-prior
    unet: dict = field(default_factory=dict)      # StageBConfig overrides (tiny preset) for ldm-unet
    stage_a_flags: tuple = ()     # train.py flags when Stage A has to be trained first (tiny preset)
    stage_b_flags: tuple = ()
    baselines: tuple = ("ldm-prior", "ldm-unet")
    bootstrap: int = 1000
    oracle: ev.OracleConfig = ev.OracleConfig()
    fd: bool = True               # FD-oracle (numpy eigendecompositions of 288² covariances)


SCALES = {
    # Measured: 26.6 min wall, 15.3 CPU-min, with one thread on a shared 2-core CPU (load ≈ 4) and Stages A and B
    # given. The LDM Prior's 400 steps (≈ 1.4 s each) and its 29-call sampling of 100 prompts dominate.
    "smoke": Scale("smoke", dataset_size=4096, batch_size=32, steps=400, stops=(50, 100, 200, 400), ema_start=200,
                   warmup=100, prompts=100, prior_steps=None),
    # Long enough on a 2-core CPU for a verdict (issue 15): 10× the smoke run's steps on twice its data, 200 prompts.
    # Chosen before any result, from one timing with 2 threads on the loaded machine (s per step at batch 32:
    # stage_c 0.20, ldm-unet 0.72, ldm-prior 1.4). Measured: 82.6 min wall with one thread (docs/efficiency.md), of
    # which ldm-prior's training took 45 min at 0.66 s per step.
    "cpu": Scale("cpu", dataset_size=8192, batch_size=32, steps=4000, stops=(500, 1000, 2000, 4000), ema_start=500,
                 warmup=100, prompts=200, prior_steps=None),
    # One GPU: wider and deeper denoisers, 50× the samples, 4× the prompts. Stages A and B, if not given, are
    # trained longer than the demo's (Stage B's quality caps what Stage C can score).
    "gpu": Scale("gpu", dataset_size=32768, batch_size=128, steps=20_000, stops=(2500, 5000, 10_000, 20_000),
                 ema_start=2000, warmup=500, prompts=400, prior_steps=None,
                 prior={"c": 128, "depth": 8, "nhead": 8},
                 unet={"c_hidden": (64, 128, 128), "nhead": (0, 8, 8), "blocks": (2, 2, 2), "c_cond": 128},
                 stage_a_flags=("--steps", "3000", "--batch-size", "64"),
                 stage_b_flags=("--steps", "10000", "--batch-size", "64", "--dataset-size", "32768")),
}
# --dataset-size 64: one block of cached frozen features (train.py encodes 64 samples at a time), not 4,096
MICRO_AUTOENCODER_FLAGS = ("--steps", "2", "--batch-size", "4", "--log-every", "1", "--save-every", "2",
                           "--sample-every", "1000", "--ema-start", "1", "--warmup", "1", "--text-length", "16",
                           "--dataset-size", "64")


def dry_run(scale: Scale) -> Scale:
    """The same models and code path at micro sizes: every branch runs in seconds, the numbers mean nothing."""
    return dataclasses.replace(scale, name=scale.name + " (dry run)", dataset_size=64, batch_size=4, steps=4,
                               stops=(2, 4), ema_start=2, warmup=1, prompts=4, prior_steps=2, decoder_steps=2,
                               stage_a_flags=MICRO_AUTOENCODER_FLAGS, stage_b_flags=MICRO_AUTOENCODER_FLAGS,
                               bootstrap=50, oracle=ev.OracleConfig(images=64, epochs=1, val_images=16),
                               fd=False)   # from 4 samples of 288 features it means nothing, and it is the slow part


def train_config(scale: Scale) -> TrainConfig:
    """Stage C's tiny training recipe (lr, weight decay, clipping, EMA β, caption dropout), with the scale's
    length, batch and schedule points. One object, handed to every arm."""
    return dataclasses.replace(TRAIN_PRESETS["tiny"]["c"], steps=scale.steps, batch_size=scale.batch_size,
                               warmup=scale.warmup, ema_start=scale.ema_start, dataset_size=scale.dataset_size,
                               cache_frozen=True, hold_out=True)


# ----------------------------------------------------------------------------------------------------------------
# The denoisers
# ----------------------------------------------------------------------------------------------------------------
class TextUNet(nn.Module):
    """A classic LDM denoiser: Stage B's DiffNeXt U-Net with no semantic latent injected anywhere, so the caption is
    its only condition. It trains with Stage C's own loss, so that only the network differs."""

    def __init__(self, config: stage_b.StageBConfig):
        super().__init__()
        if any(config.inject_semantic):
            raise ValueError("TextUNet: a text-only baseline takes no semantic latent; set inject_semantic all False")
        self.config = config
        self.unet = stage_b.DiffNeXt(config)

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, None, text)                  # no mapper reads the semantic argument

    # It models the f4 latent as it is (as Stage B does); Prior.loss and sampling call these.
    def to_prior_space(self, x):
        return x

    def from_prior_space(self, x):
        return x

    # The very function Stage C trains with: P2-weighted ε-MSE, per-sample caption dropout to the empty caption.
    loss = stage_c.Prior.loss


def build_denoiser(arm: str, scale: Scale, c_semantic: int, c_latent: int, text_width: int) -> nn.Module:
    # text_conv 0: the prior arms read the caption tokens as the released prior does. The deciding run
    # (docs/efficiency.md) predates the tiny preset's token convolutions, and the U-Net arm has none.
    prior = dataclasses.replace(stage_c.PRESETS["tiny"], c_cond=text_width, text_conv=0, **scale.prior)
    if arm == "stage_c":
        return stage_c.Prior(dataclasses.replace(prior, c_in=c_semantic))
    if arm == "ldm-prior":     # models Stage A's latent as it is, like Stage B: no (z + shift) / scale
        return stage_c.Prior(dataclasses.replace(prior, c_in=c_latent, semantic_shift=0.0, semantic_scale=1.0))
    if arm == "ldm-unet":
        levels = len(scale.unet.get("c_hidden", stage_b.PRESETS["tiny"].c_hidden))
        return TextUNet(dataclasses.replace(stage_b.PRESETS["tiny"], c_in=c_latent, c_text=text_width,
                                            inject_semantic=(False,) * levels, **scale.unet))
    raise ValueError(f"unknown arm {arm!r}; expected one of {ARMS}")


# ----------------------------------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------------------------------
def count_flops(fn) -> int:
    """FLOPs of fn() by FlopCounterMode (matrix products, convolutions, attention). Attention runs on the math
    backend meanwhile: the counter has no formula for the CPU flash kernel and would count it as 0."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def training_step_flops(model: nn.Module, x0, text, uncond, caption_dropout: float) -> int:
    """Forward + backward of one training step's loss, on a copy: the model, its gradients and the RNG are left as
    they were. FLOPs do not depend on the values, so any generator will do."""
    clone = copy.deepcopy(model).train()
    generator = torch.Generator(x0.device).manual_seed(0)

    def step():
        loss, _ = clone.loss(x0, text, uncond, caption_dropout, generator)
        loss.backward()
    with torch.random.fork_rng(devices=[x0.device] if x0.device.type == "cuda" else []):   # dropout draws, if any
        return count_flops(step)


@torch.no_grad()
def forward_flops_per_sample(fn, batch) -> float:
    return count_flops(lambda: fn(batch)) / len(batch)


def samples_encoded(seen: set, dataset_size: int, cached: bool, samples_seen: int) -> int:
    """How many samples train.py's FrozenFeatures has run the frozen encoders on: whole blocks of BLOCK consecutive
    indices, once each, when cached; every sample of every batch otherwise."""
    if not cached:
        return samples_seen
    block = FrozenFeatures.BLOCK
    return sum(min((b + 1) * block, dataset_size) - b * block for b in {i // block for i in seen})


def autoencoder_training_flops(path_a: Path, path_b: Path, text_flops_per_sample: float, log) -> dict | None:
    """Training FLOPs of Stage A and of Stage B (decoder + compressor, and its frozen Stage A and text passes), from
    the steps, batch and configs that train.py recorded in the checkpoints; None for weights without that record."""
    try:
        ckpt_a, ckpt_b = read_checkpoint(path_a), read_checkpoint(path_b)
        cfg_a, train_a = stage_a.StageAConfig(**ckpt_a["config"]), TrainConfig(**ckpt_a["train"])
        cfg_b, train_b = stage_b.StageBConfig(**ckpt_b["config"]), TrainConfig(**ckpt_b["train"])
        steps_a, steps_b = int(ckpt_a["step"]), int(ckpt_b["step"])
    except (KeyError, TypeError, ValueError) as e:
        log(f"note: no training record in the Stage A/B checkpoints ({type(e).__name__}: {e}); whole-pipeline FLOPs "
            f"are left out")
        return None
    with torch.random.fork_rng(devices=[]):                # fresh weights for counting; the global RNG is kept
        return _autoencoder_flops(ckpt_a, ckpt_b, cfg_a, cfg_b, train_a, train_b, steps_a, steps_b,
                                  text_flops_per_sample)


def _autoencoder_flops(ckpt_a, ckpt_b, cfg_a, cfg_b, train_a, train_b, steps_a, steps_b, text_flops_per_sample):
    torch.manual_seed(0)
    side = train_a.image_size
    model_a = stage_a.StageA(cfg_a).train()
    images = torch.rand(train_a.batch_size, 3, side, side)
    per_step_a = count_flops(lambda: model_a.loss(images, None, 0)[0].backward())
    gan_steps = 0
    if "discriminator" in ckpt_a and steps_a > cfg_a.adversarial_start:    # the GAN term and the critic's own step
        disc = stage_a.Discriminator(cfg_a).train()
        gan_steps = steps_a - cfg_a.adversarial_start

        def gan_step():
            loss, parts = model_a.loss(images, disc, cfg_a.adversarial_start)
            loss.backward()
            stage_a.discriminator_loss(disc, images, parts["recon"]).backward()
        per_step_gan = count_flops(gan_step)
    total_a = train_a.grad_accum * ((steps_a - gan_steps) * per_step_a + (gan_steps * per_step_gan if gan_steps else 0))

    side = train_b.image_size
    model_b = stage_b.StageB(cfg_b).train()
    B, f = train_b.batch_size, 2 ** cfg_a.levels
    latents, images = torch.randn(B, cfg_b.c_in, side // f, side // f), torch.rand(B, 3, side, side)
    L = int(ckpt_b.get("text_length") or 32)
    text, uncond = torch.randn(B, L, cfg_b.c_text), torch.randn(1, L, cfg_b.c_text)
    per_step_b = count_flops(lambda: model_b.loss(latents, images, text, uncond, 0.05, 0.05)[0].backward())
    vqgan = stage_a.StageA(cfg_a).eval()
    encode_a = forward_flops_per_sample(vqgan.encode, torch.rand(4, 3, side, side))
    seen_b = steps_b * train_b.grad_accum * B
    # train.py caches Stage B's frozen inputs on a finite data set: after an epoch every sample was encoded once
    encoded_b = min(seen_b, train_b.dataset_size) if train_b.dataset_size and train_b.cache_frozen else seen_b
    return {"stage_a": {"steps": steps_a, "batch": train_a.batch_size, "per_step": per_step_a,
                        "gan_steps": gan_steps, "total": total_a},
            "stage_b": {"steps": steps_b, "batch": B, "per_step": per_step_b,
                        "training": steps_b * train_b.grad_accum * per_step_b,
                        "frozen_samples": encoded_b, "frozen_per_sample": encode_a + text_flops_per_sample,
                        "total": steps_b * train_b.grad_accum * per_step_b + encoded_b * (encode_a +
                                                                                          text_flops_per_sample)}}


# ----------------------------------------------------------------------------------------------------------------
# Training: train.py's step, for any arm
# ----------------------------------------------------------------------------------------------------------------
def _sha(h, tensor: torch.Tensor):
    h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())


def train_arm(model: nn.Module, x0_features: FrozenFeatures, text_features: FrozenFeatures, uncond: torch.Tensor,
              batches: Batches, cfg: TrainConfig, seed: int, device, autocast, stops, on_stop) -> dict:
    """Train `model` as train.py trains a stage, step for step: linear warm-up, AdamW, gradient clipping, a skipped
    step on a non-finite loss or gradient, the released EMA scheme, and per-step noise from (seed, step). At each
    step in `stops`, on_stop(step, ema, model, trace) runs (evaluation does not touch the training RNG). Returns the
    trace:
    what this arm was trained with and on, recorded from the objects themselves, so that arms can be compared."""
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    hashes = {k: hashlib.sha256() for k in ("indices", "captions", "text", "settings")}
    trace = {"train_config": dataclasses.asdict(cfg),
             "optimizer": {"type": type(opt).__name__} | {k: v for k, v in opt.defaults.items()
                                                           if isinstance(v, (int, float, bool, tuple))},
             "dataset": {"type": type(batches.dataset).__name__, "length": len(batches.dataset),
                         "seed": batches.seed, "size": getattr(batches.dataset, "size", None),
                         "exclude": sorted(map(list, getattr(batches.dataset, "exclude", ())))},
             "uncond_sha256": hashlib.sha256(uncond.float().cpu().numpy().tobytes()).hexdigest(),
             "seed": seed, "skipped": 0, "seen": set(), "samples_seen": 0}
    model.train()
    step, bad_in_a_row = 0, 0
    t0 = time.time()
    for stop in sorted(stops):
        while step < stop:
            for group in opt.param_groups:
                group["lr"] = learning_rate(step, cfg)
            total = 0.0
            for micro in range(cfg.grad_accum):
                images, captions, indices = batches(step * cfg.grad_accum + micro)
                images = images.to(device, non_blocking=True)
                gen = step_generator(seed, step * cfg.grad_accum + micro, 0, device)
                dropout = cfg.caption_dropout
                with autocast:
                    x0 = x0_features(indices, images, captions, device)
                    text = text_features(indices, images, captions, device)
                    loss, _ = model.loss(x0, text, uncond, dropout, gen)
                    (loss / cfg.grad_accum).backward()
                total += loss.item() / cfg.grad_accum
                # the values this step actually used, so that a difference between arms anywhere in training shows
                group = opt.param_groups[0]
                used = (group["lr"], group["betas"], group["eps"], group["weight_decay"], dropout, cfg.grad_clip,
                        cfg.ema_start, cfg.ema_every, cfg.ema_beta, gen.initial_seed())
                hashes["settings"].update(repr(used).encode())
                hashes["indices"].update(np.asarray(indices, np.int64).tobytes())
                hashes["captions"].update("\n".join(captions).encode())
                _sha(hashes["text"], text)
                trace["seen"].update(indices)
                trace["samples_seen"] += len(indices)
            finite = math.isfinite(total)
            if finite:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                finite = math.isfinite(grad_norm)
            if not finite:                                  # train.py skips the step and keeps the weights
                opt.zero_grad(set_to_none=True)
                trace["skipped"] += 1
                bad_in_a_row += 1
                if bad_in_a_row >= cfg.max_bad_steps:
                    raise SystemExit(f"error: {bad_in_a_row} non-finite losses in a row at step {step + 1}")
                step += 1
                continue
            bad_in_a_row = 0
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            update_ema(ema, model, step, cfg)
        trace.update({k + "_sha256": h.hexdigest() for k, h in hashes.items()}, step=step,
                     train_seconds=time.time() - t0, last_loss=total)
        on_stop(step, ema, model, trace)
        t0 = time.time()                                    # training time excludes evaluation
    return trace


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------
@torch.inference_mode()
def generate_direct(model, vqgan, encoder, prompts, side, gen, device) -> torch.Tensor:
    """An LDM arm's images: the denoiser samples Stage A's latent with Stage C's sampler settings, Stage A decodes.
    Batch b draws its noise from seed·1000 + b, as evaluate.generate_images does for Stage C."""
    f = 2 ** vqgan.config.levels
    timesteps = linear_timesteps(gen.prior_steps) if gen.prior_steps else STAGE_C_TIMESTEPS
    out = []
    for b, (i, j) in enumerate(ev.batched(len(prompts), gen.batch)):
        text, uncond = encode_prompts(encoder, prompts[i:j], device)
        generator = torch.Generator(device).manual_seed(gen.seed * 1000 + b)
        x = sample_loop(model, (j - i, model.config.c_in, side // f, side // f), cond={"text": text},
                        uncond={"text": uncond}, guidance=gen.prior_guidance, timesteps=timesteps,
                        generator=generator, device=device)
        out.append(vqgan.decode(model.from_prior_space(x.float())).float().clamp(0, 1).cpu())
    return torch.cat(out)


def measure(images: torch.Tensor, requests, oracles: dict, reference_features, counts, fd: bool = True) -> dict:
    """Alignment (per-image headline mean and categories, both oracles) and the distribution metrics of a set of
    images, one per request (FD-oracle None unless `fd`)."""
    out = {"alignment": {}, "categories": {}}
    for name, oracle in oracles.items():
        summary = ev.summarise(ev.score_images(oracle, images, requests, 1), counts)["per_image"]
        out["alignment"][name] = summary["mean"]
        out["categories"][name] = {c: summary[c] for c in ev.HEADLINE}     # mean, 95% interval, n
    features = oracles["CNN"].features(images)
    out["kid_oracle"] = ev.kid(reference_features, features)
    out["fd_oracle"] = ev.frechet_features(reference_features, features) if fd else None
    out.update(ev.precision_recall(reference_features, features))
    return out


# ----------------------------------------------------------------------------------------------------------------
# The decision
# ----------------------------------------------------------------------------------------------------------------
def decide(candidate: list[dict], baseline: list[dict], chance: dict | None, flops_key: str = "gen_flops",
           fraction: float = RULE["flops_fraction"], oracles: tuple = RULE["oracles"]) -> dict:
    """RULE applied to two curves of checkpoints, each point a dict with `flops_key` and, for every oracle,
    alignment[oracle] = {"mean", "lo", "hi"} (optionally kid_oracle = {"mean", "std"}); chance = {oracle: mean}.
    Returns the verdict ("supported", "not supported", "inconclusive" or "unknown"), the reason, the baseline's final
    point and the cheapest Stage C point that matches it by every oracle."""
    if not candidate or not baseline or any(p.get(flops_key) is None for p in candidate + baseline):
        return {"verdict": "unknown", "reason": f"no {flops_key} for every checkpoint"}
    final = max(baseline, key=lambda p: p[flops_key])
    target = {o: final["alignment"][o] for o in oracles}
    budget = fraction * final[flops_key]
    out = {"baseline_final": {"flops": final[flops_key], "alignment": target}, "budget_flops": budget,
           "chance": chance, "match": None, "kid_check": None}
    for who, last in (("the baseline", final), ("Stage C", max(candidate, key=lambda p: p[flops_key]))):
        for o in oracles:                   # a model that has learned nothing cannot show anything either way
            a = last["alignment"][o]
            if chance is not None and not a["lo"] > chance[o]:
                return out | {"verdict": "inconclusive",
                              "reason": f"{who}'s final alignment by the {o} oracle, {a['mean']:.3f} (lower bound "
                                        f"{a['lo']:.3f}), is not above chance {chance[o]:.3f}"}
    bounds = " and ".join(f"{target[o]['lo']:.3f} ({o})" for o in oracles)
    matches = sorted((p for p in candidate if all(p["alignment"][o]["mean"] >= target[o]["lo"] for o in oracles)),
                     key=lambda p: p[flops_key])
    cheap = [p for p in matches if p[flops_key] <= budget]
    if not cheap:
        best = max(candidate, key=lambda p: p[flops_key])
        late = (f"; it matches only at {matches[0][flops_key] / final[flops_key]:.3g}× the baseline's FLOPs"
                if matches else "; its final checkpoint scores " +
                " and ".join(f"{best['alignment'][o]['mean']:.3f} ({o})" for o in oracles))
        return out | {"verdict": "not supported",
                      "reason": f"no Stage C checkpoint within {fraction:.2g}× the baseline's FLOPs reaches its "
                                f"lower bounds {bounds}{late}"}
    match = cheap[0]
    kid_c, kid_b = match.get("kid_oracle"), final.get("kid_oracle")
    kid_ok = None
    if kid_c and kid_b and kid_c.get("mean") is not None and kid_b.get("mean") is not None:
        kid_ok = bool(kid_c["mean"] <= kid_b["mean"] + (kid_b.get("std") or 0.0))
    scores = " and ".join(f"{match['alignment'][o]['mean']:.3f} ({o})" for o in oracles)
    return out | {"verdict": "supported", "match": {"step": match.get("step"), "flops": match[flops_key],
                                                    "alignment": {o: match["alignment"][o] for o in oracles}},
                  "kid_check": kid_ok,
                  "reason": f"Stage C at step {match.get('step')} ({match[flops_key] / final[flops_key]:.3g}× the "
                            f"baseline's FLOPs) scores {scores} ≥ the baseline's lower bounds {bounds}"}


# ----------------------------------------------------------------------------------------------------------------
# Tables and the plot
# ----------------------------------------------------------------------------------------------------------------
def seconds_per_step(points: list[dict]) -> float:
    """Training seconds per step over the last segment between checkpoints: the first one may include filling the
    frozen-feature caches (runs before they were warmed up front did), the last one is training alone."""
    if len(points) == 1:
        return points[0]["train_seconds"] / max(points[0]["step"], 1)
    return points[-1]["train_seconds"] / max(points[-1]["step"] - points[-2]["step"], 1)


def _ci(stat) -> str:
    return "–" if not stat or stat.get("mean") is None else f"{stat['mean']:.3f} ({stat['lo']:.3f}–{stat['hi']:.3f})"


def _flops(x) -> str:
    return "–" if x is None else f"{x:.3g}"


def _fd(m) -> str:
    return "–" if m.get("fd_oracle") is None else f"{m['fd_oracle']:.1f}"


def _kid(m) -> str:
    k = m.get("kid_oracle") or {}
    return "–" if k.get("mean") is None else f"{k['mean'] * 1e3:.1f} ± {k['std'] * 1e3:.1f}"


def _single_object(m: dict, oracle: str) -> str:
    """A measurement's single-object accuracy with its interval (runs before the categories kept intervals: the
    re-scored final images, or the mean alone)."""
    cats = m.get("categories_rescored") or m.get("categories") or {}
    c = cats.get(oracle, {}).get("single object")
    return _ci(c) if isinstance(c, dict) else "–" if c is None else f"{c:.3f}"


def tables(results: dict) -> str:
    arms, cal = results["arms"], results["calibration"]
    lines = [f"Efficiency at small scale, {results['scale']['name']} scale"
             + (" (a SMOKE RUN: it shows that the comparison runs end to end; it settles nothing)"
                if results["scale"]["name"].startswith("smoke") else ""), "",
             "Decision rule (fixed before running): " + results["rule"]["text"], "",
             "| arm | parameters | denoises | training FLOPs per step | frozen-encoder FLOPs per sample | "
             "s per step |", "|---|---|---|---|---|---|"]
    for arm, a in arms.items():
        lines.append(f"| {arm} | {a['parameters']:,} | {'×'.join(map(str, a['latent_shape']))} | "
                     f"{_flops(a['flops_per_step'])} | {_flops(a['frozen_flops_per_sample'])} | "
                     f"{seconds_per_step(a['points']):.3f} |")
    per_sample = results["flops"]["frozen_forward_per_sample"]
    lines += ["", "Frozen encoders, forward FLOPs per training sample: text encoder "
              f"{_flops(per_sample['text'])}, Stage A's encoder {_flops(per_sample['f4'])} (the LDM arms' input), "
              f"the semantic compressor {_flops(per_sample['semantic'])} (Stage C's input). Each arm runs the text "
              f"encoder and its own space's encoder once per distinct sample (cached). The generative-stage FLOPs "
              f"count the denoiser alone, as the paper's A100-hours do; the whole-pipeline FLOPs add these "
              f"encoder passes and the training of the autoencoders each arm needs (Stage A for all; Stage B, "
              f"with its own Stage A and text passes, for Würstchen)."]
    lines += ["", "| calibration | alignment, CNN (95% CI) | alignment, analytic | KID-oracle ×10³ | FD-oracle |",
              "|---|---|---|---|---|"]
    for key, m in cal.items():
        lines.append(f"| {m['label']} | {_ci(m['alignment']['CNN'])} | {_ci(m['alignment']['analytic'])} | "
                     f"{_kid(m)} | {_fd(m)} |")
    lines += ["", "| arm | step | generative FLOPs | frozen-encoder FLOPs | whole-pipeline FLOPs | training s | "
                  "alignment, CNN (95% CI) | alignment, analytic | KID-oracle ×10³ | FD-oracle |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for arm, a in arms.items():
        for p in a["points"]:
            wall = p.get("train_seconds_total")
            lines.append(f"| {arm} | {p['step']} | {_flops(p['gen_flops'])} | {_flops(p.get('frozen_flops'))} | "
                         f"{_flops(p['pipeline_flops'])} | {'–' if wall is None else f'{wall:.0f}'} | "
                         f"{_ci(p['alignment']['CNN'])} | {_ci(p['alignment']['analytic'])} | {_kid(p)} | "
                         f"{_fd(p)} |")
    lines += ["", "| arm, final checkpoint | single object, CNN (95% CI) | single object, analytic (95% CI) |",
              "|---|---|---|"]
    rows = [("chance (shuffled captions)", cal["shuffled"])] + [(arm, a["points"][-1]) for arm, a in arms.items()]
    for key, m in rows:
        lines.append(f"| {key} | {_single_object(m, 'CNN')} | {_single_object(m, 'analytic')} |")
    lines += ["", "| verdict | against | FLOPs | reason |", "|---|---|---|---|"]
    for d in results["decisions"]:
        lines.append(f"| **{d['verdict']}**{' (primary)' if d['primary'] else ''} | {d['baseline']} | {d['flops']} | "
                     f"{d['reason']}" + (f"; KID check {'passes' if d['kid_check'] else 'fails'}"
                                         if d.get("kid_check") is not None else "") + " |")
    return "\n".join(lines)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)         # Pillow ≥ 10.1 with FreeType
    except (TypeError, OSError, AttributeError):
        return ImageFont.load_default()


def _ascii(text: str) -> str:
    """Pillow's built-in font has no ü, × or ³: the plot's labels are written without them."""
    for a, b in (("ü", "ue"), ("×", "x"), ("³", "^3"), ("—", "-"), ("–", "-"), ("≤", "<=")):
        text = text.replace(a, b)
    return text


def _tick(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"


def _panel(draw, box, series, hlines, title, xlabel, font, small):
    """One panel with a log x axis in box = (x0, y0, x1, y1). series: [(colour, [(x, y, lo, hi)])], lo/hi None for
    no bar; hlines: [(y, colour, label)], dashed, labelled at alternate ends so that close ones stay readable."""
    x0, y0, x1, y1 = box
    left, right, top, bottom = x0 + 60, x1 - 20, y0 + 34, y1 - 48
    xs = [x for _, pts in series for x, *_ in pts if x and x > 0]
    hlines = [h for h in hlines if h[0] is not None]
    ys = [v for _, pts in series for _, y, lo, hi in pts for v in (y, lo, hi) if v is not None]
    ys += [y for y, _, _ in hlines]
    draw.text((x0 + 10, y0 + 8), _ascii(title), fill="black", font=font)
    if not xs or not ys:
        draw.text((left, top + 20), "no data", fill="black", font=font)
        return
    lx0, lx1 = math.floor(math.log10(min(xs))), math.ceil(math.log10(max(xs)))
    lx1 = max(lx1, lx0 + 1)
    ylo, yhi = min(0.0, min(ys)), max(ys)
    pad = (yhi - ylo) * 0.08 or 0.1
    ylo, yhi = ylo - (pad if ylo < 0 else 0), yhi + pad
    X = lambda x: left + (math.log10(x) - lx0) / (lx1 - lx0) * (right - left)
    Y = lambda y: bottom - (y - ylo) / (yhi - ylo) * (bottom - top)
    for i in range(6):                                    # y grid and labels
        v = ylo + (yhi - ylo) * i / 5
        draw.line((left, Y(v), right, Y(v)), fill=(232, 232, 232))
        draw.text((left - 8 - draw.textlength(_tick(v), font=small), Y(v) - 7), _tick(v), fill="black", font=small)
    draw.rectangle((left, top, right, bottom), outline="black")
    for e in range(lx0, lx1 + 1):                         # decade ticks on the FLOP axis
        draw.line((X(10 ** e), bottom, X(10 ** e), bottom + 5), fill="black")
        draw.text((X(10 ** e) - 14, bottom + 8), f"1e{e}", fill="black", font=small)
    draw.text(((left + right) / 2 - draw.textlength(xlabel, font=small) / 2, bottom + 26), xlabel, fill="black",
              font=small)
    for i, (y, colour, label) in enumerate(hlines):
        for sx in range(int(left), int(right), 12):
            draw.line((sx, Y(y), min(sx + 6, right), Y(y)), fill=colour, width=1)
        lx = right - 6 - draw.textlength(label, font=small) if i % 2 == 0 else left + 6
        draw.text((lx, Y(y) - 15), label, fill=colour, font=small)
    for colour, pts in series:
        pts = [p for p in pts if p[0] and p[0] > 0]
        for a, b in zip(pts, pts[1:]):
            draw.line((X(a[0]), Y(a[1]), X(b[0]), Y(b[1])), fill=colour, width=2)
        for x, y, lo, hi in pts:
            if lo is not None and hi is not None:        # 95% interval, or the KID spread
                draw.line((X(x), Y(lo), X(x), Y(hi)), fill=colour, width=1)
                draw.line((X(x) - 4, Y(lo), X(x) + 4, Y(lo)), fill=colour)
                draw.line((X(x) - 4, Y(hi), X(x) + 4, Y(hi)), fill=colour)
            draw.ellipse((X(x) - 4, Y(y) - 4, X(x) + 4, Y(y) + 4), fill=colour)


def plot(results: dict, path: Path):
    """3×3 panels: alignment by the CNN oracle and by the analytic one (95% CI bars), and KID-oracle (± its spread
    over subsets), each against cumulative generative-stage training FLOPs, whole-pipeline training FLOPs and
    training wall-clock seconds. Drawn with Pillow: the project has no plotting dependency."""
    arms, cal = results["arms"], results["calibration"]
    W, panel_h, legend_h = 1800, 400, 30 + 22 * len(arms)
    H = 50 + 3 * panel_h + legend_h
    image = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(15), _font(13)
    axes = (("gen_flops", "generative-stage training FLOPs"), ("pipeline_flops", "whole-pipeline training FLOPs"),
            ("train_seconds_total", "training seconds (this machine, this run)"))
    for row, (key, label) in enumerate(axes):
        top = 50 + row * panel_h
        for col, oracle in enumerate(("CNN", "analytic")):
            lines = [(cal["stage_a"]["alignment"][oracle]["mean"], (90, 90, 90), "Stage A recon (LDM ceiling)"),
                     (cal["stage_ab"]["alignment"][oracle]["mean"], ARM_COLOURS["stage_c"], "Stage A+B (ceiling)"),
                     (cal["shuffled"]["alignment"][oracle]["mean"], (150, 150, 150), "chance")]
            series = [(ARM_COLOURS[arm], [(p.get(key), p["alignment"][oracle]["mean"], p["alignment"][oracle]["lo"],
                                           p["alignment"][oracle]["hi"]) for p in a["points"]])
                      for arm, a in arms.items()]
            _panel(draw, (col * W // 3, top, (col + 1) * W // 3, top + panel_h), series, lines,
                   f"Alignment, {oracle} oracle (95% CI)", label, font, small)
        kid = [(ARM_COLOURS[arm], [(p.get(key), p["kid_oracle"]["mean"] * 1e3,
                                    (p["kid_oracle"]["mean"] - p["kid_oracle"]["std"]) * 1e3,
                                    (p["kid_oracle"]["mean"] + p["kid_oracle"]["std"]) * 1e3)
                                   for p in a["points"] if p["kid_oracle"]["mean"] is not None])
               for arm, a in arms.items()]
        _panel(draw, (2 * W // 3, top, W, top + panel_h), kid, [], "KID-oracle x1000, lower is better (± spread)",
               label, font, small)
    title = f"Wuerstchen vs LDM baselines on Stage A's latent, {results['scale']['name']} scale"
    if results["smoke_run"]:
        title += ": a SMOKE RUN, not a result"
    draw.text((20, 14), _ascii(title), fill="black", font=_font(18))
    for i, arm in enumerate(arms):                         # legend, one line per arm
        y = 50 + 3 * panel_h + 10 + 22 * i
        draw.rectangle((20, y + 2, 34, y + 16), fill=ARM_COLOURS[arm])
        draw.text((42, y), _ascii(f"{arm}: {ARM_LABELS[arm]}"), fill="black", font=small)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Würstchen's efficiency claim at small scale: Stage C against LDM "
                                            "baselines on Stage A's latent, alignment and KID-oracle vs FLOPs.")
    p.add_argument("--scale", choices=sorted(SCALES), default="smoke", help="smoke (CPU) or gpu (one GPU)")
    p.add_argument("--dry-run", action="store_true", help="the scale's models and code path at micro sizes")
    p.add_argument("--run", help="folder with Stage A and B: train.py's .pt or exported .safetensors, e.g.\n"
                                 "weights/shapes (else they are trained first)")
    p.add_argument("--stage-a", help="Stage A checkpoint (default RUN/stage_a.pt or .safetensors)")
    p.add_argument("--stage-b", help="Stage B checkpoint (default RUN/stage_b.pt or .safetensors)")
    p.add_argument("--baselines", help="comma-separated LDM arms (default: the scale's, ldm-prior,ldm-unet); "
                                       f"{RULE['primary_baseline']} is always run, as the rule needs it")
    p.add_argument("--out", help="output folder (default runs/efficiency/SCALE)")
    p.add_argument("--seed", type=int, default=0, help="data, initialisation and noise seed (train.py's default)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--cache-dir", default="runs/oracle_cache",
                   help="the CNN oracle's cache (shared with experiments/evaluate.py)")
    p.add_argument("--resume", action="store_true", help="reuse the arms an earlier run with the same settings "
                                                          "finished in OUT (arm_NAME.json), train the others")
    p.add_argument("--quiet", action="store_true", help="print the tables only")
    p.add_argument("--report", metavar="JSON", help="only print the tables of an earlier run's efficiency.json and "
                                                    "draw its plot again, next to it")
    args = p.parse_args(argv)
    if args.baselines is not None:
        names = [b.strip() for b in args.baselines.split(",") if b.strip()]
        unknown = [b for b in names if b not in ARMS[1:]]
        if unknown:
            p.error(f"--baselines: unknown {unknown}; expected some of {list(ARMS[1:])}")
        args.baselines = tuple(dict.fromkeys([RULE["primary_baseline"], *names]))
    return args


def autoencoders(args, scale: Scale, out: Path, log) -> tuple[Path, Path]:
    """Stage A and B checkpoints: given, or trained now with train.py at the tiny preset (kept in OUT/autoencoders,
    so a second run reuses them)."""
    if args.run or (args.stage_a and args.stage_b):
        try:                                        # .pt or exported .safetensors, checked against a SHA256SUMS
            paths = run_paths(args.run or ".", {"a": args.stage_a, "b": args.stage_b}, stages="ab")
        except ValueError as e:
            raise SystemExit(f"error: {e}")
        return paths["a"], paths["b"]
    import train
    folder = out / "autoencoders"
    for stage, flags in (("a", scale.stage_a_flags), ("b", scale.stage_b_flags)):
        if (folder / f"stage_{stage}.pt").exists():
            log(f"Stage {stage.upper()}: reusing {folder / f'stage_{stage}.pt'}")
            continue
        log(f"Stage {stage.upper()}: training it first (tiny preset {' '.join(flags)}) into {folder}")
        train.main(["--stage", stage, "--preset", "tiny", "--out", str(folder), "--seed", str(args.seed),
                    "--device", args.device, "--no-progress", *flags])
    return folder / "stage_a.pt", folder / "stage_b.pt"


def report_only(path: Path) -> dict:
    """The tables and the plot of an earlier run, from its JSON: nothing is trained or measured again."""
    try:
        results = json.loads(path.read_text())
        report = tables(results)
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"error: --report {path}: not an experiments/efficiency.py result "
                         f"({type(e).__name__}: {e})") from None
    print(report)
    path.with_suffix(".md").write_text(report + "\n")
    plot(results, path.with_suffix(".png"))
    return results


def main(argv=None):
    args = parse_args(argv)
    if args.report:
        return report_only(Path(args.report))
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    scale = dry_run(SCALES[args.scale]) if args.dry_run else SCALES[args.scale]
    baselines = args.baselines or scale.baselines
    arms = ("stage_c",) + tuple(b for b in ARMS[1:] if b in baselines)
    out = Path(args.out or f"runs/efficiency/{args.scale}{'-dry-run' if args.dry_run else ''}")
    out.mkdir(parents=True, exist_ok=True)

    def log(message, progress=False):
        if not args.quiet and (not progress or sys.stdout.isatty()):
            print(message, end="\r" if progress else "\n", flush=True)

    t_start = time.time()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True      # as train.py
    precision, autocast = autocast_for(device, "auto")
    log(f"efficiency: {scale.name} scale · {', '.join(arms)} · {device} · {precision}")
    log("decision rule (fixed before running): " + RULE_TEXT)

    # --- frozen stages and the text encoder ---
    path_a, path_b = autoencoders(args, scale, out, log)
    from text import TextEncoder
    # train.py seeds, then loads Stage A, Stage B and the text encoder (building a model draws random weights
    # before loading), then builds Stage C. The same calls in the same order leave the same RNG state, which every
    # arm starts from: the stage_c arm is then train.py's Stage C, bit for bit (tests/test_efficiency.py).
    torch.manual_seed(args.seed)
    try:
        vqgan, stage_b_model = load_stage("a", path_a, device), load_stage("b", path_b, device)
        spec, length = getattr(stage_b_model, "text_encoder_spec", (None, None))
        encoder = TextEncoder.from_name_or_path(spec or "minilm", max_length=length or 32).to(device)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    uncond = encoder.encode([""], device)
    init_rng = torch.get_rng_state()
    compressor, decoder = stage_b_model.compressor, stage_b_model.decoder
    for frozen in (vqgan, stage_b_model, encoder.model):
        frozen.eval().requires_grad_(False)
    cfg = train_config(scale)
    side = cfg.image_size

    # --- one data stream and one text cache for every arm ---
    batches = Batches("shapes", args.seed, cfg, 0, 1)
    text_features = FrozenFeatures(batches, lambda x, c: encoder.encode(c, device), cfg.cache_frozen)
    latent_features = {"f4": FrozenFeatures(batches, lambda x, c: vqgan.encode(x.to(device)), cfg.cache_frozen),
                       "semantic": FrozenFeatures(batches, lambda x, c: compressor(x.to(device)), cfg.cache_frozen)}
    space = {"stage_c": "semantic", "ldm-prior": "f4", "ldm-unet": "f4"}
    t = time.time()
    if cfg.cache_frozen and batches.finite:       # encode every sample now, so that training times are training's
        with autocast:                            # as train.py computes them: inside its autocast
            for features in [text_features] + [latent_features[k] for k in sorted({space[a] for a in arms})]:
                for i, j in ev.batched(len(batches.dataset), FrozenFeatures.BLOCK):
                    features(list(range(i, j)), None, None, device)
    timings = {"frozen features": time.time() - t}
    log(f"frozen features of {len(batches.dataset):,} samples: {timings['frozen features']:.0f} s")

    # --- evaluation set, oracles and calibration rows (experiments/evaluate.py's seeds and machinery) ---
    t = time.time()
    n = scale.prompts
    real, samples = ev.render_with_truth(ev.EVAL_SEED, n, side, exclude=ev.HELD_OUT_PAIRS)
    reference, _ = ev.render_with_truth(ev.REFERENCE_SEED, n, side, exclude=ev.HELD_OUT_PAIRS)
    prompts = [s.caption for s in samples]
    requests = [ev.parse_caption(c) for c in prompts]
    oracles = {"analytic": ev.AnalyticDetector(side),
               "CNN": ev.load_or_train_oracle(side, scale.oracle, Path(args.cache_dir), log)}
    reference_features = oracles["CNN"].features(reference)
    counts = ev.bootstrap_counts(n, scale.bootstrap, seed=1)
    gen = SimpleNamespace(prior_steps=scale.prior_steps, decoder_steps=scale.decoder_steps, prior_guidance=4.0,
                          decoder_guidance=0.0, batch=64, seed=args.seed)
    with torch.inference_mode():
        recon = torch.cat([vqgan.decode(vqgan.encode(real[i:j].to(device))).float().clamp(0, 1).cpu()
                           for i, j in ev.batched(n, gen.batch)])
        decoded = []
        for b, (i, j) in enumerate(ev.batched(n, gen.batch)):
            text_b, text_b_uncond = encode_prompts(encoder, prompts[i:j], device)
            decoded.append(ev.decode_semantic(decoder, vqgan, compressor(real[i:j].to(device)), text_b,
                                              text_b_uncond, side, linear_timesteps(scale.decoder_steps), 0.0,
                                              torch.Generator(device).manual_seed(args.seed * 1000 + 500 + b),
                                              device).cpu())
        decoded = torch.cat(decoded)
    calibration = {}
    for key, label, images, reqs in (("real", "real images (ceiling)", real, requests),
                                     ("shuffled", "real, shuffled captions (chance)", real, ev.derange(requests, 3)),
                                     ("stage_a", "Stage A reconstructions (LDM arms' decoder ceiling)", recon,
                                      requests),
                                     ("stage_ab", "Stage A+B from real semantic latents (Stage C's decoder ceiling)",
                                      decoded, requests)):
        calibration[key] = {"label": label} | measure(images, reqs, oracles, reference_features, counts, scale.fd)
    chance = {o: calibration["shuffled"]["alignment"][o]["mean"] for o in RULE["oracles"]}
    log(f"evaluation set and calibration: {time.time() - t:.0f} s")

    # --- FLOPs of the frozen encoders (per sample) and of the autoencoders' training ---
    t = time.time()
    probe_images, probe_captions, _ = batches(0)
    probe_images = probe_images[:4].to(device)
    per_sample = {"text": forward_flops_per_sample(lambda c: encoder.encode(c, device), probe_captions[:4]),
                  "f4": forward_flops_per_sample(vqgan.encode, probe_images),
                  "semantic": forward_flops_per_sample(compressor, probe_images)}
    autoencoder_flops = autoencoder_training_flops(path_a, path_b, per_sample["text"], log)
    fixed = None if autoencoder_flops is None else {
        "stage_c": autoencoder_flops["stage_a"]["total"] + autoencoder_flops["stage_b"]["total"],
        "ldm-prior": autoencoder_flops["stage_a"]["total"], "ldm-unet": autoencoder_flops["stage_a"]["total"]}
    log(f"FLOP counts of the frozen parts: {time.time() - t:.0f} s")

    # --- the arms ---
    # Each arm starts from the same RNG state and data, so arms are independent: --resume reads the arms that a
    # stopped run finished (OUT/arm_NAME.json) and trains the rest. The key makes sure they were made alike.
    resume_key = json.loads(json.dumps({"scale": dataclasses.asdict(scale), "seed": args.seed, "device": str(device),
                                        "stage_a_sha256": file_sha256(path_a), "stage_b_sha256": file_sha256(path_b),
                                        "text_encoder": spec or "minilm"}))
    results_arms, traces, finals = {}, {}, {}
    for arm in arms:
        saved = out / f"arm_{arm}.json"
        if args.resume and saved.exists():
            try:
                record = json.loads(saved.read_text())
                images = torch.load(out / f"arm_{arm}_images.pt", weights_only=True)
            except (OSError, ValueError, RuntimeError) as e:
                raise SystemExit(f"error: --resume: {saved} or its images cannot be read ({e}); expected what "
                                 f"an earlier run of this script wrote, or delete it to train {arm} again") from None
            if record.get("key") != resume_key:
                differs = sorted(k for k in resume_key if record.get("key", {}).get(k) != resume_key[k])
                raise SystemExit(f"error: --resume: {saved} was made with other settings ({', '.join(differs)} "
                                 f"differ); expected this run's, or delete it to train {arm} again")
            try:
                results_arms[arm], traces[arm] = record["info"], record["info"]["trace"]
                last = record["info"]["points"][-1]
                old = last["categories"]["CNN"]["single object"]
            except (KeyError, IndexError, TypeError) as e:
                raise SystemExit(f"error: --resume: {saved} lacks {e}; expected what an earlier run of this script "
                                 f"wrote, or delete it to train {arm} again") from None
            finals[arm] = images.float() / 255
            if not isinstance(old, dict):
                # A record from before the categories kept their intervals: score the saved final images again
                # (stored as 8-bit, so a borderline pixel could move a score), keep both, and say whether they agree.
                again = measure(finals[arm], requests, oracles, reference_features, counts, False)["categories"]
                same = all(again[o][c]["mean"] == last["categories"][o][c] for o in again for c in ev.HEADLINE)
                last["categories_rescored"] = again | {"means_equal_the_run's": same}
                log(f"{arm}: final images scored again for the categories' intervals; means "
                    f"{'equal' if same else 'DIFFER from'} the run's")
            log(f"\n{arm}: finished by an earlier run, read from {saved}")
            continue
        torch.set_rng_state(init_rng)                        # where train.py stands when it builds Stage C
        model = build_denoiser(arm, scale, compressor.config.c_semantic, vqgan.config.c_latent,
                               encoder.width).to(device)
        feats = latent_features[space[arm]]
        images0, captions0, indices0 = batches(0)              # the first step's batch: the shapes it trains on
        with torch.no_grad():
            x0_probe = feats(indices0, images0, captions0, device)
            text_probe = text_features(indices0, images0, captions0, device)
        per_step = training_step_flops(model, x0_probe, text_probe, uncond, cfg.caption_dropout)
        frozen_per_sample = per_sample["text"] + per_sample[space[arm]]
        info = {"label": ARM_LABELS[arm], "space": space[arm], "latent_shape": list(x0_probe.shape[1:]),
                "parameters": sum(p.numel() for p in model.parameters()), "config": dataclasses.asdict(model.config),
                "flops_per_step": per_step, "frozen_flops_per_sample": frozen_per_sample, "points": []}
        log(f"\n{arm}: {info['parameters']:,} parameters on {'×'.join(map(str, info['latent_shape']))}, "
            f"{per_step:.3g} training FLOPs per step")
        eval_seconds = [0.0]

        def on_stop(step, ema, live, trace, arm=arm, info=info, per_step=per_step, feats=feats):
            t_eval = time.time()
            if arm == "stage_c":
                images = ev.generate_images(ema, decoder, vqgan, encoder, encoder, prompts, 1, side, gen, device, 0,
                                            lambda *a, **k: None)
            else:
                images = generate_direct(ema, vqgan, encoder, prompts, side, gen, device)
            m = measure(images, requests, oracles, reference_features, counts, scale.fd)
            encoded = samples_encoded(trace["seen"], len(batches.dataset), cfg.cache_frozen, trace["samples_seen"])
            gen_flops = per_step * step * cfg.grad_accum
            frozen_flops = encoded * info["frozen_flops_per_sample"]
            point = {"step": step, "samples_seen": trace["samples_seen"], "samples_encoded": encoded,
                     "gen_flops": gen_flops, "frozen_flops": frozen_flops,
                     "pipeline_flops": None if fixed is None else gen_flops + frozen_flops + fixed[arm],
                     "train_seconds": round(trace["train_seconds"], 1),
                     "train_seconds_total": round(sum(p["train_seconds"] for p in info["points"])
                                                  + trace["train_seconds"], 1),
                     "loss": trace["last_loss"]} | m
            info["points"].append(point)
            finals[arm] = images
            state = {"arm": arm, "step": step, "config": dataclasses.asdict(live.config), "ema": ema.state_dict()}
            if arm == "stage_c":     # train.py's layout: sample.py and experiments/evaluate.py load it as a Stage C
                state |= {"stage": "c", "skipped": trace["skipped"], "train": dataclasses.asdict(cfg),
                          "text_encoder": spec or "minilm", "text_length": length or 32, "model": live.state_dict()}
            atomic_save(state, out / f"{arm}_{step:06d}.pt")
            eval_seconds[0] += time.time() - t_eval
            log(f"  {arm} step {step}: alignment {_ci(m['alignment']['CNN'])} (CNN), {_ci(m['alignment']['analytic'])}"
                f" (analytic), KID-oracle×10³ {_kid(m)}; train {trace['train_seconds']:.0f} s, "
                f"eval {time.time() - t_eval:.0f} s")

        trace = train_arm(model, feats, text_features, uncond, batches, cfg, args.seed, device, autocast,
                          scale.stops, on_stop)
        info |= {"seconds_per_step": seconds_per_step(info["points"]),
                 "train_seconds": round(sum(p["train_seconds"] for p in info["points"]), 1),
                 "eval_seconds": round(eval_seconds[0], 1)}
        traces[arm] = {k: v for k, v in trace.items() if k != "seen"} | {"distinct_samples": len(trace["seen"])}
        info["trace"] = traces[arm]
        results_arms[arm] = info
        atomic_save((finals[arm] * 255).round().to(torch.uint8), out / f"arm_{arm}_images.pt")
        tmp = saved.with_suffix(".json.tmp")               # written whole and synced, then renamed (as atomic_save)
        with open(tmp, "w") as f:
            f.write(json.dumps({"key": resume_key, "info": info}))
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(saved)

    # --- decisions ---
    decisions = []
    for baseline in arms[1:]:
        for key, name in (("gen_flops", "generative stage"), ("pipeline_flops", "whole pipeline")):
            d = decide(results_arms["stage_c"]["points"], results_arms[baseline]["points"], chance, key)
            decisions.append(d | {"baseline": baseline, "flops": name,
                                  "primary": baseline == RULE["primary_baseline"] and key == "gen_flops"})
    primary = next(d for d in decisions if d["primary"])
    timings = {k: round(v, 1) for k, v in timings.items()}
    timings |= {f"{arm}: train, eval": [a["train_seconds"], a["eval_seconds"]] for arm, a in results_arms.items()}

    results = {
        "scale": dataclasses.asdict(scale) | {"oracle": dataclasses.asdict(scale.oracle)},
        "smoke_run": scale.name.startswith("smoke") or args.dry_run,
        "rule": RULE | {"text": RULE_TEXT}, "verdict": primary["verdict"], "decisions": decisions,
        "checkpoints": {"stage_a": str(path_a), "stage_b": str(path_b)},
        "text_encoder": {"spec": spec or "minilm", "length": length or 32, "width": encoder.width},
        "settings": {"seed": args.seed, "device": str(device), "precision": precision, "prompts": n,
                     "images_per_prompt": 1, "eval_seed": ev.EVAL_SEED, "reference_seed": ev.REFERENCE_SEED,
                     "prior_steps": scale.prior_steps or "released 29-call list", "prior_guidance": gen.prior_guidance,
                     "decoder_steps": scale.decoder_steps, "train_config": dataclasses.asdict(cfg),
                     "threads": torch.get_num_threads()},
        "flops": {"counter": "torch.utils.flop_counter.FlopCounterMode, attention on the math backend; matrix "
                             "products, convolutions and attention only",
                  "frozen_forward_per_sample": per_sample, "autoencoders": autoencoder_flops,
                  "autoencoder_flops_per_arm": fixed},
        "calibration": calibration, "arms": results_arms,
        "timings_s": timings | {"total": round(time.time() - t_start, 1)},
    }
    report = tables(results)
    print(report)
    (out / "efficiency.md").write_text(report + "\n")
    (out / "efficiency.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "efficiency.png")
    shown = min(n, 8)                                      # what the numbers are about: real, then each arm's last
    save_grid([real[:shown], recon[:shown], decoded[:shown]] + [finals[a][:shown] for a in arms],
              out / "efficiency_samples.png")
    log(f"\nverdict ({RULE['primary_baseline']}, generative-stage FLOPs): {primary['verdict']}: {primary['reason']}")
    log(f"results: {out / 'efficiency.json'}, table: {out / 'efficiency.md'}, plot: {out / 'efficiency.png'}, "
        f"samples (rows: real, Stage A, Stage A+B, then {', '.join(arms)}): {out / 'efficiency_samples.png'} "
        f"({time.time() - t_start:.0f} s)")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
