"""Usage:
    python train.py --stage {a,b,c} --preset tiny --out runs/tiny          # A first, then B, then C
    python train.py --stage c --preset tiny --out runs/tiny --resume --steps 16000
    torchrun --nproc_per_node 2 train.py --stage c --preset small --data my_images --out runs/mine

Train one Würstchen stage. The order is A → B → C, as in the paper (Sec. 4): Stage B trains on the frozen Stage
A's latents and learns its semantic compressor jointly; Stage C trains on the semantic latents of Stage B's frozen
compressor.

- Every field of the stage's config (stage_x.py) and of the training config below is a flag (`--depth 6`,
  `--c-hidden 32,64,64`, `--lr 3e-4`); the preset gives the defaults.
- Precision: bf16 autocast on a CUDA device that supports it, fp16 only with `--precision fp16` (with a
  GradScaler; this model family is known to overflow in fp16), fp32 on CPU. TF32 is on.
- AdamW with linear warm-up, gradient accumulation and clipping, the released EMA scheme, a tqdm bar, a JSONL log,
  an image grid every N steps, and atomic checkpoints holding everything `--resume` needs to continue exactly.
- Under `torchrun` it runs DDP (detected from the environment); otherwise on one device.
"""
import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import stage_a
import stage_b
import stage_c
from data import DEMO_PROMPTS, HELD_OUT_PAIRS, ImageFolderDataset, ShapesDataset, UndecodableFolder
from sample import (OneLineParser, device_value, encode_prompts, first_line, generate, load_stage, run_paths,
                    save_grid, valid_side)
from schedule import linear_timesteps, sample

STAGES = {"a": stage_a, "b": stage_b, "c": stage_c}


# ----------------------------------------------------------------------------------------------------------------
# Training config and presets
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000            # optimizer steps
    batch_size: int = 32         # images per device per micro-batch
    grad_accum: int = 1          # micro-batches per optimizer step
    lr: float = 1e-4             # AdamW learning rate after warm-up (official: 1e-4)
    warmup: int = 100            # linear warm-up steps (official: 10,000)
    lr_decay: int = 0            # then linear decay to 0 over the last this many steps (0: constant, as released);
                                 # a count, not a share: a preset's decay spans all of a run of fewer --steps
    weight_decay: float = 0.01   # AdamW's default
    grad_clip: float = 1.0       # max gradient norm (official: 1.0)
    ema_start: int = 100         # before this step the EMA is a copy of the model (official: 5,000)
    ema_every: int = 1           # then every this many steps ... (official: 100)
    ema_beta: float = 0.99       # ... ema = beta·ema + (1 − beta)·model (official: 0.9)
    image_size: int = 64         # training images are this square size
    log_every: int = 25          # JSONL log interval (steps)
    sample_every: int = 500      # image grid interval (steps); a grid is also written at the end
    save_every: int = 250        # checkpoint interval (steps); a checkpoint is also written at the end
    caption_dropout: float = 0.05  # captions replaced by "" so that classifier-free guidance works (official 5%)
    semantic_dropout: float = 0.05  # Stage B: semantic latents replaced by zeros, for the same reason
    max_bad_steps: int = 20      # stop after this many non-finite losses in a row
    dataset_size: int = 0        # built-in shapes: 0 = an endless stream of new images; N = the first N, in epochs
    cache_frozen: bool = False   # keep frozen encoders' outputs per sample (a finite data set only; needs RAM)
    hold_out: bool = True        # built-in shapes: leave data.HELD_OUT_PAIRS out (for experiments/evaluate.py)
    two_object_prob: float = 0.3  # built-in shapes: the share of scenes with two objects, the rest have one


