"""Usage:
    python experiments/evaluate.py --run runs/tiny --n 200

Measure a trained Würstchen on the built-in shapes: prompt alignment, reconstruction, and distribution metrics.

Prompts are captions of the shapes dataset drawn with a seed that training does not use (EVAL_SEED), so every
prompt comes with the ground truth of a real image. Two oracles read images back into scenes (objects with colour,
shape, size and grid cell, and a background), and the scenes are scored against what each caption asks for:

- `analytic`: the palette model of data.py. The background is read from the border; each pixel is explained as a
  mix of that background and one shape colour (anti-aliased edges are exactly such mixes); pixels more than half
  shape colour form connected components; a component's colour is its palette entry, its shape comes from scale-free
  geometry (fill of its bounding box, aspect, spread, vertical skew, and the angular harmonics 3, 4 and 5 that
  tell the shapes' symmetries apart), its size from its width, its cell from its centre. Nothing is learned,
  except seven reference numbers per shape measured on rendered shapes, blurred as much as the CNN oracle's
  training images are (σ up to 1.2 px), so that a soft edge is not read as another shape.
- `CNN`: a small convolutional net applied to each of the 3×3 cells (objects sit inside their cells), with a head
  per attribute (empty or not, colour, shape, size, background), trained once on fresh renders (ORACLE_SEED) with
  blur and noise added, and cached. Its penultimate features, nine cells' worth, are the space of the
  distribution metrics.

Both are checked on real held-out images (the ceiling), Stage A reconstructions and Stage A+B decodes from the
semantic latent (what the decoders lose), and real images with shuffled captions (the chance floor). With
`--no-generation` only these rows are measured, so a Stage B can be judged before a Stage C is trained for it.

Categories follow GenEval (Ghosh et al. 2023), mapped onto the caption grammar; the headline is their unweighted
mean:
- single object: a one-object prompt's colour-and-shape pair is found;
- colour / shape: the main (largest) object of a one-object image has the asked colour / shape;
- position: a one-object prompt's grid cell; for two objects, both are found (by colour and shape) and the asked
  relation or both asked cells hold;
- two objects: both asked shapes are there, whatever their colours;
- colour binding: both asked (colour, shape) pairs are there.
Size, background and "everything asked" are reported too, outside the mean. Accuracies come per image and, with k
images per prompt, as any-of-k per prompt, with percentile-bootstrap 95% intervals over prompts.

Distribution metrics live in the CNN oracle's feature space, not Inception's, and are named for it: KID-oracle,
FD-oracle (a Fréchet distance), and k-NN precision and recall (Kynkäänniemi et al. 2019). Each set is compared with
an equal number of real renders of other prompts from the same distribution; the prompts' own real images give the
noise floor. They are comparable only between runs of this script with the same oracle and the same n.

data.HELD_OUT_PAIRS are colour–shape pairs that train.py leaves out of the built-in shapes unless told otherwise
(`--hold-out false`); prompts made only of them are scored apart. The main prompt set never contains them.
"""
import argparse
import dataclasses
import hashlib
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# Run as `python experiments/<name>.py` from anywhere: the project's root holds the stage files, data and sample.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data import (BACKGROUNDS, COLOURS, FILL_RATIO, HELD_OUT_PAIRS, POSITIONS, RELATIONS, SHAPES, SIZES,
                  TRIANGLE_HEIGHT, _STAR_HEIGHT, render_sample)
from checkpoints import SHIPPED, load_stage, run_paths
from cli import guidance_value, positive_int
from sample import encode_prompts, generate, latent_sizes, save_grid, valid_side
from schedule import STAGE_B_STEPS, STAGE_C_TIMESTEPS, linear_timesteps
from schedule import sample as sample_loop

# ----------------------------------------------------------------------------------------------------------------
# Fixed choices. Training uses seed 0 by default (train.py --seed); these seeds must differ from any training seed.
# ----------------------------------------------------------------------------------------------------------------
EVAL_SEED = 1_000_003            # prompts and their real images
REFERENCE_SEED = 1_000_033       # other real images: the reference set of the distribution metrics
ORACLE_SEED = 2_000_003          # the CNN oracle's training images
ORACLE_VAL_SEED = 2_000_029      # ... and its validation images
SHAPE_REFERENCE_SEED = 3_000_017  # renders that fix the analytic detector's shape references
TWO_OBJECT_PROB = 0.5            # eval prompts: half one-object, half two-object (training draws 0.3)


HEADLINE = ("single object", "colour", "shape", "position", "two objects", "colour binding")
EXTRA = ("size", "background", "everything")
CATEGORIES = HEADLINE + EXTRA
ORACLES = ("analytic", "CNN")
COLOUR_NAMES, BACKGROUND_NAMES, SIZE_NAMES = tuple(COLOURS), tuple(BACKGROUNDS), tuple(SIZES)
CELLS = tuple(POSITIONS)                                  # (row, col), row-major
CELL_OF = {name: cell for cell, name in POSITIONS.items()}
HEIGHT_RATIO = {"triangle": TRIANGLE_HEIGHT, "star": _STAR_HEIGHT}
SIZE_THRESHOLD = math.sqrt(SIZES["small"] * SIZES["large"])   # width / side between "small" and "large"


# ----------------------------------------------------------------------------------------------------------------
# What a caption asks for, and what an oracle sees
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AskedObject:
    colour: str
    shape: str
    size: str | None                     # None: the caption does not say
    cell: tuple[int, int] | None         # None: the caption does not say


@dataclass(frozen=True)
class Request:
    objects: tuple[AskedObject, ...]     # one or two, in caption order
    relation: str | None                 # objects[0] relation objects[1]
    background: str | None


@dataclass(frozen=True)
class SeenObject:
    colour: str
    shape: str
    size: str
    cell: tuple[int, int]
    centre: tuple[float, float]          # (x, y) as fractions of the side
    area: float                          # fraction of the image; the main object is the largest
    confidence: float = 1.0


@dataclass(frozen=True)
class Scene:
    objects: tuple[SeenObject, ...]
    background: str


def _alternation(words) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))   # longest first: "top left"


_OBJECT_RE = re.compile(rf"\b(?:({_alternation(SIZES)}) )?({_alternation(COLOURS)}) ({_alternation(SHAPES)})\b")
_BACKGROUND_RE = re.compile(rf"\b({_alternation(BACKGROUNDS)}) background\b")
_RELATION_RE = re.compile(rf"\b({_alternation(RELATIONS)})\b")
_POSITION_RE = re.compile(rf"\b({_alternation(POSITIONS.values())})\b")


def parse_caption(caption: str) -> Request:
    """What a caption of data.caption_for asks for. Every attribute appears there under its exact name, so the
    grammar is read back with a few patterns; tests check it against the ground truth of rendered samples."""
    text = caption.lower()
    background = _BACKGROUND_RE.search(text)
    text = _BACKGROUND_RE.sub(" ", text)
    found = list(_OBJECT_RE.finditer(text))
    if not 1 <= len(found) <= 2:
        raise ValueError(f"caption {caption!r}: expected one or two '[size] colour shape' phrases, found {len(found)}")
    relation = _RELATION_RE.search(text) if len(found) == 2 else None
    # Positions are read from what is left once the objects (and "left of", ...) are cut out; with two objects and
    # no relation, each position follows its object ("a red circle at the top and a blue star on the left").
    spans = [(m.start(), m.end()) for m in found]
    if relation is None and len(found) == 2:
        segments = [text[spans[0][1]:spans[1][0]], text[spans[1][1]:]]
    elif relation is None:
        segments = [text[:spans[0][0]] + " " + text[spans[0][1]:]]
    else:
        segments = [""] * len(found)
    cells = []
    for segment in segments:
        m = _POSITION_RE.search(segment)
        cells.append(CELL_OF[m.group(1)] if m else None)
    cells += [None] * (len(found) - len(cells))
    objects = tuple(AskedObject(m.group(2), m.group(3), m.group(1), cell) for m, cell in zip(found, cells))
    return Request(objects, relation.group(1) if relation else None, background.group(1) if background else None)


