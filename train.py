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
- AdamW with linear warm-up, gradient accumulation and clipping, and the released EMA scheme. The loop is `main`,
  at the end of the file; checkpoints, the log and what happens when a step goes wrong are in train_state.py.
- Under `torchrun` it runs DDP (detected from the environment); otherwise on one device.
"""
import argparse
import copy
import dataclasses
import json
import math
import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import lora
import stage_a
import stage_b
import stage_c
from checkpoints import first_line, load_stage, run_paths
from cli import OneLineParser, device_value, field_flags
from data import DEMO_PROMPTS, EMOJI_DEMO_PROMPTS, Batches, FrozenFeatures, UndecodableFolder
from sample import encode_prompts, generate, valid_side
from schedule import linear_timesteps, sample
from train_state import Checkpointer, Progress, StepGuard, one_line, out_folder, read_for_resume

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
    sample_every: int = 500      # image grid interval (steps), and one at the end; 0: no grids
    save_every: int = 250        # checkpoint interval (steps); a checkpoint is also written at the end
    caption_dropout: float = 0.05  # captions replaced by "" so that classifier-free guidance works (official 5%)
    semantic_dropout: float = 0.05  # Stage B: semantic latents replaced by zeros, for the same reason
    max_bad_steps: int = 20      # stop after this many non-finite losses in a row
    dataset_size: int = 0        # built-in shapes: 0 = an endless stream of new images; N = the first N, in epochs
    cache_frozen: bool = False   # keep frozen encoders' outputs per sample (a finite data set only; needs RAM)
    hold_out: bool = True        # built-in shapes: leave data.HELD_OUT_PAIRS out (for experiments/evaluate.py)
    two_object_prob: float = 0.3  # built-in shapes: the share of scenes with two objects, the rest have one

    def __post_init__(self):
        """Range checks: a bad value fails here, in one line that names the field, not deep inside the loop."""
        def check(name, ok, expected):
            if not ok:
                raise ValueError(f"{name} {getattr(self, name)}: expected {expected}")
        for name in ("steps", "batch_size", "grad_accum", "image_size", "log_every", "save_every", "ema_every",
                     "max_bad_steps"):
            check(name, getattr(self, name) > 0, "a positive integer")
        for name in ("warmup", "lr_decay", "ema_start", "dataset_size", "sample_every"):
            check(name, getattr(self, name) >= 0, "an integer ≥ 0")
        for name in ("lr", "grad_clip"):
            check(name, math.isfinite(getattr(self, name)) and getattr(self, name) > 0, "a finite number > 0")
        check("weight_decay", math.isfinite(self.weight_decay) and self.weight_decay >= 0, "a finite number ≥ 0")
        for name in ("ema_beta", "caption_dropout", "semantic_dropout", "two_object_prob"):
            check(name, 0 <= getattr(self, name) <= 1, "a number in [0, 1]")


OFFICIAL = dict(lr=1e-4, warmup=10_000, ema_start=5000, ema_every=100, ema_beta=0.9, grad_clip=1.0)
TRAIN_PRESETS = {
    # The shipped weights (weights/shapes/, scripts/train_weights.sh): 64² shapes on 2 CPU cores. Ours; each
    # departure's measurement is listed in docs/shipped.md#the-tiny-recipe:
    # - Stage A 4,000 steps, without its GAN term (train_weights.sh passes --no-adversarial);
    # - Stage B 16,000 steps, then 2,000 of linear decay (lr_decay);
    # - Stage C 16,000 steps on a fixed set of 16,384 captions (scripts/demo.sh trains the first 8,000).
    "tiny": {"a": TrainConfig(steps=4000, batch_size=16, lr=4e-3, warmup=50, ema_start=300),
             "b": TrainConfig(steps=18_000, batch_size=32, lr=2e-3, warmup=100, lr_decay=2000, ema_start=500,
                              dataset_size=4096, cache_frozen=True),
             "c": TrainConfig(steps=16_000, batch_size=64, lr=1e-3, warmup=100, ema_start=500, dataset_size=16_384,
                              cache_frozen=True)},
    # weights/emoji/ (scripts/train_weights.sh emoji): the tiny preset on the emoji world, 64² on 2 CPU cores.
    # Departures from tiny, and what each rests on: docs/emoji.md#the-emoji-recipe
    # - Stage A 3,000 steps; Stage B 9,000 on 8,192 renders (2.6 per emoji), with the last 2,000 decaying;
    # - Stage C 16,000 steps on 32,768 captioned renders (10 per emoji), the last 3,000 decaying.
    "emoji": {"a": TrainConfig(steps=3000, batch_size=16, lr=4e-3, warmup=50, ema_start=300),
              "b": TrainConfig(steps=9000, batch_size=32, lr=2e-3, warmup=100, lr_decay=2000, ema_start=500,
                               dataset_size=8192, cache_frozen=True),
              "c": TrainConfig(steps=16_000, batch_size=64, lr=1e-3, warmup=100, lr_decay=3000, ema_start=500,
                               dataset_size=32_768, cache_frozen=True)},
    # One consumer GPU, 256² images.
    "small": {s: TrainConfig(steps=50_000, batch_size=32, lr=3e-4, warmup=1000, ema_start=2000, ema_every=10,
                             ema_beta=0.99, image_size=256, log_every=100, sample_every=2000, save_every=2000)
              for s in "abc"},
    # The released recipe (Stage C: 918k steps at batch 1280 for v2, at 1024²).
    "paper": {s: TrainConfig(steps=918_000, batch_size=8, image_size=1024, log_every=100, sample_every=5000,
                             save_every=5000, **OFFICIAL) for s in "abc"},
}


# ----------------------------------------------------------------------------------------------------------------
# Command line: fixed flags, then one flag per config field (cli.field_flags)
# ----------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    # --help is added last, so that it lists the flags of the chosen stage's config too.
    p = OneLineParser(description="Train one Würstchen stage (A, then B, then C).",
                      formatter_class=argparse.RawTextHelpFormatter, add_help=False)
    p.add_argument("--stage", choices=["a", "b", "c"], required=True, help="which stage to train")
    p.add_argument("--preset", choices=["tiny", "emoji", "small", "paper"], default="tiny",
                   help="model and training defaults (tiny: CPU demo, emoji: tiny for --data emoji,\n"
                        "small: one GPU, paper: released)")
    p.add_argument("--out", default="runs/tiny", help="folder for checkpoints, logs and grids")
    p.add_argument("--data", default=None,
                   help="'shapes' or 'emoji' (the built-in worlds; default: emoji for --preset emoji, else\n"
                        "shapes) or a folder of images with captions (a .txt per image or a metadata.jsonl\n"
                        "with file_name/text)")
    p.add_argument("--stage-a", default=None, help="Stage A checkpoint (stages b, c; default OUT/stage_a.pt)")
    p.add_argument("--stage-b", default=None, help="Stage B checkpoint (stage c; default OUT/stage_b.pt)")
    p.add_argument("--text-encoder", default="minilm",
                   help="'minilm' (offline all-MiniLM-L6-v2) or a local CLIP folder (stages b, c)")
    p.add_argument("--text-encoder-b", default=None,
                   help="stage c: Stage B's own text encoder, for the sample grids (default: --text-encoder;\n"
                        "the released decoder reads CLIP ViT-H's tokens, its prior ViT-bigG's)")
    p.add_argument("--text-length", type=int, default=32, help="text tokens per caption (CLIP uses 77)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/stage_X.pt exactly where it stopped")
    p.add_argument("--seed", type=int, default=0, help="seed for data, initialisation and noise")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="auto: bf16 autocast on a capable GPU, fp32 on CPU; fp16 needs asking for")
    p.add_argument("--no-adversarial", action="store_true", help="stage a: never switch on the GAN term")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar (logs still go to the JSONL file)")
    tune = p.add_argument_group("fine-tuning (docs/finetune.md)")
    tune.add_argument("--init", default=None, metavar="PATH",
                      help="stages b, c: start from these weights (a train.py checkpoint's EMA, an exported\n"
                           ".safetensors, the official .pt or, for stage c, a diffusers folder); the model\n"
                           "config comes from them, the optimizer starts fresh and the EMA as a copy")
    tune.add_argument("--grad-checkpoint", action="store_true",
                      help="stage c: recompute each block in the backward pass (a 14th of the activation\n"
                           "memory, for about 1.2× the step time, 1.3-1.6× with LoRA, on the CPU: docs/finetune.md)")
    tune.add_argument("--lora-rank", type=int, default=0, metavar="R",
                      help="stage c with --init: train rank-R adapters only (lora.py); 0: the whole model")
    tune.add_argument("--lora-alpha", type=float, default=None, help="LoRA α: the change is scaled by α/R "
                      "(default R)")
    tune.add_argument("--lora-targets", choices=["attention", "linear"], default=None,
                      help="attention: to_q, to_k, to_v, to_out.0 (diffusers' example); linear: every Linear")
    known, _ = p.parse_known_args(argv)
    model_defaults = STAGES[known.stage].PRESETS[known.preset]
    train_defaults = TRAIN_PRESETS[known.preset][known.stage]
    model_dests = field_flags(p, f"Stage {known.stage.upper()} model (stage_{known.stage}.py)", model_defaults)
    train_dests = field_flags(p, "training", train_defaults)
    p.add_argument("-h", "--help", action="help", help="show this help, with the flags of --stage's config")
    args = p.parse_args(argv)
    if args.data is None:
        args.data = "emoji" if args.preset == "emoji" else "shapes"
    given = lambda dests: {name: getattr(args, d) for d, name in dests.items() if getattr(args, d) is not None}
    try:
        model_cfg = dataclasses.replace(model_defaults, **given(model_dests))
    except (ValueError, TypeError, ArithmeticError) as e:
        p.error(f"{e} (model flags: {flags_changed(model_defaults, given(model_dests))})")
    try:
        train_cfg = dataclasses.replace(train_defaults, **given(train_dests))
    except ValueError as e:               # TrainConfig's checks name the field; here it is the flag
        field, _, rest = str(e).partition(" ")
        p.error(f"--{field.replace('_', '-')} {rest}")
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
    if args.lora_rank < 0:
        p.error(f"--lora-rank {args.lora_rank}: expected a positive integer (or 0: no LoRA)")
    if args.lora_rank and (args.stage != "c" or not (args.init or args.resume)):
        p.error(f"--lora-rank {args.lora_rank}: expected --stage c with --init PATH (adapters adapt trained weights)")
    if args.lora_alpha is not None and not (math.isfinite(args.lora_alpha) and args.lora_alpha > 0):
        p.error(f"--lora-alpha {args.lora_alpha}: expected a positive number")
    if args.init and args.stage == "a":
        p.error("--init: expected --stage b or c (Stage A trains from scratch in minutes)")
    if args.text_encoder_b and args.stage != "c":
        p.error(f"--text-encoder-b: expected --stage c (its sample grids), got --stage {args.stage}")
    if args.grad_checkpoint and args.stage != "c":
        p.error(f"--grad-checkpoint: expected --stage c (the prior's blocks), got --stage {args.stage}")
    args.model_flags = given(model_dests)         # --init checks these against the config of its weights
    return args, model_cfg, train_cfg


def flags_changed(preset, changed: dict) -> str:
    """The model flags given that differ from the preset: where to look when a config cannot build its model."""
    text = lambda v: ",".join(map(str, v)) if isinstance(v, tuple) else str(v)
    diff = [f"--{k.replace('_', '-')} {text(v)}" for k, v in changed.items() if getattr(preset, k) != v]
    return " ".join(diff) or "none, the preset's"


# ----------------------------------------------------------------------------------------------------------------
# Small pieces: device and precision, distributed set-up, learning rate, EMA, one step's parts
# ----------------------------------------------------------------------------------------------------------------
def setup_distributed():
    """(rank, world size, local rank); DDP only when launched by torchrun, which sets these variables."""
    if "RANK" not in os.environ:
        return 0, 1, 0
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return rank, world, local


def wrap_for_ddp(loss_module, world: int, device):
    """Under DDP, the module whose backward() averages the gradients over the ranks."""
    if world == 1:
        return loss_module
    return torch.nn.parallel.DistributedDataParallel(loss_module,
                                                     device_ids=[device.index] if device.type == "cuda" else None)


def end_distributed(device):
    """Once every rank is done. The DDP wrapper must be freed before this: freed after destroy_process_group, it
    could deadlock a rank in gloo's clean-up (seen in about 1 of 10 forked test runs)."""
    dist.barrier(device_ids=[device.index]) if device.type == "cuda" else dist.barrier()
    dist.destroy_process_group()


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


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Warm-up, then constant; with lr_decay, falling linearly to 0 over the last lr_decay steps. Until the decay
    starts the rate does not depend on the total, so a run resumed before that point with more --steps (and the
    decay) equals one trained for that many steps from the start."""
    decay = min(1.0, (cfg.steps - step) / cfg.lr_decay) if cfg.lr_decay else 1.0
    return cfg.lr * min(1.0, (step + 1) / max(cfg.warmup, 1)) * decay


def make_ema(model: torch.nn.Module) -> torch.nn.Module:
    """The EMA copy of `model`, in eval mode. Its frozen parameters (a LoRA run's base) are the model's own tensors,
    not copies: they never change, and a copy of the released prior would cost 4 GB more in fp32."""
    frozen = {id(p): p for p in model.parameters() if not p.requires_grad}
    return copy.deepcopy(model, frozen).eval().requires_grad_(False)   # deepcopy returns memo's entries as they are


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, step: int, cfg: TrainConfig, keys=None):
    """The released scheme: a plain copy until ema_start, then every ema_every steps ema ← β·ema + (1 − β)·model.
    `keys`: only these state-dict entries (a LoRA run's adapters: the frozen base would only be copied onto itself,
    1B numbers a step for the released prior)."""
    if keys is not None:
        e_state, m_state = ema.state_dict(), model.state_dict()
        for k in keys:
            if step < cfg.ema_start:
                e_state[k].copy_(m_state[k])
            elif step % cfg.ema_every == 0:
                e_state[k].lerp_(m_state[k], 1 - cfg.ema_beta)
        return
    if step < cfg.ema_start:
        ema.load_state_dict(model.state_dict())
    elif step % cfg.ema_every == 0:
        for e, m in zip(ema.state_dict().values(), model.state_dict().values()):
            if e.dtype.is_floating_point:
                e.lerp_(m, 1 - cfg.ema_beta)
            else:
                e.copy_(m)                                                # BatchNorm's batch counter


def step_generator(seed: int, micro_step: int, rank: int, device) -> torch.Generator:
    """Noise, t and dropout draws of a micro-step depend only on (seed, micro-step, rank), so resuming repeats them
    exactly. Ranks are a prime apart that no step count reaches (step·101 < 1,000,000,007 for 9.9M micro-steps),
    so no two ranks share a step's draws (docs/robustness.md#ddp-checkpoints-and-the-per-rank-seeds)."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + micro_step * 101 + rank * 1_000_000_007)


def gradient_sync(loss_module, last_micro_batch: bool):
    """DDP averages gradients over the ranks in backward(); with accumulation, only on the last micro-batch."""
    ddp = isinstance(loss_module, torch.nn.parallel.DistributedDataParallel)
    return loss_module.no_sync() if ddp and not last_micro_batch else nullcontext()


def add_mean(means: dict, parts: dict, n: int):
    """Adds each scalar loss part / n to `means`: their mean over a step's n micro-batches, for the log."""
    for k, v in parts.items():
        if v.dim() == 0:
            means[k] = means.get(k, 0.0) + v.item() / n


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
# The three stages as training tasks: what is trained, what is frozen, the loss of a batch, and the grid
# ----------------------------------------------------------------------------------------------------------------
class LossModule(torch.nn.Module):
    """DDP synchronises gradients through forward(); ours routes forward() to the stage's own loss()."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model.loss(*args, **kwargs)


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


def load_text_encoder(args, width: int, flag: str, device, spec: str | None = None, length: int | None = None):
    """The caption encoder `spec` (default --text-encoder) at `length` tokens (default --text-length), checked
    against the `width` the model reads; a mismatch names `flag` (--c-text, --c-cond, or --text-encoder-b for the
    encoder Stage C's grids give Stage B's decoder)."""
    from text import TextEncoder          # imports transformers (5 s): only stages b and c need it
    spec = spec or args.text_encoder
    encoder = TextEncoder.from_name_or_path(spec, max_length=length or args.text_length).to(device)
    if encoder.width != width:
        if flag == "--text-encoder-b":
            raise SystemExit(f"error: --text-encoder-b {spec} gives {encoder.width}-wide tokens; expected the "
                             f"{width}-wide ones Stage B's decoder reads")
        if args.init:
            raise SystemExit(f"error: --text-encoder {spec} gives {encoder.width}-wide tokens but --init "
                             f"{args.init} reads {width}-wide ones; expected the text encoder it was trained with")
        raise SystemExit(f"error: the text encoder gives {encoder.width}-wide tokens but {flag} is {width}; "
                         f"pass {flag} {encoder.width}")
    return encoder


def check_multiple(side: int, multiple: int, why: str):
    if side % multiple:
        raise ValueError(f"--image-size {side}: expected a multiple of {multiple} ({why}), e.g. "
                         f"{max(multiple, side // multiple * multiple)} or {(side // multiple + 1) * multiple}")


class Task:
    """A stage as a training task. `model` trains; the models in `frozen` only encode its inputs; `disc` is Stage
    A's discriminator, if any. loss(...) is the loss of a batch, grid(...) the rows of an image grid."""
    disc, frozen = None, ()

    def __init__(self, train_cfg: TrainConfig):
        self.caption_dropout, self.semantic_dropout = train_cfg.caption_dropout, train_cfg.semantic_dropout

    def prepare(self, batches: Batches, device):
        """Before the first step of a fresh run (not of a resumed one)."""


class TaskA(Task):
    def __init__(self, args, cfg, train_cfg, device, out: Path, batches: Batches):
        super().__init__(train_cfg)
        side = train_cfg.image_size
        check_multiple(side, 2 ** cfg.levels, f"Stage A's f{2 ** cfg.levels} with levels={cfg.levels}")
        if not args.no_adversarial and 2 ** cfg.disc_depth >= side:   # else it fails when the GAN term starts
            raise ValueError(f"--image-size {side}: expected more than {2 ** cfg.disc_depth} px for a discriminator "
                             f"of --disc-depth {cfg.disc_depth}; lower it or pass --no-adversarial")
        preset = stage_a.PRESETS[args.preset]
        self.model = build_model(stage_a.StageA, cfg, preset, device)
        self.disc = None if args.no_adversarial else build_model(stage_a.Discriminator, cfg, preset, device)

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


class TaskB(Task):
    def __init__(self, args, cfg, train_cfg, device, out: Path, batches: Batches):
        super().__init__(train_cfg)
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


class TaskC(Task):
    def __init__(self, args, cfg, train_cfg, device, out: Path, batches: Batches):
        super().__init__(train_cfg)
        # The loss needs only Stage B's semantic compressor and the caption encoder. Stage A, the decoder and Stage
        # B's caption encoder draw the sample grids; with --sample-every 0 they stay off the device (for the released
        # models 1,427M weights, 5.3 GiB in fp32: docs/finetune.md#memory). Stage A is built either way, in the order
        # the shipped weights were trained with: building a model draws from the RNG that then initialises the
        # prior, so a run without grids starts from the same weights as one with them.
        grids = train_cfg.sample_every > 0
        vqgan = load_frozen("a", args.stage_a, out, device if grids else "cpu")
        self.vqgan = vqgan if grids else None
        stage_b_model = load_frozen("b", args.stage_b, out, device if grids else "cpu")
        side = train_cfg.image_size
        if grids and valid_side(side, stage_b_model.decoder.config) != side:
            raise ValueError(f"--image-size {side}: expected a size the Stage B decoder can make, e.g. "
                             f"{valid_side(side, stage_b_model.decoder.config)}")
        self.compressor = stage_b_model.compressor.to(device)
        self.decoder = stage_b_model.decoder if grids else None
        self.text = load_text_encoder(args, cfg.c_cond, "--c-cond", device)
        self.uncond = self.text.encode([""], device)
        self.frozen, self.device = [self.compressor, self.text.model], device
        if grids:
            self.frozen += [self.vqgan, self.decoder]
            # Stage B reads captions of its own: the released prior reads CLIP ViT-bigG's 1280-wide tokens, the
            # released decoder ViT-H's 1024-wide ones.
            c_text = self.decoder.config.c_text
            if args.text_encoder_b is None and self.text.width != c_text:
                raise ValueError(f"the Stage B decoder reads {c_text}-wide caption tokens but --text-encoder "
                                 f"{args.text_encoder} gives {self.text.width}-wide ones; expected --text-encoder-b "
                                 f"FOLDER, Stage B's own (for the released decoder, the CLIP ViT-H of "
                                 f"warp-ai/wuerstchen)")
            # ... at the caption length it was trained with (a Stage C may read another --text-length); checkpoints
            # from elsewhere store none, and read --text-length.
            length_b = getattr(stage_b_model, "text_encoder_spec", (None, None))[1] or args.text_length
            self.text_b = (self.text if args.text_encoder_b is None and length_b == args.text_length else
                           load_text_encoder(args, c_text, "--text-encoder-b", device, args.text_encoder_b, length_b))
            self.frozen += [self.text_b.model] if self.text_b is not self.text else []
        self.model = build_model(stage_c.Prior, cfg, stage_c.PRESETS[args.preset], device)
        self.demo_prompts = list(EMOJI_DEMO_PROMPTS if args.data == "emoji" else DEMO_PROMPTS)
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
        text_c, text_c_uncond = encode_prompts(self.text, self.demo_prompts, self.device)
        text_b, text_b_uncond = encode_prompts(self.text_b, self.demo_prompts, self.device)
        return [generate(ema, self.decoder, self.vqgan, text_c, text_c_uncond, text_b, text_b_uncond, side, side,
                         generator=torch.Generator(self.device).manual_seed(0), device=self.device)]


TASKS = {"a": TaskA, "b": TaskB, "c": TaskC}


def print_start(args, task, model, cfg, train_cfg, device, precision, world, step, ckpt_path):
    """What a run is, before its first step: stage, device, configs, parameter counts, latent shapes."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for m in task.frozen for p in m.parameters())
    print(f"stage {args.stage} · preset {args.preset} · {device} · {precision} · world {world}")
    print("model config:", json.dumps(dataclasses.asdict(cfg)))
    print("train config:", json.dumps(dataclasses.asdict(train_cfg)))
    print(f"parameters: {trainable:,} trainable, {frozen:,} frozen")
    print(task.describe(cfg, train_cfg))
    if step:
        print(f"resuming from {ckpt_path} at step {step}")


# ----------------------------------------------------------------------------------------------------------------
# Fine-tuning: --init and --lora-rank (docs/finetune.md)
# ----------------------------------------------------------------------------------------------------------------
TUNABLE = {"dropout"}     # the model fields a flag may change on top of --init's weights: regularisation, not shape


def load_init(stage: str, path, flags: dict) -> tuple:
    """(model config, state dict) of the weights a run starts from. The config is theirs: a model flag that says
    otherwise is one line, except dropout, which a fine-tune may change."""
    path = Path(path)
    if stage == "b" and path.is_dir():
        raise ValueError(f"--init {path}: a folder, but Stage B starts from a file (a diffusers decoder folder holds "
                         f"no semantic compressor, which Stage B trains with); expected the official "
                         f"model_v2_stage_b.pt, a train.py checkpoint or an exported .safetensors")
    model = load_stage(stage, path)
    cfg = model.config
    for name, value in flags.items():
        if name not in TUNABLE and getattr(cfg, name) != value:
            raise ValueError(f"--{name.replace('_', '-')} {value}: --init {path} has {name}={getattr(cfg, name)}; "
                             f"drop the flag (the model config comes from the weights)")
    return dataclasses.replace(cfg, **{k: v for k, v in flags.items() if k in TUNABLE}), model.state_dict()


def save_adapters(ema, path: Path, step: int):
    """The adapters as sample.py --lora reads them. The checkpoint, already written, holds them too, so a failed
    write is a warning and training goes on."""
    try:
        lora.save_lora(ema, path)
    except OSError as e:
        print(f"warning: cannot write the LoRA file {path} at step {step} ({first_line(e)}); the checkpoint holds "
              f"the adapters, and training goes on", file=sys.stderr)


def init_weights_path(args, resume: dict | None, ckpt_path: Path) -> str | None:
    """The weights a run started from, as an absolute path (a LoRA run reloads them when it resumes, wherever it
    is started): --init's, or, resuming, the one its checkpoint names. Never the run's own checkpoint, which the first
    save would overwrite."""
    given = Path(args.init).resolve() if args.init else None
    if resume is None:
        if given is not None and given == ckpt_path.resolve():
            raise ValueError(f"--init {args.init} is this run's own checkpoint, which its first save would overwrite; "
                             f"expected another --out")
        return str(given) if given is not None else None
    saved = resume.get("init")
    if given is not None and (saved is None or given != Path(saved).resolve()):
        raise ValueError(f"--init {args.init} with --resume: the run in {args.out} started from "
                         f"{saved or 'scratch'}; expected that or no --init")
    return saved


def lora_settings(args, resume: dict | None) -> dict | None:
    """The adapters of this run: from the flags, or, resuming, from the checkpoint (a flag that differs is one
    line)."""
    asked = {"rank": args.lora_rank, "alpha": args.lora_alpha or float(args.lora_rank),
             "targets": args.lora_targets or "attention"}
    given = {"rank": True, "alpha": args.lora_alpha is not None, "targets": args.lora_targets is not None}
    if resume is None:
        return asked if args.lora_rank else None
    saved = resume.get("lora")
    if args.lora_rank and saved is None:
        raise SystemExit(f"error: --resume --lora-rank {args.lora_rank}: the run in {args.out} trained the whole "
                         f"model; drop --lora-rank")
    if saved is not None and args.lora_rank:
        for key, flag in (("rank", "--lora-rank"), ("alpha", "--lora-alpha"), ("targets", "--lora-targets")):
            if given[key] and asked[key] != saved[key]:
                raise SystemExit(f"error: {flag} {asked[key]}: the run in {args.out} trains adapters with "
                                 f"{key} {saved[key]}; expected {flag} {saved[key]} or none")
    return saved


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------
def main(argv=None):
    args, model_cfg, cfg = parse_args(argv)
    rank, world, local_rank = setup_distributed()
    device = pick_device(args.device, local_rank)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    precision, autocast = autocast_for(device, args.precision)
    out = out_folder(Path(args.out), f"stage_{args.stage}.pt", rank == 0)
    ckpt_path = out / f"stage_{args.stage}.pt"
    resume = None
    if args.resume:                       # the run's own configs win; its total and, if given, its decay may change
        resume, model_cfg, saved = read_for_resume(ckpt_path, args.stage, TrainConfig)
        cfg = dataclasses.replace(saved, steps=cfg.steps,
                                  **({"lr_decay": cfg.lr_decay} if args.field_lr_decay is not None else {}))
    lora_cfg = lora_settings(args, resume)
    # The weights to start from: --init's; resuming a LoRA run, its base again (its checkpoint holds the adapters).
    init_path = one_line(init_weights_path, args, resume, ckpt_path)
    load_from = init_path if resume is None or lora_cfg else None     # a resumed full run's checkpoint holds it all
    init_state = None
    if load_from is not None:
        init_cfg, init_state = one_line(load_init, args.stage, load_from, {} if resume else args.model_flags)
        model_cfg = model_cfg if resume else init_cfg
    torch.manual_seed(args.seed)
    batches = one_line(Batches, args.data, args.seed, cfg, rank, world)
    task = one_line(TASKS[args.stage], args, model_cfg, cfg, device, out, batches)
    model, disc = task.model, task.disc
    if init_state is not None:
        model.load_state_dict(init_state)                 # the config is the weights' own, so every key fits
        del init_state
    elif resume is None:
        task.prepare(batches, device)                                     # before DDP copies rank 0's weights
    if args.stage == "c":
        model.grad_checkpoint = args.grad_checkpoint
    lora_keys = None
    if lora_cfg is not None:              # the base freezes; only the adapters train, and only they are saved
        lora.add_lora(model, lora.target_names(model, lora_cfg["targets"]), lora_cfg["rank"], lora_cfg["alpha"])
        lora_keys = [k for k, p in model.named_parameters() if p.requires_grad]
    ema = make_ema(model)
    for frozen in task.frozen:
        frozen.eval().requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad] if lora_keys else model.parameters()
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    disc_opt = torch.optim.AdamW(disc.parameters(), lr=cfg.lr) if disc is not None else None
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")    # a no-op unless fp16
    meta = {"stage": args.stage, "config": dataclasses.asdict(model_cfg), "train": dataclasses.asdict(cfg),
            "text_encoder": args.text_encoder, "text_length": args.text_length,
            **({"init": str(init_path)} if init_path else {}), **({"lora": lora_cfg} if lora_cfg else {})}
    saver = Checkpointer(ckpt_path, meta, model, ema, opt, scaler, disc, disc_opt, rank, world, device, lora_keys)
    step, skipped = saver.restore(resume) if resume is not None else (0, 0)
    loss_module = wrap_for_ddp(LossModule(model), world, device)
    if rank == 0:
        print_start(args, task, model, model_cfg, cfg, device, precision, world, step, ckpt_path)
    progress = Progress(out, args.stage, step, cfg, rank == 0, not args.no_progress)
    guard = StepGuard(saver, cfg.max_bad_steps, model, disc)
    model.train()

    while step < cfg.steps:
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, cfg)
        guard.begin()                                                     # BatchNorm statistics, to put back
        loss, logged = 0.0, {}
        with guard.stop_if_undecodable(step, skipped):
            for micro in range(cfg.grad_accum):                           # gradient accumulation
                i = step * cfg.grad_accum + micro
                images, captions, indices = batches(i)
                images = images.to(device, non_blocking=True)
                with autocast, gradient_sync(loss_module, micro == cfg.grad_accum - 1):
                    micro_loss, parts = task.loss(loss_module, images, captions, indices,
                                                  step_generator(args.seed, i, rank, device), step)
                    scaler.scale(micro_loss / cfg.grad_accum).backward()
                loss += micro_loss.item() / cfg.grad_accum
                add_mean(logged, parts, cfg.grad_accum)
        loss = mean_over_ranks(loss, world, device)                       # all ranks must agree to skip a step
        grad_norm = clip_gradients(model, opt, scaler, loss, cfg.grad_clip)   # None: not finite
        if grad_norm is not None:
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            if disc is not None and step >= model_cfg.adversarial_start:
                logged["disc"] = discriminator_step(disc, disc_opt, images, parts["recon"], autocast, world)
            update_ema(ema, model, step + 1, cfg, lora_keys)
            guard.passed()
        else:                                                             # skip the step, keep the weights
            opt.zero_grad(set_to_none=True)
            skipped += 1
            guard.skip(step)                                              # stops after max_bad_steps in a row
        step += 1
        progress.step(step, loss, logged, grad_norm, learning_rate(step - 1, cfg), skipped)
        if step % cfg.save_every == 0 or step == cfg.steps:               # a skipped step may be one to save at
            saver.save(step, skipped)
            if lora_cfg is not None and rank == 0:                        # what sample.py --lora applies
                save_adapters(ema, out / "stage_c_lora.safetensors", step)
        if rank == 0 and cfg.sample_every and (step % cfg.sample_every == 0 or step == cfg.steps):
            progress.grid(task, ema, batches, step, device)
    progress.close()
    if rank == 0:
        print(f"stage {args.stage}: {step} steps, {skipped} skipped, checkpoint {ckpt_path}")
    if world > 1:
        del loss_module                   # the DDP wrapper holds the process group: free it first (end_distributed)
        end_distributed(device)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UndecodableFolder as e:                # before the first step, or while drawing a grid
        raise SystemExit(f"error: {e}") from None
