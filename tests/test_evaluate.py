"""experiments/evaluate.py: the caption parser against the ground truth, the analytic oracle's ceiling and chance floor, category
scoring on hand-built scenes, bootstrap intervals, KID, the Fréchet distance, precision/recall, and the command
line end to end on tiny untrained checkpoints."""
import json
import math
import random

import numpy as np
import pytest
import torch

import data
from experiments import evaluate as ev
import train

SIZE = 64


@pytest.fixture(scope="module")
def held_out_samples():
    """Real images the generator never trains on (evaluation seed), half of them with two objects."""
    images, samples = ev.render_with_truth(ev.EVAL_SEED, 300, SIZE, exclude=ev.HELD_OUT_PAIRS)
    return images, samples


@pytest.fixture(scope="module")
def detector():
    return ev.AnalyticDetector(SIZE)


# ----------------------------------------------------------------------------------------------------------------
# Captions and categories
# ----------------------------------------------------------------------------------------------------------------
def test_parse_caption_reads_back_the_ground_truth():
    for i in range(1500):
        s = data.render_sample(7, i, SIZE, two_object_prob=0.5)
        request, truth = ev.parse_caption(s.caption), s.attributes
        assert [(o.colour, o.shape) for o in request.objects] == [(o.colour, o.shape) for o in truth.objects], \
            s.caption
        for asked, real in zip(request.objects, truth.objects):
            assert asked.size in (None, real.size) and asked.cell in (None, real.cell), s.caption
        words = s.caption.split()
        assert sum(o.size is not None for o in request.objects) == words.count("small") + words.count("large")
        assert request.background == (truth.background if "background" in s.caption else None), s.caption
        if len(truth.objects) == 1:
            assert request.objects[0].cell == truth.objects[0].cell and request.relation is None, s.caption
        elif request.relation is not None:
            assert request.relation == truth.relation, s.caption
        else:                                              # two objects placed by their cells instead
            assert [o.cell for o in request.objects] == [o.cell for o in truth.objects], s.caption


def scene(*objects, background="white"):
    return ev.Scene(tuple(ev.SeenObject(colour, shape, size, cell, ((cell[1] + 0.5) / 3, (cell[0] + 0.5) / 3), area)
                          for colour, shape, size, cell, area in objects), background)


def test_scoring_one_object():
    request = ev.parse_caption("a small red circle at the top left on a black background")
    right = scene(("red", "circle", "small", (0, 0), 0.02), background="black")
    assert ev.score(request, right) == {"single object": True, "colour": True, "shape": True, "position": True,
                                        "size": True, "background": True, "everything": True}
    wrong_colour = ev.score(request, scene(("blue", "circle", "small", (0, 0), 0.02), background="black"))
    assert not wrong_colour["colour"] and not wrong_colour["single object"] and wrong_colour["shape"]
    assert wrong_colour["position"] and not wrong_colour["everything"]
    wrong_place = ev.score(request, scene(("red", "circle", "large", (2, 2), 0.05), background="white"))
    assert wrong_place["single object"] and not wrong_place["position"] and not wrong_place["size"]
    assert not wrong_place["background"] and not wrong_place["everything"]
    # the main object is the largest: a big wrong shape outweighs a small right one for colour and shape ...
    distracted = ev.score(request, scene(("red", "circle", "small", (0, 0), 0.02), ("blue", "star", "large", (1, 1),
                                                                                   0.06), background="black"))
    assert not distracted["colour"] and not distracted["shape"]
    assert distracted["single object"]                      # ... while the pair itself is still found
    assert not any(ev.score(request, scene(background="black"))[c] for c in ("single object", "colour", "shape"))


