"""What train.py's loop leans on so that no fault costs a run its progress: checkpoints written atomically and read
back for --resume, a guard that skips a non-finite step and stops cleanly on data that no longer decodes, and the
progress bar, JSONL log and image grids. Every failure is one line that says what is kept.

- `Checkpointer` owns the checkpoint that --resume continues from: everything needed to go on exactly (weights,
  EMA, optimizer, GradScaler, discriminator, RNG states, step and skipped-step counts, both configs).
- `StepGuard` puts BatchNorm statistics back after a step that is skipped or cut short, and stops the run after
  too many non-finite steps in a row, pointing at the last good checkpoint.
- `Progress` writes what a person watches: the bar, the log (rank 0) and the image grids.
"""
import contextlib
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from checkpoints import first_line, load_strict, read_checkpoint, stage_parts
from data import UndecodableFolder
from sample import save_grid


def one_line(fn, *args):
    """fn(*args), exiting with one line on a ValueError: what our loaders and data sets raise for a bad file,
    folder or setting, with a message that names it."""
    try:
        return fn(*args)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def out_folder(out: Path, checkpoint_name: str, main_process: bool) -> Path:
    """Creates the run folder, and removes the temporary files of a run killed while it saved (never the
    checkpoint itself)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: --out {out}: cannot create the folder ({e.strerror or e})") from None
    if main_process:
        for stale in out.glob(f".{checkpoint_name}.tmp*"):
            stale.unlink(missing_ok=True)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------
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


def read_for_resume(path: Path, stage: str, train_config_class) -> tuple[dict, object, object]:
    """(checkpoint, model config, training config) of a train.py checkpoint of `stage`, read safely (no pickled
    code runs); anything else exits with one line."""
    if not path.exists():
        raise SystemExit(f"error: --resume: no checkpoint at {path}")
    ckpt = one_line(read_checkpoint, path)
    if ckpt.get("stage") != stage:
        raise SystemExit(f"error: --resume: {path} is a stage {ckpt.get('stage')} checkpoint, not stage {stage}")
    missing = [k for k in ("step", "skipped", "config", "train", "model", "ema", "optimizer", "rng") if k not in ckpt]
    if missing:
        raise SystemExit(f"error: --resume: {path} lacks {missing}; expected a complete train.py checkpoint")
    try:
        return ckpt, stage_parts(stage)[1](**ckpt["config"]), train_config_class(**ckpt["train"])
    except (TypeError, ValueError, ArithmeticError) as e:     # unknown or missing fields: another version's file
        raise SystemExit(f"error: --resume: the configs in {path} do not fit this train.py ({first_line(e)})") \
            from None


class Checkpointer:
    """Owns the checkpoint that --resume continues from: what goes in it, writing it atomically, and what is left
    when a write fails. Under DDP, rank 0 writes and every rank learns whether it could, so that none waits for it
    forever. `saved_step` is the step of the last checkpoint this run wrote or resumed from (None: none yet)."""

    def __init__(self, path: Path, meta: dict, model, ema, opt, scaler, disc, disc_opt, rank: int, world: int,
                 device, keys=None):
        self.path, self.meta, self.rank, self.world, self.device = path, meta, rank, world, device
        self.keys = keys              # a LoRA run's adapters: the only weights it changes, and so saves
        self.model, self.ema, self.opt, self.scaler, self.disc, self.disc_opt = model, ema, opt, scaler, disc, disc_opt
        self.saved_step = None

    def restore(self, ckpt: dict) -> tuple[int, int]:
        """Load a checkpoint read by read_for_resume into the live objects; returns (step, skipped)."""
        stage = self.meta["stage"]
        try:                              # the config came from the same file, so a mismatch means damage
            for module, key in ((self.model, "model"), (self.ema, "ema")):
                if self.keys is None:
                    load_strict(module, ckpt[key], f"stage {stage.upper()} ({key} weights)", self.path)
                elif sorted(ckpt[key]) != sorted(self.keys):
                    raise ValueError(f"its {key} adapters are not this run's ({len(ckpt[key])} tensors, "
                                     f"expected {len(self.keys)})")
                else:
                    module.load_state_dict(ckpt[key], strict=False)
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
                "model": self.weights(self.model), "ema": self.weights(self.ema), "optimizer": self.opt.state_dict(),
                "scaler": self.scaler.state_dict(),
                **({"discriminator": self.disc.state_dict(), "disc_optimizer": self.disc_opt.state_dict()}
                   if self.disc_opt is not None else {}),
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}}

    def weights(self, module) -> dict:
        state = module.state_dict()
        return state if self.keys is None else {k: state[k] for k in self.keys}

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

    def kept(self) -> str:
        return f"the checkpoint of step {self.saved_step} is in {self.path}" if self.saved_step is not None else \
            "no checkpoint has been written"


# ----------------------------------------------------------------------------------------------------------------
# Steps that go wrong
# ----------------------------------------------------------------------------------------------------------------
class StepGuard:
    """The forward pass updates BatchNorm statistics even on a step that gets skipped or cut short, and a batch with
    NaN activations would leave NaN in them for good: `begin` copies them, and a failed step puts them back. A
    non-finite step is skipped; `limit` of them in a row stop the run. A folder whose images stop decoding stops it
    too, after saving the steps done."""

    def __init__(self, checkpointer: Checkpointer, limit: int, *modules):
        self.checkpointer, self.limit, self.in_a_row = checkpointer, limit, 0
        self.buffers = [b for m in modules if m is not None for b in m.buffers()]
        self.saved = []

    def begin(self):
        self.saved = [b.detach().clone() for b in self.buffers]

    @torch.no_grad()
    def _restore_buffers(self):
        for b, before in zip(self.buffers, self.saved):
            b.copy_(before)

    @contextlib.contextmanager
    def stop_if_undecodable(self, step: int, skipped: int):
        """Around the forward and backward passes: no weight has changed yet, so the steps done are saved first."""
        try:
            yield
        except UndecodableFolder as e:
            self._restore_buffers()
            if step and step != self.checkpointer.saved_step:
                self.checkpointer.save(step, skipped)
            raise SystemExit(f"error: {e}; stopped, and {self.checkpointer.kept()}") from None

    def passed(self):
        self.in_a_row = 0

    def skip(self, step: int):
        """Step `step` (0-based) had a non-finite loss or gradient: its statistics go back; stop after `limit`."""
        self._restore_buffers()
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            saved, path = self.checkpointer.saved_step, self.checkpointer.path
            kept = f"the last good checkpoint, of step {saved}, is kept" if saved is not None else \
                "no checkpoint was written by this run"
            raise SystemExit(f"error: {self.in_a_row} non-finite losses or gradients in a row (steps "
                             f"{step - self.in_a_row + 2}–{step + 1}); stopped, and {kept} in {path}. Try a lower "
                             f"--lr or --precision fp32.")


# ----------------------------------------------------------------------------------------------------------------
# What a person watches: the bar, the JSONL log, image grids
# ----------------------------------------------------------------------------------------------------------------
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


class Progress:
    """The tqdm bar, the JSONL log every `log_every` steps, and image grids (rank 0 only). A failed write (say, a
    full disk) costs the log or a grid, never the training."""

    def __init__(self, out: Path, stage: str, step: int, cfg, main_process: bool, show_bar: bool):
        self.out, self.stage, self.cfg, self.t0 = out, stage, cfg, time.time()
        self.bar = tqdm(total=cfg.steps, initial=step, disable=not (main_process and show_bar),
                        desc=f"stage {stage}", dynamic_ncols=True)
        self.log_path = out / f"stage_{stage}.log.jsonl"
        try:
            self.log = open_log(self.log_path, step) if main_process else None
        except OSError as e:
            raise SystemExit(f"error: cannot write the log {self.log_path} ({first_line(e)})") from None

    def step(self, step: int, loss: float, parts: dict, grad_norm: float | None, lr: float, skipped: int):
        """After step `step` (1-based); a skipped step (grad_norm None) moves the bar and logs nothing."""
        self.bar.update(1)
        if grad_norm is None:
            return
        self.bar.set_postfix(loss=f"{loss:.4f}")
        if step % self.cfg.log_every == 0 or step == self.cfg.steps:
            self.write({"step": step, "loss": loss, **parts, "grad_norm": grad_norm, "lr": lr, "skipped": skipped,
                        "time": round(time.time() - self.t0, 2)})

    def write(self, record: dict):
        if self.log is None:
            return
        try:
            self.log.write(json.dumps(record) + "\n")
            self.log.flush()
        except OSError as e:
            self.bar.write(f"warning: cannot write the log {self.log_path} ({first_line(e)}); training goes on "
                           f"without it")
            with contextlib.suppress(OSError):
                self.log.close()
            self.log = None

    def grid(self, task, ema, batches, step: int, device):
        """Samples for the first 8 captions of batch 0 (the same every time); a grid is for looking at, so a failed
        write is a warning."""
        path = self.out / f"stage_{self.stage}_{step:06d}.png"
        images, captions, _ = batches(0)
        try:
            save_grid(task.grid(ema, images[:8].to(device), captions[:8]), path)
        except OSError as e:
            self.bar.write(f"warning: cannot write the image grid {path} ({first_line(e)}); training goes on")

    def close(self):
        self.bar.close()
