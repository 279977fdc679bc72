"""Usage:
    python experiments/evaluate_emoji.py --run weights/emoji
    python experiments/evaluate_emoji.py --run runs/shipped_emoji --no-generation      # Stages A and B only

Measure a Würstchen trained on the emoji world (data.py, `train.py --preset emoji`): does each image show the emoji
that its prompt names?

Two oracles name the emoji in an image, each ranking all N emoji of the world (data.emoji_catalogue(), held-out
ones included):
- `CNN`: a small convolutional net with two heads, the base emoji ("thumbs up") and the skin tone (none or one of
  five), trained once on fresh augmented renders (ORACLE_SEED) with the blur and noise of evaluate.augment, and
  cached. An emoji's score is log p(its base) + log p(its tone), so base and tone are read apart. Its penultimate
  features are the space of the distribution metrics.
- `nearest`: nothing learned. The image and every emoji's render at three scales, box-filtered to 16 × 16 RGB;
  emoji ranked by their nearest render's distance. A different kind of judge, so that one network's blind spots
  do not become the figure.

Prompt sets (seeds that training does not use):
- names: n emoji that training saw, each with a caption drawn as training draws them (data.emoji_caption: the
  name alone, a template, or an alias);
- held out: the (emoji, tone) pairs that training never saw (data.emoji_held_out), by name; the model saw the base
  emoji in other tones and the tone on other emoji;
- descriptions: experiments/emoji_descriptions.tsv, prompts that are neither names nor aliases nor templates.
Calibration rows, on the names set's emoji: real renders (augmented as in training), Stage A reconstructions,
Stage A+B decoding the real renders' semantic latents (the ceiling for generated images), and real renders
scored against shuffled prompts (chance).

Per image: top-1 and top-5 among all N emoji (top-50 too for descriptions); for emoji with a skin tone, the base
emoji's top-1 and top-5 among the bases and whether the tone is right. Intervals are 95% percentile bootstraps
over prompts (a prompt's k images move together). Distribution: FD-oracle and KID-oracle of each set against real
renders of the same emoji drawn with another seed (REFERENCE_SEED), whose own real row is the floor.
"""
import argparse
import dataclasses
import hashlib
import json
import math
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# Run as `python experiments/<name>.py` from anywhere: the project's root holds the stage files, data and sample.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from checkpoints import SHIPPED_EMOJI
from cli import guidance_value, positive_int
from data import SKIN_TONES, draw_emoji, emoji_caption, emoji_catalogue, emoji_held_out, emoji_view, to_tensor
from experiments.evaluate import (augment, batched, bootstrap_counts, bootstrap_mean, decode_semantic, derange,
                                  eval_device, frechet_features, generate_images, kid, load_models, logger,
                                  save_results)
from sample import encode_prompts, valid_side
from schedule import STAGE_B_STEPS, linear_timesteps

EVAL_SEED = 1_000_003            # prompts and their real renders
REFERENCE_SEED = 1_000_033       # other renders of the same emoji: the reference set of the distribution metrics
ORACLE_SEED = 2_000_003          # the CNN oracle's training renders
ORACLE_VAL_SEED = 2_000_029      # ... and its check
DESCRIPTIONS = Path(__file__).resolve().parent / "emoji_descriptions.tsv"
TONES = (None,) + SKIN_TONES     # the tone head's classes
NEAREST_SIDE = 16                # the nearest-render oracle compares 16 × 16 RGB
NEAREST_SCALES = (0.85, 0.925, 1.0)   # the scales of its reference renders (data.EMOJI_SCALES and between)
LOOKALIKE_RMS = 0.01             # two emoji whose centred 64² renders differ by less than this RMS are one picture
METRICS = ("top-1", "top-5", "top-50", "base top-1", "base top-5", "tone")
ORACLES = ("CNN", "nearest")


