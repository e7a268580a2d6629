"""The offline caption set: synthetic scenes of coloured shapes with 5 varied reference captions each.

A scene holds 1 or 2 shapes (circle, square, triangle) in red, green, blue or yellow, small or large, at the
left/right/top/bottom of a plain white, gray or black background (two shapes sit on opposite sides so they
never overlap), rendered with PIL. Its 5 references come from 5 different templates with synonyms drawn per
reference, so they vary in word choice ("circle"/"disc"/"dot"), order ("on the left there is ...") and detail
(with or without size, position, background). That is what makes the metrics disagree: BLEU-1 rewards common
words whatever their order, ROUGE-L the longest common subsequence, BLEU-4 exact 4-grams, CIDEr-D the
n-grams that are rare across images (colour-shape pairs over "a" and "the").

Everything is a function of (seed, split, index): scene i of split "train" is the same on every machine, and
the three splits are independent draws (the same attribute combination can occur in two splits, never the
same image: shape centres are jittered).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 70, 220), "yellow": (235, 210, 20)}
SIZES = ("small", "large")
BACKGROUNDS = {"white": (255, 255, 255), "gray": (128, 128, 128), "black": (0, 0, 0)}
POSITIONS = ("left", "right", "top", "bottom")
OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
CENTRES = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75)}
RADIUS = {"small": 0.1, "large": 0.19}  # fraction of the image side

SHAPE_WORDS = {"circle": ("circle", "disc", "dot"), "square": ("square", "box", "block"),
               "triangle": ("triangle", "wedge")}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
POSITION_WORDS = {
    "left": ("on the left", "to the left", "at the left side", "in the left part"),
    "right": ("on the right", "to the right", "at the right side", "in the right part"),
    "top": ("at the top", "near the top", "in the upper part"),
    "bottom": ("at the bottom", "near the bottom", "in the lower part"),
}
BACKGROUND_WORDS = {"white": ("white",), "gray": ("gray", "grey"), "black": ("black", "dark")}

# {d}: size colour shape, {c}: colour shape, {p}: position phrase, {bg}: background word.
ONE_SHAPE_TEMPLATES = (
    "a {d} {p}",
    "a {c} {p}",
    "there is a {d} {p}",
    "{p} there is a {c}",
    "a {d} {p} on a {bg} background",
    "an image of a {c}",
    "a picture with a {d} on a {bg} background",
)
TWO_SHAPE_TEMPLATES = (
    "a {d1} {p1} and a {d2} {p2}",
    "two shapes: a {c1} and a {c2}",
    "a {c2} {p2} and a {c1} {p1}",
    "a {c1} {p1} next to a {c2}",
    "a {d1} and a {d2} on a {bg} background",
    "an image with a {c1} and a {c2}",
    "{p1} a {c1}, {p2} a {c2}",
)


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    size: str
    position: str
    jitter: tuple[float, float]


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: str


def _rng(seed: int, split: str, index: int) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`: stable across runs and PYTHONHASHSEED values.
    return random.Random(f"rs-captions/{seed}/{split}/{index}")


def make_scene(rng: random.Random, max_shapes: int = 2) -> Scene:
    """Draw a scene: 1..max_shapes shapes (two shapes sit on opposite sides) on a random background."""
    n = rng.randint(1, max(1, min(2, max_shapes)))
    first = rng.choice(POSITIONS)
    positions = [first, OPPOSITE[first]][:n]
    shapes = tuple(
        Shape(rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(SIZES), pos,
              (rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04)))
        for pos in positions
    )
    return Scene(shapes, rng.choice(list(BACKGROUNDS)))


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Draw the scene as an RGB image of `size` x `size` pixels."""
    image = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        cx, cy = CENTRES[shape.position]
        cx, cy = (cx + shape.jitter[0]) * size, (cy + shape.jitter[1]) * size
        r = RADIUS[shape.size] * size
        color = COLORS[shape.color]
        if shape.kind == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        elif shape.kind == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=color)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    return image


def _words(rng: random.Random, shape: Shape) -> dict[str, str]:
    noun = rng.choice(SHAPE_WORDS[shape.kind])
    return {"d": f"{rng.choice(SIZE_WORDS[shape.size])} {shape.color} {noun}", "c": f"{shape.color} {noun}",
            "p": rng.choice(POSITION_WORDS[shape.position])}


def captions(scene: Scene, rng: random.Random, n: int = 5) -> list[str]:
    """`n` reference captions of the scene, from `n` different templates (synonyms drawn per caption)."""
    templates = ONE_SHAPE_TEMPLATES if len(scene.shapes) == 1 else TWO_SHAPE_TEMPLATES
    if n > len(templates):
        raise ValueError(f"at most {len(templates)} captions per scene, got n={n}")
    out = []
    for template in rng.sample(templates, n):
        fields = {"bg": rng.choice(BACKGROUND_WORDS[scene.background])}
        for i, shape in enumerate(scene.shapes, start=1):
            words = _words(rng, shape)
            suffix = "" if len(scene.shapes) == 1 else str(i)
            fields.update({f"{key}{suffix}": value for key, value in words.items()})
        out.append(template.format(**fields))
    return out


class SyntheticCaptions:
    """One split of the synthetic caption set: `(image, references)` pairs, rendered on access.

    Args:
        num: number of scenes.
        split: split name ("train", "val", "test"); splits are independent draws.
        seed: dataset seed.
        image_size: side of the rendered images in pixels.
        captions_per_image: references per scene (at most 7).
        max_shapes: 1 or 2 shapes per scene.
        transform: applied to the PIL image (e.g. open_clip's preprocess).
    """

    def __init__(self, num: int, split: str = "train", seed: int = 0, image_size: int = 64,
                 captions_per_image: int = 5, max_shapes: int = 2, transform=None) -> None:
        self.split, self.seed, self.image_size, self.transform = split, seed, image_size, transform
        self.scenes, self.references = [], []
        for index in range(num):
            rng = _rng(seed, split, index)
            scene = make_scene(rng, max_shapes)
            self.scenes.append(scene)
            self.references.append(captions(scene, rng, captions_per_image))

    def __len__(self) -> int:
        return len(self.scenes)

    def picture(self, index: int) -> Image.Image:
        """The untransformed image of item `index` (what a person looks at, e.g. in `rs serve`)."""
        return render(self.scenes[index], self.image_size)

    def __getitem__(self, index: int) -> dict:
        image = self.picture(index)
        if self.transform is not None:
            image = self.transform(image)
        return {"image": image, "references": self.references[index], "id": f"{self.split}-{index}"}
