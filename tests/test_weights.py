"""The shipped weights (weights/shapes/ and weights/emoji/) and their format: safetensors files checked against
SHA256SUMS.

- scripts/export_weights.py turns a train.py run into the format, byte for byte the same each time, and the files
  load to exactly the checkpoints' EMA weights;
- a missing, truncated or altered file is one line naming it and its expected SHA-256, before any stage loads;
- sample.py with no --run uses the shipped weights, which are whole, small, and built from the tiny preset, and
  draw most demo prompts right by the CNN oracle (an untrained Stage C does not);
- sample.py --world emoji uses weights/emoji/, which are whole, small, the emoji preset, checked like the shapes'
  and draw most emoji demo prompts near their emoji by the nearest-render oracle (an untrained Stage C does not);
- Stage C trains on exported Stages A and B (what scripts/demo.sh does) and samples from the mixed folder.
"""
import dataclasses
import importlib.util
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoints
import sample
import stage_a
import stage_b
import stage_c
import train
from conftest import ROOT
from experiments import evaluate as ev
from test_train_sample import FAST

EXPORT = ROOT / "scripts" / "export_weights.py"
SAMPLE_FLAGS = ["--prior-steps", "3", "--decoder-steps", "2", "--seed", "3"]


def export(run, to):
    result = subprocess.run([sys.executable, str(EXPORT), "--run", str(run), "--to", str(to)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(train.py run, its export): three stages of 2 steps each."""
    run, to = tmp_path_factory.mktemp("run"), tmp_path_factory.mktemp("exported")
    for stage in "abc":
        train.main(["--stage", stage, "--out", str(run), "--steps", "2", *FAST])
    export(run, to)
    return run, to


def test_export_loads_the_ema_weights_exactly_and_is_byte_stable(exported, tmp_path):
    run, to = exported
    for s in "abc":
        ckpt = torch.load(run / f"stage_{s}.pt", weights_only=True)
        theirs = checkpoints.load_stage(s, to / f"stage_{s}.safetensors")
        assert json.loads(json.dumps(dataclasses.asdict(theirs.config))) == json.loads(json.dumps(ckpt["config"]))
        assert theirs.text_encoder_spec == ("minilm", 16) and theirs.train_side == 64
        loaded = theirs.state_dict()
        assert loaded.keys() == ckpt["ema"].keys()
        for name, value in ckpt["ema"].items():
            assert loaded[name].dtype == value.dtype and torch.equal(loaded[name], value), name
        assert any(not torch.equal(ckpt["ema"][k], ckpt["model"][k]) for k in ckpt["ema"]), "EMA = model: no test"
    export(run, tmp_path)                        # a second export of the same run: the same bytes, the same hashes
    assert (tmp_path / checkpoints.MANIFEST).read_text() == (to / checkpoints.MANIFEST).read_text()
    assert len(checkpoints.read_manifest(to)) == 3


def test_export_into_the_shipped_folder(exported, tmp_path, monkeypatch):
    """scripts/train_weights.sh exports into weights/shapes/, whose manifest is required: the export writes it
    before it loads the files back."""
    run, to = exported
    monkeypatch.setattr(checkpoints, "SHIPPED", tmp_path.resolve())
    spec = importlib.util.spec_from_file_location("export_weights", EXPORT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--run", str(run), "--to", str(tmp_path)])
    assert (tmp_path / checkpoints.MANIFEST).read_text() == (to / checkpoints.MANIFEST).read_text()


def test_sampling_from_the_export_matches_the_run(exported, tmp_path):
    run, to = exported
    for name, folder in (("pt", run), ("exported", to)):
        sample.main(["a red circle", "--run", str(folder), *SAMPLE_FLAGS, "--out", str(tmp_path / name)])
    a, b = (np.asarray(Image.open(tmp_path / name / "grid.png")) for name in ("pt", "exported"))
    assert np.array_equal(a, b)


def damage(path, how):
    if how == "missing":
        path.unlink()
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:                                        # one byte of the weights flipped: still a readable safetensors file
        data = bytearray(path.read_bytes())
        data[-100] ^= 0x01
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["missing", "truncated", "altered"])
@pytest.mark.parametrize("stage", ["a", "c"])
def test_a_damaged_file_is_one_line_and_nothing_loads(exported, tmp_path, monkeypatch, capsys, how, stage):
    _, to = exported
    folder = tmp_path / "weights"
    shutil.copytree(to, folder)
    target = folder / f"stage_{stage}.safetensors"
    expected = checkpoints.read_manifest(folder)[target.name]
    damage(target, how)
    loaded = []
    real_load = sample.load_stage
    monkeypatch.setattr(sample, "load_stage", lambda *a, **k: loaded.append(a[0]) or real_load(*a, **k))
    with pytest.raises(SystemExit) as info:
        sample.main(["a red circle", "--run", str(folder), *SAMPLE_FLAGS, "--out", str(tmp_path / "out")])
    message = str(info.value)
    assert message.startswith(f"error: {target}: ") and expected in message and "\n" not in message
    assert ("missing" if how == "missing" else "damaged or altered") in message
    assert loaded == [], "a stage loaded before the damaged file was found"
    with pytest.raises(checkpoints.WeightsError, match=expected):   # loading the one file by its path is checked too
        if how != "missing":
            real_load(stage, target)
        else:
            checkpoints.verify_weights(folder)


def test_the_shipped_folder_needs_its_manifest(exported, tmp_path, monkeypatch):
    _, to = exported
    folder = tmp_path / "shipped"
    shutil.copytree(to, folder)
    (folder / checkpoints.MANIFEST).unlink()
    monkeypatch.setattr(checkpoints, "SHIPPED", folder.resolve())
    with pytest.raises(SystemExit, match=f"{checkpoints.MANIFEST}: missing"):
        sample.main(["a red circle", *SAMPLE_FLAGS, "--out", str(tmp_path / "out")])


def test_a_folder_with_both_formats_of_a_stage_is_refused(exported, tmp_path):
    run, to = exported
    shutil.copytree(run, tmp_path / "both")
    shutil.copy(to / "stage_b.safetensors", tmp_path / "both")
    with pytest.raises(checkpoints.WeightsError, match="both stage_b.pt and stage_b.safetensors"):
        checkpoints.run_paths(tmp_path / "both")


def test_stage_c_trains_on_exported_stages_a_and_b(exported, tmp_path):
    """scripts/demo.sh: the shipped A and B with their manifest lines in the run folder, Stage C trained there."""
    _, to = exported
    folder = tmp_path / "demo"
    folder.mkdir()
    for s in "ab":
        shutil.copy(to / f"stage_{s}.safetensors", folder)
    lines = [line for line in (to / checkpoints.MANIFEST).read_text().splitlines() if "stage_c" not in line]
    (folder / checkpoints.MANIFEST).write_text("\n".join(lines) + "\n")
    train.main(["--stage", "c", "--out", str(folder), "--steps", "2", *FAST])
    assert checkpoints.run_paths(folder) == {"a": folder / "stage_a.safetensors", "b": folder / "stage_b.safetensors",
                                        "c": folder / "stage_c.pt"}
    sample.main(["a red circle", "--run", str(folder), *SAMPLE_FLAGS, "--out", str(tmp_path / "out")])
    assert (tmp_path / "out" / "grid.png").exists()


# ----------------------------------------------------------------------------------------------------------------
# The shipped weights themselves
# ----------------------------------------------------------------------------------------------------------------
SHIPPED_WORLDS = [("shapes", "tiny"), ("emoji", "emoji")]


@pytest.mark.parametrize("world,preset", SHIPPED_WORLDS)
def test_the_shipped_weights_are_whole_small_and_their_preset(world, preset):
    folder = checkpoints.SHIPPED if world == "shapes" else checkpoints.SHIPPED_EMOJI
    manifest = checkpoints.read_manifest(folder)
    assert sorted(manifest) == ["stage_a.safetensors", "stage_b.safetensors", "stage_c.safetensors"]
    checkpoints.verify_weights(folder)
    assert sum((folder / name).stat().st_size for name in manifest) <= 10 * 2 ** 20
    for s, module in (("a", stage_a), ("b", stage_b), ("c", stage_c)):
        info = checkpoints.exported_info(folder / f"stage_{s}.safetensors")
        assert info["stage"] == s and info["image_size"] == 64 and info["text_encoder"] == "minilm"
        model = checkpoints.load_stage(s, folder / f"stage_{s}.safetensors")
        assert model.config == module.PRESETS[preset], f"stage {s}: not the {preset} preset that the card's command uses"
        assert info["step"] == train.TRAIN_PRESETS[preset][s].steps
    card = (folder / "README.md").read_text()
    for name, sha in manifest.items():
        assert sha in card, f"the model card does not give {name}'s SHA-256"


def test_the_shipped_emoji_folder_is_checked_like_the_shapes_one(tmp_path, monkeypatch):
    """A damaged file of weights/emoji/ is refused in one line before anything loads, and the folder needs its
    manifest (sample.py --world emoji)."""
    original, folder = checkpoints.SHIPPED_EMOJI, tmp_path / "emoji"
    shutil.copytree(original, folder)
    monkeypatch.setattr(checkpoints, "SHIPPED_EMOJI", folder.resolve())
    damage(folder / "stage_b.safetensors", "altered")
    with pytest.raises(SystemExit, match="stage_b.safetensors: .*damaged or altered"):
        sample.main(["red apple", "--world", "emoji", *SAMPLE_FLAGS, "--out", str(tmp_path / "out")])
    shutil.copy(original / "stage_b.safetensors", folder)                    # whole again
    (folder / checkpoints.MANIFEST).unlink()
    with pytest.raises(SystemExit, match=f"{checkpoints.MANIFEST}: missing"):
        sample.main(["red apple", "--world", "emoji", *SAMPLE_FLAGS, "--out", str(tmp_path / "out")])


def test_sample_without_run_uses_the_shipped_weights(tmp_path, capsys):
    """sample.py with no --run draws exactly what --run weights/shapes draws, at the same seed."""
    sample.main(["a red star on the left", "--batch", "2", "--out", str(tmp_path / "default")])
    assert "64×64" in capsys.readouterr().out
    sample.main(["a red star on the left", "--batch", "2", "--run", str(checkpoints.SHIPPED),
                 "--out", str(tmp_path / "shipped")])
    for name in ("000_a_red_star_on_the_left.png", "001_a_red_star_on_the_left.png", "grid.png"):
        default, shipped = (np.asarray(Image.open(tmp_path / run / name)) for run in ("default", "shipped"))
        assert np.array_equal(default, shipped), f"{name}: sample.py's default is not the shipped weights"


def test_sample_world_emoji_uses_the_shipped_emoji_weights(tmp_path):
    """sample.py --world emoji draws exactly what --run weights/emoji draws, at the same seed."""
    sample.main(["red apple", "--world", "emoji", *SAMPLE_FLAGS, "--out", str(tmp_path / "world")])
    sample.main(["red apple", "--run", str(checkpoints.SHIPPED_EMOJI), *SAMPLE_FLAGS, "--out", str(tmp_path / "run")])
    world, run = (np.asarray(Image.open(tmp_path / name / "grid.png")) for name in ("world", "run"))
    assert np.array_equal(world, run)
    shapes = np.asarray(Image.open(tmp_path / "world" / "grid.png"))
    sample.main(["red apple", *SAMPLE_FLAGS, "--out", str(tmp_path / "shapes")])
    assert not np.array_equal(shapes, np.asarray(Image.open(tmp_path / "shapes" / "grid.png"))), \
        "--world emoji drew what the shapes weights draw"


def test_the_shipped_emoji_weights_draw_their_demo_prompts():
    """The nearest-render oracle (nothing learned) finds the named emoji among the 5 nearest of all 3,496 in the
    shipped weights' images of most emoji demo prompts; the same Stage C untrained, on the same A and B, in few
    (measured: 22 of 24 images against 0), so the check can fail."""
    from data import EMOJI_DEMO_PROMPTS, emoji_named
    from experiments import evaluate_emoji as ee
    from text import TextEncoder
    world = ee.World()
    oracle = ee.NearestOracle(world, 64)
    targets = [world.index[emoji_named(p).name] for p in EMOJI_DEMO_PROMPTS]
    paths = checkpoints.run_paths(checkpoints.SHIPPED_EMOJI)
    vqgan, stage_b_model, prior = (checkpoints.load_stage(s, paths[s]) for s in "abc")
    encoder = TextEncoder.from_name_or_path(prior.text_encoder_spec[0], max_length=prior.text_encoder_spec[1])
    text, text_uncond = sample.encode_prompts(encoder, EMOJI_DEMO_PROMPTS, repeat=2)

    def right(model) -> int:
        images = sample.generate(model, stage_b_model.decoder, vqgan, text, text_uncond, text, text_uncond, 64, 64,
                                 generator=torch.Generator().manual_seed(0))
        return int(ee.score_images(oracle, world, images, targets, k=2)["top-5"].sum())

    shipped = right(prior)
    torch.manual_seed(0)
    untrained = right(stage_c.Prior(prior.config).eval())
    assert shipped >= 18, f"the shipped emoji weights draw {shipped} of 24 images near their emoji; expected ≥ 18"
    assert untrained <= 4, f"an untrained Stage C draws {untrained} of 24 near their emoji: the check cannot tell"


def demo_prompts_right(prior, decoder, vqgan, encoder, oracle, k: int = 4) -> int:
    """How many of the 8 demo prompts the oracle reads right in at least half of k images (seed 0): the asked
    colour and shape for a one-object prompt, both asked colour–shape pairs for a two-object one."""
    from data import DEMO_PROMPTS
    text, text_uncond = sample.encode_prompts(encoder, DEMO_PROMPTS, repeat=k)
    images = sample.generate(prior, decoder, vqgan, text, text_uncond, text, text_uncond, 64, 64,
                             generator=torch.Generator().manual_seed(0))
    table = ev.score_images(oracle, images, [ev.parse_caption(p) for p in DEMO_PROMPTS], k=k)
    right = np.where(np.isnan(table["single object"]), table["colour binding"], table["single object"])
    return int((right.mean(axis=1) >= 0.5).sum())


def test_the_shipped_weights_draw_the_demo_prompts(tmp_path):
    """The CNN oracle (a small one, trained here in seconds) reads most demo prompts right in the shipped weights'
    images; the same Stage C untrained, on the same Stages A and B, gets few right (measured: 8 of 8 against 3-4
    over four seeds), so the check can fail."""
    from text import TextEncoder
    net, info = ev.train_oracle(64, ev.OracleConfig(images=2000, epochs=2), log=lambda *a: None)
    assert info["val_exact_scene"] >= 0.9, "the oracle itself misreads real renders"
    oracle = ev.CNNOracle(net, info)
    paths = checkpoints.run_paths(checkpoints.SHIPPED)
    vqgan, stage_b_model, prior = (checkpoints.load_stage(s, paths[s]) for s in "abc")
    encoder = TextEncoder.from_name_or_path(prior.text_encoder_spec[0], max_length=prior.text_encoder_spec[1])
    shipped = demo_prompts_right(prior, stage_b_model.decoder, vqgan, encoder, oracle)
    torch.manual_seed(0)
    untrained = demo_prompts_right(stage_c.Prior(prior.config).eval(), stage_b_model.decoder, vqgan, encoder, oracle)
    assert shipped >= 7, f"the shipped weights draw {shipped} of the 8 demo prompts right; expected at least 7"
    assert untrained <= 5, f"an untrained Stage C draws {untrained} of 8 right: the check cannot tell them apart"



def test_exported_files_hold_the_ema_weights_only(exported):
    _, to = exported
    with pytest.raises(ValueError, match="holds the EMA weights only"):
        checkpoints.load_stage("a", to / "stage_a.safetensors", weights="model")