# ----------------------------------------------------------------------------------------------------------------
# The world, as the oracles see it
# ----------------------------------------------------------------------------------------------------------------
class World:
    """The catalogue with the indices the oracles use: each emoji's base (among the sorted base names) and tone,
    and which emoji look alike.

    About 100 pairs of OpenMoji emoji are drawn the same but for antialiasing ("farmer" and "man farmer", "person
    with white cane" and "man with white cane"): their centred 64² renders differ by an RMS below 0.005, while the
    next-closest pairs, two skin tones of one emoji, differ by 0.014 or more. No image can tell such a pair apart, so
    an oracle that names either one is right (`same`, and `same_base` among the bases)."""

    def __init__(self):
        self.emoji = emoji_catalogue()
        self.index = {e.name: i for i, e in enumerate(self.emoji)}
        self.bases = sorted({e.base for e in self.emoji})
        base_index = {b: i for i, b in enumerate(self.bases)}
        self.base_of = torch.tensor([base_index[e.base] for e in self.emoji])
        self.tone_of = torch.tensor([TONES.index(e.tone) for e in self.emoji])
        self.held_out = emoji_held_out(self.emoji)
        x = torch.stack([to_tensor(draw_emoji(e.sequence, 64)) for e in self.emoji]).flatten(1)   # (N, 3·64·64)
        sq = x.pow(2).sum(1)
        rms = ((sq[:, None] + sq[None] - 2 * x @ x.T).clamp(min=0) / x.shape[1]).sqrt()          # (N, N)
        self.same = (rms < LOOKALIKE_RMS) | torch.eye(len(x), dtype=torch.bool)
        untoned = torch.tensor([e.tone is None for e in self.emoji])      # each base is drawn untoned once
        if sorted(self.base_of[untoned].tolist()) != list(range(len(self.bases))):
            raise RuntimeError("data.emoji_catalogue: expected each base emoji once without a skin tone")
        base_rows = self.same[untoned][:, untoned]                        # (bases, bases), in base_of's order
        order = self.base_of[untoned].argsort()
        self.same_base = base_rows[order][:, order]


def render(world: World, targets: list[int], side: int, seed: int, augmented: bool = True) -> torch.Tensor:
    """(N, 3, side, side) in [0, 1]: emoji `targets`, each at a scale and shift drawn from (seed, position)."""
    images = [emoji_view(world.emoji[t], side, random.Random(f"emoji-eval/{seed}/{i}")) if augmented
              else draw_emoji(world.emoji[t].sequence, side) for i, t in enumerate(targets)]
    return torch.stack([to_tensor(im) for im in images])


# ----------------------------------------------------------------------------------------------------------------
# Oracle 1: a CNN with a base-emoji head and a skin-tone head
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OracleConfig:
    views: int = 20              # augmented renders per emoji, drawn once (ORACLE_SEED)
    epochs: int = 16             # each with fresh blur and noise (evaluate.augment)
    batch_size: int = 128
    lr: float = 3e-3
    side: int = 64               # images are resized to this side first
    version: int = 2             # bump when the architecture or the recipe changes: old caches are then ignored


class EmojiNet(nn.Module):
    """A 64² image → features (B, 256) → logits of the base emoji (B, bases) and of the tone (B, 6)."""

    FEATURES = 256

    def __init__(self, bases: int):
        super().__init__()

        def block(c_in, c_out, stride):
            return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

        # 64² → 32² → 16² → 8² → 4² → 2²; the 2² map is flattened, not pooled: where things are is part of an
        # emoji. 64², not 32²: "man running" and "person running" differ in a few dozen pixels at 64², and a 32²
        # net confused them (docs/emoji.md#the-oracles)
        self.trunk = nn.Sequential(*block(3, 32, 2), *block(32, 48, 2), *block(48, 96, 2), *block(96, 128, 1),
                                   *block(128, 192, 2),
                                   *block(192, 256, 2), nn.Flatten(), nn.Linear(256 * 2 * 2, self.FEATURES),
                                   nn.ReLU(inplace=True))
        self.base = nn.Linear(self.FEATURES, bases)
        self.tone = nn.Linear(self.FEATURES, len(TONES))

    def forward(self, images: torch.Tensor):
        features = self.trunk(images * 2 - 1)
        return features, self.base(features), self.tone(features)


