"""Guards for train.main's loop (gradient accumulation, DDP and its resume), and sample.py's published-weight
flags. Each test covers a path that no other test file checks.

- Gradient accumulation: --grad-accum 2 at batch 8 makes the same update as batch 16.
- DDP: two gloo processes at batch 8 each (and at batch 4 with --grad-accum 2) make the same update as one
  process at batch 16, and each rank trains on different images.
- DDP resume: a two-process run stopped at step 2 and resumed to step 4 ends bit-identical to an uninterrupted one.
- sample.py with --stage-c/-b/-a and --text-encoder-c/-b on tiny diffusers-format folders laid out as the
  released ones (wuerstchen-prior/, wuerstchen/): the CLI writes its images and grid, and they are the images that
  diffusers' WuerstchenCombinedPipeline and our own `generate` make in-process.

Why Stage C, and why its random draws are made per sample in the first two tests
--------------------------------------------------------------------------------
Stage B's compressor (EfficientNetV2, BatchNorm throughout) trains jointly with the decoder, and Stage A's encoder
ends in a BatchNorm: in training these normalise by the statistics of the batch in hand, so a batch of 16 and two
micro-batches of 8 are different computations and equality cannot hold (Stage A's discriminator, moreover, takes
one step per optimizer step on the last micro-batch alone). Stage C (the tiny preset: LayerNorm, GlobalResponseNorm
per sample, dropout 0) computes each sample's loss from that sample alone, so the mean over 16 equals the mean of
two means over 8, exactly in math.

What is *not* equal by design: train.py draws each micro-batch's caption dropout, t and noise from
`step_generator(seed, step · grad_accum + micro, rank)`, one generator per micro-batch and per rank (train.py's
loop and `step_generator`). Batch 16 draws 16 t values from one generator; two micro-batches of 8 draw 8 each from
two others; two ranks from two more. So the sample with index 9 gets other noise in each of the three runs, and
the weights legitimately differ. The strongest exact statement that holds is conditional on the draws: *given the
same draws per sample*, the runs make the same update. The first two tests therefore run train.main unchanged
except for `per_sample_draws`, which gives each sample its own generator keyed by (step, dataset index) and calls
Stage C's own `Prior.loss` on it alone (averaging those losses is what `Prior.loss` does over a batch). Everything
the refactor could break is still train.py's: which images a micro-batch or rank gets, the loss scaling by
1/grad_accum, accumulating (not zeroing) gradients between micro-batches, DDP's averaging and no_sync, clipping
after accumulation, one AdamW step per accumulation, the warm-up and the EMA. The DDP resume test runs the real
`step_generator` draws, no patch at all. The DDP processes are forked from the test process, which has imported
torch and transformers already (see `ddp`).

Tolerance: summing 16 per-sample gradients in another order rounds differently, and AdamW's first steps move each
weight by about lr · sign(gradient), so a weight whose gradient nearly cancels can move a little differently (the
runs here differ by 2e-7 at most). TOL = lr / 100 is far above that rounding and far below what a wrong batch, a dropped
micro-batch or a missed step does (about lr per weight, checked in each test: `assert_moved`). Logged losses and
gradient norms are compared to rtol 1e-5, which catches a loss scaled by grad_accum (Adam would hide it in the
weights).
"""
import hashlib
import json
import multiprocessing
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

import checkpoints
import sample
import stage_c
import train


LR = 1e-3
TOL = LR / 100
STEPS = 2
# Stage C at 32² on a finite data set of 64 shapes: its frozen features are cached in one block of 64 samples, so
# they are bit-identical whichever batch first asks for them. Warm-up 3: the lr changes every step (lr/3, 2lr/3, lr),
# so an lr that counted micro-batches would show. ema_start 1: a real EMA update (β 0.5) on every step. Caption
# dropout 0.5: both branches of it.
C_FLAGS = ["--stage", "c", "--image-size", "32", "--text-length", "8", "--dataset-size", "64", "--cache-frozen",
           "true", "--caption-dropout", "0.5", "--lr", str(LR), "--warmup", "3", "--ema-start", "1", "--ema-beta",
           "0.5", "--log-every", "1", "--save-every", "2", "--sample-every", "1000", "--no-progress", "--seed", "3"]