def relations(a_centre, b_centre) -> set[str]:
    """Relations of a to b from centres given as fractions of the side: data.relations_between's rule (centres
    more than half a cell apart on an axis)."""
    dx, dy = a_centre[0] - b_centre[0], a_centre[1] - b_centre[1]
    out = set()
    if abs(dx) > 1 / 6:
        out.add("left of" if dx < 0 else "right of")
    if abs(dy) > 1 / 6:
        out.add("above" if dy < 0 else "below")
    return out


def _find(scene: Scene, colour: str | None, shape: str | None, taken=()) -> SeenObject | None:
    """The largest seen object with this colour and shape (None: any), not among `taken`."""
    hits = [o for o in scene.objects if (colour is None or o.colour == colour) and (shape is None or o.shape == shape)
            and not any(o is t for t in taken)]
    return max(hits, key=lambda o: (o.area, o.confidence)) if hits else None


def score(request: Request, scene: Scene) -> dict[str, bool]:
    """Category → pass/fail for one image; categories that do not apply to the prompt are absent."""
    out = {}
    if request.background is not None:
        out["background"] = scene.background == request.background
    if len(request.objects) == 1:
        asked = request.objects[0]
        main = max(scene.objects, key=lambda o: (o.area, o.confidence)) if scene.objects else None
        bound = _find(scene, asked.colour, asked.shape)
        out["single object"] = bound is not None
        out["colour"] = main is not None and main.colour == asked.colour
        out["shape"] = main is not None and main.shape == asked.shape
        out["position"] = main is not None and main.cell == asked.cell
        if asked.size is not None:
            out["size"] = main is not None and main.size == asked.size
        ok = bound is not None and (asked.cell is None or bound.cell == asked.cell) and \
            (asked.size is None or bound.size == asked.size)
    else:
        a, b = request.objects
        first = _find(scene, None, a.shape)      # "a red circle and a blue circle" needs two circles
        out["two objects"] = first is not None and _find(scene, None, b.shape, taken=(first,)) is not None
        found_a = _find(scene, a.colour, a.shape)
        found_b = _find(scene, b.colour, b.shape, taken=(found_a,) if found_a else ())
        both = found_a is not None and found_b is not None
        out["colour binding"] = both
        if request.relation is not None:
            placed = both and request.relation in relations(found_a.centre, found_b.centre)
        else:
            placed = both and all(asked.cell is None or seen.cell == asked.cell
                                  for asked, seen in ((a, found_a), (b, found_b)))
        out["position"] = placed
        sized = [(asked, seen) for asked, seen in ((a, found_a), (b, found_b)) if asked.size is not None]
        if sized:
            out["size"] = both and all(seen.size == asked.size for asked, seen in sized)
        ok = placed and (not sized or out["size"])
    out["everything"] = ok and out.get("background", True)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Oracle 1: the analytic detector
# ----------------------------------------------------------------------------------------------------------------
_PALETTE = np.array(list(COLOURS.values()), np.float32)                  # (6, 3)
_BACKGROUND_PALETTE = np.array(list(BACKGROUNDS.values()), np.float32)   # (4, 3)
MAX_RESIDUAL = 60.0      # RGB distance from the background–colour line beyond which a pixel is no shape colour:
                         # under half the gap between the closest shape colours (orange and red, 95)
MIN_AREA = 0.4           # a component smaller than this × the smallest shape (a small star) is noise
SHAPE_FEATURES = ("fill", "aspect", "spread", "skew", "h3", "c4", "h5")
REFERENCE_BLUR = 1.2     # px: the widest blur of the shape references, and of the CNN oracle's augment()


def _pixels(images) -> np.ndarray:
    """(B, 3, H, W) tensors (floats in [0, 1], or uint8) or (B, H, W, 3) uint8 arrays → (B, H, W, 3) float32 in
    0…255, rounded as an 8-bit image would be."""
    if isinstance(images, torch.Tensor):
        if images.dtype == torch.uint8:
            return images.permute(0, 2, 3, 1).float().numpy()
        return (images.detach().float().clamp(0, 1) * 255).round().permute(0, 2, 3, 1).cpu().numpy()
    return np.asarray(images, np.float32)


def _components(labels: np.ndarray) -> list[np.ndarray]:
    """8-connected components of equal labels ≥ 0 in an (H, W) map, as arrays of flat pixel indices. Vectorised,
    since a noisy generated image can hold hundreds of specks: every pixel takes the largest pixel index among its
    like-labelled neighbours until nothing changes, with pointer jumping (a pixel adopts the label of the pixel
    its label names, which is in the same component) so that long components need few rounds."""
    H, W = labels.shape
    ids = np.where(labels >= 0, np.arange(H * W).reshape(H, W), -1)
    padded_labels = np.pad(labels, 1, constant_values=-2)
    shifts = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
    same = [(padded_labels[1 + dy:H + 1 + dy, 1 + dx:W + 1 + dx] == labels) & (labels >= 0) for dy, dx in shifts]
    while True:
        padded = np.pad(ids, 1, constant_values=-1)
        new = ids.copy()
        for (dy, dx), ok in zip(shifts, same):
            np.maximum(new, np.where(ok, padded[1 + dy:H + 1 + dy, 1 + dx:W + 1 + dx], -1), out=new)
        flat = new.ravel()
        new = np.where(new >= 0, flat[np.maximum(new, 0)], -1)          # pointer jumping
        if np.array_equal(new, ids):
            break
        ids = new
    flat = ids.ravel()
    pixels = np.flatnonzero(flat >= 0)
    roots, inverse = np.unique(flat[pixels], return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    return np.split(pixels[order], np.cumsum(np.bincount(inverse, minlength=len(roots)))[:-1])


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, 3, H, W) blurred by a separable Gaussian of `sigma` px, edges replicated; sigma 0 returns the input."""
    if sigma == 0:
        return images
    r = int(np.ceil(3 * sigma))
    kernel = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * sigma ** 2))
    kernel = (kernel / kernel.sum()).repeat(3, 1, 1, 1)                               # (3, 1, 1, 2r + 1)
    x = F.pad(images, (r, r, r, r), mode="replicate")
    x = F.conv2d(x, kernel, groups=3)                                                 # along x
    return F.conv2d(x, kernel.transpose(2, 3), groups=3)                              # along y


UPSAMPLE = 4             # the coverage map is read at 4× resolution, bilinearly: its 0.5 contour is the shape's edge


def _geometry(weights: np.ndarray) -> dict:
    """Scale-free geometry of a coverage map (H, W) in [0, 1]. It is upsampled bilinearly and cut at 0.5, which
    finds the edge to a fraction of a pixel on an anti-aliased render, and stays put under a symmetric blur such as
    a decoder's, where a sum of coverage or a bounding box of every touched pixel would grow."""
    ys, xs = np.nonzero(weights)
    y0, x0 = max(ys.min() - 1, 0), max(xs.min() - 1, 0)
    crop = torch.from_numpy(np.ascontiguousarray(weights[y0:ys.max() + 2, x0:xs.max() + 2], np.float32))
    fine = F.interpolate(crop[None, None], scale_factor=UPSAMPLE, mode="bilinear", align_corners=False)[0, 0]
    mask = (fine >= 0.5).numpy()
    if not mask.any():
        return {"area": 0.0}
    area = mask.sum() / UPSAMPLE ** 2
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    w, h = (cols[-1] + 1 - cols[0]) / UPSAMPLE, (rows[-1] + 1 - rows[0]) / UPSAMPLE
    yy, xx = (np.nonzero(mask)[i] + 0.5 for i in (0, 1))
    cy, cx = yy.mean(), xx.mean()
    var_x, var_y = ((xx - cx) ** 2).mean() / UPSAMPLE ** 2, ((yy - cy) ** 2).mean() / UPSAMPLE ** 2
    skew = ((yy - cy) ** 3).mean() / UPSAMPLE ** 3 / max(var_y, 1e-6) ** 1.5
    centre = (x0 + (cols[0] + cols[-1] + 1) / 2 / UPSAMPLE, y0 + (rows[0] + rows[-1] + 1) / 2 / UPSAMPLE)
    # Angular harmonics of the mask around its centroid, weighted by r² so that points and corners count most:
    # c_k = Σ r²·e^{ikθ} / Σ r². A shape with n-fold symmetry has c_k = 0 unless n divides k, and a blur keeps the
    # symmetry, only shrinking |c_k|: the triangle alone has c_3, the star alone c_5, and the cross (arms on the
    # axes, cos 4θ = 1) and the square (corners on the diagonals, cos 4θ = −1) differ in the sign of Re c_4. The
    # fill of the bounding box, by contrast, rises from 0.46 towards the cross's 0.64 as a 64-px star blurs.
    dx, dy = xx - cx, cy - yy                   # y up, as in a plot (flipping y changes none of the three numbers)
    r2, theta = dx ** 2 + dy ** 2, np.arctan2(dy, dx)
    harmonic = {k: (r2 * np.exp(1j * k * theta)).sum() / max(r2.sum(), 1e-9) for k in (3, 4, 5)}
    return {"area": area, "width": w, "centre": centre, "fill": area / (w * h), "aspect": h / w,
            "spread": (var_x + var_y) / area, "skew": skew, "h3": abs(harmonic[3]), "c4": harmonic[4].real,
            "h5": abs(harmonic[5])}