def test_scoring_two_objects():
    request = ev.parse_caption("a red circle left of a blue star")
    assert set(ev.score(request, scene())) == {"two objects", "colour binding", "position", "everything"}
    right = scene(("red", "circle", "small", (1, 0), 0.02), ("blue", "star", "large", (1, 2), 0.03))
    assert all(ev.score(request, right).values())
    swapped = ev.score(request, scene(("blue", "circle", "small", (1, 0), 0.02), ("red", "star", "large", (1, 2),
                                                                                 0.03)))
    assert swapped["two objects"] and not swapped["colour binding"] and not swapped["position"]
    mirrored = ev.score(request, scene(("red", "circle", "small", (1, 2), 0.02), ("blue", "star", "large", (1, 0),
                                                                                  0.03)))
    assert mirrored["colour binding"] and not mirrored["position"]
    one = ev.score(request, scene(("red", "circle", "small", (1, 0), 0.02)))
    assert not one["two objects"] and not one["colour binding"]
    same_shape = ev.parse_caption("a red circle at the top and a blue circle at the bottom")
    assert not ev.score(same_shape, scene(("red", "circle", "small", (0, 1), 0.02)))["two objects"]
    assert all(ev.score(same_shape, scene(("red", "circle", "small", (0, 1), 0.02),
                                          ("blue", "circle", "small", (2, 1), 0.02))).values())


# ----------------------------------------------------------------------------------------------------------------
# The analytic oracle: ceiling and chance floor
# ----------------------------------------------------------------------------------------------------------------
def category_means(table):
    return {c: np.nanmean(v) for c, v in table.items() if not np.isnan(v).all()}


def test_analytic_detector_reads_real_held_out_images(held_out_samples, detector):
    images, samples = held_out_samples
    requests = [ev.parse_caption(s.caption) for s in samples]
    means = category_means(ev.score_images(detector, images, requests))
    assert set(ev.HEADLINE) <= set(means)
    for category, accuracy in means.items():
        assert accuracy >= 0.98, f"{category}: {accuracy:.3f}"
    exact = np.mean([ev._scene_matches(s, sc) for s, sc in zip(samples, detector(images))])
    assert exact >= 0.98, f"every object and the background right on only {exact:.1%} of images"


def test_analytic_detector_reads_blurred_shapes(held_out_samples, detector):
    """A decoder's soft edges are not another shape: real images blurred by σ = 1.2 px (the widest blur the CNN
    oracle trains on, 31 dB) keep their shapes. With fill, aspect, spread and skew alone, blurred stars were read as
    crosses: single object 0.75 at this blur."""
    images, samples = held_out_samples
    requests = [ev.parse_caption(s.caption) for s in samples]
    blurred = ev.gaussian_blur(images, 1.2)
    means = category_means(ev.score_images(detector, blurred, requests))
    assert means["single object"] >= 0.97 and means["shape"] >= 0.97, means
    shuffled = category_means(ev.score_images(detector, blurred, ev.derange(requests, seed=0)))
    assert shuffled["shape"] < 0.4 and shuffled["single object"] < 0.1, shuffled     # still no rubber stamp


def test_angular_harmonics_follow_the_symmetry():
    """On a large render of each shape, only the harmonic that its symmetry allows is strong: 3 for the triangle,
    5 for the star, 4 for the cross (positive: arms on the axes) and the square (negative: corners on the
    diagonals), none for the circle."""
    size = 192
    for shape in data.SHAPES:
        obj = data._place(random.Random(0), shape, "red", "large", (1, 1), size)
        image = np.asarray(data.draw_scene(data.SceneAttributes((obj,), "white", None, size)), np.float32)
        red_green = data.COLOURS["red"][1]          # red on white: green falls from 255 outside to this inside
        coverage = (255 - image[..., 1]) / (255 - red_green)
        g = ev._geometry(coverage)
        strong = {k for k in ("h3", "h5") if g[k] > 0.2} | ({"c4+"} if g["c4"] > 0.2 else set()) \
            | ({"c4-"} if g["c4"] < -0.2 else set())
        assert strong == {"circle": set(), "square": {"c4-"}, "triangle": {"h3"}, "star": {"h5"},
                          "cross": {"c4+"}}[shape], (shape, g)


def test_shuffled_captions_score_about_chance(held_out_samples, detector):
    images, samples = held_out_samples
    requests = ev.derange([ev.parse_caption(s.caption) for s in samples], seed=0)
    assert all(a is not b for a, b in zip(requests, [ev.parse_caption(s.caption) for s in samples]))
    means = category_means(ev.score_images(detector, images, requests))
    headline = np.mean([means[c] for c in ev.HEADLINE])
    assert headline < 0.3, means
    assert 0.05 < means["colour"] < 0.35 and 0.05 < means["shape"] < 0.4, means     # 1/6 and 1/5 by chance
    assert means["colour binding"] < 0.1, means


