"""experiments/evaluate_emoji.py, the emoji world's evaluation: its ranks, its look-alike rule, its oracles' sense,
its descriptions file, and one run of the whole script on the shipped weights (calibration rows only)."""
import json

import pytest
import torch

from data import emoji_caption
from experiments import evaluate_emoji as ee


@pytest.fixture(scope="module")
def world():
    return ee.World()


def test_rank_counts_candidates_above_the_target_and_forgives_look_alikes():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3],
                           [0.1, 0.9, 0.5, 0.3]])
    alone = torch.eye(4, dtype=torch.bool)
    assert ee.rank_of(scores, torch.tensor([2, 0]), alone).tolist() == [1, 3]
    twins = alone.clone()
    twins[1, 2] = twins[2, 1] = True             # 1 and 2 are one picture: naming 1 is naming 2
    assert ee.rank_of(scores, torch.tensor([2, 0]), twins).tolist() == [0, 3]   # other names still count one each


def test_look_alikes_are_the_pictures_no_image_can_tell_apart(world):
    same = lambda a, b: bool(world.same[world.index[a], world.index[b]])
    assert same("farmer", "man farmer") and same("person with white cane", "man with white cane")
    assert not same("red apple", "green apple") and not same("thumbs up", "thumbs up: dark skin tone")
    assert not same("grinning face", "grinning face with big eyes")
    assert torch.equal(world.same, world.same.T) and bool(world.same.diagonal().all())
    assert int(world.same.sum()) - len(world.emoji) < 0.1 * len(world.emoji)   # a rule for a few, not a blur
    base = lambda name: world.bases.index(name)
    assert bool(world.same_base[base("farmer"), base("man farmer")])
    assert not bool(world.same_base[base("red apple"), base("green apple")])


def test_the_nearest_render_oracle_names_real_renders_and_not_shuffled_ones(world):
    """On centred renders (its own reference scale), nearly every emoji is its own nearest render; against
    shuffled targets the same images score at chance."""
    oracle = ee.NearestOracle(world, 64)
    targets = list(range(0, len(world.emoji), 29))                      # 121 emoji of all kinds
    images = ee.render(world, targets, 64, 0, augmented=False)
    right = ee.score_images(oracle, world, images, targets, k=1)
    assert right["top-1"].mean() >= 0.95 and right["top-5"].mean() >= 0.98
    shuffled = ee.score_images(oracle, world, images, ee.derange(targets, seed=3), k=1)
    assert shuffled["top-5"].mean() <= 0.05


def test_the_descriptions_are_neither_names_nor_aliases_nor_templates(world):
    pairs = ee.read_descriptions(world)
    assert len(pairs) >= 50
    said = set()
    for e in world.emoji:
        said |= {e.name.lower(), *map(str.lower, e.aliases)}
        rng = __import__("random").Random(e.name)
        said |= {emoji_caption(e, rng).lower() for _ in range(20)}
    for prompt, target in pairs:
        assert prompt.lower() not in said, prompt
        assert world.emoji[target].name not in world.held_out, prompt


def test_a_description_naming_no_emoji_is_one_line(world, tmp_path):
    path = tmp_path / "descriptions.tsv"
    path.write_text("a round red fruit\tred apple\na purple sky\tpurple sky emoji\n", encoding="utf-8")
    with pytest.raises(SystemExit, match=r"line 2: 'purple sky emoji' is not an emoji of the world"):
        ee.read_descriptions(world, path)


def test_the_calibration_rows_on_the_shipped_weights(tmp_path):
    """The script end to end without Stage C (--no-generation): every row for both oracles in the JSON, and real
    renders far above their shuffled prompts by the nearest-render oracle. The CNN here is trained for one short
    epoch, to keep the test in seconds, so its figures are only checked to be there."""
    out = tmp_path / "eval.json"
    results = ee.main(["--no-generation", "--n", "12", "--oracle-views", "1", "--oracle-epochs", "1",
                       "--cache-dir", str(tmp_path / "cache"), "--json", str(out), "--bootstrap", "50", "--quiet"])
    saved = json.loads(out.read_text())
    assert set(saved["alignment"]) == {"real", "stage_a", "stage_ab", "shuffled"}
    for row in saved["alignment"].values():
        for oracle in ee.ORACLES:
            assert 0 <= row[oracle]["top-5"]["mean"] <= 1 and row[oracle]["top-5"]["lo"] <= row[oracle]["top-5"]["hi"]
    real, chance = (saved["alignment"][k]["nearest"]["top-5"]["mean"] for k in ("real", "shuffled"))
    assert real >= 0.6 and chance <= 0.1, (real, chance)
    assert results["distribution"]["real renders (floor)"]["n"] == 12
    assert (tmp_path / "eval.png").exists()