class AnalyticDetector:
    """Palette → connected components → colour, area, centre; shape from geometry (see the module docstring)."""

    name = "analytic"

    def __init__(self, size: int):
        self.size = size
        small_star = SIZES["small"] ** 2 * HEIGHT_RATIO["star"] * FILL_RATIO["star"] * size ** 2
        self.min_area = MIN_AREA * small_star
        self.references = self._shape_references()

    def _shape_references(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean geometry per shape, and the pooled spread per feature, measured on single rendered shapes at this
        image size (pixel-grid effects at 10-pixel shapes are real and differ from the continuous FILL_RATIO),
        blurred by σ spread evenly over 0 … REFERENCE_BLUR px: the softness that the CNN oracle's augment() also
        forgives, so that both oracles judge the shape drawn rather than the sharpness of its edges."""
        per_shape = {s: [] for s in SHAPES}
        count = 300
        for i in range(count):
            sample = render_sample(SHAPE_REFERENCE_SEED, i, self.size, two_object_prob=0.0)
            image = torch.from_numpy(np.array(sample.image)).permute(2, 0, 1)[None].float() / 255
            pixels = _pixels(gaussian_blur(image, REFERENCE_BLUR * i / (count - 1)))[0]
            for geometry, colour in self._blobs(pixels, self._background(pixels)[0]):
                per_shape[sample.attributes.objects[0].shape].append([geometry[f] for f in SHAPE_FEATURES])
        means = np.array([np.mean(per_shape[s], 0) for s in SHAPES])
        spread = np.sqrt(np.mean([np.var(per_shape[s], 0) for s in SHAPES], 0)) + 1e-3
        return means, spread

    @staticmethod
    def _background(pixels: np.ndarray) -> tuple[np.ndarray, str]:
        """The border's median colour, and the palette background nearest to it. Shapes keep a margin inside
        their cells, so the outermost ring of a real image is background."""
        border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
        colour = np.median(border, axis=0)
        name = BACKGROUND_NAMES[int(np.argmin(((_BACKGROUND_PALETTE - colour) ** 2).sum(1)))]
        return colour, name

    def _blobs(self, pixels: np.ndarray, background: np.ndarray):
        """(geometry, colour name) of each component. Each pixel is modelled as background + α·(colour −
        background): anti-aliased edges are exactly such mixes, so a half-covered orange pixel on dark grey is read
        as half orange, not as red, which is the palette entry nearest to its raw value."""
        direction = _PALETTE - background                                   # (6, 3)
        offset = pixels - background                                        # (H, W, 3)
        alpha = np.clip(offset @ direction.T / (direction ** 2).sum(1), 0, 1)           # (H, W, 6)
        residual = np.linalg.norm(offset[..., None, :] - alpha[..., None] * direction, axis=-1)
        best = residual.argmin(-1)
        best_alpha = np.take_along_axis(alpha, best[..., None], -1)[..., 0]
        best_residual = np.take_along_axis(residual, best[..., None], -1)[..., 0]
        labels = np.where((best_alpha >= 0.5) & (best_residual <= MAX_RESIDUAL), best, -1)
        shape_pixels = labels >= 0
        out = []
        for members in _components(labels):
            if len(members) < self.min_area / 2:        # far too small to pass the area test below: skip the work
                continue
            colour = int(labels.flat[members[0]])
            mask = np.zeros(labels.shape, bool)
            mask.flat[members] = True
            # the component, grown by one pixel into non-shape pixels: its partly covered edge
            grown = np.pad(mask, 1)
            grown = np.logical_or.reduce([grown[1 + dy:grown.shape[0] - 1 + dy, 1 + dx:grown.shape[1] - 1 + dx]
                                          for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
            region = mask | (grown & ~shape_pixels)
            geometry = _geometry(np.where(region, alpha[..., colour], 0.0))
            if geometry["area"] < self.min_area:
                continue
            out.append((geometry, COLOUR_NAMES[colour]))
        return out

    def classify_shape(self, geometry: dict) -> str:
        means, spread = self.references
        x = np.array([geometry[f] for f in SHAPE_FEATURES])
        return SHAPES[int(np.argmin((((x - means) / spread) ** 2).sum(1)))]

    def scene(self, pixels: np.ndarray) -> Scene:
        """pixels: (H, W, 3) float in 0…255."""
        background, name = self._background(pixels)
        side = pixels.shape[0]
        objects = []
        for geometry, colour in self._blobs(pixels, background):
            cx, cy = geometry["centre"]
            cell = (min(int(3 * cy / side), 2), min(int(3 * cx / side), 2))
            objects.append(SeenObject(colour, self.classify_shape(geometry),
                                      "large" if geometry["width"] / side > SIZE_THRESHOLD else "small", cell,
                                      (cx / side, cy / side), geometry["area"] / side ** 2))
        return Scene(tuple(objects), name)

    def __call__(self, images) -> list[Scene]:
        """images: (B, 3, H, W) in [0, 1] (or uint8) → one Scene each."""
        return [self.scene(p) for p in _pixels(images)]


# ----------------------------------------------------------------------------------------------------------------
# Oracle 2: a small CNN with a head per attribute, applied to each of the 3×3 cells
# ----------------------------------------------------------------------------------------------------------------
CELL_SIDE = 24                   # the image is resized to 3 × 24 = 72 px and cut into its nine cells
CELL_FEATURES = 32               # per cell; the image's features are the nine concatenated (288 numbers)
HEADS = {"present": 1, "colour": len(COLOURS), "shape": len(SHAPES), "size": len(SIZES),
         "background": len(BACKGROUNDS)}


@dataclass(frozen=True)
class OracleConfig:
    images: int = 10_000         # fresh renders (ORACLE_SEED), every colour–shape pair, half of them two-object
    epochs: int = 3
    batch_size: int = 128        # cells per step
    empty_cells: int = 1         # empty cells drawn per image per epoch (its objects' cells are always used)
    lr: float = 3e-3
    val_images: int = 1000       # more fresh renders (ORACLE_VAL_SEED), to check it
    version: int = 3             # bump when the architecture or the recipe changes: old caches are then ignored


class CellNet(nn.Module):
    """A 24² cell → features (B, CELL_FEATURES) → present, colour, shape, size, and the background around it.
    One net serves all nine cells: objects sit inside their cells (data.py keeps a margin), so a cell is a whole
    object or none, and a cell-sized input learns from every object of every image at a ninth of the cost."""

    def __init__(self):
        super().__init__()

        def block(c_in, c_out, stride):
            return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

        self.trunk = nn.Sequential(*block(3, 24, 1), *block(24, 32, 2), *block(32, 48, 1), *block(48, 64, 2),
                                   nn.Flatten(), nn.Linear(64 * 6 * 6, CELL_FEATURES), nn.ReLU(inplace=True))
        self.head = nn.Linear(CELL_FEATURES, sum(HEADS.values()))

    def forward(self, cells: torch.Tensor) -> tuple[torch.Tensor, dict]:
        features = self.trunk(cells * 2 - 1)
        logits = dict(zip(HEADS, self.head(features).split(list(HEADS.values()), dim=-1)))
        logits["present"] = logits["present"][:, 0]
        return features, logits


def cut_cells(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] → (B, 9, 3, 24, 24): resized to 72², then the cells in CELLS order (row-major)."""
    side = 3 * CELL_SIDE
    if images.shape[-2:] != (side, side):
        images = F.interpolate(images.float(), size=(side, side), mode="bilinear", antialias=True,
                               align_corners=False)
    B = images.shape[0]
    cells = images.reshape(B, 3, 3, CELL_SIDE, 3, CELL_SIDE).permute(0, 2, 4, 1, 3, 5)
    return cells.reshape(B, 9, 3, CELL_SIDE, CELL_SIDE)


def cell_targets(samples) -> dict[str, torch.Tensor]:
    """Ground truth per cell (B, 9): present, and colour, shape, size (-1 for an empty cell); background (B, 9)."""
    B = len(samples)
    t = {"present": torch.zeros(B, 9), "colour": torch.full((B, 9), -1), "shape": torch.full((B, 9), -1),
         "size": torch.full((B, 9), -1), "background": torch.zeros(B, 9, dtype=torch.long)}
    for i, s in enumerate(samples):
        t["background"][i] = BACKGROUND_NAMES.index(s.attributes.background)
        for o in s.attributes.objects:
            c = CELLS.index(o.cell)
            t["present"][i, c] = 1
            t["colour"][i, c] = COLOUR_NAMES.index(o.colour)
            t["shape"][i, c] = SHAPES.index(o.shape)
            t["size"][i, c] = SIZE_NAMES.index(o.size)
    return t


def render_with_truth(seed: int, count: int, size: int, two_object_prob: float = TWO_OBJECT_PROB,
                      exclude=frozenset(), start: int = 0):
    """(images (N, 3, size, size) in [0, 1], samples) for samples start … start + count − 1 of a seed."""
    samples = [render_sample(seed, start + i, size, two_object_prob, exclude) for i in range(count)]
    pixels = np.stack([np.asarray(s.image) for s in samples])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255, samples


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """What decoders do to an image, so that the oracle judges content rather than finish: a blur of random width,
    noise, a slight shift in brightness and contrast. Colours move far less than the 95 levels between the closest
    palette entries."""
    B = images.shape[0]
    u = lambda *shape: torch.rand(*shape, generator=generator)
    sigma = u(B) * REFERENCE_BLUR                                        # blur σ up to 1.2 px
    x = torch.arange(-2, 3).float()
    k1 = torch.exp(-x ** 2 / (2 * sigma[:, None].clamp(min=1e-3) ** 2))
    k1 = k1 / k1.sum(1, keepdim=True)                                    # (B, 5)
    pad = F.pad(images, (2, 2, 2, 2), mode="replicate")
    flat = pad.reshape(1, B * 3, *pad.shape[-2:])                       # one kernel per image: batch → channels
    kx = k1.repeat_interleave(3, 0)[:, None, None, :]
    ky = k1.repeat_interleave(3, 0)[:, None, :, None]
    blurred = F.conv2d(F.conv2d(flat, kx, groups=B * 3), ky, groups=B * 3).view_as(images)
    contrast = 1 + (u(B, 1, 1, 1) - 0.5) * 0.16
    brightness = (u(B, 1, 1, 1) - 0.5) * 0.08
    noise = torch.randn(images.shape, generator=generator) * (u(B, 1, 1, 1) * 0.05)
    return ((blurred - 0.5) * contrast + 0.5 + brightness + noise).clamp(0, 1)


def oracle_loss(logits: dict, targets: dict) -> torch.Tensor:
    loss = F.binary_cross_entropy_with_logits(logits["present"], targets["present"])
    loss = loss + F.cross_entropy(logits["background"], targets["background"])
    for head in ("colour", "shape", "size"):
        loss = loss + F.cross_entropy(logits[head], targets[head], ignore_index=-1)
    return loss


class CNNOracle:
    """The trained CellNet, reading scenes and features from whole images."""

    name = "CNN"

    def __init__(self, net: CellNet, info: dict):
        self.net, self.info = net.eval(), info

    @torch.no_grad()
    def run(self, images: torch.Tensor, batch: int = 128) -> tuple[torch.Tensor, dict]:
        """(features (B, 9 · CELL_FEATURES), logits per head (B, 9, ...))."""
        feats, logits = [], []
        for i in range(0, len(images), batch):
            cells = cut_cells(images[i:i + batch].float().cpu())
            f, l = self.net(cells.flatten(0, 1))
            n = cells.shape[0]
            feats.append(f.view(n, -1))
            logits.append({k: v.view(n, 9, *v.shape[1:]) for k, v in l.items()})
        return torch.cat(feats), {k: torch.cat([l[k] for l in logits]) for k in logits[0]}

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features, centred and scaled by one number so that fresh renders have unit variance per
        feature on average: the scale KID's kernel (x·y / d + 1)³ expects, fixed per oracle rather than per run."""
        raw = self.run(images)[0]
        if "feature_mean" not in self.info:
            return raw
        return (raw - torch.tensor(self.info["feature_mean"])) / self.info["feature_scale"]

    def __call__(self, images: torch.Tensor) -> list[Scene]:
        return self.scenes(self.run(images)[1])

    @staticmethod
    def scenes(logits: dict) -> list[Scene]:
        present = torch.sigmoid(logits["present"])                           # (B, 9)
        picks = {h: logits[h].argmax(-1) for h in ("colour", "shape", "size")}
        backgrounds = logits["background"].log_softmax(-1).sum(1).argmax(-1)  # every cell votes
        out = []
        for i in range(len(present)):
            objects = []
            for c in torch.nonzero(present[i] > 0.5).flatten().tolist():
                shape, size = SHAPES[picks["shape"][i, c]], SIZE_NAMES[picks["size"][i, c]]
                row, col = CELLS[c]
                # the nominal area of the predicted shape and size: what "largest" means to this oracle
                area = SIZES[size] ** 2 * HEIGHT_RATIO.get(shape, 1.0) * FILL_RATIO[shape]
                objects.append(SeenObject(COLOUR_NAMES[picks["colour"][i, c]], shape, size, (row, col),
                                          ((col + 0.5) / 3, (row + 0.5) / 3), area, float(present[i, c])))
            out.append(Scene(tuple(objects), BACKGROUND_NAMES[backgrounds[i]]))
        return out


def train_oracle(size: int, config: OracleConfig, log=print) -> tuple[CellNet, dict]:
    """Train the CNN oracle on fresh renders at `size` px (never a training seed), with every colour–shape pair,
    held-out ones included: it is a judge, and must know what the generator was not shown."""
    t0 = time.time()
    torch.manual_seed(ORACLE_SEED)
    images, samples = render_with_truth(ORACLE_SEED, config.images, size)
    targets = cell_targets(samples)
    generator = torch.Generator().manual_seed(ORACLE_SEED)
    net = CellNet()
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=1e-4)
    occupied = torch.nonzero(targets["present"] > 0)                    # (M, 2): (image, cell)
    empty = torch.nonzero(targets["present"] == 0)
    per_epoch = len(occupied) + config.empty_cells * config.images
    steps = config.epochs * math.ceil(per_epoch / config.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=steps, pct_start=0.15)
    net.train()
    for epoch in range(config.epochs):
        # every object's cell, and a fresh draw of empty ones; images are augmented whole, then cut
        picks = torch.cat([occupied, empty[torch.randperm(len(empty), generator=generator)
                                           [:config.empty_cells * config.images]]])
        picks = picks[torch.randperm(len(picks), generator=generator)]
        for i in range(0, len(picks), config.batch_size):
            img, cell = picks[i:i + config.batch_size].T
            cells = cut_cells(augment(images[img], generator))[torch.arange(len(img)), cell]
            _, logits = net(cells)
            loss = oracle_loss(logits, {k: v[img, cell] for k, v in targets.items()})
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        log(f"  oracle epoch {epoch + 1}/{config.epochs}: loss {loss.item():.4f} ({time.time() - t0:.0f} s)")
    net.eval()
    val_images, val_samples = render_with_truth(ORACLE_VAL_SEED, config.val_images, size)
    features, logits = CNNOracle(net, {}).run(val_images)
    exact = np.mean([_scene_matches(s, sc) for s, sc in zip(val_samples, CNNOracle.scenes(logits))])
    mean = features.mean(0)
    scale = float((features - mean).pow(2).mean().sqrt().clamp(min=1e-6))
    info = {"size": size, "config": dataclasses.asdict(config), "seconds": round(time.time() - t0, 1),
            "val_exact_scene": float(exact), "train_seed": ORACLE_SEED, "val_seed": ORACLE_VAL_SEED,
            "feature_mean": mean.tolist(), "feature_scale": scale}
    return net, info


