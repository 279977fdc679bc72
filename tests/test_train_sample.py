"""train.py and sample.py end to end at the tiny preset, shrunk further so each run takes seconds.

- Each stage trains, saves, resumes, and its loss curve continues exactly as in an uninterrupted run.
- sample.py writes its PNGs and grid, and the same seed and flags give the same image.
- DDP with two CPU processes (gloo) runs under torchrun.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import train
from conftest import ROOT
from data import HELD_OUT_PAIRS, Batches

# Small enough for seconds per run, big enough to exercise every path (grids, EMA after ema_start, checkpoints).
# --lr-decay 0: a 2-step run continued to 4 equals a 4-step run only while the rate does not depend on the total,
# and the tiny Stage B's preset decays over its last 2,000 steps (a decay has its own test below).
FAST = ["--batch-size", "4", "--log-every", "1", "--save-every", "2", "--sample-every", "3", "--ema-start", "2",
        "--warmup", "2", "--lr-decay", "0", "--no-progress", "--text-length", "16"]


def run_train(out, stage, steps, *extra):
    train.main(["--stage", stage, "--out", str(out), "--steps", str(steps), *FAST, *extra])


def losses(out, stage):
    lines = (out / f"stage_{stage}.log.jsonl").read_text().splitlines()
    return {rec["step"]: rec["loss"] for rec in map(json.loads, lines)}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One uninterrupted run of all three stages, 4 steps each (Stage B on A's checkpoint, C on B's)."""
    out = tmp_path_factory.mktemp("run")
    for stage in "abc":
        run_train(out, stage, 4)
    return out