OFFICIAL = dict(lr=1e-4, warmup=10_000, ema_start=5000, ema_every=100, ema_beta=0.9, grad_clip=1.0)
TRAIN_PRESETS = {
    # The shipped weights (weights/shapes/, made by scripts/train_weights.sh): 64² shapes, under 2 hours on 2 CPU
    # cores. Departures from the earlier 20-minute demo recipe (A 600, B 1,500, C 1,400 steps), each measured:
    # - A 4,000 steps: at 600, Stage A's own reconstructions scored 0.62-0.70 single-object by the analytic oracle
    #   (CNN 0.94-0.96), and its MSE was still falling at 2,000 (0.0017). Its GAN term is left off for these
    #   weights (scripts/train_weights.sh: --no-adversarial): switched on at step 2,000 at this learning rate, it
    #   raised the MSE to 0.011-0.014 within 600 steps and drew a checkerboard over flat backgrounds.
    #   A linear decay over 1,000 more steps (resumed at 4,000) gained 1.3 dB (30.1 to 31.4) but not a shape: its
    #   reconstructions read 0.76 single-object by the analytic oracle against 0.74 (--no-generation --n 200),
    #   large stars still losing their points; an L1 term as well gave 0.71. Neither is used (docs/shipped.md).
    # - B 16,000 steps: its ceiling (experiments/evaluate.py --no-generation, single object, CNN, small / large
    #   shapes) rose
    #   from 0.34 / 0.44 at 1,500 steps to 0.82 / 0.88 at 12,000, about +0.15 per doubling, still climbing.
    #   Then 2,000 steps of linear decay (lr_decay; resumed at 16,000, 8 minutes): the ceiling (--no-generation
    #   --n 200, analytic / CNN) went from 0.55 / 0.91 to 0.61 / 0.96 single object, 0.69 / 0.81 to 0.70 / 0.88
    #   position and 0.35 / 0.62 to 0.38 / 0.74 colour binding; 34.3 to 35.8 dB against Stage A's reconstruction.
    # - C 16,000 steps on 16,384 captions: resumed from 1,400 to 5,000 steps on a 12k-step B, position went from
    #   0.08 (chance) to 0.51 and single object (CNN) from 0.61 to 0.81. The larger caption set (4,096 before)
    #   keeps 16,000 steps × 64 at 62 epochs, not 250, for the two-object captions' sake: a choice, not measured
    #   apart (its first pass, which caches the frozen features, costs about 2 of Stage C's 28 minutes).
    #   Not kept, each within its interval of this recipe without text_conv (position 0.53 / 0.57, binding
    #   0.14 / 0.30): 12,000 steps (on the 16,000-step B: 0.55 / 0.58, 0.17 / 0.34), a decay over the last 2,000
    #   (0.54 / 0.56, 0.14 / 0.29), c = 128 for 5,000 steps, about the same time (0.54 / 0.57, 0.19 / 0.32), and
    #   two_object_prob 0.6 (0.52 / 0.56, 0.16 / 0.37; single object 0.52 / 0.88). Depth 8 for 4,000 steps, the
    #   same time, placed objects far worse (position 0.21 / 0.23).
    #   Kept (2026-12-01): the model's text_conv 2 (stage_c.PRESETS), which mixes neighbouring caption tokens:
    #   binding 0.30 to 0.47 by the CNN oracle, position 0.57 to 0.62 (on the shipped A and B, one thread).
    #   Kept (2026-12-01, later): 16,000 steps instead of 8,000. With text_conv, the same run resumed from 8,000 to
    #   16,000 (one thread) raised colour binding from 0.47 to 0.54 (CNN) and, for the held-out pairs, from 0.53 to
    #   0.64; single object (0.93) and position (0.61) stayed. scripts/demo.sh stops at 8,000 to fit 20 minutes.
    #   (Analytic figures above are from before 2026-12-01's change of that oracle: docs/evaluation.md.)
    # Result (docs/shipped.md): single object 0.77 / 0.94 (analytic / CNN oracle), position 0.57 / 0.62, colour
    # binding 0.39 / 0.60, against 0.32, 0.11 and 0.03 by the CNN oracle for the earlier recipe; 113 minutes.
    # scripts/demo.sh trains 8,000 steps of this Stage C on the shipped A and B; with --from-scratch, all three
    # stages with fewer --steps.
    "tiny": {"a": TrainConfig(steps=4000, batch_size=16, lr=4e-3, warmup=50, ema_start=300),
             "b": TrainConfig(steps=18_000, batch_size=32, lr=2e-3, warmup=100, lr_decay=2000, ema_start=500,
                              dataset_size=4096, cache_frozen=True),
             "c": TrainConfig(steps=16_000, batch_size=64, lr=1e-3, warmup=100, ema_start=500, dataset_size=16_384,
                              cache_frozen=True)},
    # One consumer GPU, 256² images.
    "small": {s: TrainConfig(steps=50_000, batch_size=32, lr=3e-4, warmup=1000, ema_start=2000, ema_every=10,
                             ema_beta=0.99, image_size=256, log_every=100, sample_every=2000, save_every=2000)
              for s in "abc"},
    # The released recipe (Stage C: 918k steps at batch 1280 for v2, at 1024²).
    "paper": {s: TrainConfig(steps=918_000, batch_size=8, image_size=1024, log_every=100, sample_every=5000,
                             save_every=5000, **OFFICIAL) for s in "abc"},
}