def _scene_matches(sample, scene: Scene) -> bool:
    truth = sorted((o.colour, o.shape, o.size, o.cell) for o in sample.attributes.objects)
    seen = sorted((o.colour, o.shape, o.size, o.cell) for o in scene.objects)
    return truth == seen and scene.background == sample.attributes.background


def data_fingerprint(size: int, count: int = 16) -> str:
    """A hash of a few renders with their captions and ground truth. It changes whenever data.py's world does
    (sizes, colours, geometry, grammar), so a cached oracle never judges a world it was not trained on."""
    h = hashlib.sha256()
    for i in range(count):
        s = render_sample(0, i, size, two_object_prob=0.5)
        h.update(s.image.tobytes() + s.caption.encode() + repr(s.attributes).encode())
    return h.hexdigest()[:16]


def load_or_train_oracle(size: int, config: OracleConfig, cache_dir: Path, log=print) -> CNNOracle:
    """The CNN oracle for this image size and recipe: from cache_dir if it was trained before, else trained now
    and saved there."""
    key = hashlib.sha256(json.dumps({"size": size, "data": data_fingerprint(size), **dataclasses.asdict(config)},
                                    sort_keys=True).encode())
    path = Path(cache_dir) / f"oracle_{size}px_{key.hexdigest()[:12]}.pt"
    if path.exists():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        net = CellNet()
        net.load_state_dict(blob["state"])
        log(f"CNN oracle: {path} (every object and the background right on {blob['info']['val_exact_scene']:.1%} "
            f"of fresh renders)")
        return CNNOracle(net, blob["info"] | {"path": str(path), "cached": True})
    log(f"CNN oracle: training on {config.images:,} fresh renders at {size} px, {config.epochs} epochs "
        f"(once; cached in {path})")
    net, info = train_oracle(size, config, log)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"state": net.state_dict(), "info": info}, tmp)
    tmp.replace(path)
    log(f"CNN oracle: every object and the background right on {info['val_exact_scene']:.1%} of "
        f"{config.val_images:,} fresh renders ({info['seconds']:.0f} s)")
    return CNNOracle(net, info | {"path": str(path), "cached": False})