@pytest.mark.parametrize("stage", ["a", "b", "c"])
def test_resume_continues_exactly(run, tmp_path, stage):
    for dep in "abc"[: "abc".index(stage)]:                                # the frozen stages it trains on
        (tmp_path / f"stage_{dep}.pt").write_bytes((run / f"stage_{dep}.pt").read_bytes())
    run_train(tmp_path, stage, 2)
    run_train(tmp_path, stage, 4, "--resume")
    straight, resumed = losses(run, stage), losses(tmp_path, stage)
    assert sorted(resumed) == [1, 2, 3, 4]
    assert resumed == straight, "the resumed loss curve differs from the uninterrupted one"
    a = torch.load(run / f"stage_{stage}.pt", weights_only=True)
    b = torch.load(tmp_path / f"stage_{stage}.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after resuming"


def test_learning_rate_decays_linearly_to_zero_over_its_last_steps():
    cfg = train.TrainConfig(steps=10, lr=1.0, warmup=2, lr_decay=4)
    assert [train.learning_rate(s, cfg) for s in range(10)] == [0.5, 1, 1, 1, 1, 1, 1.0, 0.75, 0.5, 0.25]
    assert train.learning_rate(7, train.TrainConfig(steps=10, lr=1.0, warmup=2)) == 1.0      # 0: constant


def test_resume_that_adds_a_decay_equals_a_run_trained_with_it(tmp_path):
    """The shipped Stage B is a constant-rate run resumed with --steps N --lr-decay D: that must be the same run
    as the preset trained from the start, which is what scripts/train_weights.sh does on a clean checkout."""
    run_train(tmp_path / "straight", "a", 6, "--lr-decay", "3")
    run_train(tmp_path / "resumed", "a", 3)
    run_train(tmp_path / "resumed", "a", 6, "--resume", "--lr-decay", "3")
    straight, resumed = losses(tmp_path / "straight", "a"), losses(tmp_path / "resumed", "a")
    assert sorted(resumed) == list(range(1, 7)) and resumed == straight
    lrs = [json.loads(x)["lr"] for x in (tmp_path / "resumed" / "stage_a.log.jsonl").read_text().splitlines()]
    assert lrs[-1] < lrs[2], lrs                                          # the decay took effect after the resume
    a, b = (torch.load(tmp_path / d / "stage_a.pt", weights_only=True) for d in ("straight", "resumed"))
    assert a["train"]["lr_decay"] == b["train"]["lr_decay"] == 3
    assert all(torch.equal(t, b["ema"][k]) for k, t in a["ema"].items())


def test_training_writes_grids_logs_and_complete_checkpoints(run):
    for stage in "abc":
        assert (run / f"stage_{stage}_000003.png").exists() and (run / f"stage_{stage}_000004.png").exists()
        ckpt = torch.load(run / f"stage_{stage}.pt", weights_only=True)
        assert {"model", "ema", "optimizer", "rng", "config", "train", "step"} <= set(ckpt)
        assert not list(run.glob(".*.tmp*")), "a temporary checkpoint file was left behind"
    grid = Image.open(run / "stage_a_000004.png")
    assert grid.height > 2 * 64                                           # inputs above reconstructions


def test_flags_override_preset_fields():
    args, model_cfg, train_cfg = train.parse_args(["--stage", "b", "--c-hidden", "16,32,32", "--blocks", "1,2,1",
                                                   "--lr", "0.01", "--attention", "false,true,false"])
    assert model_cfg.c_hidden == (16, 32, 32) and model_cfg.blocks == (1, 2, 1) and train_cfg.lr == 0.01
    assert model_cfg.attention == (False, True, False)


def test_built_in_shapes_hold_out_the_evaluation_pairs():
    """experiments/evaluate.py's held-out rows measure unseen compositions only if training never draws those pairs."""
    def pairs(argv):
        args, _, cfg = train.parse_args(["--stage", "a", "--dataset-size", "400"] + argv)
        data = Batches(args.data, args.seed, cfg, rank=0, world=1).dataset
        return {(o.colour, o.shape) for i in range(len(data)) for o in data.sample(i).attributes.objects}
    assert not pairs([]) & HELD_OUT_PAIRS
    assert pairs(["--hold-out", "false"]) & HELD_OUT_PAIRS


def test_two_object_prob_sets_the_share_of_two_object_scenes():
    """--two-object-prob reaches the built-in shapes: 0 draws only one-object scenes, 1 only two-object ones."""
    def counts(p):
        args, _, cfg = train.parse_args(["--stage", "c", "--dataset-size", "200", "--two-object-prob", p])
        data = Batches(args.data, args.seed, cfg, rank=0, world=1).dataset
        return {len(data.sample(i).attributes.objects) for i in range(len(data))}
    assert counts("0") == {1} and counts("1") == {2} and counts("0.5") == {1, 2}


@pytest.mark.parametrize("argv", [["--stage", "a", "--steps", "0"], ["--stage", "c", "--depth", "two"],
                                  ["--stage", "x"], ["--stage", "a", "--bogus"]])
def test_bad_flags_exit_with_a_message(argv, capsys):
    with pytest.raises(SystemExit) as info:
        train.parse_args(argv)
    assert info.value.code == 2 and "error:" in capsys.readouterr().err


def read_pixels(path):
    return np.asarray(Image.open(path))


def test_sample_writes_images_and_is_deterministic(run, tmp_path, capsys):
    flags = ["--run", str(run), "--prior-steps", "3", "--decoder-steps", "2", "--batch", "2", "--seed", "5"]
    sample.main(["a red circle", "a blue square left of a green star", *flags, "--out", str(tmp_path / "one")])
    printed = capsys.readouterr().out
    assert "stage C:" in printed and "stage B:" in printed and "stage A:" in printed and "grid:" in printed
    sample.main(["a red circle", "a blue square left of a green star", *flags, "--out", str(tmp_path / "two")])
    files = sorted(p.name for p in (tmp_path / "one").glob("*.png"))
    assert len(files) == 5 and "grid.png" in files                      # 2 prompts × 2 images + the grid
    for name in files:
        assert np.array_equal(read_pixels(tmp_path / "one" / name), read_pixels(tmp_path / "two" / name)), name
    assert read_pixels(tmp_path / "one" / files[0]).shape == (64, 64, 3)
    sample.main(["a red circle", "a blue square left of a green star", *flags[:-1], "6", "--out",
                 str(tmp_path / "three")])
    assert not np.array_equal(read_pixels(tmp_path / "one" / files[0]), read_pixels(tmp_path / "three" / files[0]))


@pytest.mark.parametrize("argv, message", [(["--decoder-steps", "0"], "positive integer"),
                                           (["--prior-guidance", "-1"], "guidance"),
                                           (["--prior-timesteps", "0,1"], "descending")])
def test_sample_bad_flags(run, argv, message, capsys):
    with pytest.raises(SystemExit):
        sample.main(["a red circle", "--run", str(run), *argv])
    assert message in capsys.readouterr().err


def test_ddp_two_cpu_processes(tmp_path):
    """torchrun with 2 gloo processes: Stage A with the GAN term on from step 1 (its discriminator is synced by
    hand), 3 steps. Both ranks must finish, and rank 0 writes the checkpoint and log."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(ROOT / "train.py"), "--stage", "a", "--out", str(tmp_path), "--steps", "3", *FAST,
           "--adversarial-start", "1"]
    result = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "world 2" in result.stdout
    log = losses(tmp_path, "a")
    assert sorted(log) == [1, 2, 3]
    records = [json.loads(x) for x in (tmp_path / "stage_a.log.jsonl").read_text().splitlines()]
    assert "disc" in records[-1]
    assert torch.load(tmp_path / "stage_a.pt", weights_only=True)["step"] == 3


def test_trains_on_a_folder_of_captioned_images(tmp_path):
    """--data FOLDER: sidecar captions, a corrupt file skipped and counted, images resized to the training size."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (48 + 8 * i, 80, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"picture number {i}")
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "broken.txt").write_text("a broken picture")
    with pytest.warns(UserWarning, match="skipped"):
        run_train(tmp_path / "run", "a", 2, "--data", str(folder), "--image-size", "32")
    assert sorted(losses(tmp_path / "run", "a")) == [1, 2]