# ----------------------------------------------------------------------------------------------------------------
# Command line: fixed flags, then one flag per config field, generated from the dataclasses
# ----------------------------------------------------------------------------------------------------------------
def parse_value(text: str, default):
    """A flag's text as the type of the field's default: ints, floats, bools, and tuples ("32,64,64" or JSON)."""
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise argparse.ArgumentTypeError(f"{text!r}: expected true or false")
        return text.lower() in ("true", "1")
    if isinstance(default, tuple):
        if text.strip().startswith("["):
            def tuples(v):
                return tuple(tuples(x) for x in v) if isinstance(v, list) else v
            return tuples(json.loads(text))
        kind = type(default[0]) if default else int
        return tuple(parse_value(x, kind()) if kind is not bool else parse_value(x, False) for x in text.split(","))
    try:
        return type(default)(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a {type(default).__name__}") from None


def field_flags(parser, group_name: str, config) -> dict:
    """One --flag per dataclass field; returns {dest: field name}."""
    group, dests = parser.add_argument_group(group_name), {}
    for f in dataclasses.fields(config):
        default = getattr(config, f.name)
        group.add_argument("--" + f.name.replace("_", "-"), dest=f"field_{f.name}", default=None, metavar="V",
                           type=lambda s, d=default: parse_value(s, d), help=f"(preset: {default})")
        dests[f"field_{f.name}"] = f.name
    return dests


def parse_args(argv=None):
    # --help is added last, so that it lists the flags of the chosen stage's config too.
    p = OneLineParser(description="Train one Würstchen stage (A, then B, then C).",
                      formatter_class=argparse.RawTextHelpFormatter, add_help=False)
    p.add_argument("--stage", choices=["a", "b", "c"], required=True, help="which stage to train")
    p.add_argument("--preset", choices=["tiny", "small", "paper"], default="tiny",
                   help="model and training defaults (tiny: CPU demo, small: one GPU, paper: released)")
    p.add_argument("--out", default="runs/tiny", help="folder for checkpoints, logs and grids")
    p.add_argument("--data", default="shapes",
                   help="'shapes' (built-in captioned shapes) or a folder of images with captions\n"
                        "(a .txt per image or a metadata.jsonl with file_name/text)")
    p.add_argument("--stage-a", default=None, help="Stage A checkpoint (stages b, c; default OUT/stage_a.pt)")
    p.add_argument("--stage-b", default=None, help="Stage B checkpoint (stage c; default OUT/stage_b.pt)")
    p.add_argument("--text-encoder", default="minilm",
                   help="'minilm' (offline all-MiniLM-L6-v2) or a local CLIP folder (stages b, c)")
    p.add_argument("--text-length", type=int, default=32, help="text tokens per caption (CLIP uses 77)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/stage_X.pt exactly where it stopped")
    p.add_argument("--seed", type=int, default=0, help="seed for data, initialisation and noise")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="auto: bf16 autocast on a capable GPU, fp32 on CPU; fp16 needs asking for")
    p.add_argument("--no-adversarial", action="store_true", help="stage a: never switch on the GAN term")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar (logs still go to the JSONL file)")
    known, _ = p.parse_known_args(argv)
    model_defaults = STAGES[known.stage].PRESETS[known.preset]
    train_defaults = TRAIN_PRESETS[known.preset][known.stage]
    model_dests = field_flags(p, f"Stage {known.stage.upper()} model (stage_{known.stage}.py)", model_defaults)
    train_dests = field_flags(p, "training", train_defaults)
    p.add_argument("-h", "--help", action="help", help="show this help, with the flags of --stage's config")
    args = p.parse_args(argv)
    overrides = lambda dests: {name: getattr(args, d) for d, name in dests.items() if getattr(args, d) is not None}
    try:
        model_cfg = dataclasses.replace(model_defaults, **overrides(model_dests))
        train_cfg = dataclasses.replace(train_defaults, **overrides(train_dests))
    except (ValueError, TypeError, ArithmeticError) as e:
        p.error(f"{e} (model flags: {flags_changed(model_defaults, overrides(model_dests))})")
    for name in ("steps", "batch_size", "grad_accum", "image_size", "log_every", "sample_every", "save_every",
                 "ema_every", "max_bad_steps"):
        if getattr(train_cfg, name) <= 0:
            p.error(f"--{name.replace('_', '-')} {getattr(train_cfg, name)}: expected a positive integer")
    for name in ("warmup", "lr_decay", "ema_start", "dataset_size"):
        if getattr(train_cfg, name) < 0:
            p.error(f"--{name.replace('_', '-')} {getattr(train_cfg, name)}: expected an integer ≥ 0")
    for name, low, high in (("lr", 0, math.inf), ("grad_clip", 0, math.inf), ("weight_decay", 0, math.inf),
                            ("ema_beta", 0, 1), ("caption_dropout", 0, 1), ("semantic_dropout", 0, 1),
                            ("two_object_prob", 0, 1)):
        value = getattr(train_cfg, name)
        if not (low <= value <= high and math.isfinite(value)) or (name in ("lr", "grad_clip") and value == 0):
            expected = f"a number in [{low}, {high}]" if high < math.inf else \
                f"a finite number {'>' if name in ('lr', 'grad_clip') else '≥'} 0"
            p.error(f"--{name.replace('_', '-')} {value}: expected {expected}")
    for name, value in dataclasses.asdict(model_cfg).items():   # a negative width or a NaN fails deep in torch
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, int) and not isinstance(v, bool) and v < 0:
                p.error(f"--{name.replace('_', '-')} {v}: expected an integer ≥ 0")
            if isinstance(v, float) and not math.isfinite(v):
                p.error(f"--{name.replace('_', '-')} {v}: expected a finite number")
    if not 0 <= args.seed < 2 ** 32:      # step_generator multiplies the seed; torch takes at most 2^64 − 1
        p.error(f"--seed {args.seed}: expected an integer from 0 to 2^32 − 1")
    if args.text_length <= 0:
        p.error(f"--text-length {args.text_length}: expected a positive integer")
    return args, model_cfg, train_cfg


# ----------------------------------------------------------------------------------------------------------------
# Small pieces: device and precision, distributed set-up, data, EMA, learning rate, atomic saving
# ----------------------------------------------------------------------------------------------------------------
def setup_distributed():
    """(rank, world size, local rank); DDP only when launched by torchrun, which sets these variables."""
    if "RANK" not in os.environ:
        return 0, 1, 0
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return rank, world, local


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        return device_value(name)             # a device this machine lacks fails here, not inside torch
    except argparse.ArgumentTypeError as e:
        raise SystemExit(f"error: --device {e}") from None