def test_analytic_detector_sees_degradation(held_out_samples, detector):
    """Not a rubber stamp: noise that hides the shapes must cost accuracy."""
    images, samples = held_out_samples
    images, samples = images[:100], samples[:100]
    noisy = (images + torch.randn(images.shape, generator=torch.Generator().manual_seed(0)) * 0.5).clamp(0, 1)
    requests = [ev.parse_caption(s.caption) for s in samples]
    assert category_means(ev.score_images(detector, noisy, requests))["shape"] < 0.8


# ----------------------------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------------------------
def test_bootstrap_interval_contains_the_estimate_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    widths = []
    for n in (50, 800):
        values = (rng.random(n) < 0.6).astype(float)
        stat = ev.bootstrap_mean(values, ev.bootstrap_counts(n, 1000))
        assert stat["lo"] <= stat["mean"] <= stat["hi"] and stat["n"] == n
        assert abs(stat["mean"] - 0.6) < 4 * math.sqrt(0.24 / n)
        widths.append(stat["hi"] - stat["lo"])
    assert widths[1] < widths[0] / 2.5                    # about 1/√16 = 1/4 as wide
    values = np.array([1.0, np.nan, 0.0, 1.0])              # NaN: a category the prompt does not ask about
    assert ev.bootstrap_mean(values, ev.bootstrap_counts(4, 200))["mean"] == pytest.approx(2 / 3)
    table = {"colour": (rng.random(200) < 0.9).astype(float), "shape": (rng.random(200) < 0.3).astype(float)}
    head = ev.bootstrap_headline(table, ev.bootstrap_counts(200, 1000))
    assert head["mean"] == pytest.approx((table["colour"].mean() + table["shape"].mean()) / 2)
    assert head["lo"] <= head["mean"] <= head["hi"] and head["categories"] == ["colour", "shape"]


def test_kid_is_zero_for_one_distribution_and_positive_for_two():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 16, generator=g).abs()
    same, other = ev.kid(x, x), ev.kid(x, x + 0.5)
    assert abs(same["mean"]) < 0.01 * other["mean"]          # unbiased: off zero by O(1/n)
    fresh = ev.kid(x, torch.randn(300, 16, generator=g).abs())     # new samples of the same distribution
    assert other["mean"] > 0 and abs(fresh["mean"]) < 0.05 * other["mean"]


def test_frechet_distance_matches_the_closed_form_on_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
    var1, var2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(var1) - np.sqrt(var2)) ** 2).sum()    # 5 + 4 + 1 = 10
    assert ev.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-9)
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((3, 3)))   # a rotation of both: same distance,
    rotated = ev.frechet_distance(q @ mu1, q @ np.diag(var1) @ q.T, q @ mu2, q @ np.diag(var2) @ q.T)  # full
    assert rotated == pytest.approx(expected, rel=1e-6)                     # matrices this time
    a = np.array([[2.0, 0.5], [0.5, 1.0]])
    assert ev.frechet_distance(np.zeros(2), a, np.zeros(2), a) == pytest.approx(0, abs=1e-9)
    g = torch.Generator().manual_seed(0)                                    # and from samples, approximately
    x = torch.randn(20000, 3, generator=g, dtype=torch.float64) * torch.tensor(np.sqrt(var1)) + torch.tensor(mu1)
    y = torch.randn(20000, 3, generator=g, dtype=torch.float64) * torch.tensor(np.sqrt(var2)) + torch.tensor(mu2)
    assert ev.frechet_features(x, y) == pytest.approx(expected, rel=0.05)