# ----------------------------------------------------------------------------------------------------------------
# Instrumentation, used in-process (through monkeypatch.setattr) and in the DDP processes (plain setattr)
# ----------------------------------------------------------------------------------------------------------------
def per_sample_draws(setattr_):
    """Stage C's caption dropout, t and noise drawn per sample, from a generator keyed by (step, dataset index),
    whatever the micro-batch or rank the sample is in. train.py's own generator is ignored."""
    task_loss, prior_loss = train.TaskC.loss, stage_c.Prior.loss

    def loss_of_task(self, model, images, captions, indices, gen, step):
        gens = [torch.Generator(self.device).manual_seed(1_000_003 * step + i) for i in indices]
        return task_loss(self, model, images, captions, indices, gens, step)

    def loss_of_prior(self, semantic, text, text_uncond, caption_dropout=0.05, generator=None):
        if not isinstance(generator, list):
            return prior_loss(self, semantic, text, text_uncond, caption_dropout, generator)
        each = [prior_loss(self, semantic[k:k + 1], text[k:k + 1], text_uncond, caption_dropout, g)
                for k, g in enumerate(generator)]
        loss = torch.stack([value for value, _ in each]).mean()
        return loss, {name: torch.stack([parts[name] for _, parts in each]).mean() for name in each[0][1]}

    setattr_(train.TaskC, "loss", loss_of_task)
    setattr_(stage_c.Prior, "loss", loss_of_prior)


def record_batches(setattr_, folder: Path):
    """Each call of Stage C's task loss appends (step, dataset indices, a fingerprint per image) to
    FOLDER/rank{RANK}.jsonl (a fingerprint is the SHA-256 of the pixels: mirrored layouts have the same pixel sum);
    the first call of rank 0 saves the model's initial weights to FOLDER/initial.pt."""
    task_loss = train.TaskC.loss
    rank = int(os.environ.get("RANK", "0"))

    def loss(self, model, images, captions, indices, gen, step):
        if rank == 0 and not (folder / "initial.pt").exists():
            torch.save({k: v.detach().clone() for k, v in self.model.state_dict().items()}, folder / "initial.pt")
        with open(folder / f"rank{rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "indices": indices,
                                "images": [hashlib.sha256(x.cpu().numpy().tobytes()).hexdigest() for x in images]})
                    + "\n")
        return task_loss(self, model, images, captions, indices, gen, step)

    folder.mkdir(parents=True, exist_ok=True)
    setattr_(train.TaskC, "loss", loss)