def autocast_for(device: torch.device, precision: str):
    """One autocast context for the whole run; bf16 on CPU would be 20–30× slower (no native bf16), so fp32."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp32":
        return precision, nullcontext()
    return precision, torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


class Batches:
    """Batch i is a fixed function of (seed, i, rank): a resumed run sees exactly the data it would have seen.
    Returns (images (B, 3, S, S) in [0, 1], captions, dataset indices)."""

    def __init__(self, args, cfg: TrainConfig, rank: int, world: int):
        self.rank, self.world, self.batch_size = rank, world, cfg.batch_size
        if args.data == "shapes":
            endless = cfg.dataset_size == 0                               # then every batch is new images
            self.dataset = ShapesDataset(length=2 ** 62 if endless else cfg.dataset_size, size=cfg.image_size,
                                         seed=args.seed, two_object_prob=cfg.two_object_prob,
                                         exclude=HELD_OUT_PAIRS if cfg.hold_out else ())
        else:
            self.dataset = ImageFolderDataset(args.data, size=cfg.image_size)
        self.finite = args.data != "shapes" or cfg.dataset_size > 0
        self.perms, self.seed = {}, args.seed

    def index(self, i: int) -> int:
        if not self.finite:
            return i
        n = len(self.dataset)
        epoch = i // n
        if epoch not in self.perms:                                       # a fresh permutation per epoch
            self.perms = {epoch: torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))}
        return int(self.perms[epoch][i % n])

    def __call__(self, micro_step: int):
        first = (micro_step * self.world + self.rank) * self.batch_size
        indices = [self.index(first + k) for k in range(self.batch_size)]
        items = [self.dataset[i] for i in indices]
        return torch.stack([x for x, _ in items]), [c for _, c in items], indices


class FrozenFeatures:
    """What a frozen model computes per sample (caption tokens, latents). On a finite data set it is computed once
    and kept on the CPU, so the frozen encoders run once per sample, not once per epoch. It is computed in fixed
    blocks of consecutive sample indices, so the values never depend on which batch first asked for them, and a
    resumed run sees bit-identical features."""

    BLOCK = 64

    def __init__(self, batches: Batches, compute, enabled: bool):
        self.batches, self.compute, self.enabled, self.store = batches, compute, enabled, {}

    def _items(self, indices):
        items = [self.batches.dataset[i] for i in indices]
        return torch.stack([x for x, _ in items]), [c for _, c in items]

    @torch.no_grad()
    def __call__(self, indices: list[int], images, captions, device) -> torch.Tensor:
        """Features of the batch (images, captions), whose samples are `indices` of the data set."""
        if not self.enabled:
            return self.compute(images, captions).to(device)
        for block in sorted({i // self.BLOCK for i in indices if i not in self.store}):
            ids = list(range(block * self.BLOCK, min((block + 1) * self.BLOCK, len(self.batches.dataset))))
            for i, value in zip(ids, self.compute(*self._items(ids)).cpu()):
                self.store[i] = value
        return torch.stack([self.store[i] for i in indices]).to(device)


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, step: int, cfg: TrainConfig):
    """The released scheme: a plain copy until ema_start, then every ema_every steps ema ← β·ema + (1 − β)·model."""
    if step < cfg.ema_start:
        ema.load_state_dict(model.state_dict())
    elif step % cfg.ema_every == 0:
        for e, m in zip(ema.state_dict().values(), model.state_dict().values()):
            if e.dtype.is_floating_point:
                e.lerp_(m, 1 - cfg.ema_beta)
            else:
                e.copy_(m)                                                # BatchNorm's batch counter


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Warm-up, then constant; with lr_decay, falling linearly to 0 over the last lr_decay steps. Until the decay
    starts the rate does not depend on the total, so a run resumed before that point with more --steps (and the
    decay) equals one trained for that many steps from the start."""
    decay = min(1.0, (cfg.steps - step) / cfg.lr_decay) if cfg.lr_decay else 1.0
    return cfg.lr * min(1.0, (step + 1) / max(cfg.warmup, 1)) * decay