# ----------------------------------------------------------------------------------------------------------------
# Statistics: bootstrap intervals, KID, Fréchet distance, precision and recall
# ----------------------------------------------------------------------------------------------------------------
def bootstrap_counts(n: int, resamples: int, seed: int = 0) -> np.ndarray:
    """(resamples, n) multiplicities of n items drawn with replacement: one bootstrap resample per row."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1 / n), size=resamples).astype(np.float64)


def bootstrap_mean(values, counts: np.ndarray, level: float = 0.95) -> dict:
    """Mean of values (n,) with a percentile-bootstrap interval; NaN marks items it does not apply to. Resampling
    is over items (prompts), so a prompt's k images move together."""
    v = np.asarray(values, np.float64)
    ok = ~np.isnan(v)
    if not ok.any():
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    sums, totals = counts @ np.where(ok, v, 0.0), counts @ ok
    stats = sums[totals > 0] / totals[totals > 0]
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return {"mean": float(v[ok].mean()), "lo": float(lo), "hi": float(hi), "n": int(ok.sum())}


def bootstrap_headline(table: dict[str, np.ndarray], counts: np.ndarray, level: float = 0.95) -> dict:
    """The unweighted mean over HEADLINE categories of per-prompt values (NaN: not asked), its interval from the
    same resamples for every category, so that their correlation is kept."""
    present = [c for c in HEADLINE if c in table and not np.isnan(table[c]).all()]
    if not present:
        return {"mean": None, "lo": None, "hi": None, "categories": []}
    per_resample, point = [], []
    for c in present:
        v = table[c]
        ok = ~np.isnan(v)
        sums, totals = counts @ np.where(ok, v, 0.0), counts @ ok
        per_resample.append(np.where(totals > 0, sums / np.maximum(totals, 1), np.nan))
        point.append(v[ok].mean())
    stats = np.nanmean(np.stack(per_resample), 0)
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return {"mean": float(np.mean(point)), "lo": float(lo), "hi": float(hi), "categories": present}


def kid(x: torch.Tensor, y: torch.Tensor, subsets: int = 50, subset_size: int = 1000, seed: int = 0) -> dict:
    """Kernel inception distance (Bińkowski et al. 2018) computed on any features: the unbiased MMD² with the
    kernel (x·y / d + 1)³, its mean and spread over random subsets of equal size, 0 on average for sets from one
    distribution. Subsets hold at most half of the smaller set, so that they differ and the spread means something."""
    x, y = x.double(), y.double()
    d, m = x.shape[1], min(len(x) // 2, len(y) // 2, subset_size)
    if m < 2:
        return {"mean": None, "std": None}
    g = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        a, b = x[torch.randperm(len(x), generator=g)[:m]], y[torch.randperm(len(y), generator=g)[:m]]
        kxx, kyy, kxy = ((a @ a.T) / d + 1) ** 3, ((b @ b.T) / d + 1) ** 3, ((a @ b.T) / d + 1) ** 3
        off = lambda k: (k.sum() - k.diagonal().sum()) / (m * (m - 1))
        values.append(float(off(kxx) + off(kyy) - 2 * kxy.mean()))
    return {"mean": float(np.mean(values)), "std": float(np.std(values))}


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix by eigendecomposition (no scipy)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁^½ Σ₂ Σ₁^½)^½), the Fréchet (2-Wasserstein) distance between Gaussians. The
    symmetric form keeps every matrix root that of a PSD matrix, so eigh is exact where sqrtm(Σ₁Σ₂) is not."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    root1 = _sqrtm_psd(sigma1)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ sigma2 @ root1), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * cross)


