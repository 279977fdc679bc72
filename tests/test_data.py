"""The shapes dataset (determinism, coverage, ground truth that matches the pixels, held-out pairs, captions) and
ImageFolderDataset (caption sources, image modes, broken files, clear errors)."""
import io
import json
import random
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import data

SIZE = 64


@pytest.fixture(scope="module")
def samples():
    return [data.render_sample(0, i, SIZE, two_object_prob=0.4) for i in range(400)]


# ----------------------------------------------------------------------------------------------------------------
# Shapes dataset
# ----------------------------------------------------------------------------------------------------------------
def test_same_seed_and_index_give_the_same_sample():
    a, b = data.render_sample(3, 17), data.render_sample(3, 17)
    assert a.image.tobytes() == b.image.tobytes() and a.caption == b.caption and a.attributes == b.attributes
    c = data.render_sample(3, 18)
    assert c.image.tobytes() != a.image.tobytes() and c.attributes != a.attributes
    d = data.render_sample(4, 17)
    assert d.attributes != a.attributes


def test_samples_do_not_depend_on_generation_order():
    ds = data.ShapesDataset(50, seed=7)
    forward = [ds[i] for i in range(50)]
    random.seed(123)                                            # global RNG state must not matter either
    torch.manual_seed(123)
    for i in [31, 2, 49, 0, 17]:
        image, caption = data.ShapesDataset(50, seed=7)[i]
        assert torch.equal(image, forward[i][0]) and caption == forward[i][1]
    images, captions = data.render_dataset(10, seed=7, start=20)
    assert images.dtype == torch.uint8 and images.shape == (10, 3, SIZE, SIZE)
    assert captions == [forward[i][1] for i in range(20, 30)]
    assert torch.equal(images.float() / 255, torch.stack([forward[i][0] for i in range(20, 30)]))


def test_dataset_item_format():
    image, caption = data.ShapesDataset(4, size=96)[3]
    assert image.shape == (3, 96, 96) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    assert isinstance(caption, str) and caption
    with pytest.raises(IndexError):
        data.ShapesDataset(4)[4]


def test_every_attribute_value_appears(samples):
    objects = [o for s in samples for o in s.attributes.objects]
    assert {o.shape for o in objects} == set(data.SHAPES)
    assert {o.colour for o in objects} == set(data.COLOURS)
    assert {o.size for o in objects} == set(data.SIZES)
    assert {o.cell for o in objects} == set(data.POSITIONS)
    assert {s.attributes.background for s in samples} == set(data.BACKGROUNDS)
    assert {s.attributes.relation for s in samples} == set(data.RELATIONS) | {None}
    assert len(data.COLOURS) >= 6 and len(data.SHAPES) >= 5
    assert 0.3 < np.mean([len(s.attributes.objects) == 2 for s in samples]) < 0.5


def _coverage(image: np.ndarray, colour, background) -> np.ndarray:
    """Per pixel, the fraction of it covered by a shape of `colour` on `background` (anti-aliased edges blend)."""
    c, bg = np.array(colour, float), np.array(background, float)
    return np.clip(((image - bg) @ (c - bg)) / ((c - bg) @ (c - bg)), 0, 1)


def test_ground_truth_matches_the_pixels(samples):
    for s in samples:
        image, attrs = np.asarray(s.image).astype(float), s.attributes
        background = data.BACKGROUNDS[attrs.background]
        outside = np.ones((SIZE, SIZE), dtype=bool)
        for obj in attrs.objects:
            x0, y0, x1, y1 = obj.bbox
            assert 0 <= x0 < x1 <= SIZE and 0 <= y0 < y1 <= SIZE
            row, col = obj.cell                                 # the box lies in its grid cell
            assert col * SIZE / 3 <= x0 and x1 <= (col + 1) * SIZE / 3
            assert row * SIZE / 3 <= y0 and y1 <= (row + 1) * SIZE / 3
            assert x0 < obj.centre[0] < x1 and y0 < obj.centre[1] < y1
            # filled shapes: the pixel at the centre has the object's colour
            centre_pixel = image[int(obj.centre[1]), int(obj.centre[0])]
            assert np.abs(centre_pixel - data.COLOURS[obj.colour]).max() <= 2, (s.caption, obj)
            # the shape fills the fraction of its box that its kind should (what a detector relies on)
            box = image[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))]
            area = _coverage(box, data.COLOURS[obj.colour], background).sum() / ((x1 - x0) * (y1 - y0))
            assert area == pytest.approx(data.FILL_RATIO[obj.shape], abs=0.04), (s.caption, obj)
            outside[max(0, int(y0) - 1):int(np.ceil(y1)) + 1, max(0, int(x0) - 1):int(np.ceil(x1)) + 1] = False
        assert (image[outside] == background).all(), "paint outside the objects' boxes"
        if len(attrs.objects) == 2:
            a, b = attrs.objects
            assert a.cell != b.cell
            apart_x = a.bbox[2] <= b.bbox[0] or b.bbox[2] <= a.bbox[0]
            apart_y = a.bbox[3] <= b.bbox[1] or b.bbox[3] <= a.bbox[1]
            assert apart_x or apart_y, "the two objects overlap"
            dx, dy = b.centre[0] - a.centre[0], b.centre[1] - a.centre[1]
            expected_sign = {"left of": dx > 0, "right of": dx < 0, "above": dy > 0, "below": dy < 0}
            assert expected_sign[attrs.relation], (s.caption, a.centre, b.centre)
            assert attrs.relation in data.relations_between(a, b, SIZE)
        else:
            assert attrs.relation is None