def atomic_save(obj, path: Path):
    """Write to a temporary file in the same folder, then rename: a crash or a failed write (disk full) leaves the
    old checkpoint whole. fsync before the rename, so that after a power cut the new name never points at a file
    whose data had not reached the disk."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):    # the original error is the one to report
            tmp.unlink(missing_ok=True)
        raise


def open_log(path: Path, step: int):
    """The JSONL log, keeping only records up to `step`: a resumed run logs again the steps that its checkpoint
    had not kept (and a crash may have cut the last line short); a fresh run starts a fresh log."""
    kept = []
    if step and path.exists():
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(line + "\n")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)
    return open(path, "a")


def one_line(fn, *args):
    """fn(*args), exiting with one line on a ValueError: what our loaders and data sets raise for a bad file,
    folder or setting, with a message that names it."""
    try:
        return fn(*args)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def step_generator(seed: int, step: int, rank: int, device) -> torch.Generator:
    """Noise, t and dropout draws of a step depend only on (seed, step, rank), so resuming repeats them exactly.
    Ranks are a prime apart that no step count reaches (step·101 < 1,000,000,007 for 9.9M micro-steps), so no two
    ranks share a step's draws. Rank 0's seeds, those of every single-process run, are what they always were; DDP
    checkpoints from before this change resume with other draws on ranks ≥ 1."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step * 101 + rank * 1_000_000_007)


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------------------------
# The three stages as training tasks: what is trained, what is frozen, the loss of a batch, and the grid
# ----------------------------------------------------------------------------------------------------------------
class LossModule(torch.nn.Module):
    """DDP synchronises gradients through forward(); ours routes forward() to the stage's own loss()."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model.loss(*args, **kwargs)


def flags_changed(preset, changed: dict) -> str:
    """The model flags given that differ from the preset: where to look when a config cannot build its model."""
    text = lambda v: ",".join(map(str, v)) if isinstance(v, tuple) else str(v)
    diff = [f"--{k.replace('_', '-')} {text(v)}" for k, v in changed.items() if getattr(preset, k) != v]
    return " ".join(diff) or "none, the preset's"


def build_model(cls, cfg, preset, device):
    """cls(cfg) on the device, or one line naming the flags that stop it (a zero width, say)."""
    try:
        return cls(cfg).to(device)
    except (ValueError, RuntimeError, ArithmeticError) as e:
        changed = flags_changed(preset, dataclasses.asdict(cfg))
        raise ValueError(f"the {cls.__name__} config does not build a model ({first_line(e)}); model flags: "
                         f"{changed}") from None


def load_frozen(stage: str, given, out: Path, device):
    """A frozen stage that this one trains on: --stage-x PATH, or OUT/stage_x.pt from an earlier train.py run (or
    OUT/stage_x.safetensors, as scripts/demo.sh puts the shipped Stages A and B there)."""
    path = Path(given) if given else run_paths(out, stages=stage)[stage]
    if not given and not path.exists():
        raise ValueError(f"no Stage {stage.upper()} checkpoint at {path}; expected one from an earlier run "
                         f"(train.py --stage {stage} --out {out}), or pass --stage-{stage} PATH")
    return load_stage(stage, path, device)


def check_multiple(side: int, multiple: int, why: str):
    if side % multiple:
        raise ValueError(f"--image-size {side}: expected a multiple of {multiple} ({why}), e.g. "
                         f"{max(multiple, side // multiple * multiple)} or {(side // multiple + 1) * multiple}")


class TaskA:
    def __init__(self, args, cfg, train_cfg, device, out: Path, batches: Batches):
        side = train_cfg.image_size
        check_multiple(side, 2 ** cfg.levels, f"Stage A's f{2 ** cfg.levels} with levels={cfg.levels}")
        if not args.no_adversarial and 2 ** cfg.disc_depth >= side:   # else it fails when the GAN term starts
            raise ValueError(f"--image-size {side}: expected more than {2 ** cfg.disc_depth} px for a discriminator "
                             f"of --disc-depth {cfg.disc_depth}; lower it or pass --no-adversarial")
        preset = stage_a.PRESETS[args.preset]
        self.model = build_model(stage_a.StageA, cfg, preset, device)
        self.disc = None if args.no_adversarial else build_model(stage_a.Discriminator, cfg, preset, device)
        self.frozen = []

    def prepare(self, batches, device):
        """A fresh run starts its codebook from encoder outputs of the first batches (see VectorQuantizer.init_from)."""
        with torch.no_grad():
            images = torch.cat([batches(i)[0] for i in range(4)]).to(device)
            self.model.vquantizer.init_from(self.model.encode_raw(images), torch.Generator().manual_seed(0))

    def describe(self, cfg, train_cfg):
        s = train_cfg.image_size
        return (f"Stage A: 3×{s}×{s} image → {cfg.c_latent}×{s // 4}×{s // 4} latent "
                f"(f4, {3 * 4 * 4 / cfg.c_latent:.0f}:1 by elements)")

    def loss(self, model, images, captions, indices, gen, step):
        return model(images, self.disc, step)

    @torch.no_grad()
    def grid(self, ema, images, captions):
        recon = ema.decode(ema.encode(images)).clamp(0, 1)                # un-quantized, as Würstchen v2 uses it
        return [images, recon]


def load_text_encoder(args, width: int, flag: str, device):
    from text import TextEncoder          # imports transformers (5 s): only stages b and c need it
    encoder = TextEncoder.from_name_or_path(args.text_encoder, max_length=args.text_length).to(device)
    if encoder.width != width:
        raise SystemExit(f"error: the text encoder gives {encoder.width}-wide tokens but {flag} is {width}; "
                         f"pass {flag} {encoder.width}")
    return encoder


class TaskB:
    def __init__(self, args, cfg, train_cfg, device, out: Path, batches: Batches):
        self.vqgan = load_frozen("a", args.stage_a, out, device)
        f = 2 ** self.vqgan.config.levels
        check_multiple(train_cfg.image_size, f * cfg.latent_multiple,
                       f"Stage A's f{f} latent must divide into the decoder's {len(cfg.c_hidden)} levels")
        self.text = load_text_encoder(args, cfg.c_text, "--c-text", device)
        self.uncond = self.text.encode([""], device)
        self.model = build_model(stage_b.StageB, cfg, stage_b.PRESETS[args.preset], device)
        self.frozen, self.device = [self.vqgan, self.text.model], device
        cache = train_cfg.cache_frozen and batches.finite
        self.latents = FrozenFeatures(batches, lambda x, c: self.vqgan.encode(x.to(device)), cache)
        self.text_tokens = FrozenFeatures(batches, lambda x, c: self.text.encode(c, device), cache)

    def describe(self, cfg, train_cfg):
        s = train_cfg.image_size
        hc, wc = self.model.compressor.latent_size(s, s)
        return (f"Stage B: {cfg.c_in}×{s // 4}×{s // 4} Stage A latent from a {cfg.c_semantic}×{hc}×{wc} semantic "
                f"latent ({s / hc:.2f}× per side from pixels, {3 * s * s / (cfg.c_semantic * hc * wc):.1f}:1 by "
                f"elements)")

    def loss(self, model, images, captions, indices, gen, step):
        latents = self.latents(indices, images, captions, self.device)
        text = self.text_tokens(indices, images, captions, self.device)
        return model(latents, images, text, self.uncond, self.semantic_dropout, self.caption_dropout, gen)

    @torch.no_grad()
    def grid(self, ema, images, captions):
        """Rows: images, Stage A reconstructions, Stage B decodes from the semantic latent (12 steps)."""
        semantic = ema.compressor(images)
        text = self.text.encode(captions, self.device)
        latents = sample(ema.decoder, (images.shape[0], ema.config.c_in, images.shape[2] // 4, images.shape[3] // 4),
                         cond={"semantic": semantic, "text": text}, timesteps=linear_timesteps(12),
                         generator=torch.Generator(self.device).manual_seed(0), device=self.device)
        return [images, self.vqgan.decode(self.vqgan.encode(images)).clamp(0, 1),
                self.vqgan.decode(latents).clamp(0, 1)]


class TaskC:
    def __init__(self, args, cfg, train_cfg, device, out: Path, batches: Batches):
        self.vqgan = load_frozen("a", args.stage_a, out, device)
        stage_b_model = load_frozen("b", args.stage_b, out, device)
        side = train_cfg.image_size
        if valid_side(side, stage_b_model.decoder.config) != side:   # its sample grids go through the decoder
            raise ValueError(f"--image-size {side}: expected a size the Stage B decoder can make, e.g. "
                             f"{valid_side(side, stage_b_model.decoder.config)}")
        self.compressor, self.decoder = stage_b_model.compressor, stage_b_model.decoder
        self.text = load_text_encoder(args, cfg.c_cond, "--c-cond", device)
        self.uncond = self.text.encode([""], device)
        self.model = build_model(stage_c.Prior, cfg, stage_c.PRESETS[args.preset], device)
        self.frozen, self.device = [self.vqgan, stage_b_model, self.text.model], device
        cache = train_cfg.cache_frozen and batches.finite
        self.semantic = FrozenFeatures(batches, lambda x, c: self.compressor(x.to(device)), cache)
        self.text_tokens = FrozenFeatures(batches, lambda x, c: self.text.encode(c, device), cache)

    def describe(self, cfg, train_cfg):
        s = train_cfg.image_size
        hc, wc = self.compressor.latent_size(s, s)
        return (f"Stage C: text → {cfg.c_in}×{hc}×{wc} semantic latent ({s / hc:.2f}× per side, "
                f"{3 * s * s / (cfg.c_in * hc * wc):.1f}:1 by elements from pixels)")

    def loss(self, model, images, captions, indices, gen, step):
        semantic = self.semantic(indices, images, captions, self.device)
        text = self.text_tokens(indices, images, captions, self.device)
        return model(semantic, text, self.uncond, self.caption_dropout, gen)

    @torch.no_grad()
    def grid(self, ema, images, captions):
        """One row: text-to-image samples for the demo prompts."""
        side = images.shape[-1]
        text_c, text_c_uncond = encode_prompts(self.text, list(DEMO_PROMPTS), self.device)
        return [generate(ema, self.decoder, self.vqgan, text_c, text_c_uncond, text_c, text_c_uncond, side, side,
                         generator=torch.Generator(self.device).manual_seed(0), device=self.device)]


TASKS = {"a": TaskA, "b": TaskB, "c": TaskC}


# ----------------------------------------------------------------------------------------------------------------
# What the loop leans on: saving, skipped steps, BatchNorm statistics, the log
# ----------------------------------------------------------------------------------------------------------------
class Checkpointer:
    """Owns the checkpoint that --resume continues from: what goes in it, writing it atomically, and what is left
    when a write fails. Under DDP, rank 0 writes and every rank learns whether it could, so that none waits for it
    forever. `saved_step` is the step of the last checkpoint this run wrote or resumed from (None: none yet)."""

    def __init__(self, path: Path, meta: dict, model, ema, opt, scaler, disc, disc_opt, rank: int, world: int,
                 device):
        self.path, self.meta, self.rank, self.world, self.device = path, meta, rank, world, device
        self.model, self.ema, self.opt, self.scaler, self.disc, self.disc_opt = model, ema, opt, scaler, disc, disc_opt
        self.saved_step = None

    def restore(self, ckpt: dict) -> tuple[int, int]:
        """Load a checkpoint read by load_training_checkpoint into the live objects; returns (step, skipped)."""
        stage = self.meta["stage"]
        try:                              # the config came from the same file, so a mismatch means damage
            load_strict = STAGES[stage]._load_strict
            load_strict(self.model, ckpt["model"], f"stage {stage.upper()} (model weights)", self.path)
            load_strict(self.ema, ckpt["ema"], f"stage {stage.upper()} (EMA weights)", self.path)
            self.opt.load_state_dict(ckpt["optimizer"])
            if self.disc_opt is not None:
                self.disc.load_state_dict(ckpt["discriminator"])
                self.disc_opt.load_state_dict(ckpt["disc_optimizer"])
            if self.scaler.is_enabled():
                self.scaler.load_state_dict(ckpt["scaler"])
            step, skipped = int(ckpt["step"]), int(ckpt["skipped"])
            torch.set_rng_state(ckpt["rng"]["torch"])
            if self.device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
                torch.cuda.set_rng_state(ckpt["rng"]["cuda"], self.device)
        except KeyError as e:
            hint = "; the run used --no-adversarial, pass it again" if e.args[0] == "discriminator" else ""
            raise SystemExit(f"error: --resume: {self.path} has no {e.args[0]!r}{hint}") from None
        except (ValueError, RuntimeError, TypeError, AttributeError) as e:
            raise SystemExit(f"error: --resume: {self.path} does not fit this run ({first_line(e)})") from None
        self.saved_step = step
        return step, skipped

    def state(self, step: int, skipped: int) -> dict:
        return {"stage": self.meta["stage"], "step": step, "skipped": skipped, **self.meta,   # the earlier order
                "model": self.model.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.opt.state_dict(),
                "scaler": self.scaler.state_dict(),
                **({"discriminator": self.disc.state_dict(), "disc_optimizer": self.disc_opt.state_dict()}
                   if self.disc_opt is not None else {}),
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}}

    def save(self, step: int, skipped: int):
        """Write the checkpoint of `step`, or stop every rank with one line that says what is left."""
        error = None
        if self.rank == 0:
            try:
                atomic_save(self.state(step, skipped), self.path)
            except (OSError, RuntimeError) as e:     # torch reports a failed write (disk full) as a RuntimeError
                kept = f"the checkpoint of step {self.saved_step} is intact" if self.saved_step is not None else \
                    "the file there is left as it was" if self.path.exists() else "no checkpoint has been written"
                error = f"error: saving {self.path} at step {step} failed ({first_line(e)}); {kept}"
        if self.world > 1:
            failed = torch.tensor([error is not None], dtype=torch.int32, device=self.device)
            dist.broadcast(failed, 0)
            if failed.item() and error is None:
                raise SystemExit(f"error: rank {self.rank}: rank 0 could not save {self.path} at step {step}; "
                                 f"stopped")
        if error is not None:
            raise SystemExit(error)
        self.saved_step = step

    def stop_on_undecodable(self, e: UndecodableFolder, step: int, skipped: int):
        """A folder whose images no longer decode: no weight has changed this step, so save the steps done first."""
        if step and step != self.saved_step:
            self.save(step, skipped)
        kept = f"the checkpoint of step {self.saved_step} is in {self.path}" if self.saved_step is not None else \
            "no checkpoint has been written"
        raise SystemExit(f"error: {e}; stopped, and {kept}") from None


class BadSteps:
    """Counts non-finite steps in a row; stops the run, pointing at the last good checkpoint, after `limit`."""

    def __init__(self, limit: int, checkpointer: Checkpointer):
        self.limit, self.in_a_row, self.checkpointer = limit, 0, checkpointer

    def passed(self):
        self.in_a_row = 0

    def failed(self, step: int):
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            saved, path = self.checkpointer.saved_step, self.checkpointer.path
            kept = f"the last good checkpoint, of step {saved}, is kept" if saved is not None else \
                "no checkpoint was written by this run"
            raise SystemExit(f"error: {self.in_a_row} non-finite losses or gradients in a row (steps "
                             f"{step - self.in_a_row + 2}–{step + 1}); stopped, and {kept} in {path}. Try a lower "
                             f"--lr or --precision fp32.")


class Buffers:
    """The forward pass updates BatchNorm statistics even on a step that gets skipped or cut short, and a batch with
    NaN activations would leave NaN in them for good: a copy is taken before each step, to put back."""

    def __init__(self, *modules):
        self.buffers = [b for m in modules if m is not None for b in m.buffers()]

    def snapshot(self) -> list:
        return [b.detach().clone() for b in self.buffers]

    @torch.no_grad()
    def restore(self, saved: list):
        for b, before in zip(self.buffers, saved):
            b.copy_(before)


class JsonLog:
    """The JSONL log (rank 0 only). A failed write (say, a full disk) costs the log, never the training."""

    def __init__(self, path: Path, step: int, enabled: bool, warn):
        self.path, self.warn = path, warn
        try:
            self.file = open_log(path, step) if enabled else None
        except OSError as e:
            raise SystemExit(f"error: cannot write the log {path} ({first_line(e)})") from None

    def write(self, record: dict):
        if self.file is None:
            return
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as e:
            self.warn(f"warning: cannot write the log {self.path} ({first_line(e)}); training goes on without it")
            with contextlib.suppress(OSError):
                self.file.close()
            self.file = None


def write_grid(task, ema, batches: Batches, path: Path, device, warn):
    """Samples for the first 8 captions of batch 0 (the same every time); a grid is for looking at, so a failed
    write is a warning."""
    images, captions, _ = batches(0)
    try:
        save_grid(task.grid(ema, images[:8].to(device), captions[:8]), path)
    except OSError as e:
        warn(f"warning: cannot write the image grid {path} ({first_line(e)}); training goes on")


# ----------------------------------------------------------------------------------------------------------------
# One step, in pieces
# ----------------------------------------------------------------------------------------------------------------
def accumulate_gradients(task, loss_module, batches: Batches, scaler, autocast, step: int, cfg: TrainConfig,
                         seed: int, rank: int, world: int, device):
    """Forward and backward over the step's cfg.grad_accum micro-batches; DDP averages the gradients once, on the
    last. Returns the mean loss, the mean of the scalar loss parts, and the last micro-batch's images and parts
    (the discriminator's step uses them)."""
    total, logged = 0.0, {}
    for micro in range(cfg.grad_accum):
        images, captions, indices = batches(step * cfg.grad_accum + micro)
        images = images.to(device, non_blocking=True)
        gen = step_generator(seed, step * cfg.grad_accum + micro, rank, device)
        sync = micro == cfg.grad_accum - 1 or world == 1
        with autocast, (nullcontext() if sync else loss_module.no_sync()):
            loss, parts = task.loss(loss_module, images, captions, indices, gen, step)
            scaler.scale(loss / cfg.grad_accum).backward()
        total += loss.item() / cfg.grad_accum
        for k, v in parts.items():
            if v.dim() == 0:
                logged[k] = logged.get(k, 0.0) + v.item() / cfg.grad_accum
    return total, logged, images, parts


def mean_over_ranks(value: float, world: int, device) -> float:
    """Under DDP, the mean of a number over the ranks: what is logged, and what all ranks decide to skip on."""
    if world == 1:
        return value
    reduced = torch.tensor([value], device=device)
    dist.all_reduce(reduced)
    return reduced.item() / world


def clip_gradients(model, opt, scaler, loss: float, max_norm: float) -> float | None:
    """The clipped gradient norm, or None when the step must be skipped: the loss (the same on every rank, from
    mean_over_ranks) or the gradient is not finite."""
    if not math.isfinite(loss):
        return None
    scaler.unscale_(opt)
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
    # A finite loss with an inf gradient would still make every weight NaN. (fp16's scaler skips such steps
    # itself, and lowers its scale.) DDP has averaged the gradients, so the ranks agree.
    return norm if scaler.is_enabled() or math.isfinite(norm) else None


def discriminator_step(disc, disc_opt, images, recon, autocast, world: int) -> float:
    """Stage A's patch discriminator learns to tell real images from reconstructions. It is not DDP-wrapped, so
    its gradients are averaged over the ranks here."""
    with autocast:
        d_loss = stage_a.discriminator_loss(disc, images, recon)
    disc_opt.zero_grad(set_to_none=True)
    d_loss.backward()
    if world > 1:
        for p in disc.parameters():
            dist.all_reduce(p.grad)
            p.grad /= world
    disc_opt.step()
    return d_loss.item()


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------
def main(argv=None):
    args, cfg, train_cfg = parse_args(argv)
    rank, world, local_rank = setup_distributed()
    main_process = rank == 0
    device = pick_device(args.device, local_rank)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    precision, autocast = autocast_for(device, args.precision)
    out = Path(args.out)
    ckpt_path = out / f"stage_{args.stage}.pt"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: --out {out}: cannot create the folder ({e.strerror or e})") from None
    if main_process:                      # left by a run killed while it saved; never the checkpoint itself
        for stale in out.glob(f".{ckpt_path.name}.tmp*"):
            stale.unlink(missing_ok=True)

    resume = None
    if args.resume:
        resume, cfg, saved_train_cfg = load_training_checkpoint(ckpt_path, args.stage)   # the run's own configs win
        # the run's total and, if asked, its decay may change: --steps 16000 goes on; --lr-decay 1000 ends it
        train_cfg = dataclasses.replace(saved_train_cfg, steps=train_cfg.steps, **(
            {"lr_decay": train_cfg.lr_decay} if args.field_lr_decay is not None else {}))
    torch.manual_seed(args.seed)
    batches = one_line(Batches, args, train_cfg, rank, world)
    task = one_line(TASKS[args.stage], args, cfg, train_cfg, device, out, batches)
    task.caption_dropout, task.semantic_dropout = train_cfg.caption_dropout, train_cfg.semantic_dropout
    model = task.model
    if resume is None and hasattr(task, "prepare"):
        task.prepare(batches, device)                                     # before DDP copies rank 0's weights
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    for frozen in task.frozen:
        frozen.eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    disc = getattr(task, "disc", None)
    disc_opt = torch.optim.AdamW(disc.parameters(), lr=train_cfg.lr) if disc is not None else None
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    meta = {"stage": args.stage, "config": dataclasses.asdict(cfg), "train": dataclasses.asdict(train_cfg),
            "text_encoder": args.text_encoder, "text_length": args.text_length}
    saver = Checkpointer(ckpt_path, meta, model, ema, opt, scaler, disc, disc_opt, rank, world, device)
    step, skipped = saver.restore(resume) if resume is not None else (0, 0)
    loss_module = LossModule(model)
    if world > 1:
        loss_module = torch.nn.parallel.DistributedDataParallel(
            loss_module, device_ids=[device.index] if device.type == "cuda" else None)

    if main_process:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        frozen = sum(count(m) for m in task.frozen)
        print(f"stage {args.stage} · preset {args.preset} · {device} · {precision} · world {world}")
        print("model config:", json.dumps(dataclasses.asdict(cfg)))
        print("train config:", json.dumps(dataclasses.asdict(train_cfg)))
        print(f"parameters: {trainable:,} trainable, {frozen:,} frozen")
        print(task.describe(cfg, train_cfg))
        if step:
            print(f"resuming from {ckpt_path} at step {step}")
    bar = tqdm(total=train_cfg.steps, initial=step, disable=not main_process or args.no_progress,
               desc=f"stage {args.stage}", dynamic_ncols=True)
    log = JsonLog(out / f"stage_{args.stage}.log.jsonl", step, main_process, bar.write)
    bad_steps, buffers = BadSteps(train_cfg.max_bad_steps, saver), Buffers(model, disc)
    model.train()
    t0 = time.time()

    while step < train_cfg.steps:
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, train_cfg)
        before = buffers.snapshot()
        try:
            loss, logged, images, parts = accumulate_gradients(task, loss_module, batches, scaler, autocast, step,
                                                               train_cfg, args.seed, rank, world, device)
        except UndecodableFolder as e:
            buffers.restore(before)
            saver.stop_on_undecodable(e, step, skipped)
        loss = mean_over_ranks(loss, world, device)                      # all ranks must agree to skip a step
        grad_norm = clip_gradients(model, opt, scaler, loss, train_cfg.grad_clip)
        if grad_norm is None:                                             # skip the step, keep the weights
            opt.zero_grad(set_to_none=True)
            buffers.restore(before)
            skipped += 1
            bad_steps.failed(step)
        else:
            bad_steps.passed()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            if disc_opt is not None and step >= cfg.adversarial_start:
                logged["disc"] = discriminator_step(disc, disc_opt, images, parts["recon"], autocast, world)
            update_ema(ema, model, step + 1, train_cfg)
        step += 1
        bar.update(1)
        if grad_norm is not None:
            bar.set_postfix(loss=f"{loss:.4f}")
            if step % train_cfg.log_every == 0 or step == train_cfg.steps:
                log.write({"step": step, "loss": loss, **logged, "grad_norm": grad_norm,
                           "lr": learning_rate(step - 1, train_cfg), "skipped": skipped,
                           "time": round(time.time() - t0, 2)})
        if step % train_cfg.save_every == 0 or step == train_cfg.steps:  # a skipped step may still be one to save at
            saver.save(step, skipped)
        if main_process and (step % train_cfg.sample_every == 0 or step == train_cfg.steps):
            write_grid(task, ema, batches, out / f"stage_{args.stage}_{step:06d}.png", device, bar.write)
    bar.close()
    if main_process:
        print(f"stage {args.stage}: {step} steps, {skipped} skipped, checkpoint {ckpt_path}")
    if world > 1:
        # The DDP wrapper holds the process group: freed after destroy_process_group, it could deadlock a rank in
        # gloo's clean-up (seen in about 1 of 10 forked test runs). Free it first, once every rank is done.
        del loss_module
        dist.barrier(device_ids=[device.index]) if device.type == "cuda" else dist.barrier()
        dist.destroy_process_group()