def _resize(images: torch.Tensor, side: int) -> torch.Tensor:
    if images.shape[-1] == side:
        return images.float()
    return F.interpolate(images.float(), size=(side, side), mode="bilinear", antialias=True, align_corners=False)


class CNNOracle:
    name = "CNN"

    def __init__(self, net: EmojiNet, world: World, info: dict):
        self.net, self.world, self.info = net.eval(), world, info

    @torch.no_grad()
    def run(self, images: torch.Tensor, batch: int = 256):
        """(features (B, 256), log p(base) (B, bases), log p(tone) (B, 6))."""
        out = [self.net(_resize(images[i:i + batch].cpu(), self.info["config"]["side"]))
               for i in range(0, len(images), batch)]
        features, base, tone = (torch.cat(x) for x in zip(*out))
        return features, base.log_softmax(-1), tone.log_softmax(-1)

    def scores(self, images: torch.Tensor):
        """(emoji scores (B, N), base scores (B, bases), predicted tone (B,))."""
        _, base, tone = self.run(images)
        return base[:, self.world.base_of] + tone[:, self.world.tone_of], base, tone.argmax(-1)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features, centred and scaled by one number fixed per oracle (as evaluate.CNNOracle's)."""
        raw = self.run(images)[0]
        return (raw - torch.tensor(self.info["feature_mean"])) / self.info["feature_scale"]


def train_oracle(world: World, config: OracleConfig, log=print) -> tuple[EmojiNet, dict]:
    """Train on `views` augmented renders of every emoji, held-out ones included: a judge must know what the
    generator was not shown. Checked on one fresh render per emoji, plain and with evaluate.augment's blur."""
    t0 = time.time()
    torch.manual_seed(ORACLE_SEED)
    n = len(world.emoji)
    targets = [t for _ in range(config.views) for t in range(n)]
    images = (render(world, targets, config.side, ORACLE_SEED) * 255).round().to(torch.uint8)   # (V·N, 3, S, S)
    log(f"  oracle: {len(targets):,} renders ({time.time() - t0:.0f} s)")
    labels = torch.tensor(targets)
    generator = torch.Generator().manual_seed(ORACLE_SEED)
    net = EmojiNet(len(world.bases))
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=1e-4)
    steps = config.epochs * math.ceil(len(targets) / config.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=steps, pct_start=0.15)
    net.train()
    for epoch in range(config.epochs):
        order = torch.randperm(len(targets), generator=generator)
        for i in range(0, len(order), config.batch_size):
            pick = order[i:i + config.batch_size]
            x = augment(images[pick].float() / 255, generator)
            _, base, tone = net(x)
            y = labels[pick]
            loss = F.cross_entropy(base, world.base_of[y]) + F.cross_entropy(tone, world.tone_of[y])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        log(f"  oracle epoch {epoch + 1}/{config.epochs}: loss {loss.item():.4f} ({time.time() - t0:.0f} s)")
    net.eval()
    oracle = CNNOracle(net, world, {"config": dataclasses.asdict(config)})
    val = render(world, list(range(n)), config.side, ORACLE_VAL_SEED)
    checks = {"fresh renders": val, "fresh renders, blurred": augment(val, torch.Generator().manual_seed(1))}
    info = {"config": dataclasses.asdict(config), "seconds": None, "train_seed": ORACLE_SEED,
            "val_seed": ORACLE_VAL_SEED, "emoji": n, "bases": len(world.bases)}
    for label, x in checks.items():
        scores, _, tone = oracle.scores(x)
        info[f"top-1 on {label}"] = float((rank_of(scores, torch.arange(n), world.same) == 0).float().mean())
        info[f"exact top-1 on {label}"] = float((scores.argmax(-1) == torch.arange(n)).float().mean())
        info[f"tone on {label}"] = float((tone == world.tone_of).float().mean())
    features = oracle.run(val)[0]
    mean = features.mean(0)
    info |= {"feature_mean": mean.tolist(),
             "feature_scale": float((features - mean).pow(2).mean().sqrt().clamp(min=1e-6)),
             "seconds": round(time.time() - t0, 1)}
    return net, info