def test_exclude_holds_out_pairs():
    held_out = frozenset({("red", "star"), ("blue", "circle")})
    pairs = set()
    for i in range(600):
        for obj in data.render_sample(1, i, two_object_prob=0.5, exclude=held_out).attributes.objects:
            pairs.add((obj.colour, obj.shape))
    assert not pairs & held_out
    assert ("red", "circle") in pairs and ("blue", "star") in pairs      # the parts still appear elsewhere
    with pytest.raises(ValueError, match="not a \\(colour, shape\\) pair"):
        data.render_sample(0, 0, exclude=frozenset({("star", "red")}))


def test_captions_mention_the_attributes(samples):
    for s in samples:
        caption, attrs = s.caption, s.attributes
        for obj in attrs.objects:
            assert f"{obj.colour} {obj.shape}" in caption
            for size in data.SIZES:                             # a size, if named, is the right one
                if f"{size} {obj.colour} {obj.shape}" in caption:
                    assert obj.size == size
        if "background" in caption:
            assert f"{attrs.background} background" in caption
        if len(attrs.objects) == 1:
            assert attrs.objects[0].position in caption
        else:
            assert attrs.relation in caption or all(o.position in caption for o in attrs.objects), caption
    captions = {s.caption for s in samples}
    assert len(captions) > 300                                  # varied wording, not a handful of strings
    full = data.caption_for(samples[0].attributes, random.Random(0), size_prob=1.0, background_prob=1.0)
    assert all(o.size in full for o in samples[0].attributes.objects) and "background" in full


def test_demo_prompts_use_the_vocabulary():
    assert 6 <= len(data.DEMO_PROMPTS) <= 12
    assert any(" of " in p or "above" in p or "below" in p for p in data.DEMO_PROMPTS)
    for prompt in data.DEMO_PROMPTS:
        assert any(c in prompt for c in data.COLOURS) and any(s in prompt for s in data.SHAPES)


# ----------------------------------------------------------------------------------------------------------------
# ImageFolderDataset
# ----------------------------------------------------------------------------------------------------------------
def _save(image: Image.Image, path, caption=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption + "\n")


def test_folder_with_sidecar_captions(tmp_path):
    # A wide image, red | blue | red in thirds: the centre crop keeps only blue.
    wide = np.zeros((32, 96, 3), np.uint8)
    wide[:, :32], wide[:, 32:64], wide[:, 64:] = (255, 0, 0), (0, 0, 255), (255, 0, 0)
    _save(Image.fromarray(wide), tmp_path / "a.png", "a blue patch")
    _save(Image.new("RGB", (40, 80), (0, 200, 0)), tmp_path / "sub" / "b.jpg", "a green patch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")                          # nothing to skip, so nothing to warn about
        ds = data.ImageFolderDataset(tmp_path, 16)
    assert len(ds) == 2 and ds.skipped == 0
    image, caption = ds[0]
    assert caption == "a blue patch" and image.shape == (3, 16, 16)
    # bicubic resampling reads a little past the crop, so the edge columns may carry a trace of red
    assert image[0].max() < 0.1 and image[2].min() > 0.9
    torch.testing.assert_close(image[:, :, 2:-2], torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1).expand(3, 16, 12))
    image, caption = ds[1]
    assert caption == "a green patch" and image.shape == (3, 16, 16)
    assert (image.mean(dim=(1, 2)) - torch.tensor([0, 200 / 255, 0])).abs().max() < 0.03