def rank_main(rank: int, port: int, log_path: Path, argv: list[str], record: Path | None):
    """One DDP process, forked from this one: the environment torchrun would set (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR/PORT, which is how train.setup_distributed detects DDP), one thread, its output to its own file; with
    `record`, the per-sample draws and the batch record, else train.main exactly as the CLI runs it."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", TOKENIZERS_PARALLELISM="false")
    torch.set_num_threads(1)              # as DataLoader workers do: OpenMP's thread pool does not survive a fork
    log = open(log_path, "w", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    if record:
        per_sample_draws(setattr)
        record_batches(setattr, record)
    # Keep the process group alive past train.main. Otherwise the DDP module freed with main's frame drops the last
    # reference to it, and ~ProcessGroupGloo joins gloo's worker thread while holding the GIL; a worker still
    # releasing the last collective's work (the final checkpoint's broadcast, whose tensor needs the GIL to be
    # freed) then waits for the GIL forever. Rank 1 hung so in about 1 forked run in 10 (gdb: Reducer dealloc →
    # ~ProcessGroupGloo → thread join; pt_gloo_runloop → ~AsyncBroadcastWork → decref_pyobject → take_gil). The
    # forked process ends with os._exit, so the kept group is never destroyed. Training is untouched.
    kept, destroy = [], dist.destroy_process_group

    def destroy_process_group(group=None):
        kept.append(dist.distributed_c10d._get_default_group())
        destroy(group)

    dist.destroy_process_group = destroy_process_group
    train.main(argv)


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------
needs_fork = pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(),
                                reason="the DDP processes are forked from this one")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp(out: Path, argv: list[str], record: Path | None = None, timeout: float = 120) -> str:
    """train.main in 2 gloo processes on the CPU; returns rank 0's output. The processes are forked from this one,
    which has imported torch and transformers already: a fresh interpreter per rank (torchrun, as
    tests/test_train_sample.py runs it) spends about 10 s of a loaded 2-core machine on imports. A rank that fails
    stops the other at once, rather than leaving it waiting for gloo's timeout."""
    out.mkdir(parents=True, exist_ok=True)
    port, context = free_port(), multiprocessing.get_context("fork")
    logs = [out.parent / f"{out.name}.rank{rank}.txt" for rank in range(2)]
    procs = [context.Process(target=rank_main, args=(rank, port, logs[rank], [*argv, "--out", str(out)], record))
             for rank in range(2)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    try:
        while any(p.exitcode is None for p in procs):
            if any(p.exitcode not in (None, 0) for p in procs) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.exitcode is None:
                p.kill()
            p.join()
    texts = [path.read_text() for path in logs]
    for rank, (p, text) in enumerate(zip(procs, texts)):
        assert p.exitcode == 0, f"rank {rank} exited with {p.exitcode}:\n{text[-3000:]}"
    return texts[0]


def in_process(monkeypatch, out: Path, argv: list[str], record: Path):
    """train.main here, on one thread as the DDP processes run, with the per-sample draws and a record."""
    with monkeypatch.context() as m:
        per_sample_draws(m.setattr)
        record_batches(m.setattr, record)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            train.main([*argv, "--out", str(out)])
        finally:
            torch.set_num_threads(threads)


def checkpoint(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def weights(ckpt: dict) -> dict:
    return {f"{k}.{n}": t for k in ("model", "ema") for n, t in ckpt[k].items()}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def assert_close_weights(got: dict, expected: dict, what: str):
    got, expected = weights(got), weights(expected)
    diff = max_diff(got, expected)
    worst = max(got, key=lambda k: (got[k].double() - expected[k].double()).abs().max().item())
    assert diff <= TOL, f"{what}: weights differ by up to {diff:.3g} (at {worst}), over {TOL:.3g}"


def assert_moved(ckpt: dict, initial: dict, what: str):
    """The comparison is not vacuous: training moved the weights by far more than TOL (about lr per weight)."""
    moved = max_diff({k: ckpt["model"][k] for k in initial}, initial)
    assert moved > 50 * TOL, f"{what}: the weights moved by only {moved:.3g} from their initial values"


def log(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "stage_c.log.jsonl").read_text().splitlines()]


def assert_same_log(got: list[dict], expected: list[dict], keys=("loss", "grad_norm", "lr"), what=""):
    assert [r["step"] for r in got] == [r["step"] for r in expected] == list(range(1, STEPS + 1)), what
    for g, e in zip(got, expected):
        for key in keys:
            assert g[key] == pytest.approx(e[key], rel=1e-5, abs=1e-9), f"{what}: step {g['step']} {key}"


def records(folder: Path, rank: int = 0) -> dict[int, list[dict]]:
    """{step: [the task-loss calls of that step, in order]} of one rank."""
    by_step = {}
    for line in (folder / f"rank{rank}.jsonl").read_text().splitlines():
        record = json.loads(line)
        by_step.setdefault(record["step"], []).append(record)
    return by_step


# ----------------------------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def frozen(tmp_path_factory):
    """Stages A and B trained one step each at 32² (what Stage C trains on); returns their flags for train.py."""
    out = tmp_path_factory.mktemp("frozen")
    quick = ["--batch-size", "2", "--image-size", "32", "--text-length", "8", "--sample-every", "1000",
             "--no-progress", "--dataset-size", "0", "--cache-frozen", "false"]
    for stage in "ab":
        train.main(["--stage", stage, "--out", str(out), "--steps", "1", *quick])
    return ["--stage-a", str(out / "stage_a.pt"), "--stage-b", str(out / "stage_b.pt")]


@pytest.fixture(scope="module")
def batch16(frozen, tmp_path_factory):
    """The reference: one process, batch 16, no accumulation, per-sample draws, STEPS steps."""
    root = tmp_path_factory.mktemp("batch16")
    with pytest.MonkeyPatch.context() as m:
        in_process(m, root / "run", [*C_FLAGS, *frozen, "--steps", str(STEPS), "--batch-size", "16"], root / "rec")
    return root / "run", root / "rec"


# ----------------------------------------------------------------------------------------------------------------
# 1. Gradient accumulation
# ----------------------------------------------------------------------------------------------------------------
def test_grad_accum_2_at_batch_8_equals_batch_16(frozen, batch16, tmp_path, monkeypatch):
    """--grad-accum 2 --batch-size 8 against --batch-size 16, given the same draws per sample (module docstring):
    the same 16 images in the same order at each step, the same logged loss, gradient norm and lr, and the same
    model and EMA weights after 2 steps. A third run at batch 8 without accumulation (half the data per step) must
    differ by far more than the tolerance: the test would see a micro-batch dropped or its gradient zeroed."""
    ref_out, ref_rec = batch16
    flags = [*C_FLAGS, *frozen, "--steps", str(STEPS), "--batch-size", "8"]
    in_process(monkeypatch, tmp_path / "accum", [*flags, "--grad-accum", "2"], tmp_path / "accum_rec")
    in_process(monkeypatch, tmp_path / "half", flags, tmp_path / "half_rec")

    ref_calls, calls = records(ref_rec), records(tmp_path / "accum_rec")
    assert sorted(calls) == sorted(ref_calls) == list(range(STEPS))
    for step in range(STEPS):
        assert [len(c["indices"]) for c in calls[step]] == [8, 8], f"step {step}: expected 2 micro-batches of 8"
        assert sum((c["indices"] for c in calls[step]), []) == ref_calls[step][0]["indices"], f"step {step}"
        assert sum((c["images"] for c in calls[step]), []) == ref_calls[step][0]["images"], f"step {step}"
    assert len(set(ref_calls[0][0]["indices"] + ref_calls[1][0]["indices"])) == 32, "steps must see new samples"

    ref, accum = checkpoint(ref_out / "stage_c.pt"), checkpoint(tmp_path / "accum" / "stage_c.pt")
    assert ref["step"] == accum["step"] == STEPS and accum["train"]["grad_accum"] == 2
    assert_same_log(log(tmp_path / "accum"), log(ref_out), keys=("loss", "mse", "caption_dropped", "grad_norm", "lr"),
                    what="grad-accum log")
    assert_close_weights(accum, ref, "--grad-accum 2 at batch 8 vs batch 16")
    initial = torch.load(ref_rec / "initial.pt", weights_only=True)
    assert max_diff(initial, torch.load(tmp_path / "accum_rec" / "initial.pt", weights_only=True)) == 0
    assert_moved(ref, initial, "batch 16")
    half = checkpoint(tmp_path / "half" / "stage_c.pt")
    assert max_diff(weights(half), weights(ref)) > 20 * TOL, "batch 8 alone should differ from batch 16"


# ----------------------------------------------------------------------------------------------------------------
# 2. DDP: 2 processes at batch 8 = 1 process at batch 16
# ----------------------------------------------------------------------------------------------------------------
@needs_fork
@pytest.mark.parametrize("batch, accum", [(8, 1), (4, 2)], ids=["batch8", "batch4-accum2"])
def test_ddp_two_ranks_equal_one_process_at_batch_16(frozen, batch16, tmp_path, batch, accum):
    """Two gloo processes against one process at batch 16, given the same draws per sample: at batch 8 each (the
    case asked for), and at batch 4 with --grad-accum 2 (DDP's no_sync on the first micro-batch). Train.Batches
    numbers micro-batches micro-major (micro 0 of rank 0, of rank 1, micro 1 of rank 0, ...): in that order the
    ranks' batches are the single process's 16 images, and the ranks' images are disjoint, by index and by pixels.
    DDP's averaged gradient makes the same update: same logged loss (the all-rank mean), gradient norm and lr, same
    model and EMA weights. (The log's other parts, mse and caption_dropped, are rank 0's alone under DDP, so they
    are not compared.)"""
    ref_out, ref_rec = batch16
    stdout = ddp(tmp_path / "ddp", [*C_FLAGS, *frozen, "--steps", str(STEPS), "--batch-size", str(batch),
                                    "--grad-accum", str(accum)], record=tmp_path / "rec")
    assert "world 2" in stdout

    ref_calls = records(ref_rec)
    ranks = [records(tmp_path / "rec", rank) for rank in (0, 1)]
    for step in range(STEPS):
        calls = [ranks[rank][step] for rank in (0, 1)]
        assert [[len(c["indices"]) for c in calls[rank]] for rank in (0, 1)] == [[batch] * accum] * 2, f"step {step}"
        seen = [{x for c in calls[rank] for x in c[key]} for rank in (0, 1) for key in ("indices", "images")]
        assert not seen[0] & seen[2], f"step {step}: the ranks share samples"
        assert not seen[1] & seen[3], f"step {step}: the ranks share images"
        in_order = [calls[rank][micro] for micro in range(accum) for rank in (0, 1)]
        for key in ("indices", "images"):
            assert sum((c[key] for c in in_order), []) == ref_calls[step][0][key], f"step {step}: {key}"

    ref, got = checkpoint(ref_out / "stage_c.pt"), checkpoint(tmp_path / "ddp" / "stage_c.pt")
    assert got["step"] == STEPS and got["train"]["grad_accum"] == accum
    assert_same_log(log(tmp_path / "ddp"), log(ref_out), what="DDP log")
    assert_close_weights(got, ref, f"2 DDP ranks at batch {batch} × {accum} vs 1 process at batch 16")
    initial = torch.load(ref_rec / "initial.pt", weights_only=True)
    assert max_diff(initial, torch.load(tmp_path / "rec" / "initial.pt", weights_only=True)) == 0
    assert_moved(got, initial, "DDP")


# ----------------------------------------------------------------------------------------------------------------
# 3. DDP resume
# ----------------------------------------------------------------------------------------------------------------
@needs_fork
def test_ddp_resume_equals_uninterrupted_ddp_run(frozen, tmp_path):
    """The plain CLI in 2 gloo processes (train.py's own step_generator draws, nothing patched): 2 steps, then
    --resume to 4, against 4 steps straight. The final checkpoints must be bit-identical (model, EMA, optimizer
    moments) and the log must hold steps 1-4 once with the same losses; the resumed run really trained (its
    weights moved from those of step 2)."""
    flags = [*C_FLAGS, *frozen, "--batch-size", "8"]
    ddp(tmp_path / "straight", [*flags, "--steps", "4"])
    ddp(tmp_path / "resumed", [*flags, "--steps", "2"])
    half = checkpoint(tmp_path / "resumed" / "stage_c.pt")
    stdout = ddp(tmp_path / "resumed", [*flags, "--steps", "4", "--resume"])
    assert "resuming from" in stdout and "at step 2" in stdout and "world 2" in stdout

    straight, resumed = checkpoint(tmp_path / "straight" / "stage_c.pt"), checkpoint(tmp_path / "resumed" /
                                                                                     "stage_c.pt")
    assert half["step"] == 2 and straight["step"] == resumed["step"] == 4
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resuming under DDP"
    for key, value in straight["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(value[name], resumed["optimizer"]["state"][key][name]), f"optimizer {key}.{name}"
    assert max_diff(weights(half), b) > 50 * TOL, "the resumed run did not move the weights"
    straight_log, resumed_log = log(tmp_path / "straight"), log(tmp_path / "resumed")
    assert [r["step"] for r in resumed_log] == [1, 2, 3, 4]
    assert [r["loss"] for r in resumed_log] == [r["loss"] for r in straight_log]
    assert [r["grad_norm"] for r in resumed_log] == [r["grad_norm"] for r in straight_log]


# ----------------------------------------------------------------------------------------------------------------
# 4. sample.py with the published-weight flags
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """tests/test_pipeline_parity.py's tiny re-randomised pipeline, saved in the released diffusers layout:
    wuerstchen-prior/{prior,text_encoder,tokenizer}/ and wuerstchen/{decoder,vqgan,text_encoder,tokenizer}/.
    Skips as the parity tests do when diffusers is not installed."""
    pytest.importorskip("transformers")
    pytest.importorskip("diffusers")
    pytest.importorskip("diffusers.pipelines.deprecated.wuerstchen")
    import test_pipeline_parity as parity
    parts = parity.parts.__wrapped__(tmp_path_factory)                    # the fixture's own builder
    pipe, root = parts["pipe"], tmp_path_factory.mktemp("published")
    prior_root, decoder_root = root / "wuerstchen-prior", root / "wuerstchen"
    for folder, module in ((prior_root / "prior", pipe.prior_prior), (prior_root / "text_encoder",
                                                                      pipe.prior_text_encoder),
                           (prior_root / "tokenizer", pipe.prior_tokenizer), (decoder_root / "decoder", pipe.decoder),
                           (decoder_root / "vqgan", pipe.vqgan), (decoder_root / "text_encoder", pipe.text_encoder),
                           (decoder_root / "tokenizer", pipe.tokenizer)):
        module.save_pretrained(folder)
    flags = ["--stage-c", str(prior_root / "prior"), "--stage-b", str(decoder_root / "decoder"),
             "--stage-a", str(decoder_root / "vqgan"), "--text-encoder-c", str(prior_root),
             "--text-encoder-b", str(decoder_root)]
    return parity, parts, flags


def test_sample_cli_with_published_weight_flags(published, tmp_path, capsys):
    """sample.main with --stage-c/-b/-a (diffusers folders) and --text-encoder-c/-b (pipeline folders with
    text_encoder/ and tokenizer/), 2 images of one prompt at 128², both guidances on, short schedules. It must write
    2 images of 128×128 and a grid of one row of 2 (2 px white padding: 262×132), and its PNGs must be the images
    of `sample.generate` called in-process on the same folders, exactly after rounding to 8 bits, and those of
    diffusers' WuerstchenCombinedPipeline to within half a level plus the parity tolerance."""
    parity, parts, flags = published
    prompt, n, seed, size = "lower newer", 2, 1, 128
    prior_ts, decoder_ts, prior_cfg, decoder_cfg = [1.0, 0.7, 0.4, 0.0], [1.0, 0.6, 0.3, 0.0], 3.0, 2.5
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sample.main([prompt, *flags, "--size", str(size), "--batch", str(n), "--seed", str(seed),
                     "--prior-timesteps", ",".join(map(str, prior_ts)), "--decoder-timesteps",
                     ",".join(map(str, decoder_ts)), "--prior-guidance", str(prior_cfg), "--decoder-guidance",
                     str(decoder_cfg), "--device", "cpu", "--precision", "fp32", "--out", str(tmp_path)])
        printed = capsys.readouterr()
        assert f"{n} images of {size}×{size}" in printed.out and f"grid: {tmp_path / 'grid.png'}" in printed.out
        assert printed.err == ""

        files = sorted(p.name for p in tmp_path.glob("*.png"))
        assert files == ["000_lower_newer.png", "001_lower_newer.png", "grid.png"], files
        pixels = np.stack([np.asarray(Image.open(tmp_path / name)) for name in files[:n]])
        assert pixels.shape == (n, size, size, 3)
        grid = np.asarray(Image.open(tmp_path / "grid.png"))
        assert grid.shape == (size + 4, n * (size + 2) + 2, 3)
        for i in range(n):                                                # the grid holds the images, in order
            assert np.array_equal(grid[2:2 + size, 2 + i * (size + 2):2 + i * (size + 2) + size], pixels[i])

        # In-process, as sample.main does it: the same loaders, encoders and generator.
        load = checkpoints.load_stage
        prior, decoder, vqgan = load("c", flags[1]), load("b", flags[3]).decoder, load("a", flags[5])
        from text import TextEncoder
        text_c, text_c_uncond = sample.encode_prompts(TextEncoder.from_name_or_path(flags[7]), [prompt], repeat=n)
        text_b, text_b_uncond = sample.encode_prompts(TextEncoder.from_name_or_path(flags[9]), [prompt], repeat=n)
        ours = sample.generate(prior, decoder, vqgan, text_c, text_c_uncond, text_b, text_b_uncond, size, size,
                               prior_timesteps=torch.tensor(prior_ts), decoder_timesteps=torch.tensor(decoder_ts),
                               prior_guidance=prior_cfg, decoder_guidance=decoder_cfg,
                               generator=torch.Generator().manual_seed(seed))
        theirs = parity._diffusers(parts, prompt, n, seed, prior_ts, decoder_ts, prior_cfg, decoder_cfg)
    finally:
        torch.set_num_threads(threads)
    parity._assert_nontrivial(theirs)
    assert np.abs(pixels[0].astype(int) - pixels[1].astype(int)).max() > 10, "each image has its own noise"
    expected = (ours.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    assert np.array_equal(pixels, expected), \
        f"the CLI's images differ from generate's by up to {np.abs(pixels.astype(int) - expected).max()} levels"
    diff = (ours - theirs).abs().max().item()
    assert diff == 0, f"generate's images differ from diffusers' by {diff:.3g} (max abs); expected them equal"


def test_step_seeds_differ_across_ranks_and_steps():
    """With `+ rank` alone, rank r + 101 drew rank r's noise one step later: 160 ranks (the paper's batch 1,280 at
    8 per GPU) would have trained on repeated draws. Every (step, rank) pair must get its own seed."""
    seeds = {train.step_generator(0, step, rank, "cpu").initial_seed() for step in range(2000) for rank in range(256)}
    assert len(seeds) == 2000 * 256
    assert train.step_generator(3, 7, 0, "cpu").initial_seed() == 3 * 1_000_003 + 7 * 101   # single process: unchanged