def frechet_features(x: torch.Tensor, y: torch.Tensor) -> float:
    """The Fréchet distance between Gaussians fitted to two feature sets (FID's formula, other features)."""
    x, y = x.double().numpy(), y.double().numpy()
    return frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> dict:
    """Improved precision and recall (Kynkäänniemi et al. 2019): each set's manifold is the union of balls reaching
    each sample's k-th nearest neighbour in the set; precision is the share of fakes inside the real manifold,
    recall the share of reals inside the fake one."""
    real, fake = real.double(), fake.double()

    def radii(a):
        d = torch.cdist(a, a)
        return d.kthvalue(min(k + 1, len(a)), dim=1).values          # +1: the point itself is at distance 0

    def inside(points, centres, r):
        return (torch.cdist(points, centres) <= r[None]).any(1).double().mean().item()

    return {"precision": inside(fake, real, radii(real)), "recall": inside(real, fake, radii(fake))}


def psnr(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Per-image PSNR in dB of images in [0, 1]."""
    mse = ((a.float() - b.float()) ** 2).flatten(1).mean(1).clamp(min=1e-10)
    return (10 * torch.log10(1 / mse)).numpy()


# ----------------------------------------------------------------------------------------------------------------
# Scoring sets of images
# ----------------------------------------------------------------------------------------------------------------
def score_images(oracle, images: torch.Tensor, requests: list[Request], k: int = 1) -> dict[str, np.ndarray]:
    """Category → (prompts, k) array of 1 / 0, NaN where the category does not apply. images: (prompts · k, 3, H,
    W), the k images of a prompt next to each other."""
    scenes = oracle(images)
    table = {c: np.full((len(requests), k), np.nan) for c in CATEGORIES}
    for i, scene in enumerate(scenes):
        for category, ok in score(requests[i // k], scene).items():
            table[category][i // k, i % k] = float(ok)
    return table


def summarise(table: dict[str, np.ndarray], counts: np.ndarray) -> dict:
    """Per-image accuracy (mean over a prompt's k images) and any-of-k (best of them), with bootstrap intervals
    over prompts."""
    out = {}
    for mode, reduce in (("per_image", np.mean), ("any_of_k", np.max)):
        with np.errstate(all="ignore"):
            per_prompt = {c: reduce(v, axis=1) for c, v in table.items()}
        out[mode] = {c: bootstrap_mean(v, counts) for c, v in per_prompt.items()}
        out[mode]["mean"] = bootstrap_headline(per_prompt, counts)
    return out


def derange(items: list, seed: int) -> list:
    """The items in a random order in which none stays in place (a cycle through a random permutation)."""
    order = np.random.default_rng(seed).permutation(len(items))
    out = list(items)
    for i in range(len(items)):
        out[order[i]] = items[order[(i + 1) % len(items)]]
    return out


# ----------------------------------------------------------------------------------------------------------------
# Running the stages
# ----------------------------------------------------------------------------------------------------------------
def batched(n: int, size: int):
    return [(i, min(i + size, n)) for i in range(0, n, size)]


@torch.inference_mode()
def decode_semantic(decoder, vqgan, semantic, text_b, text_b_uncond, side, timesteps, guidance, generator, device):
    """Stage B, then Stage A, from given semantic latents: sample.generate's second half."""
    _, (hb, wb) = latent_sizes(side, side, decoder.config)
    latents = sample_loop(decoder, (semantic.shape[0], decoder.config.c_in, hb, wb),
                          cond={"semantic": semantic, "text": text_b},
                          uncond={"semantic": torch.zeros_like(semantic), "text": text_b_uncond},
                          guidance=guidance, timesteps=timesteps, generator=generator, device=device)
    return vqgan.decode(latents.float()).float().clamp(0, 1)


@torch.inference_mode()
def generate_images(prior, decoder, vqgan, enc_c, enc_b, prompts, k, side, args, device, seed_offset, log):
    """k images per prompt, next to each other, in batches; batch b draws its noise from seed·1000 + b."""
    todo = [p for p in prompts for _ in range(k)]
    prior_ts = linear_timesteps(args.prior_steps) if args.prior_steps else STAGE_C_TIMESTEPS
    decoder_ts = linear_timesteps(args.decoder_steps)
    out, t0 = [], time.time()
    for b, (i, j) in enumerate(batched(len(todo), args.batch)):
        text_c, text_c_uncond = encode_prompts(enc_c, todo[i:j], device)
        text_b, text_b_uncond = (text_c, text_c_uncond) if enc_b is enc_c else encode_prompts(enc_b, todo[i:j], device)
        generator = torch.Generator(device).manual_seed(args.seed * 1000 + seed_offset + b)
        out.append(generate(prior, decoder, vqgan, text_c, text_c_uncond, text_b, text_b_uncond, side, side,
                            prior_timesteps=prior_ts, decoder_timesteps=decoder_ts,
                            prior_guidance=args.prior_guidance, decoder_guidance=args.decoder_guidance,
                            generator=generator, device=device).cpu())
        log(f"  generated {j}/{len(todo)} ({time.time() - t0:.0f} s)", progress=True)
    log(f"  generated {len(todo)} images in {time.time() - t0:.0f} s")
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------
def _cell(stat: dict) -> str:
    if stat is None or stat.get("mean") is None:
        return "–"
    return f"{stat['mean']:.2f} ({stat['lo']:.2f}–{stat['hi']:.2f})"


def alignment_table(rows: list[tuple[str, str, dict]], columns) -> str:
    """Markdown: one line per (row, oracle), a column per category, "mean (95% CI)" in each cell."""
    header = "| images | oracle | " + " | ".join(columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 2)]
    for label, oracle, stats in rows:
        lines.append(f"| {label} | {oracle} | " + " | ".join(_cell(stats.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def distribution_table(rows: dict) -> str:
    lines = ["| images, against real renders of other prompts | n | KID-oracle ×10³ | FD-oracle | precision | "
             "recall |", "|---|---|---|---|---|---|"]
    for label, m in rows.items():
        if m["kid_oracle"]["mean"] is None:
            continue
        lines.append(f"| {label} | {m['n']} | {m['kid_oracle']['mean'] * 1e3:.2f} ± {m['kid_oracle']['std'] * 1e3:.2f}"
                     f" | {m['fd_oracle']:.2f} | {m['precision']:.2f} | {m['recall']:.2f} |")
    return "\n".join(lines)


def reconstruction_table(rec: dict) -> str:
    lines = ["| reconstruction | PSNR dB (95% CI) |", "|---|---|"]
    for label, stat in rec["psnr"].items():
        lines.append(f"| {label} | {stat['mean']:.2f} ({stat['lo']:.2f}–{stat['hi']:.2f}) |")
    cb = rec["codebook"]
    lines.append(f"\nStage A codebook: {cb['used']} of {cb['size']} codes used ({cb['usage']:.1%}) on the "
                 f"{cb['images']} real images, perplexity {cb['perplexity']:.1f}.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------
def held_out_pairs(text: str) -> frozenset:
    if text.strip().lower() == "none":
        return frozenset()
    pairs = set()
    for item in text.split(","):
        colour, _, shape = item.strip().partition(":")
        if colour not in COLOURS or shape not in SHAPES:
            raise argparse.ArgumentTypeError(f"{item!r}: expected colour:shape, with a colour in {list(COLOURS)} and "
                                             f"a shape in {list(SHAPES)}")
        pairs.add((colour, shape))
    if len(pairs) < 2:
        raise argparse.ArgumentTypeError("give at least two colour:shape pairs (the held-out prompts are made of "
                                         "them alone), or 'none'")
    return frozenset(pairs)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Measure a Würstchen run on the built-in shapes: prompt alignment "
                                            "(two oracles), reconstruction, and distribution metrics.")
    p.add_argument("--run", default="runs/tiny",
                   help="folder with train.py's stage_a/b/c.pt or exported .safetensors (weights/shapes: the shipped)")
    p.add_argument("--stage-a", help="Stage A checkpoint (default RUN/stage_a.pt or .safetensors)")
    p.add_argument("--stage-b", help="Stage B checkpoint (default RUN/stage_b.pt or .safetensors)")
    p.add_argument("--stage-c", help="Stage C checkpoint (default RUN/stage_c.pt or .safetensors)")
    p.add_argument("--weights", choices=["ema", "model"], default="ema", help="which weights of the checkpoints")
    p.add_argument("--no-generation", action="store_true",
                   help="only the rows of Stage A and Stage A+B on real images (no Stage C checkpoint needed)")
    p.add_argument("--n", type=positive_int, default=200, help="prompts (half one-object, half two-object)")
    p.add_argument("--k", type=positive_int, default=4, help="images per prompt (any-of-k accuracy)")
    p.add_argument("--n-held-out", type=int, default=None, help="held-out-pair prompts (default n / 2; 0: none)")
    p.add_argument("--held-out", type=held_out_pairs, default=HELD_OUT_PAIRS,
                   help="colour:shape pairs held out of training, comma-separated, or 'none' (default: "
                        + ",".join(f"{c}:{s}" for c, s in sorted(HELD_OUT_PAIRS)) + ")")
    p.add_argument("--seed", type=int, default=0, help="seed of the generation noise")
    p.add_argument("--prior-steps", type=positive_int, help="linear Stage C steps (default: the released 29-call list)")
    p.add_argument("--decoder-steps", type=positive_int, default=STAGE_B_STEPS, help="linear Stage B steps")
    p.add_argument("--prior-guidance", type=guidance_value, default=4.0, help="Stage C guidance (on for > 1)")
    p.add_argument("--decoder-guidance", type=guidance_value, default=0.0, help="Stage B guidance (on for > 1)")
    p.add_argument("--size", type=positive_int, help="image side (default: the size Stage C was trained at)")
    p.add_argument("--batch", type=positive_int, default=64, help="images per generation batch")
    p.add_argument("--bootstrap", type=positive_int, default=1000, help="bootstrap resamples")
    p.add_argument("--cache-dir", default="runs/oracle_cache", help="where the CNN oracle is kept once trained")
    p.add_argument("--oracle-images", type=positive_int, default=OracleConfig.images,
                   help="renders the CNN oracle trains on")
    p.add_argument("--oracle-epochs", type=positive_int, default=OracleConfig.epochs, help="its epochs")
    p.add_argument("--json", help="where to write the results (default RUN/eval.json; runs/eval_shipped.json for "
                                  "weights/shapes)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ... (the oracles run on the CPU)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--quiet", action="store_true", help="print the tables only")
    args = p.parse_args(argv)
    if args.n < 4:
        p.error(f"--n {args.n}: expected at least 4 prompts (the distribution metrics compare halves of the sets)")
    if args.n_held_out is not None and (args.n_held_out < 0 or 0 < args.n_held_out < 4):
        p.error(f"--n-held-out {args.n_held_out}: expected 0 (none) or at least 4")
    return args


def logger(quiet: bool):
    """log(message, progress=False): progress lines overwrite each other on a terminal, and are left out of logs."""
    def log(message, progress=False):
        if not quiet and (not progress or sys.stdout.isatty()):
            print(message, end="\r" if progress else "\n", flush=True)
    return log


def eval_device(name: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def save_results(out: Path, results: dict, calibration: list, generated, k: int, captions: list[str], log,
                 t_start: float):
    """Writes results as JSON to `out` and, next to it as PNG, what the numbers are about for the first 12 prompts:
    real, Stage A, Stage A+B (`calibration`), then the k generated images of each (none without Stage C)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    shown = min(len(captions), 12)
    generated_rows = [] if generated is None else [generated[j::k][:shown] for j in range(k)]
    save_grid([x[:shown] for x in calibration] + generated_rows, out.with_suffix(".png"))
    results["grid"] = {"path": str(out.with_suffix(".png")), "captions": captions[:shown],
                       "rows": ["real", "Stage A", "Stage A+B from the semantic latent"] +
                               [f"generated {j + 1}" for j in range(len(generated_rows))]}
    out.write_text(json.dumps(results, indent=1))
    log(f"\nresults: {out}, images of the first {shown} prompts: {out.with_suffix('.png')} "
        f"({time.time() - t_start:.0f} s)")


def load_models(args, run: Path, device):
    """(checkpoint paths, Stage A, Stage B, Stage C or None under --no-generation, Stage B's and Stage C's text
    encoders) for a run folder and the --stage-x, --weights and --no-generation flags. Errors are one line."""
    from text import TextEncoder
    encoders = {}                           # Stages B and C usually share one: load it once

    def text_encoder(model):
        spec, length = getattr(model, "text_encoder_spec", (None, None))
        if spec is None:
            raise SystemExit(f"error: {Path(sys.argv[0]).name} needs train.py checkpoints, which name their text "
                             f"encoder")
        if (spec, length) not in encoders:
            encoders[(spec, length)] = TextEncoder.from_name_or_path(spec, **({"max_length": length} if length
                                                                              else {})).to(device)
        return encoders[(spec, length)]

    try:                                    # checkpoint and text-encoder errors are one line, never a traceback
        paths = run_paths(run, {s: getattr(args, f"stage_{s}") for s in "abc"},
                          stages="ab" if args.no_generation else "abc")
        vqgan, stage_b_model = (load_stage(s, paths[s], device, args.weights) for s in "ab")
        prior = None if args.no_generation else load_stage("c", paths["c"], device, args.weights)
        enc_b = text_encoder(stage_b_model)
        enc_c = None if prior is None else text_encoder(prior)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    return paths, vqgan, stage_b_model, prior, enc_b, enc_c


def main(argv=None):
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    log, device = logger(args.quiet), eval_device(args.device)
    t_start, timings = time.time(), {}
    run = Path(args.run)

    paths, vqgan, stage_b_model, prior, enc_b, enc_c = load_models(args, run, device)
    decoder, compressor = stage_b_model.decoder, stage_b_model.compressor
    side = args.size or getattr(prior if prior is not None else stage_b_model, "train_side", None) or 64
    if valid_side(side, decoder.config) != side:
        raise SystemExit(f"error: the decoder cannot make {side}² images; the next size it can make is "
                         f"{valid_side(side, decoder.config)} (pass --size)")
    n, k = args.n, args.k
    n_held = (n // 2 if args.n_held_out is None else args.n_held_out) if args.held_out and prior is not None else 0
    log(f"evaluate: {run} · {side} px · {n} prompts × {k} images (+ {n_held} held-out-pair prompts) · {device}")

    # --- prompts and their real images (seeds training does not use) ---
    t = time.time()
    real, samples = render_with_truth(EVAL_SEED, n, side, exclude=args.held_out)
    reference, _ = render_with_truth(REFERENCE_SEED, n, side, exclude=args.held_out)
    captions = [s.caption for s in samples]
    requests = [parse_caption(c) for c in captions]
    if n_held:
        others = frozenset((c, s) for c in COLOURS for s in SHAPES) - args.held_out
        real_held, samples_held = render_with_truth(EVAL_SEED, n_held, side, exclude=others, start=n)
        reference_held, _ = render_with_truth(REFERENCE_SEED, n_held, side, exclude=others, start=n)
        captions_held = [s.caption for s in samples_held]
        requests_held = [parse_caption(c) for c in captions_held]

    # --- oracles ---
    oracle_config = OracleConfig(images=args.oracle_images, epochs=args.oracle_epochs,
                                 val_images=min(OracleConfig.val_images, args.oracle_images))
    oracles = {"analytic": AnalyticDetector(side),
               "CNN": load_or_train_oracle(side, oracle_config, Path(args.cache_dir), log)}
    timings["oracles"] = time.time() - t

    # --- Stage A and Stage A+B on the real images ---
    t = time.time()
    with torch.inference_mode():
        recon, recon_q, indices = [], [], []
        for i, j in batched(n, args.batch):
            x = real[i:j].to(device)
            recon.append(vqgan.decode(vqgan.encode(x)).float().clamp(0, 1).cpu())      # as Würstchen v2 decodes
            r, _, idx = vqgan(x)
            recon_q.append(r.float().clamp(0, 1).cpu())
            indices.append(idx.cpu())
        recon, recon_q, indices = torch.cat(recon), torch.cat(recon_q), torch.cat(indices)
        decoded = []
        for b, (i, j) in enumerate(batched(n, args.batch)):
            text_b, text_b_uncond = encode_prompts(enc_b, captions[i:j], device)
            decoded.append(decode_semantic(decoder, vqgan, compressor(real[i:j].to(device)), text_b, text_b_uncond,
                                           side, linear_timesteps(args.decoder_steps), args.decoder_guidance,
                                           torch.Generator(device).manual_seed(args.seed * 1000 + 500 + b),
                                           device).cpu())
        decoded = torch.cat(decoded)
    timings["stage A and A+B on real images"] = time.time() - t

    # --- text → image ---
    if prior is not None:
        t = time.time()
        log(f"generating {n * k + n_held * k} images")
        generated = generate_images(prior, decoder, vqgan, enc_c, enc_b, captions, k, side, args, device, 0, log)
        if n_held:
            generated_held = generate_images(prior, decoder, vqgan, enc_c, enc_b, captions_held, k, side, args,
                                             device, 700, log)
        timings["generation"] = time.time() - t

    # --- alignment ---
    t = time.time()
    counts = bootstrap_counts(n, args.bootstrap, seed=1)
    counts_held = bootstrap_counts(n_held, args.bootstrap, seed=2) if n_held else None
    shuffled = derange(requests, seed=3)
    sets = [("real", "real images (ceiling)", real, requests, 1, counts),
            ("stage_a", "Stage A reconstructions", recon, requests, 1, counts),
            ("stage_ab", "Stage A+B from the semantic latent", decoded, requests, 1, counts),
            ("shuffled", "real, shuffled captions (chance)", real, shuffled, 1, counts)]
    if prior is not None:
        sets += [("generated", "generated", generated, requests, k, counts)]
    if n_held:
        sets += [("held_out_real", "held-out pairs: real", real_held, requests_held, 1, counts_held),
                 ("held_out_generated", "held-out pairs: generated", generated_held, requests_held, k, counts_held)]
    alignment, rows = {}, []
    for key, label, images, reqs, kk, cnt in sets:
        alignment[key] = {"label": label, "images_per_prompt": kk, "prompts": len(reqs)}
        for name, oracle in oracles.items():
            alignment[key][name] = summarise(score_images(oracle, images, reqs, kk), cnt)
        modes = ["per_image"] if kk == 1 else ["per_image", "any_of_k"]
        for mode in modes:
            suffix = "" if kk == 1 else (", per image" if mode == "per_image" else f", any of {kk}")
            for name in oracles:
                rows.append((label + suffix, name, alignment[key][name][mode]))
    timings["scoring"] = time.time() - t

    # --- distribution metrics in the CNN oracle's feature space ---
    t = time.time()
    cnn = oracles["CNN"]
    # Every set is compared with real renders of *other* prompts from the same distribution (REFERENCE_SEED), as
    # FID compares with a data set: against the prompts' own images, reconstructions would look closer than a
    # fresh draw of real images merely for being paired with them. The real row is then the noise floor.
    first = lambda images, kk: images[::kk]                                   # the first image of each prompt
    ref = cnn.features(reference)
    compare = {"real images (floor)": (cnn.features(real), ref),
               "Stage A reconstructions": (cnn.features(recon), ref),
               "Stage A+B from the semantic latent": (cnn.features(decoded), ref)}
    if prior is not None:
        compare["generated (first image per prompt)"] = (cnn.features(first(generated, k)), ref)
    if n_held:
        ref_held = cnn.features(reference_held)
        compare["held-out pairs: real (floor)"] = (cnn.features(real_held), ref_held)
        compare["held-out pairs: generated"] = (cnn.features(first(generated_held, k)), ref_held)
    distribution = {}
    for label, (fake, ref) in compare.items():
        distribution[label] = {"n": len(fake), "kid_oracle": kid(ref, fake), "fd_oracle": frechet_features(ref, fake),
                               **precision_recall(ref, fake)}
    timings["distribution"] = time.time() - t

    # --- reconstruction ---
    used = torch.bincount(indices.flatten(), minlength=vqgan.config.codebook_size).double()
    p = used / used.sum()
    reconstruction = {
        "psnr": {"Stage A, un-quantized (as Würstchen v2 decodes) vs real": bootstrap_mean(psnr(recon, real), counts),
                 "Stage A, quantized vs real": bootstrap_mean(psnr(recon_q, real), counts),
                 "Stage A+B from the semantic latent vs Stage A reconstruction":
                     bootstrap_mean(psnr(decoded, recon), counts),
                 "Stage A+B from the semantic latent vs real": bootstrap_mean(psnr(decoded, real), counts)},
        "codebook": {"size": vqgan.config.codebook_size, "used": int((used > 0).sum()),
                     "usage": float((used > 0).double().mean()), "images": n,
                     "perplexity": float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))}}

    # --- print and write ---
    warnings_ = []
    for name in oracles:
        ceiling = alignment["real"][name]["per_image"]["mean"]["mean"]
        if ceiling is not None and ceiling < 0.98:
            warnings_.append(f"warning: the {name} oracle scores {ceiling:.1%} on real images, under the 98% it "
                             f"needs to be trusted")
    cnn_info = cnn.info
    report = "\n\n".join([
        f"Prompt alignment, GenEval-style categories: accuracy (95% bootstrap CI over prompts); mean = unweighted "
        f"mean of the six. {n} prompts, {k} images each" + (f"; {n_held} held-out-pair prompts "
                                                           f"({', '.join(f'{c} {s}' for c, s in sorted(args.held_out))})"
                                                           if n_held else "") + ".",
        alignment_table(rows, HEADLINE + ("mean",)),
        "Outside the mean: size and background (where the caption names them), and everything the caption asks.",
        alignment_table(rows, EXTRA),
        "Distribution metrics on the CNN oracle's features (not Inception: comparable only between runs of "
        "experiments/evaluate.py with the same oracle).",
        distribution_table(distribution),
        reconstruction_table(reconstruction)] + warnings_)
    print(report)
    results = {
        "run": str(run), "checkpoints": {s: str(paths[s]) for s in ("ab" if prior is None else "abc")},
        "weights": args.weights,
        "settings": {"size": side, "prompts": n, "images_per_prompt": k, "held_out_prompts": n_held,
                     "held_out_pairs": sorted(list(p) for p in args.held_out), "seed": args.seed,
                     "eval_seed": EVAL_SEED, "reference_seed": REFERENCE_SEED,
                     "two_object_prob": TWO_OBJECT_PROB, "prior_steps": args.prior_steps or "released 29-call list",
                     "decoder_steps": args.decoder_steps, "prior_guidance": args.prior_guidance,
                     "decoder_guidance": args.decoder_guidance, "bootstrap": args.bootstrap,
                     "headline": list(HEADLINE)},
        "oracles": {"analytic": {"max_residual": MAX_RESIDUAL, "min_area": MIN_AREA,
                                 "shape_features": list(SHAPE_FEATURES)}, "CNN": cnn_info},
        "alignment": alignment, "distribution": distribution, "reconstruction": reconstruction,
        "warnings": warnings_, "timings_s": {k_: round(v, 1) for k_, v in timings.items()} |
                                           {"total": round(time.time() - t_start, 1)},
    }
    out = Path(args.json) if args.json else \
        (Path("runs/eval_shipped.json") if run.resolve() == SHIPPED else run / "eval.json")   # not into weights/
    save_results(out, results, [real, recon, decoded], None if prior is None else generated, k, captions, log,
                 t_start)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