def test_precision_recall():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(400, 8, generator=g)
    same = ev.precision_recall(real, torch.randn(400, 8, generator=g))
    assert same["precision"] > 0.8 and same["recall"] > 0.8
    far = ev.precision_recall(real, torch.randn(400, 8, generator=g) + 10)
    assert far["precision"] == 0 and far["recall"] == 0
    collapsed = ev.precision_recall(real, torch.randn(400, 8, generator=g) * 0.1)   # on the manifold, no spread
    assert collapsed["precision"] > 0.9 and collapsed["recall"] < 0.3


# ----------------------------------------------------------------------------------------------------------------
# Held-out pairs, the CNN oracle's cache, and the command line
# ----------------------------------------------------------------------------------------------------------------
def test_held_out_pairs():
    assert len(ev.HELD_OUT_PAIRS) >= 2
    assert not {(o.colour, o.shape) for p in data.DEMO_PROMPTS for o in ev.parse_caption(p).objects} & \
        ev.HELD_OUT_PAIRS, "a demo prompt uses a held-out pair"
    assert ev.held_out_pairs("red:star, blue:cross") == {("red", "star"), ("blue", "cross")}
    assert ev.held_out_pairs("none") == frozenset()
    with pytest.raises(Exception):
        ev.held_out_pairs("red:hexagon,blue:cross")


def test_cnn_oracle_is_trained_once_and_cached(tmp_path):
    config = ev.OracleConfig(images=64, epochs=1, val_images=16)
    first = ev.load_or_train_oracle(SIZE, config, tmp_path, log=lambda *a: None)
    second = ev.load_or_train_oracle(SIZE, config, tmp_path, log=lambda *a: None)
    assert not first.info["cached"] and second.info["cached"] and len(list(tmp_path.glob("oracle_*.pt"))) == 1
    images, _ = ev.render_with_truth(ev.EVAL_SEED, 4, SIZE)
    assert torch.equal(first.features(images), second.features(images))
    assert first.features(images).shape == (4, 9 * ev.CELL_FEATURES)
    assert len(first(images)) == 4


def test_cnn_oracle_cache_is_not_reused_when_the_shapes_world_changes(tmp_path, monkeypatch):
    config = ev.OracleConfig(images=32, epochs=1, val_images=8)
    ev.load_or_train_oracle(SIZE, config, tmp_path, log=lambda *a: None)
    monkeypatch.setitem(data.SIZES, "small", data.SIZES["small"] - 0.02)     # e.g. data.py's sizes are edited
    retrained = ev.load_or_train_oracle(SIZE, config, tmp_path, log=lambda *a: None)
    assert not retrained.info["cached"] and len(list(tmp_path.glob("oracle_*.pt"))) == 2


FAST = ["--batch-size", "4", "--log-every", "1", "--save-every", "2", "--sample-every", "1000", "--ema-start", "1",
        "--warmup", "1", "--no-progress", "--text-length", "16"]


def test_command_line_end_to_end(tmp_path, capsys):
    """Untrained tiny checkpoints (2 steps per stage): the numbers mean nothing, but every path runs and the JSON
    is complete and valid."""
    run = tmp_path / "run"
    for stage in "abc":
        train.main(["--stage", stage, "--out", str(run), "--steps", "2", *FAST])
    capsys.readouterr()
    out = tmp_path / "eval.json"
    ev.main(["--run", str(run), "--n", "6", "--k", "2", "--n-held-out", "4", "--prior-steps", "2",
             "--decoder-steps", "2", "--bootstrap", "50", "--oracle-images", "64", "--oracle-epochs", "1",
             "--cache-dir", str(tmp_path / "cache"), "--json", str(out)])
    printed = capsys.readouterr().out
    for text in ("real images (ceiling)", "shuffled captions", "any of 2", "held-out pairs", "KID-oracle",
                 "FD-oracle", "Stage A codebook", "| single object | colour | shape | position | two objects |"):
        assert text in printed, text
    results = json.loads(out.read_text())
    assert set(results["alignment"]) == {"real", "stage_a", "stage_ab", "shuffled", "generated", "held_out_real",
                                         "held_out_generated"}
    generated = results["alignment"]["generated"]
    for oracle in ev.ORACLES:
        for mode in ("per_image", "any_of_k"):
            stats = generated[oracle][mode]
            assert set(ev.CATEGORIES) | {"mean"} <= set(stats)
            m = stats["mean"]
            assert m["mean"] is None or 0 <= m["lo"] <= m["mean"] <= m["hi"] <= 1
        assert generated[oracle]["any_of_k"]["mean"]["mean"] >= generated[oracle]["per_image"]["mean"]["mean"]
    assert results["alignment"]["real"]["analytic"]["per_image"]["mean"]["mean"] >= 0.98
    for metrics in results["distribution"].values():
        assert math.isfinite(metrics["fd_oracle"]) and math.isfinite(metrics["kid_oracle"]["mean"])
        assert 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
    assert results["reconstruction"]["codebook"]["used"] >= 1
    assert results["settings"]["held_out_pairs"] == sorted(list(p) for p in ev.HELD_OUT_PAIRS)


