"""Bad input, interruption and untrusted files: what a learner and a long run will meet.

- Bad input: every case ends the CLI with a non-zero exit and one line on stderr that names the bad value and says
  what was expected; never a traceback from inside torch. Over-long prompts are cut with a one-line warning, sizes
  the decoder cannot make are rounded up with a note.
- Untrusted files: a checkpoint whose pickle carries code is refused by every loader, and the code never runs.
- Interruption: training is SIGKILLed at random moments and resumed; its checkpoint always loads, it loses at most
  the steps since the last save, and it ends bit-identical to an uninterrupted run. A failing save keeps the
  previous checkpoint and says so in one line.
- Non-finite losses and gradients are skipped and counted; a run of them stops training, keeping the last good
  checkpoint.

Tests run stage a in-process where they can (seconds each); the few subprocess runs use one thread.
(tests/test_checkpoint_errors.py covers the loaders' own messages, tests/test_data.py the image modes, and
tests/test_train_sample.py exact resuming, flag basics and same-seed determinism; these tests go through the CLIs.)
"""
import contextlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoints
import sample
import stage_a
import stage_b
import train
import train_state
from conftest import ROOT

ENV = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(ROOT))
QUICK = ["--batch-size", "2", "--image-size", "32", "--text-length", "8", "--sample-every", "1000", "--no-progress",
         "--dataset-size", "0", "--cache-frozen", "false"]


def cli_error(main, argv, capsys) -> str:
    """Run a CLI's main in-process: it must exit non-zero with exactly one line on stderr, which is returned."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    code, err = info.value.code, capsys.readouterr().err
    if isinstance(code, str):             # SystemExit("error: ...") prints it and exits with status 1
        assert not err.strip(), f"more on stderr than the error: {err!r}"
        message = code
    else:
        assert code not in (0, None)
        message = err
    lines = message.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), message
    return lines[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Stages A, B and C trained for one step each at 32², enough for sample.py to load and run."""
    out = tmp_path_factory.mktemp("run")
    for stage in "abc":
        train.main(["--stage", stage, "--out", str(out), "--steps", "1", *QUICK])
    return out