def test_folder_with_metadata_jsonl(tmp_path):
    _save(Image.new("RGB", (20, 20), "red"), tmp_path / "x.png")
    _save(Image.new("RGB", (20, 20), "blue"), tmp_path / "nested" / "y.webp")
    rows = [{"file_name": "x.png", "text": "red"}, {"file_name": "nested/y.webp", "text": "blue"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = data.ImageFolderDataset(tmp_path, 8)
    assert sorted(ds[i][1] for i in range(len(ds))) == ["blue", "red"]
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "x.png", "text": "red"}\n{"file_name": "y.png"}\n')
    with pytest.raises(ValueError, match=r"metadata.jsonl, line 2: expected a JSON object") as err:
        data.ImageFolderDataset(tmp_path, 8)
    assert "\n" not in str(err.value)


def test_corrupt_and_uncaptioned_files_are_skipped_and_counted(tmp_path):
    _save(Image.new("RGB", (16, 16), "red"), tmp_path / "good.png", "good")
    (tmp_path / "garbage.png").write_bytes(b"this is not an image")
    (tmp_path / "garbage.txt").write_text("garbage")
    _save(Image.new("RGB", (16, 16), "blue"), tmp_path / "no_caption.png")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "._thumb.png").write_bytes(b"macOS resource fork")   # ignored, not even counted
    # Opens fine (valid header), fails to decode: caught only at __getitem__ time.
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    noise.save(buffer, format="PNG")
    (tmp_path / "truncated.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (tmp_path / "truncated.txt").write_text("truncated")

    with pytest.warns(UserWarning, match=r"skipped 2 of 4 images: 1 unreadable \(e\.g\. .*garbage\.png.*1 without "
                                         r"a caption \(e\.g\. .*no_caption\.png\)"):
        ds = data.ImageFolderDataset(tmp_path, 16)
    assert ds.skipped == 2 and len(ds) == 2
    assert ds.captions == ["good", "truncated"]
    with pytest.warns(UserWarning, match=r"cannot decode .*truncated\.png.*1 failed so far"):
        image, caption = ds[1]                                  # substituted by the next good image
    assert caption == "good" and image.shape == (3, 16, 16) and ds.failed == {1}
    with warnings.catch_warnings():
        warnings.simplefilter("error")                          # a known-bad file is not retried or re-reported
        assert ds[1][1] == "good"


@pytest.mark.parametrize("make, expected", [
    (lambda: Image.new("L", (8, 8), 100), (100, 100, 100)),
    (lambda: Image.new("RGBA", (8, 8), (255, 0, 0, 0)), (255, 255, 255)),          # transparent → white
    (lambda: Image.new("RGBA", (8, 8), (255, 0, 0, 128)), (255, 127, 127)),        # half red over white
    (lambda: Image.new("LA", (8, 8), (0, 0)), (255, 255, 255)),
    (lambda: Image.new("CMYK", (8, 8), (0, 255, 255, 0)), (255, 0, 0)),
    (lambda: Image.fromarray(np.full((8, 8), 65535, np.uint16)), (255, 255, 255)),  # 16-bit "I;16"
    (lambda: Image.fromarray(np.full((8, 8), 32896, np.uint16)), (128, 128, 128)),  # 32896 / 257 = 128, not clipped
    (lambda: Image.fromarray(np.full((8, 8), 1000, np.int32)), (4, 4, 4)),          # 16-bit data in 32-bit "I"
])
def test_image_modes_become_rgb(tmp_path, make, expected):
    image = make()
    rgb = data.to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == image.size
    assert np.abs(np.asarray(rgb).astype(int) - expected).max() <= 1, np.asarray(rgb)[0, 0]


def test_palette_transparency_and_16_bit_files(tmp_path):
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 255] * 256)
    palette.info["transparency"] = 0
    _save(palette, tmp_path / "p.png", "palette")
    _save(Image.fromarray(np.full((8, 8), 32896, np.uint16)), tmp_path / "g16.png", "grey16")
    ds = data.ImageFolderDataset(tmp_path, 4)
    got = {caption: image for image, caption in (ds[i] for i in range(len(ds)))}
    torch.testing.assert_close(got["palette"], torch.ones(3, 4, 4))                 # fully transparent → white
    torch.testing.assert_close(got["grey16"], torch.full((3, 4, 4), 128 / 255))


def test_folder_errors_are_one_clear_line(tmp_path):
    with pytest.raises(ValueError, match="no such folder"):
        data.ImageFolderDataset(tmp_path / "missing", 32)
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=f"image folder {tmp_path}: no images found") as err:
        data.ImageFolderDataset(tmp_path, 32)
    assert "\n" not in str(err.value)
    _save(Image.new("RGB", (8, 8)), tmp_path / "a.png")
    _save(Image.new("RGB", (8, 8)), tmp_path / "b.png")
    with pytest.raises(ValueError, match=f"image folder {tmp_path}: 2 images but no captions; expected a .txt") as err:
        data.ImageFolderDataset(tmp_path, 32)
    assert "\n" not in str(err.value)