def test_no_generation_needs_no_stage_c(tmp_path, capsys):
    """--no-generation: the Stage A and A+B rows of a run that has no Stage C checkpoint, and no generated rows."""
    run = tmp_path / "run"
    for stage in "ab":
        train.main(["--stage", stage, "--out", str(run), "--steps", "2", *FAST])
    capsys.readouterr()
    out = tmp_path / "eval.json"
    ev.main(["--run", str(run), "--no-generation", "--n", "6", "--decoder-steps", "2", "--bootstrap", "50",
             "--oracle-images", "64", "--oracle-epochs", "1", "--cache-dir", str(tmp_path / "cache"),
             "--json", str(out)])
    printed = capsys.readouterr().out
    assert "Stage A+B from the semantic latent" in printed and "generated" not in printed
    results = json.loads(out.read_text())
    assert set(results["alignment"]) == {"real", "stage_a", "stage_ab", "shuffled"}
    assert set(results["checkpoints"]) == {"a", "b"} and results["settings"]["held_out_prompts"] == 0
    assert results["grid"]["rows"] == ["real", "Stage A", "Stage A+B from the semantic latent"]


# ----------------------------------------------------------------------------------------------------------------
# experiments/oracle_blur.py
# ----------------------------------------------------------------------------------------------------------------
def test_gaussian_blur_is_a_gaussian_of_the_asked_width():
    """A point spreads into a kernel that sums to 1 with variance σ² along each axis; a flat image stays flat."""
    gaussian_blur = ev.gaussian_blur                  # also what experiments/oracle_blur.py blurs with
    point = torch.zeros(1, 3, 21, 21)
    point[:, :, 10, 10] = 1.0
    out = gaussian_blur(point, 1.5)[0, 0]
    offsets = torch.arange(21, dtype=torch.float32) - 10
    assert out.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert (out.sum(0) * offsets ** 2).sum().item() == pytest.approx(1.5 ** 2, rel=0.02)
    assert (out.sum(1) * offsets ** 2).sum().item() == pytest.approx(1.5 ** 2, rel=0.02)
    flat = torch.full((1, 3, 8, 8), 0.3)
    assert torch.allclose(gaussian_blur(flat, 1.0), flat) and gaussian_blur(point, 0) is point


def test_oracle_blur_refuses_negative_widths(capsys):
    from experiments.oracle_blur import main
    with pytest.raises(SystemExit):
        main(["--sigmas", "0,-1"])
    assert "--sigmas '0,-1': expected numbers ≥ 0" in capsys.readouterr().err


def test_text_binding_variance_share_separates_explained_from_unexplained():
    """experiments/text_binding.py's ANOVA share: 1 when the label fixes the state, 0 when groups have equal means."""
    from experiments.text_binding import variance_share
    labels = ["a", "b", "c"] * 20
    means = {"a": [1.0, 0.0], "b": [0.0, 2.0], "c": [-1.0, -2.0]}
    assert variance_share(np.array([means[x] for x in labels]), labels) == pytest.approx(1.0)
    mixed = np.array([[1.0, 0.0], [-1.0, 0.0]] * 30)                  # every label sees both rows equally often
    assert variance_share(mixed, ["a"] * 2 + ["b"] * 2 + ["c"] * 2 + labels[:54]) == pytest.approx(0.0, abs=1e-9)