def world_fingerprint(world: World, side: int) -> str:
    """A hash of the catalogue and a few renders: a cached oracle never judges a world it was not trained on."""
    h = hashlib.sha256(json.dumps([dataclasses.astuple(e) for e in world.emoji]).encode())
    h.update((render(world, list(range(0, len(world.emoji), 97)), side, 0) * 255).round().to(torch.uint8).numpy())
    return h.hexdigest()[:16]


def load_or_train_oracle(world: World, config: OracleConfig, cache_dir: Path, log=print) -> CNNOracle:
    key = hashlib.sha256(json.dumps({"world": world_fingerprint(world, config.side), **dataclasses.asdict(config)},
                                    sort_keys=True).encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"emoji_oracle_{key}.pt"
    if path.exists():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        net = EmojiNet(len(world.bases))
        net.load_state_dict(blob["state"])
        log(f"CNN oracle: {path} (top-1 {blob['info']['top-1 on fresh renders']:.1%} on fresh renders)")
        return CNNOracle(net, world, blob["info"] | {"path": str(path), "cached": True})
    log(f"CNN oracle: training on {config.views} renders of each of {len(world.emoji):,} emoji, {config.epochs} "
        f"epochs (once; cached in {path})")
    net, info = train_oracle(world, config, log)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"state": net.state_dict(), "info": info}, tmp)
    tmp.replace(path)
    log(f"CNN oracle: top-1 {info['top-1 on fresh renders']:.1%} on a fresh render of each emoji, "
        f"{info['top-1 on fresh renders, blurred']:.1%} blurred ({info['seconds']:.0f} s)")
    return CNNOracle(net, world, info | {"path": str(path), "cached": False})


