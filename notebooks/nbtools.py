"""What the teaching notebooks share: set-up, checkpoints (loaded, or tiny ones trained on the spot), pictures and
tables. Models, losses, schedules and samplers are never defined here: the notebooks import them from the project's
own files (stage_a.py, stage_b.py, stage_c.py, schedule.py, sample.py, train.py, data.py, experiments/evaluate.py, text.py).

Environment variables (each notebook's first cell can set RUN instead of WUERSTCHEN_RUN):
- WUERSTCHEN_RUN: a folder of train.py checkpoints (stage_a.pt, stage_b.pt, stage_c.pt) or exported .safetensors,
  e.g. runs/tiny from `bash scripts/demo.sh`. Unset: the shipped weights, weights/shapes/. Nothing is trained then.
  WUERSTCHEN_RUN=train: tiny models are trained on the spot instead, a few minutes per stage.
- NOTEBOOK_TRAIN_DIR: where those are trained (default runs/notebooks, or runs/notebooks-smoke in smoke mode).
  Checkpoints found there are reused, so the notebooks train each stage once.
- NOTEBOOK_SMOKE=1: the test suite's mode: fewer images and repeats (and a handful of training steps with
  WUERSTCHEN_RUN=train), so that the notebooks run in about a minute.
- NOTEBOOK_THREADS: torch threads (default 1; the CPU is shared).
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # before torch loads OpenMP: idle threads sleep, not spin

import contextlib
import io
import json
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import matplotlib  # noqa: E402

matplotlib.use("module://matplotlib_inline.backend_inline" if "ipykernel" in sys.modules else "agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("NOTEBOOK_THREADS", "1")))
SMOKE = os.environ.get("NOTEBOOK_SMOKE", "") not in ("", "0")

# Training with WUERSTCHEN_RUN=train: a few minutes per stage on one CPU thread, far fewer steps than the shipped
# weights' (train.TRAIN_PRESETS["tiny"], scripts/train_weights.sh). Smoke mode: a handful of steps on small batches.
TRAIN_STEPS = {"a": 400, "b": 600, "c": 1200}
SMOKE_STEPS = {"a": 3, "b": 3, "c": 3}
SMOKE_FLAGS = ["--batch-size", "8", "--log-every", "1", "--cache-frozen", "false"]  # no feature cache to fill

# transformers imports tqdm.auto, which warns inside a kernel without ipywidgets; train.py's bars are off anyway.
warnings.filterwarnings("ignore", message="IProgress not found")

plt.rcParams.update({"figure.dpi": 72, "savefig.dpi": 72, "font.size": 9, "axes.titlesize": 9,
                     "figure.facecolor": "white"})


def pick(full, smoke):
    """`full` normally, `smoke` in smoke mode (the test suite): fewer images, steps and repeats."""
    return smoke if SMOKE else full


def shown(path: Path) -> str:
    """A path as the notebooks print it: relative to the repository when inside it."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: a given run, or tiny models trained here with train.main
# ----------------------------------------------------------------------------------------------------------------
def _given_folder(run) -> Path | None:
    """The folder to load: RUN, else $WUERSTCHEN_RUN, else the shipped weights; None to train on the spot."""
    from checkpoints import SHIPPED
    given = run or os.environ.get("WUERSTCHEN_RUN") or SHIPPED
    if str(given) == "train":
        return None
    path = Path(given).expanduser()
    if not path.is_absolute() and not path.exists():
        path = ROOT / path                              # relative to the repository rather than to notebooks/
    return path.resolve()


def _train(stage: str, folder: Path) -> dict:
    """train.py --stage STAGE --preset tiny, in this process. Returns what it reported."""
    import train
    steps = (SMOKE_STEPS if SMOKE else TRAIN_STEPS)[stage]
    # --lr-decay 0: the preset's Stage B decays its rate over its last 2,000 steps, which would be all of these
    argv = ["--stage", stage, "--preset", "tiny", "--out", str(folder), "--steps", str(steps), "--lr-decay", "0",
            "--device", "cpu", "--no-progress"] + (SMOKE_FLAGS if SMOKE else [])
    out, start = io.StringIO(), time.perf_counter()
    with contextlib.redirect_stdout(out):
        train.main(argv)
    seconds = time.perf_counter() - start
    lines = out.getvalue().splitlines()
    keep = [line for line in lines if line.startswith(("parameters", f"Stage {stage.upper()}:"))]
    print(f"trained stage {stage.upper()}: {steps} steps in {seconds:.0f} s ({' · '.join(keep)})")
    return {"stage": stage, "steps": steps, "seconds": seconds}