def load_training_checkpoint(path: Path, stage: str) -> tuple[dict, object, TrainConfig]:
    """(checkpoint, model config, training config) of a train.py checkpoint of `stage`, read safely (no pickled
    code runs); anything else exits with one line."""
    if not path.exists():
        raise SystemExit(f"error: --resume: no checkpoint at {path}")
    ckpt = one_line(STAGES[stage]._read_checkpoint, path)
    if ckpt.get("stage") != stage:
        raise SystemExit(f"error: --resume: {path} is a stage {ckpt.get('stage')} checkpoint, not stage {stage}")
    missing = [k for k in ("step", "skipped", "config", "train", "model", "ema", "optimizer", "rng") if k not in ckpt]
    if missing:
        raise SystemExit(f"error: --resume: {path} lacks {missing}; expected a complete train.py checkpoint")
    try:
        return ckpt, type(STAGES[stage].PRESETS["tiny"])(**ckpt["config"]), TrainConfig(**ckpt["train"])
    except (TypeError, ValueError, ArithmeticError) as e:     # unknown or missing fields: another version's file
        raise SystemExit(f"error: --resume: the configs in {path} do not fit this train.py ({first_line(e)})") \
            from None


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UndecodableFolder as e:                # before the first step, or while drawing a grid
        raise SystemExit(f"error: {e}") from None