class Payload:
    """Unpickling this runs a shell command: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ----------------------------------------------------------------------------------------------------------------
# sample.py: prompts, sizes, numbers
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompts, named", [([""], "prompt 1 ('')"), (["   "], "prompt 1 ('   ')"),
                                            (["a red circle", "\t\n"], "prompt 2 ('\\t\\n')")])
def test_empty_prompts_are_refused(tmp_path, prompts, named, capsys):
    message = cli_error(sample.main, [*prompts, "--run", str(tmp_path)], capsys)
    assert named in message and "expected a caption" in message


def test_long_prompt_is_cut_with_one_warning(run, tmp_path, capsys):
    long = "a red circle " + "and a blue square " * 60
    sample.main([long, "--run", str(run), "--prior-steps", "2", "--decoder-steps", "2", "--out", str(tmp_path)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines                         # one line for the prompt, naming both encoders
    assert lines[0].startswith("warning: prompt 'a red circle and a blue square and a blu'… is too long")
    assert "Stage C's text encoder reads 8 of its 245 tokens" in lines[0] and "Stage B's" in lines[0]
    assert (tmp_path / "grid.png").exists()


def test_unmakeable_size_is_rounded_up_with_a_note(run, tmp_path, capsys):
    sample.main(["a red circle", "--run", str(run), "--prior-steps", "2", "--decoder-steps", "2", "--size", "40",
                 "--out", str(tmp_path)])
    printed = capsys.readouterr()
    assert "note: size 40 is not one the decoder can make; using 48" in printed.out
    assert printed.err == ""                              # and a short prompt gets no warning
    assert Image.open(next(tmp_path.glob("000_*.png"))).size == (48, 48)


def test_paper_sizes_round_up_to_multiples_of_128():
    paper = stage_b.PRESETS["paper"]
    assert [sample.valid_side(s, paper) for s in (1, 100, 1000, 1024, 1100)] == [128, 128, 1024, 1024, 1152]


@pytest.mark.parametrize("argv, expected", [
    (["--batch", "0"], "--batch: '0': expected a positive integer"),
    (["--batch", "-3"], "--batch: '-3': expected a positive integer"),
    (["--prior-steps", "0"], "--prior-steps: '0': expected a positive integer"),
    (["--decoder-steps", "-1"], "--decoder-steps: '-1': expected a positive integer"),
    (["--size", "0"], "--size: '0': expected a positive integer"),
    (["--prior-guidance", "-0.5"], "--prior-guidance: -0.5: expected a finite guidance scale ≥ 0"),
    (["--decoder-guidance", "inf"], "--decoder-guidance: inf: expected a finite guidance scale ≥ 0"),
    (["--prior-guidance", "1e308"], "--prior-guidance: 1e308: expected a finite guidance scale ≥ 0 and ≤ 10000"),
    (["--prior-timesteps", "1,a,0"], "'1,a,0': expected numbers separated by commas"),
    (["--prior-timesteps", ""], "'': expected numbers separated by commas"),
    (["--decoder-timesteps", "1,,0"], "'1,,0': expected numbers separated by commas"),
    (["--prior-timesteps", "1.5,0"], "[1.5, 0.0]: expected strictly descending values in [0, 1]"),
    (["--prior-timesteps", "1"], "[1.0]: expected at least 2 finite values"),
    (["--seed", "-1"], "--seed: '-1': expected an integer from 0 to 2^64 − 1"),
    (["--device", "tpu9"], "--device: 'tpu9': expected auto, cpu, cuda or cuda:N"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--preset", "tiny"], "unrecognized arguments: --preset"),
])
def test_sample_bad_numbers_and_flags(tmp_path, argv, expected, capsys):
    message = cli_error(sample.main, ["a red circle", "--run", str(tmp_path), *argv], capsys)
    assert expected in message, message


def test_sample_unwritable_output(run, tmp_path, capsys):
    (tmp_path / "file").write_text("a file where the output folder should go")
    message = cli_error(sample.main, ["a red circle", "--run", str(run), "--prior-steps", "2", "--decoder-steps",
                                      "2", "--out", str(tmp_path / "file" / "out")], capsys)
    assert f"cannot write the images to {tmp_path / 'file' / 'out'}" in message


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: you tried to "
                 "allocate 40000000000 bytes."),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 38.00 GiB."),
])
def test_sample_out_of_memory_is_one_line(run, tmp_path, monkeypatch, capsys, error):
    """A size or batch too large for the machine: the allocator's error becomes one line that says what to change.
    (A real 200,000² request could succeed in part and thrash a CI machine, so the allocator's failure is injected
    at the point where generation starts.)"""
    def generate(*args, **kwargs):
        raise error

    monkeypatch.setattr(sample, "generate", generate)
    message = cli_error(sample.main, ["a red circle", "--run", str(run), "--size", "96", "--batch", "3",
                                      "--out", str(tmp_path)], capsys)
    assert message.startswith("error: out of memory on cpu making 3 images of 96×96 (") and \
        message.endswith("expected a smaller --size or --batch"), message


def test_sample_other_runtime_errors_are_not_called_memory(run, tmp_path, monkeypatch):
    """Only memory errors are rewritten: any other failure inside generation is a bug, and keeps its traceback."""
    def generate(*args, **kwargs):
        raise RuntimeError("unsupported memory format option: Preserve")

    monkeypatch.setattr(sample, "generate", generate)
    with pytest.raises(RuntimeError, match="unsupported memory format"):
        sample.main(["a red circle", "--run", str(run), "--out", str(tmp_path)])


# ----------------------------------------------------------------------------------------------------------------
# sample.py: checkpoints
# ----------------------------------------------------------------------------------------------------------------
def _ckpt(run, stage="a"):
    return torch.load(run / f"stage_{stage}.pt", weights_only=True)


def _save(obj, path):
    torch.save(obj, path)
    return path


def _truncated(run, path):
    path.write_bytes((run / "stage_a.pt").read_bytes()[:5000])
    return path


def _shape_mismatch(run, path):
    ckpt = _ckpt(run)
    name = next(k for k, v in ckpt["ema"].items() if v.dim() == 4)
    ckpt["ema"][name] = torch.zeros(ckpt["ema"][name].shape[0] + 1, *ckpt["ema"][name].shape[1:])
    return _save(ckpt, path)


def _without_ema(run, path):
    ckpt = _ckpt(run)
    del ckpt["ema"]
    return _save(ckpt, path)


def _unknown_config_field(run, path):
    ckpt = _ckpt(run)
    ckpt["config"]["wings"] = 2
    return _save(ckpt, path)


def _broken_diffusers_folder(run, path):
    path.mkdir()
    (path / "config.json").write_text("{not json")
    return path


CHECKPOINTS = {
    "missing": (lambda run, path: path, "no such file or folder"),
    "garbage": (lambda run, path: path.write_bytes(b"\x00 this is not a checkpoint") and path, "cannot be read safely"),
    "truncated": (_truncated, "cannot be read safely"),
    "wrong stage": (lambda run, path: path.write_bytes((run / "stage_c.pt").read_bytes()) and path,
                    "is a stage C checkpoint; expected stage A"),
    "shape mismatch": (_shape_mismatch, "1 shape mismatches"),
    "without ema": (_without_ema, "without its 'ema' weights"),
    "unknown config field": (_unknown_config_field, "its config does not build a Stage A"),
    "bare tensor": (lambda run, path: _save(torch.zeros(3), path), "holds a Tensor; expected a dict"),
    "broken diffusers folder": (_broken_diffusers_folder, "is not valid diffusers JSON"),
}


@pytest.mark.parametrize("case", CHECKPOINTS)
def test_sample_bad_stage_a_checkpoint(run, tmp_path, case, capsys):
    make, expected = CHECKPOINTS[case]
    path = make(run, tmp_path / ("vqgan" if case == "broken diffusers folder" else "stage_a.pt"))
    message = cli_error(sample.main, ["a red circle", "--run", str(run), "--stage-a", str(path)], capsys)
    assert str(path) in message and expected in message, message


def test_pickled_code_never_runs_in_sample_or_resume(run, tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = _ckpt(run)
    evil["ema"]["extra"] = Payload(marker)
    evil["model"]["extra"] = Payload(marker)
    path = _save(evil, tmp_path / "stage_a.pt")
    message = cli_error(sample.main, ["a red circle", "--run", str(run), "--stage-a", str(path)], capsys)
    assert "cannot be read safely" in message
    message = cli_error(train.main, ["--stage", "a", "--out", str(tmp_path), "--resume", *QUICK], capsys)
    assert "cannot be read safely" in message and str(path) in message
    assert not marker.exists(), "the checkpoint's pickled code ran"


def test_cli_prints_one_line_not_a_traceback(run, tmp_path):
    """As a user runs it, in its own process: one line on stderr, exit status 1, the payload inert. (The in-process
    tests check the same line for every case; this checks what the interpreter adds around it: nothing.)"""
    marker = tmp_path / "pwned"
    evil = _save({"state_dict": {"x": Payload(marker)}}, tmp_path / "stage_a.pt")
    result = subprocess.run([sys.executable, str(ROOT / "sample.py"), "a red circle", "--run", str(run),
                             "--stage-a", str(evil)], env=ENV, cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: checkpoint {evil}: cannot be read safely"), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------------------
# train.py: flags, data, checkpoints to resume from or train on
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, expected", [
    (["--stage", "a", "--preset", "huge"], "--preset: invalid choice: 'huge'"),
    (["--stage", "a", "--batch-size", "0"], "--batch-size 0: expected a positive integer"),
    (["--stage", "a", "--steps", "-5"], "--steps -5: expected a positive integer"),
    (["--stage", "a", "--lr", "nan"], "--lr nan: expected a finite number > 0"),
    (["--stage", "a", "--lr", "0"], "--lr 0.0: expected a finite number > 0"),
    (["--stage", "b", "--caption-dropout", "1.5"], "--caption-dropout 1.5: expected a number in [0, 1]"),
    (["--stage", "a", "--ema-beta", "-0.1"], "--ema-beta -0.1: expected a number in [0, 1]"),
    (["--stage", "a", "--warmup", "-1"], "--warmup -1: expected an integer ≥ 0"),
    (["--stage", "b", "--lr-decay", "-2"], "--lr-decay -2: expected an integer ≥ 0"),
    (["--stage", "c", "--two-object-prob", "1.5"], "--two-object-prob 1.5: expected a number in [0, 1]"),
    (["--stage", "a", "--max-bad-steps", "0"], "--max-bad-steps 0: expected a positive integer"),
    (["--stage", "a", "--c-hidden", "-64"], "--c-hidden -64: expected an integer ≥ 0"),
    (["--stage", "c", "--nhead", "0"], "(model flags: --nhead 0)"),
    (["--stage", "a", "--seed", "-1"], "--seed -1: expected an integer from 0 to 2^32 − 1"),
    (["--stage", "b", "--text-length", "0"], "--text-length 0: expected a positive integer"),
    (["--stage", "a", "--frobnicate", "3"], "unrecognized arguments: --frobnicate 3"),
])
def test_train_bad_flags(argv, expected, capsys):
    message = cli_error(train.parse_args, argv, capsys)
    assert expected in message, message


@pytest.mark.parametrize("fields, expected", [
    ({"steps": 0}, "steps 0: expected a positive integer"),
    ({"lr": float("inf")}, "lr inf: expected a finite number > 0"),
    ({"weight_decay": -1.0}, "weight_decay -1.0: expected a finite number ≥ 0"),
    ({"ema_beta": 1.5}, "ema_beta 1.5: expected a number in [0, 1]"),
    ({"dataset_size": -1}, "dataset_size -1: expected an integer ≥ 0"),
])
def test_train_config_checks_its_own_ranges(fields, expected):
    """The range checks live in TrainConfig, so that code building one (experiments/, a notebook) gets them too."""
    with pytest.raises(ValueError) as info:
        train.TrainConfig(**fields)
    assert str(info.value) == expected


@pytest.mark.parametrize("argv, expected", [
    (["--image-size", "34", "--no-adversarial"], "--image-size 34: expected a multiple of 4"),
    (["--image-size", "32", "--disc-depth", "5"], "--image-size 32: expected more than 32 px"),
    (["--image-size", "16"], "size 16 is below 32 px"),
    (["--device", "cuda:7"], "--device 'cuda:7': this machine has"),
    (["--c-hidden", "0"], "the StageA config does not build a model"),
])
def test_train_settings_that_cannot_run(tmp_path, argv, expected, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # torch's own warning about zero-element tensors
        message = cli_error(train.main, ["--stage", "a", "--out", str(tmp_path), "--steps", "1",
                                         *QUICK[:2], "--no-progress", *argv], capsys)
    assert expected in message, message


def test_train_on_a_missing_frozen_stage(tmp_path, capsys):
    message = cli_error(train.main, ["--stage", "b", "--out", str(tmp_path), *QUICK], capsys)
    assert f"no Stage A checkpoint at {tmp_path / 'stage_a.pt'}" in message and "--stage-a" in message


def test_train_unwritable_out(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    message = cli_error(train.main, ["--stage", "a", "--out", str(tmp_path / "file" / "run"), *QUICK], capsys)
    assert "--out" in message and "cannot create the folder" in message


def _resume_shape_mismatch(run, path):
    ckpt = _ckpt(run)
    name = next(iter(ckpt["model"]))
    ckpt["model"][name] = ckpt["model"][name][:1]
    return _save(ckpt, path)


def _resume_missing_keys(run, path):
    ckpt = _ckpt(run)
    del ckpt["optimizer"], ckpt["rng"]
    return _save(ckpt, path)


RESUMES = {
    "truncated": (_truncated, "cannot be read safely"),
    "wrong stage": (lambda run, path: path.write_bytes((run / "stage_b.pt").read_bytes()),
                    "is a stage b checkpoint, not stage a"),
    "missing keys": (_resume_missing_keys, "lacks ['optimizer', 'rng']"),
    "unknown config field": (_unknown_config_field, "the configs in"),
    "shape mismatch": (_resume_shape_mismatch, "does not fit this run"),
    "bare tensor": (lambda run, path: _save(torch.zeros(3), path), "holds a Tensor"),
}


@pytest.mark.parametrize("case", RESUMES)
def test_resume_from_a_bad_checkpoint(run, tmp_path, case, capsys):
    make, expected = RESUMES[case]
    make(run, tmp_path / "stage_a.pt")
    message = cli_error(train.main, ["--stage", "a", "--out", str(tmp_path), "--resume", "--steps", "2", *QUICK],
                        capsys)
    assert str(tmp_path / "stage_a.pt") in message and expected in message, message


@pytest.mark.parametrize("layout, expected", [("empty", "no images found"), ("uncaptioned", "but no captions"),
                                              ("bad metadata", "not UTF-8 text")])
def test_train_on_an_unusable_folder(tmp_path, layout, expected, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    if layout != "empty":
        Image.new("RGB", (40, 40), "red").save(folder / "a.png")
    if layout == "bad metadata":
        (folder / "metadata.jsonl").write_bytes(b"\xff\xfe{\"file_name\": \"a.png\"}")
    message = cli_error(train.main, ["--stage", "a", "--out", str(tmp_path / "run"), "--data", str(folder),
                                     *QUICK], capsys)
    assert str(folder) in message and expected in message, message


def test_train_on_a_folder_of_awkward_images(tmp_path, monkeypatch):
    """Grey, grey+alpha, RGBA, 16-bit, palette, CMYK JPEG and a large image all train; a truncated file is replaced
    at load time and reported; an image over Pillow's decompression-bomb limit is refused when the folder is read."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4_000_000)    # refused above 2× this: 8M pixels
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    images = {
        "grey": Image.fromarray(rng.integers(0, 256, (40, 50), dtype=np.uint8)),
        "grey_alpha": Image.new("LA", (48, 48), (90, 128)),
        "rgba": Image.fromarray(rng.integers(0, 256, (36, 60, 4), dtype=np.uint8)),
        "sixteen_bit": Image.fromarray(rng.integers(0, 65536, (64, 64), dtype=np.uint16)),
        "palette": Image.new("P", (33, 33), 7),
        "large": Image.linear_gradient("L").resize((2500, 1500)).convert("RGB"),   # 3.75M pixels: allowed
        "bomb": Image.new("L", (3000, 3000), 0),                                    # 9M pixels: refused
    }
    for name, image in images.items():
        image.save(folder / f"{name}.png")
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, format="PNG")
    (folder / "truncated.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    for path in list(folder.iterdir()):
        path.with_suffix(".txt").write_text(f"a picture called {path.stem}")
    with pytest.warns(UserWarning) as caught:
        train.main(["--stage", "a", "--out", str(tmp_path / "run"), "--data", str(folder), "--steps", "1",
                    *QUICK, "--batch-size", "8"])                         # 8 readable files: every one is loaded
    messages = [str(w.message) for w in caught]
    skipped = [m for m in messages if "skipped" in m]
    assert len(skipped) == 1 and "skipped 1 of 9 images" in skipped[0] and "bomb.png" in skipped[0]
    assert "decompression bomb" in skipped[0]
    undecodable = [m for m in messages if "cannot decode" in m]
    assert len(undecodable) == 1 and "truncated.png" in undecodable[0], messages
    record = json.loads((tmp_path / "run" / "stage_a.log.jsonl").read_text())
    assert record["step"] == 1 and np.isfinite(record["loss"])


# ----------------------------------------------------------------------------------------------------------------
# Non-finite losses and gradients
# ----------------------------------------------------------------------------------------------------------------
FAST_A = ["--stage", "a", "--batch-size", "2", "--image-size", "32", "--log-every", "1", "--save-every", "2",
          "--sample-every", "1000", "--warmup", "2", "--ema-start", "2", "--no-progress"]


class InfGradient(torch.autograd.Function):
    """Adds 0 to the loss and inf to the gradient of `x`: a finite loss whose step would make every weight NaN."""

    @staticmethod
    def forward(x):
        return x.sum() * 0

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.shape = inputs[0].shape

    @staticmethod
    def backward(ctx, grad):
        return grad.new_full(ctx.shape, float("inf"))


def poison(monkeypatch, steps: set, kind: str):
    """Stage A's loss becomes NaN (kind "nan") or gets an inf gradient (kind "inf-grad") on these 0-based steps."""
    original = stage_a.StageA.loss

    def loss(self, images, discriminator=None, step=0):
        value, parts = original(self, images, discriminator, step)
        if step in steps:
            value = value * float("nan") if kind == "nan" else value + InfGradient.apply(next(self.parameters()))
        return value, parts

    monkeypatch.setattr(stage_a.StageA, "loss", loss)


def weights(path):
    ckpt = torch.load(path, weights_only=True)
    return ckpt, {f"{k}.{n}": t for k in ("model", "ema") for n, t in ckpt[k].items()}


@pytest.mark.parametrize("kind", ["nan", "inf-grad"])
def test_a_non_finite_step_is_skipped_and_counted(tmp_path, monkeypatch, kind):
    poison(monkeypatch, {3}, kind)                                        # the last step: one to save at
    train.main([*FAST_A, "--out", str(tmp_path), "--steps", "4"])
    ckpt, tensors = weights(tmp_path / "stage_a.pt")
    assert ckpt["step"] == 4 and ckpt["skipped"] == 1, "the final checkpoint must be written after a skipped step"
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
    log = [json.loads(x) for x in (tmp_path / "stage_a.log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and log[-1]["skipped"] == 0


def test_non_finite_losses_in_a_row_stop_training_and_keep_the_checkpoint(tmp_path, monkeypatch, capsys):
    train.main([*FAST_A, "--out", str(tmp_path / "clean"), "--steps", "2"])
    poison(monkeypatch, set(range(2, 100)), "nan")                        # every step after the second
    message = cli_error(train.main, [*FAST_A, "--out", str(tmp_path / "bad"), "--steps", "20", "--max-bad-steps",
                                     "3"], capsys)
    assert "3 non-finite losses or gradients in a row (steps 3–5); stopped" in message, message
    assert "the last good checkpoint, of step 4, is kept" in message and "--lr" in message
    ckpt, tensors = weights(tmp_path / "bad" / "stage_a.pt")
    clean_ckpt, clean = weights(tmp_path / "clean" / "stage_a.pt")
    assert ckpt["step"] == 4 and ckpt["skipped"] == 2
    for name, tensor in clean.items():                                    # skipped steps leave the weights alone
        assert torch.equal(tensor, tensors[name]), name


# ----------------------------------------------------------------------------------------------------------------
# Saving: a failed write keeps the previous checkpoint
# ----------------------------------------------------------------------------------------------------------------
def failing_save(monkeypatch, fail_on: int, error: Exception):
    """torch.save fails on its `fail_on`-th call, after writing part of the file, as a full disk would."""
    real, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == fail_on:
            with open(f, "wb") if isinstance(f, (str, os.PathLike)) else contextlib.nullcontext(f) as file:
                file.write(b"PK\x03\x04 half a checkpoint")
            raise error
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


@pytest.mark.parametrize("error, reason", [
    (OSError(28, "No space left on device"), "No space left on device"),
    (PermissionError(13, "Permission denied"), "Permission denied"),
    (RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 576 vs 480"), "unexpected pos"),
])
def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys, error, reason):
    failing_save(monkeypatch, 2, error)
    message = cli_error(train.main, [*FAST_A, "--out", str(tmp_path), "--steps", "6"], capsys)
    path = tmp_path / "stage_a.pt"
    assert message.startswith(f"error: saving {path} at step 4 failed (") and reason in message, message
    assert message.endswith("the checkpoint of step 2 is intact"), message
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "a temporary file was left"


def test_a_failed_first_save_says_nothing_was_written(tmp_path, monkeypatch, capsys):
    failing_save(monkeypatch, 1, OSError(28, "No space left on device"))
    message = cli_error(train.main, [*FAST_A, "--out", str(tmp_path), "--steps", "2"], capsys)
    assert message.endswith("no checkpoint has been written") and not (tmp_path / "stage_a.pt").exists()


def test_ddp_stops_every_rank_when_rank_0_cannot_save(tmp_path):
    """A folder where the checkpoint should go makes rank 0's first save fail. Rank 1 must stop too, with a line of
    its own. (torchrun kills the other workers when one fails; a launcher that does not would leave rank 1 waiting
    for rank 0 at the next step until gloo's 30-minute timeout.)"""
    (tmp_path / "stage_a.pt").mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29534",
           str(ROOT / "train.py"), *FAST_A, "--out", str(tmp_path), "--steps", "4"]
    result = subprocess.run(cmd, env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert f"error: saving {tmp_path / 'stage_a.pt'} at step 2 failed" in out, out[-2000:]
    assert "error: rank 1: rank 0 could not save" in out, out[-2000:]


def captioned_folder(folder, n: int):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"picture {i}")
    return folder


def test_a_folder_that_stops_decoding_keeps_the_steps_done(tmp_path, monkeypatch, capsys):
    """Every image of the folder fails to decode from the fourth step on (as if the disk went away): the three
    steps done are saved, though the last checkpoint was at step 2, and the error is one line."""
    import data
    folder = captioned_folder(tmp_path / "images", 4)
    calls, real_load, real_call = [], data.load_image, data.Batches.__call__

    def load_image(path, size):
        if len(calls) > 4 + 3:                # 4 batches start the codebook (TaskA.prepare), then steps 0–2
            raise OSError("image file is truncated")
        return real_load(path, size)

    def call(self, micro_step):
        calls.append(micro_step)
        return real_call(self, micro_step)

    monkeypatch.setattr(data, "load_image", load_image)
    monkeypatch.setattr(data.Batches, "__call__", call)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                                   # the per-image "cannot decode" lines
        message = cli_error(train.main, [*FAST_A, "--out", str(tmp_path / "run"), "--data", str(folder),
                                         "--steps", "6"], capsys)
    path = tmp_path / "run" / "stage_a.pt"
    assert message == f"error: image folder {folder}: none of its 4 images can be decoded; stopped, and the " \
                      f"checkpoint of step 3 is in {path}", message
    assert torch.load(path, weights_only=True)["step"] == 3


class FullDiskLog:
    """A log file that takes `lines` writes, then fails as a full disk would."""

    def __init__(self, path, lines: int):
        self.file, self.left = open(path, "a"), lines

    def write(self, text):
        if self.left == 0:
            raise OSError(28, "No space left on device")
        self.left -= 1
        return self.file.write(text)

    def flush(self):
        self.file.flush()

    def close(self):
        self.file.close()


def test_unwritable_grid_and_log_warn_and_training_goes_on(tmp_path, monkeypatch, capsys):
    """A grid that cannot be written (a folder in its place) and a log on a full disk each give one warning; the
    run still trains every step and writes its checkpoints."""
    (tmp_path / "stage_a_000002.png").mkdir()
    monkeypatch.setattr(train_state, "open_log", lambda path, step: FullDiskLog(path, 1))
    train.main([*FAST_A, "--out", str(tmp_path), "--steps", "4", "--sample-every", "2"])
    out = capsys.readouterr().out
    assert out.count("warning: cannot write the image grid") == 1 and "stage_a_000002.png" in out, out
    assert out.count("warning: cannot write the log") == 1 and "No space left on device" in out, out
    assert (tmp_path / "stage_a_000004.png").is_file()
    assert [json.loads(x)["step"] for x in (tmp_path / "stage_a.log.jsonl").read_text().splitlines()] == [1]
    assert torch.load(tmp_path / "stage_a.pt", weights_only=True)["step"] == 4


# ----------------------------------------------------------------------------------------------------------------
# SIGKILL at random moments
# ----------------------------------------------------------------------------------------------------------------
STEPS, SAVE_EVERY, KILLS = 16, 3, 3
KILL_FLAGS = ["--stage", "a", "--steps", str(STEPS), "--batch-size", "4", "--image-size", "32", "--log-every", "1",
              "--save-every", str(SAVE_EVERY), "--sample-every", "1000", "--warmup", "2", "--ema-start", "2",
              "--no-progress", "--seed", "3"]


def logged_steps(out) -> list[int]:
    path = out / "stage_a.log.jsonl"
    steps = []
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            pass                          # a line the kill cut short
    return steps


def train_one_thread(argv):
    """train.main in this process, on one thread as the subprocesses run: the same kernels, so the same bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train.main(argv)
    finally:
        torch.set_num_threads(threads)


def test_sigkill_at_random_moments_then_resume(tmp_path):
    train_one_thread([*KILL_FLAGS, "--out", str(tmp_path / "straight")])
    straight_log = [json.loads(x) for x in (tmp_path / "straight" / "stage_a.log.jsonl").read_text().splitlines()]

    seed = int.from_bytes(os.urandom(4), "little")
    rng, out, ckpt_path = random.Random(seed), tmp_path / "killed", tmp_path / "killed" / "stage_a.pt"
    kills = 0
    while kills < KILLS:
        resume = ckpt_path.exists()
        start = torch.load(ckpt_path, weights_only=True)["step"] if resume else 0
        if start >= STEPS - 4:
            # The last kill came after a checkpoint at or past the last step a kill may aim at (STEPS - 4), so no
            # step is left to aim at with room before the run ends; fewer kills this time. The resume below still
            # checks the rest (CI saw this once).
            break
        if not resume:
            (out / "stage_a.log.jsonl").unlink(missing_ok=True)           # a fresh start rewrites it anyway
        target = rng.randint(start + 1, STEPS - 4)
        if rng.random() < 0.5:            # half the kills aim at a save, whose window is short
            target = min(-(-target // SAVE_EVERY) * SAVE_EVERY, STEPS - 4)
        proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *KILL_FLAGS, "--out", str(out),
                                 *(["--resume"] if resume else [])], env=ENV, cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while proc.poll() is None and max(logged_steps(out), default=0) < target and time.time() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.03))  # somewhere inside a step, or a save
        assert proc.poll() is None, f"seed {seed}: the run ended before the kill: {proc.stderr.read()[-2000:]!r}"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        kills += 1
        last = max(logged_steps(out), default=0)
        assert last >= target, f"seed {seed}"
        if ckpt_path.exists():            # it may not exist yet if the kill came before the first save ended
            ckpt = checkpoints.read_checkpoint(ckpt_path)                    # never corrupt: it reads, and loads
            checkpoints.load_stage("a", ckpt_path, weights="model")
            saved = ckpt["step"]
        else:
            saved = 0
        # At most the steps since the last save are lost: fewer than SAVE_EVERY, or exactly that many when the
        # kill came while that save was being written.
        assert saved % SAVE_EVERY == 0 and 0 <= last - saved <= SAVE_EVERY, f"seed {seed}: logged {last}, saved {saved}"

    train_one_thread([*KILL_FLAGS, "--out", str(out), "--resume"])     # in-process: saves a process start
    _, resumed = weights(ckpt_path)
    _, straight = weights(tmp_path / "straight" / "stage_a.pt")
    assert resumed.keys() == straight.keys()
    for name, tensor in straight.items():
        assert torch.equal(tensor, resumed[name]), f"seed {seed}: {name} differs from the uninterrupted run"
    log = [json.loads(x) for x in (out / "stage_a.log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, STEPS + 1)), "the log must hold each step once"
    assert [r["loss"] for r in log] == [r["loss"] for r in straight_log]
    assert not list(out.glob(".*tmp*")), "a temporary file of a killed save was left behind"