def prepare_run(stages: str, run=None) -> Path:
    """The folder holding train.py checkpoints for `stages` (e.g. "ab").

    run (or $WUERSTCHEN_RUN) names a folder of checkpoints to load, by default the shipped weights (checked against
    their SHA-256s); with "train", tiny models are trained in $NOTEBOOK_TRAIN_DIR, each stage once: a checkpoint
    already there is reused. Training a stage removes the later stages' checkpoints, which were trained on top of
    the old one.
    """
    from checkpoints import SHIPPED, run_paths
    given = _given_folder(run)
    if given is not None:
        paths = run_paths(given, stages=stages)   # exported files (the shipped ones): SHA-256s checked here
        missing = [paths[s].name for s in stages if not paths[s].is_file()]
        if missing:
            raise FileNotFoundError(f"{given}: no {', '.join(missing)}; expected the checkpoints train.py writes "
                                    f"(e.g. runs/tiny after `bash scripts/demo.sh`)")
        what = "the shipped weights" if given == SHIPPED else "given"
        print(f"checkpoints: {shown(given)} ({what}; nothing is trained)")
        return given
    default = ROOT / "runs" / ("notebooks-smoke" if SMOKE else "notebooks")
    folder = Path(os.environ.get("NOTEBOOK_TRAIN_DIR") or default).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    todo = [s for s in stages if not (folder / f"stage_{s}.pt").is_file()]
    if todo:
        first = min(todo)
        for later in "abc"[("abc".index(first)) + 1:]:
            (folder / f"stage_{later}.pt").unlink(missing_ok=True)
        todo = [s for s in "abc" if s >= first and s <= max(stages)]
        print(f"no checkpoints given: training tiny models in {shown(folder)}"
              + (" (smoke mode: a few steps, so the pictures show untrained models)" if SMOKE else ""))
        for s in todo:
            _train(s, folder)
    else:
        print(f"checkpoints: {shown(folder)} (trained earlier by these notebooks)")
    return folder


def load(stage: str, folder: Path):
    """A stage from a train.py checkpoint or an exported file (EMA weights), in eval mode, via
    checkpoints.load_stage."""
    from checkpoints import load_stage, run_paths
    return load_stage(stage, run_paths(folder, stages=stage)[stage])


def text_encoder(model):
    """The text encoder a train.py checkpoint was trained with (train.py's default: all-MiniLM-L6-v2)."""
    from text import TextEncoder
    spec, length = getattr(model, "text_encoder_spec", (None, None))
    return TextEncoder.from_name_or_path(spec or "minilm", **({"max_length": length} if length else {}))


def training_log(folder: Path, stage: str) -> list[dict]:
    """The JSONL log train.py writes (one line per log step), or [] if there is none."""
    path = Path(folder) / f"stage_{stage}.log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def checkpoint_step(folder: Path, stage: str) -> int:
    """The training step a stage's weights were saved at: from a train.py checkpoint or an exported file."""
    from checkpoints import exported_info, run_paths
    path = run_paths(folder, stages=stage)[stage]
    if path.suffix == ".safetensors":
        return int(exported_info(path)["step"])
    return int(torch.load(path, map_location="cpu", weights_only=True)["step"])


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------------------------
# Pictures
# ----------------------------------------------------------------------------------------------------------------
def _hwc(image: torch.Tensor) -> np.ndarray:
    return image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def show_images(rows, row_labels=None, col_labels=None, title=None, size=0.9):
    """Rows of (N, 3, H, W) images in [0, 1] as one figure; `size` inches per image."""
    rows = [list(r) for r in rows]
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(size * n_cols + (1.3 if row_labels else 0.1),
                                                      size * n_rows + (0.25 if col_labels else 0)), squeeze=False)
    for i, row in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i][j]
            ax.set_xticks([]), ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if j < len(row):
                ax.imshow(_hwc(row[j]), interpolation="nearest")
            if j == 0 and row_labels:
                ax.set_ylabel(row_labels[i], rotation=0, ha="right", va="center", fontsize=8)
            if i == 0 and col_labels and j < len(col_labels):
                ax.set_title(col_labels[j], fontsize=8)
    fig.tight_layout(pad=0.2)
    if title:                             # above the axes; the inline backend saves the figure's tight bounding box
        fig.suptitle(title, fontsize=10, y=1 + 0.05 / fig.get_size_inches()[1], va="bottom")
    plt.show()


def show_maps(maps: torch.Tensor, title=None, labels=None, cols=None, size=0.8, cmap="RdBu_r", symmetric=True):
    """(C, H, W) channels as heat maps, one colour scale for all (symmetric around 0 for latents)."""
    maps = maps.detach().float().cpu()
    n = maps.shape[0]
    cols = cols or n
    rows = -(-n // cols)
    lim = float(maps.abs().max()) if symmetric else None
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols + 0.6, size * rows + (0.35 if title else 0)),
                             squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.set_xticks([]), ax.set_yticks([])
        if k < n:
            im = ax.imshow(maps[k].numpy(), cmap=cmap, vmin=-lim if lim else None, vmax=lim, interpolation="nearest")
            if labels:
                ax.set_title(labels[k], fontsize=7)
        else:
            ax.axis("off")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, pad=0.02)
    if title:
        fig.suptitle(title, fontsize=10, y=1 + 0.05 / fig.get_size_inches()[1], va="bottom")
    plt.show()


# ----------------------------------------------------------------------------------------------------------------
# Tables and numbers
# ----------------------------------------------------------------------------------------------------------------
def table(rows, headers):
    """A markdown table (GitHub renders it in the committed notebook)."""
    from IPython.display import Markdown, display
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    display(Markdown("\n".join(lines)))


def shape(t) -> str:
    """(3, 64, 64) → 3×64×64."""
    return "×".join(str(s) for s in t)


def flops(n: float) -> str:
    for unit, size in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:,.0f} FLOP"


def ratio(x: float) -> str:
    return f"{x:,.2f}:1" if x < 100 else f"{x:,.0f}:1"
