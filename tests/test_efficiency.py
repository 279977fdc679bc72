"""experiments/efficiency.py: FLOP counts against closed forms, the decision rule on hand-made curves, and the command line end to
end at micro size (--dry-run), whose JSON also shows that every arm trained on the same data, text and settings."""
import contextlib
import dataclasses
import io
import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from experiments import efficiency as eff
import stage_c
from data import FrozenFeatures

# ----------------------------------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------------------------------
def test_linear_flops_equal_the_closed_form():
    B, n_in, n_out = 8, 32, 16
    layer = torch.nn.Linear(n_in, n_out)
    x = torch.randn(B, n_in)
    assert eff.count_flops(lambda: layer(x)) == 2 * B * n_in * n_out
    # backward: one product for the weight's gradient, and one for the input's once the input needs one
    assert eff.count_flops(lambda: layer(x).sum().backward()) == 2 * (2 * B * n_in * n_out)
    x.requires_grad_(True)
    assert eff.count_flops(lambda: layer(x).sum().backward()) == 3 * (2 * B * n_in * n_out)


def test_conv_and_attention_flops_equal_the_closed_form():
    conv = torch.nn.Conv2d(4, 8, kernel_size=3, padding=1)
    x = torch.randn(2, 4, 16, 16)
    assert eff.count_flops(lambda: conv(x)) == 2 * (2 * 8 * 16 * 16) * 4 * 3 * 3
    # QKᵀ and the weighted sum of V, 2·Lq·Lk·d each per head. On the CPU the counter alone would count 0 here.
    B, H, Lq, Lk, d = 2, 4, 16, 48, 8
    q, k, v = torch.randn(B, H, Lq, d), torch.randn(B, H, Lk, d), torch.randn(B, H, Lk, d)
    assert eff.count_flops(lambda: F.scaled_dot_product_attention(q, k, v)) == 2 * (2 * B * H * Lq * Lk * d)


def test_training_step_flops_scale_with_batch_and_positions():
    torch.manual_seed(0)
    cfg = stage_c.PRESETS["tiny"]
    prior = stage_c.Prior(cfg)
    text, uncond = torch.randn(2, 8, cfg.c_cond), torch.randn(1, 8, cfg.c_cond)
    one = eff.training_step_flops(prior, torch.randn(1, 16, 4, 4), text[:1], uncond, 0.05)
    two = eff.training_step_flops(prior, torch.randn(2, 16, 4, 4), text, uncond, 0.05)
    assert two == 2 * one                                         # nothing is shared across a batch
    before = [p.detach().clone() for p in prior.parameters()]
    assert all(p.grad is None for p in prior.parameters())       # counted on a copy: the model is untouched
    assert all(torch.equal(a, b) for a, b in zip(before, prior.parameters()))
    # 16× the positions of the same blocks: 16× the cost of the per-position layers, ~16²× that of attention among
    # image tokens, and the same cost for the text tokens' mapper: 10–20× in all at the tiny preset
    big = eff.training_step_flops(stage_c.Prior(dataclasses.replace(cfg, c_in=4)), torch.randn(2, 4, 16, 16), text,
                                  uncond, 0.05)
    assert 8 * two < big < 40 * two


