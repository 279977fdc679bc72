"""Bad checkpoints fail loudly, in one line, naming the problem; nothing loads partially and no pickled code runs.

Official `.pt` files imply the `paper` preset; building that (1B parameters) for every case would be slow, so these
tests point the `paper` preset at the tiny config with monkeypatch.
"""
import dataclasses
import os

import pytest
import torch

import stage_a
import stage_b
import stage_c


@pytest.fixture(autouse=True)
def tiny_as_paper(monkeypatch):
    for module in (stage_a, stage_b, stage_c):
        monkeypatch.setitem(module.PRESETS, "paper", module.PRESETS["tiny"])


def official_files(tmp_path):
    """A tiny stand-in for each released .pt, in the released layout: name → (path, loader)."""
    a, b, c = stage_a.StageA(stage_a.PRESETS["tiny"]), stage_b.StageB(stage_b.PRESETS["tiny"]), \
        stage_c.Prior(stage_c.PRESETS["tiny"])
    files = {"a": ({"state_dict": a.state_dict()}, stage_a.load_pretrained),
             "b": ({"state_dict": b.decoder.state_dict(), "effnet_state_dict": b.compressor.state_dict()},
                   stage_b.load_pretrained),
             "c": ({"ema_state_dict": c.state_dict()}, stage_c.load_pretrained)}
    out = {}
    for name, (ckpt, loader) in files.items():
        path = tmp_path / f"{name}.pt"
        torch.save(ckpt, path)
        out[name] = (path, loader)
    return out


def one_line_error(loader, path) -> str:
    with pytest.raises(ValueError) as info:
        loader(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_the_stand_ins_themselves_load(tmp_path):
    for path, loader in official_files(tmp_path).values():
        loader(path)


@pytest.mark.parametrize("stage, other, name", [("a", "c", "Stage C"), ("c", "a", "Stage A"),
                                                ("b", "c", "Stage C")])
def test_wrong_stage_is_named(tmp_path, stage, other, name):
    files = official_files(tmp_path)
    wrong = torch.load(files[other][0], weights_only=True)
    state = next(iter(wrong.values()))
    key = {"a": "state_dict", "b": "state_dict", "c": "ema_state_dict"}[stage]
    path = tmp_path / "wrong.pt"
    torch.save({key: state, "effnet_state_dict": {}}, path)
    message = one_line_error(files[stage][1], path)
    assert "missing keys" in message and f"looks like {name}" in message


@pytest.mark.parametrize("stage", ["a", "b", "c"])
def test_truncated_file(tmp_path, stage):
    path, loader = official_files(tmp_path)[stage]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert "cannot be read" in one_line_error(loader, path)


@pytest.mark.parametrize("stage", ["a", "b", "c"])
def test_missing_keys_are_listed(tmp_path, stage):
    path, loader = official_files(tmp_path)[stage]
    ckpt = torch.load(path, weights_only=True)
    state = ckpt["ema_state_dict" if stage == "c" else "state_dict"]
    dropped = sorted(state)[-1]
    del state[dropped]
    torch.save(ckpt, path)
    message = one_line_error(loader, path)
    assert "1 missing keys" in message and dropped in message


def test_shape_mismatch_is_named(tmp_path):
    wider = stage_c.Prior(dataclasses.replace(stage_c.PRESETS["tiny"], c=96, nhead=4))
    path = tmp_path / "wider.pt"
    torch.save({"ema_state_dict": wider.state_dict()}, path)
    message = one_line_error(stage_c.load_pretrained, path)
    assert "shape mismatch" in message and "checkpoint (96," in message and "model (64," in message


def test_unknown_layout_is_named(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"model": {}}, path)
    for loader in (stage_a.load_pretrained, stage_b.load_pretrained, stage_c.load_pretrained):
        assert "expected" in one_line_error(loader, path)


def test_missing_file_and_folder_without_config(tmp_path):
    assert "no such file" in one_line_error(stage_a.load_pretrained, tmp_path / "nope.pt")
    (tmp_path / "folder").mkdir()
    assert "config.json" in one_line_error(stage_c.load_pretrained, tmp_path / "folder")


class Payload:
    """Unpickling this runs a shell command: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickled_code_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": Payload(marker)}}, path)
    assert "cannot be read safely" in one_line_error(stage_a.load_pretrained, path)
    assert not marker.exists()


def test_corrupt_safetensors_folder(tmp_path):
    from safetensors.torch import save_file
    folder = tmp_path / "prior"
    folder.mkdir()
    (folder / "config.json").write_text('{"c_in": 16, "c": 64, "c_cond": 384, "c_r": 32, "depth": 4, "nhead": 4}')
    released = dataclasses.replace(stage_c.PRESETS["tiny"], text_conv=0)  # a diffusers folder has no token convs
    save_file({k: v.contiguous() for k, v in stage_c.Prior(released).state_dict().items()},
              str(folder / "diffusion_pytorch_model.safetensors"))
    stage_c.load_pretrained(folder)                                      # intact: loads
    weights = folder / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="cannot be read safely"):
        stage_c.load_pretrained(folder)