# ----------------------------------------------------------------------------------------------------------------
# Oracle 2: the nearest render, in 16 × 16 RGB
# ----------------------------------------------------------------------------------------------------------------
class NearestOracle:
    name = "nearest"

    def __init__(self, world: World, side: int):
        self.world = world
        refs = [torch.stack([to_tensor(draw_emoji(e.sequence, side, scale)) for e in world.emoji])
                for scale in NEAREST_SCALES]
        self.refs = torch.stack([self.small(r) for r in refs], 1)               # (N, scales, 768)

    @staticmethod
    def small(images: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(images.float(), NEAREST_SIDE).flatten(1)   # (B, 3·16·16)

    @torch.no_grad()
    def scores(self, images: torch.Tensor):
        x = self.small(images.cpu())
        N, S, D = self.refs.shape
        d = torch.cdist(x, self.refs.reshape(N * S, D)).view(len(x), N, S).amin(-1)   # (B, N)
        emoji = -d
        base = torch.full((len(x), len(self.world.bases)), -math.inf).scatter_reduce(
            1, self.world.base_of.expand(len(x), -1), emoji, reduce="amax")
        return emoji, base, self.world.tone_of[emoji.argmax(-1)]


# ----------------------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------------------
def rank_of(scores: torch.Tensor, target: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """How many candidates score strictly higher than the target and its look-alikes (`same`, (N, N)): 0 is top-1.
    scores: (B, N); target: (B,)."""
    group = same[target]                                                  # (B, N)
    best = torch.where(group, scores, torch.tensor(-math.inf)).amax(1, keepdim=True)
    return ((scores > best) & ~group).sum(1)


def score_images(oracle, world: World, images: torch.Tensor, targets: list[int], k: int) -> dict[str, np.ndarray]:
    """Metric → (prompts, k) array of 1 / 0, NaN where it does not apply (base and tone: toned emoji only).
    images: (prompts · k, 3, H, W), a prompt's k images next to each other; targets: one emoji per prompt."""
    t = torch.tensor(targets).repeat_interleave(k)
    emoji_scores, base_scores, tone = oracle.scores(images)
    rank, base_rank = rank_of(emoji_scores, t, world.same), rank_of(base_scores, world.base_of[t], world.same_base)
    toned = (world.tone_of[t] > 0).numpy()
    table = {"top-1": rank < 1, "top-5": rank < 5, "top-50": rank < 50,
             "base top-1": base_rank < 1, "base top-5": base_rank < 5, "tone": tone == world.tone_of[t]}
    out = {}
    for name, hit in table.items():
        v = hit.numpy().astype(np.float64)
        if name.startswith("base") or name == "tone":
            v = np.where(toned, v, np.nan)
        out[name] = v.reshape(len(targets), k)
    return out


def summarise(table: dict[str, np.ndarray], counts: np.ndarray) -> dict:
    """Per image: a prompt's mean over its k images, then the mean over prompts with its bootstrap interval."""
    with warnings.catch_warnings():      # a prompt with no toned image has no base or tone figure: NaN, skipped
        warnings.simplefilter("ignore", RuntimeWarning)
        return {m: bootstrap_mean(np.nanmean(v, axis=1), counts) for m, v in table.items()}


def _cell(stat: dict) -> str:
    if stat is None or stat.get("mean") is None:
        return "–"
    return f"{stat['mean']:.2f} ({stat['lo']:.2f}–{stat['hi']:.2f})"


def table(rows: list[tuple[str, str, dict]]) -> str:
    lines = ["| images | oracle | " + " | ".join(METRICS) + " |", "|" + "---|" * (len(METRICS) + 2)]
    for label, oracle, stats in rows:
        lines.append(f"| {label} | {oracle} | " + " | ".join(_cell(stats.get(m)) for m in METRICS) + " |")
    return "\n".join(lines)


def read_descriptions(world: World, path: Path = DESCRIPTIONS) -> list[tuple[str, int]]:
    """(prompt, emoji index) pairs from the descriptions file; a name not in the world is an error."""
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        prompt, _, name = line.partition("\t")
        if name not in world.index:
            raise SystemExit(f"error: {path}, line {number}: {name!r} is not an emoji of the world")
        out.append((prompt, world.index[name]))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Measure a Würstchen run on the emoji world: does each image show the "
                                            "emoji its prompt names (two oracles), and how close is the "
                                            "distribution of images to real renders.")
    p.add_argument("--run", default=str(SHIPPED_EMOJI),
                   help="folder with train.py's stage_a/b/c.pt or exported .safetensors (default: weights/emoji)")
    for s in "abc":
        p.add_argument(f"--stage-{s}", help=f"Stage {s.upper()} checkpoint (default RUN/stage_{s}.pt or .safetensors)")
    p.add_argument("--weights", choices=["ema", "model"], default="ema", help="which weights of the checkpoints")
    p.add_argument("--no-generation", action="store_true", help="only the calibration rows (no Stage C needed)")
    p.add_argument("--n", type=positive_int, default=400, help="emoji of the names set (training emoji)")
    p.add_argument("--k", type=positive_int, default=2, help="images per prompt")
    p.add_argument("--n-held-out", type=int, default=None, help="held-out pairs scored (default: all of them)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generation noise")
    p.add_argument("--prior-steps", type=positive_int, help="linear Stage C steps (default: the released 29-call list)")
    p.add_argument("--decoder-steps", type=positive_int, default=STAGE_B_STEPS, help="linear Stage B steps")
    p.add_argument("--prior-guidance", type=guidance_value, default=4.0, help="Stage C guidance (on for > 1)")
    p.add_argument("--decoder-guidance", type=guidance_value, default=0.0, help="Stage B guidance (on for > 1)")
    p.add_argument("--batch", type=positive_int, default=64, help="images per generation batch")
    p.add_argument("--bootstrap", type=positive_int, default=1000, help="bootstrap resamples")
    p.add_argument("--cache-dir", default="runs/oracle_cache", help="where the CNN oracle is kept once trained")
    p.add_argument("--oracle-views", type=positive_int, default=OracleConfig.views, help="renders per emoji")
    p.add_argument("--oracle-epochs", type=positive_int, default=OracleConfig.epochs, help="its epochs")
    p.add_argument("--json", help="where to write the results (default RUN/eval_emoji.json; runs/eval_emoji_shipped"
                                  ".json for weights/emoji)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ... (the oracles run on the CPU)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--quiet", action="store_true", help="print the tables only")
    args = p.parse_args(argv)
    if args.n < 4:
        p.error(f"--n {args.n}: expected at least 4 emoji (the distribution metrics need a spread)")
    if args.n_held_out is not None and args.n_held_out < 0:
        p.error(f"--n-held-out {args.n_held_out}: expected 0 (none) or more")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    log, device = logger(args.quiet), eval_device(args.device)
    t_start, timings = time.time(), {}
    run = Path(args.run)
    paths, vqgan, stage_b_model, prior, enc_b, enc_c = load_models(args, run, device)
    decoder, compressor = stage_b_model.decoder, stage_b_model.compressor
    side = getattr(prior if prior is not None else stage_b_model, "train_side", None) or 64
    if valid_side(side, decoder.config) != side:
        raise SystemExit(f"error: the decoder cannot make {side}² images")

    # --- prompts, from seeds training does not use ---
    t = time.time()
    world = World()
    seen = [i for i, e in enumerate(world.emoji) if e.name not in world.held_out]
    rng = random.Random(EVAL_SEED)
    names = rng.sample(seen, min(args.n, len(seen)))
    captions = [emoji_caption(world.emoji[i], rng) for i in names]
    held = sorted(world.index[name] for name in world.held_out)
    if args.n_held_out is not None:
        held = random.Random(EVAL_SEED + 1).sample(held, min(args.n_held_out, len(held)))
    held_prompts = [world.emoji[i].name for i in held]
    descriptions = read_descriptions(world)
    if prior is None:
        held, descriptions = [], []
    real = render(world, names, side, EVAL_SEED)
    reference = render(world, names, side, REFERENCE_SEED)
    n, k = len(names), args.k
    log(f"evaluate_emoji: {run} · {side} px · {len(world.emoji):,} emoji · {n} names × {k} images, "
        f"{len(held)} held-out pairs, {len(descriptions)} descriptions · {device}")

    oracles = {"CNN": load_or_train_oracle(world, OracleConfig(views=args.oracle_views, epochs=args.oracle_epochs),
                                           Path(args.cache_dir), log),
               "nearest": NearestOracle(world, side)}
    timings["oracles"] = time.time() - t

    # --- Stage A and Stage A+B on the real renders ---
    t = time.time()
    with torch.inference_mode():
        recon = torch.cat([vqgan.decode(vqgan.encode(real[i:j].to(device))).float().clamp(0, 1).cpu()
                           for i, j in batched(n, args.batch)])
        decoded = []
        for b, (i, j) in enumerate(batched(n, args.batch)):
            text_b, text_b_uncond = encode_prompts(enc_b, captions[i:j], device)
            decoded.append(decode_semantic(decoder, vqgan, compressor(real[i:j].to(device)), text_b, text_b_uncond,
                                           side, linear_timesteps(args.decoder_steps), args.decoder_guidance,
                                           torch.Generator(device).manual_seed(args.seed * 1000 + 500 + b),
                                           device).cpu())
        decoded = torch.cat(decoded)
    timings["stage A and A+B on real renders"] = time.time() - t

    # --- text → image ---
    if prior is not None:
        t = time.time()
        gen = lambda prompts, offset: generate_images(prior, decoder, vqgan, enc_c, enc_b, prompts, k, side, args,
                                                      device, offset, log)
        generated = gen(captions, 0)
        generated_held = gen(held_prompts, 700) if held else None
        generated_desc = gen([p for p, _ in descriptions], 900)
        timings["generation"] = time.time() - t

    # --- scoring ---
    t = time.time()
    counts = bootstrap_counts(n, args.bootstrap, seed=1)
    sets = [("real", "real renders", real, names, 1, counts),
            ("stage_a", "Stage A reconstructions", recon, names, 1, counts),
            ("stage_ab", "Stage A+B from the real semantic latent (ceiling)", decoded, names, 1, counts),
            ("shuffled", "real renders, shuffled prompts (chance)", real, derange(names, seed=3), 1, counts)]
    if prior is not None:
        sets.insert(3, ("generated", "generated: names and templates", generated, names, k, counts))
        if held:
            sets.append(("held_out", "generated: held-out (emoji, tone) pairs", generated_held, held, k,
                         bootstrap_counts(len(held), args.bootstrap, seed=2)))
        sets.append(("descriptions", "generated: descriptions", generated_desc, [i for _, i in descriptions], k,
                     bootstrap_counts(len(descriptions), args.bootstrap, seed=4)))
    results_alignment, rows = {}, []
    for key, label, images, targets, kk, cnt in sets:
        results_alignment[key] = {"label": label, "images_per_prompt": kk, "prompts": len(targets)}
        for name, oracle in oracles.items():
            results_alignment[key][name] = summarise(score_images(oracle, world, images, targets, kk), cnt)
            rows.append((label, name, results_alignment[key][name]))
    timings["scoring"] = time.time() - t

    # --- distribution metrics in the CNN oracle's feature space, against other renders of the same emoji ---
    cnn = oracles["CNN"]
    ref = cnn.features(reference)
    compare = {"real renders (floor)": real, "Stage A reconstructions": recon,
               "Stage A+B from the real semantic latent (ceiling)": decoded}
    if prior is not None:
        compare["generated (first image per prompt)"] = generated[::k]
    distribution = {label: {"n": len(x), "fd_oracle": frechet_features(ref, cnn.features(x)),
                            "kid_oracle": kid(ref, cnn.features(x))} for label, x in compare.items()}

    # --- print and write ---
    cnn_info = {key: v for key, v in cnn.info.items() if not key.startswith("feature_")}
    dist_lines = ["| images, against other renders of the same emoji | n | FD-oracle | KID-oracle ×10³ |",
                  "|---|---|---|---|"]
    for label, m in distribution.items():
        kid_text = "–" if m["kid_oracle"]["mean"] is None else \
            f"{m['kid_oracle']['mean'] * 1e3:.2f} ± {m['kid_oracle']['std'] * 1e3:.2f}"
        dist_lines.append(f"| {label} | {m['n']} | {m['fd_oracle']:.2f} | {kid_text} |")
    report = "\n\n".join([
        f"Which emoji does each image show? Per image, mean (95% bootstrap CI over prompts), ranked among all "
        f"{len(world.emoji):,} emoji (chance top-1 {1 / len(world.emoji):.4f}); base and tone: skin-tone emoji "
        f"only. {n} names, {k} images each; {len(held)} held-out pairs; {len(descriptions)} descriptions.",
        table(rows),
        f"CNN oracle: top-1 {cnn_info['top-1 on fresh renders']:.3f} on a fresh render of each emoji, "
        f"{cnn_info['top-1 on fresh renders, blurred']:.3f} blurred; tone {cnn_info['tone on fresh renders']:.3f}.",
        "Distribution metrics on the CNN oracle's features (comparable only between runs with the same oracle).",
        "\n".join(dist_lines)])
    print(report)
    results = {"run": str(run), "checkpoints": {s: str(p) for s, p in paths.items()}, "weights": args.weights,
               "settings": {"size": side, "emoji": len(world.emoji), "names": n, "images_per_prompt": k,
                            "held_out": len(held), "descriptions": len(descriptions), "seed": args.seed,
                            "eval_seed": EVAL_SEED, "reference_seed": REFERENCE_SEED,
                            "prior_steps": args.prior_steps or "released 29-call list",
                            "decoder_steps": args.decoder_steps, "prior_guidance": args.prior_guidance,
                            "decoder_guidance": args.decoder_guidance, "bootstrap": args.bootstrap},
               "oracles": {"CNN": cnn_info, "nearest": {"side": NEAREST_SIDE, "scales": list(NEAREST_SCALES)}},
               "alignment": results_alignment, "distribution": distribution,
               "timings_s": {key: round(v, 1) for key, v in timings.items()} | {"total": round(time.time() - t_start, 1)}}
    shipped = run.resolve() == SHIPPED_EMOJI
    out = Path(args.json) if args.json else (Path("runs/eval_emoji_shipped.json") if shipped else run / "eval_emoji.json")
    save_results(out, results, [real, recon, decoded], None if prior is None else generated, k, captions, log,
                 t_start)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