def test_frozen_encoder_passes_are_counted_per_cached_block():
    block = FrozenFeatures.BLOCK
    assert eff.samples_encoded({0, 1, 2}, 1000, True, 3) == block            # a whole block is encoded at once
    assert eff.samples_encoded({0, block + 1}, 1000, True, 2) == 2 * block
    assert eff.samples_encoded({999}, 1000, True, 1) == 1000 - (999 // block) * block   # the last block is short
    assert eff.samples_encoded({0, 1}, 1000, False, 96) == 96                  # no cache: every sample seen


# ----------------------------------------------------------------------------------------------------------------
# The decision rule
# ----------------------------------------------------------------------------------------------------------------
def point(step, flops, mean, lo, hi, kid=None, analytic=None):
    """A checkpoint; the analytic oracle's (mean, lo, hi) default to the CNN oracle's."""
    cnn = {"mean": mean, "lo": lo, "hi": hi}
    return {"step": step, "gen_flops": flops, "pipeline_flops": None,
            "alignment": {"CNN": cnn, "analytic": dict(zip(("mean", "lo", "hi"), analytic)) if analytic else cnn},
            "kid_oracle": {"mean": kid, "std": 0.01} if kid is not None else None}


BASELINE = [point(100, 1e12, 0.20, 0.15, 0.25), point(400, 4e12, 0.40, 0.35, 0.45, kid=0.10)]
CHANCE = {"CNN": 0.07, "analytic": 0.02}


def test_decision_rule_supported():
    stage_c_curve = [point(100, 1e11, 0.20, 0.15, 0.25, kid=0.3), point(400, 4e11, 0.36, 0.30, 0.42, kid=0.105)]
    d = eff.decide(stage_c_curve, BASELINE, chance=CHANCE)
    assert d["verdict"] == "supported" and d["match"]["step"] == 400 and d["budget_flops"] == 1e12
    assert d["kid_check"] is True                                 # 0.105 ≤ 0.10 + 0.01


def test_decision_rule_not_supported():
    weak = [point(100, 1e11, 0.20, 0.15, 0.25), point(400, 4e11, 0.30, 0.25, 0.35)]
    d = eff.decide(weak, BASELINE, chance=CHANCE)
    assert d["verdict"] == "not supported" and d["match"] is None and "scores 0.300 (CNN)" in d["reason"]
    # it matches, but only with more than a quarter of the baseline's FLOPs
    late = [point(100, 1e11, 0.20, 0.15, 0.25), point(400, 2e12, 0.38, 0.33, 0.43)]
    d = eff.decide(late, BASELINE, chance=CHANCE)
    assert d["verdict"] == "not supported" and "only at 0.5×" in d["reason"]


def test_decision_rule_needs_both_oracles():
    # the CNN oracle alone would call this a match; the analytic oracle puts Stage C below the baseline's bound
    split = [point(400, 4e11, 0.40, 0.34, 0.46, analytic=(0.20, 0.15, 0.25))]
    d = eff.decide(split, BASELINE, chance=CHANCE)
    assert d["verdict"] == "not supported" and "0.200 (analytic)" in d["reason"]
    assert eff.decide(split, BASELINE, chance=CHANCE, oracles=("CNN",))["verdict"] == "supported"


def test_decision_rule_inconclusive_when_an_arm_is_at_chance():
    strong = [point(400, 4e11, 0.90, 0.85, 0.95)]
    assert eff.decide(strong, BASELINE, chance={"CNN": 0.35, "analytic": 0.02})["verdict"] == "inconclusive"
    assert eff.decide(strong, BASELINE, chance={"CNN": 0.34, "analytic": 0.02})["verdict"] == "supported"
    # the CNN oracle is well above chance, the analytic one not: that is not enough
    d = eff.decide(strong, BASELINE, chance={"CNN": 0.07, "analytic": 0.35})
    assert d["verdict"] == "inconclusive" and "analytic" in d["reason"]
    # Stage C's own final checkpoint must be above chance too, even where the baseline is
    noise = [point(400, 4e11, 0.10, 0.05, 0.15)]
    d = eff.decide(noise, BASELINE, chance=CHANCE)
    assert d["verdict"] == "inconclusive" and d["reason"].startswith("Stage C's final")
    assert eff.decide(strong, BASELINE, chance=CHANCE, flops_key="pipeline_flops")["verdict"] == "unknown"


# ----------------------------------------------------------------------------------------------------------------
# End to end, micro size
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    """The command line with --dry-run (Stages A and B trained for 2 steps first, every arm 4 steps, 4 prompts), then
    train.py's Stage C with the same settings, for the bit-for-bit comparison below. Both at one thread, as float
    sums depend on how they are split; the suite's thread count is put back afterwards."""
    import train
    out = tmp_path_factory.mktemp("efficiency")
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            results = eff.main(["--dry-run", "--threads", "1", "--out", str(out), "--cache-dir",
                                str(out / "oracle_cache"), "--quiet"])
        cfg = results["settings"]["train_config"]
        with contextlib.redirect_stdout(io.StringIO()):
            train.main(["--stage", "c", "--out", str(out / "train_py"), "--stage-a", results["checkpoints"]["stage_a"],
                        "--stage-b", results["checkpoints"]["stage_b"], "--steps", str(cfg["steps"]),
                        "--batch-size", str(cfg["batch_size"]), "--warmup", str(cfg["warmup"]),
                        "--ema-start", str(cfg["ema_start"]), "--dataset-size", str(cfg["dataset_size"]),
                        "--text-length", str(results["text_encoder"]["length"]),
                        "--seed", str(results["settings"]["seed"]), "--no-progress", "--sample-every", "1000",
                        "--text-conv", "0"])      # efficiency.py's prior arms have no token convolutions
    finally:
        torch.set_num_threads(threads)
    return out, printed.getvalue(), json.loads((out / "efficiency.json").read_text())


def test_end_to_end_writes_valid_json_table_and_plot(micro_run):
    out, printed, results = micro_run
    assert "SMOKE RUN" in printed and eff.RULE_TEXT in printed and "| verdict | against |" in printed
    assert results["rule"]["text"] == eff.RULE_TEXT and results["smoke_run"] is True
    assert results["verdict"] in ("supported", "not supported", "inconclusive")
    assert set(results["arms"]) == set(eff.ARMS)
    assert set(results["calibration"]) == {"real", "shuffled", "stage_a", "stage_ab"}
    assert results["calibration"]["real"]["alignment"]["analytic"]["mean"] == 1.0     # the detector's ceiling
    for arm, a in results["arms"].items():
        assert [p["step"] for p in a["points"]] == [2, 4]
        for p in a["points"]:
            assert p["gen_flops"] == a["flops_per_step"] * p["step"] > 0
            assert p["pipeline_flops"] > p["gen_flops"] + p["frozen_flops"]            # autoencoders included
            m = p["alignment"]["CNN"]
            assert 0 <= m["lo"] <= m["mean"] <= m["hi"] <= 1
            assert p["kid_oracle"]["mean"] is not None and p["fd_oracle"] is None     # FD: not in dry runs
    flops = results["flops"]["autoencoder_flops_per_arm"]
    assert flops["stage_c"] > flops["ldm-prior"] == flops["ldm-unet"] > 0           # Stage B is Würstchen's alone
    arms = results["arms"]
    assert arms["stage_c"]["latent_shape"] == [16, 4, 4] and arms["ldm-prior"]["latent_shape"] == [4, 16, 16]
    assert arms["ldm-prior"]["flops_per_step"] > 8 * arms["stage_c"]["flops_per_step"]  # the mechanism
    assert {(d["baseline"], d["flops"]) for d in results["decisions"]} == \
        {(b, f) for b in ("ldm-prior", "ldm-unet") for f in ("generative stage", "whole pipeline")}
    assert sum(d["primary"] for d in results["decisions"]) == 1
    with Image.open(out / "efficiency.png") as image:
        assert image.size[0] >= 1000 and image.size[1] >= 800
    assert (out / "efficiency_samples.png").exists() and (out / "efficiency.md").read_text().strip() in printed


def test_resume_reads_finished_arms_and_refuses_other_settings(micro_run):
    out, _, results = micro_run
    common = ["--dry-run", "--threads", "1", "--out", str(out), "--cache-dir", str(out / "oracle_cache"), "--quiet",
              "--stage-a", results["checkpoints"]["stage_a"], "--stage-b", results["checkpoints"]["stage_b"]]
    written = {arm: (out / f"arm_{arm}.json").stat().st_mtime_ns for arm in eff.ARMS}
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            again = eff.main(common + ["--resume"])
        # read back, not trained again: the records are untouched and the results the same
        assert written == {arm: (out / f"arm_{arm}.json").stat().st_mtime_ns for arm in eff.ARMS}
        assert again["arms"] == json.loads(json.dumps(results["arms"]))
        assert again["verdict"] == results["verdict"]
        with pytest.raises(SystemExit, match=r"--resume: .*arm_stage_c\.json was made with other settings \(seed"):
            eff.main(common + ["--resume", "--seed", "1"])
    finally:
        torch.set_num_threads(threads)


def test_arms_train_on_identical_data_text_and_settings(micro_run):
    """Recorded by train_arm from what each arm actually used: the same batches (indices and captions, in order), the
    same text tokens fed to the model, the same empty-caption tokens, TrainConfig and AdamW settings, and at every
    step the same learning rate, AdamW settings, caption dropout, clipping, EMA settings and noise seed."""
    _, _, results = micro_run
    traces = {arm: a["trace"] for arm, a in results["arms"].items()}
    same = ("train_config", "optimizer", "dataset", "indices_sha256", "captions_sha256", "text_sha256",
            "settings_sha256", "uncond_sha256", "seed", "samples_seen", "distinct_samples", "step")
    for key in same:
        values = {json.dumps(t[key], sort_keys=True) for t in traces.values()}
        assert len(values) == 1, f"the arms differ in {key}: {values}"
    t = traces["stage_c"]
    assert t["dataset"]["exclude"] and t["train_config"]["hold_out"] and t["train_config"]["caption_dropout"] > 0
    assert t["optimizer"]["type"] == "AdamW" and t["optimizer"]["lr"] == t["train_config"]["lr"]
    # one loss function for every arm: only the network and the space it denoises differ
    assert eff.TextUNet.loss is stage_c.Prior.loss
    prior_cfg = results["arms"]["stage_c"]["config"]
    assert results["arms"]["ldm-prior"]["config"] == prior_cfg | {"c_in": 4, "semantic_shift": 0.0,
                                                                  "semantic_scale": 1.0}


def test_stage_c_arm_is_train_py_stage_c(micro_run):
    """The Würstchen arm's weights and EMA after 4 steps equal those of train.py --stage c with the same settings,
    bit for bit: the baselines are trained by the very procedure that trains Stage C."""
    out, _, _ = micro_run
    ours = torch.load(out / "stage_c_000004.pt", weights_only=True)
    theirs = torch.load(out / "train_py" / "stage_c.pt", weights_only=True)
    assert theirs["step"] == ours["step"] == 4
    for key in ("model", "ema"):
        assert ours[key].keys() == theirs[key].keys()
        assert all(torch.equal(ours[key][k], theirs[key][k]) for k in theirs[key]), key
