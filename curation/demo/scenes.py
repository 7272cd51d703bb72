"""Rendered scenes with learnable structure.

Each scene holds 1-3 coloured shapes, each in its own horizontal slot (left, middle,
right). Captions and question/answer pairs are generated from the same scene
description, so they are true of the image: a model can learn colours, shapes, counts
and positions from them, and a mismatched caption is detectably wrong.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
SLOTS = ("left", "middle", "right")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
SIGN_WORDS = (
    "OPEN", "CLOSED", "STOP", "EXIT", "SALE", "HOTEL", "PARKING", "CAFE", "BAKERY", "LIBRARY",
    "MUSEUM", "STATION", "PHARMACY", "GARDEN", "MARKET", "SCHOOL", "BRIDGE", "HARBOR", "THEATER", "BANK",
)
# The words signs are drawn from, skewed on purpose for concept balancing (`balanced:t`):
# OPEN and SALE take 12 of the 20 draws, eight other words one each, the rest none.
# Twenty slots, so a draw takes the same randomness as one from SIGN_WORDS did.
SIGN_DRAW = ("OPEN",) * 7 + ("SALE",) * 5 + SIGN_WORDS[1:4] + SIGN_WORDS[5:10]
BACKGROUNDS = ((245, 245, 245), (230, 236, 245), (245, 238, 225), (225, 240, 228))


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    slot: str


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    width: int
    height: int
    background: tuple[int, int, int]
    jitter: tuple[int, ...]  # vertical offset per object, in pixels
    word: str | None = None  # text on a sign, for OCR-rich images
    texture: int = 0  # seed of the faint background strokes that make each image unique
    scale: float = 1.0  # object size factor


def random_scene(rng: random.Random, with_word: bool = False) -> Scene:
    n = rng.randint(1, 3)
    slots = sorted(rng.sample(SLOTS, n), key=SLOTS.index)
    combos = rng.sample([(s, c) for s in SHAPES for c in COLOURS], n)
    objects = tuple(Obj(s, c, slot) for (s, c), slot in zip(combos, slots))
    size = rng.choice([(160, 160), (192, 144), (224, 224), (256, 192), (144, 192)])
    jitter = tuple(rng.randint(-12, 12) for _ in objects)
    word = rng.choice(SIGN_DRAW) if with_word else None
    return Scene(objects, size[0], size[1], rng.choice(BACKGROUNDS), jitter, word,
                 texture=rng.randrange(1 << 30), scale=rng.uniform(0.8, 1.15))


def _background(draw: ImageDraw.ImageDraw, scene: Scene) -> None:
    """Faint strokes and patches: like real photos, no two backgrounds are the same,
    so perceptual hashes separate distinct scenes while staying stable under re-encoding."""
    rng = random.Random(scene.texture)
    base = scene.background
    for _ in range(rng.randint(8, 14)):
        tone = tuple(max(0, c - rng.randint(40, 110)) for c in base)
        x0, y0 = rng.randrange(scene.width), rng.randrange(scene.height)
        x1, y1 = rng.randrange(scene.width), rng.randrange(scene.height)
        kind = rng.random()
        if kind < 0.45:
            draw.line((x0, y0, x1, y1), fill=tone, width=rng.randint(2, 7))
        elif kind < 0.8:
            draw.rectangle((min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)), outline=tone, width=3)
        else:
            pale = tuple(max(0, c - rng.randint(15, 45)) for c in base)
            draw.rectangle((min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)), fill=pale)


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def render(scene: Scene) -> Image.Image:
    img = Image.new("RGB", (scene.width, scene.height), scene.background)
    draw = ImageDraw.Draw(img)
    _background(draw, scene)
    w, h = scene.width, scene.height
    shape_top = h * 0.55 if scene.word else h * 0.5
    r = int(min(w / 8, h / 5) * scene.scale)
    for obj, dy in zip(scene.objects, scene.jitter):
        cx = int(w * (SLOTS.index(obj.slot) * 2 + 1) / 6)
        cy = int(shape_top + dy)
        fill = COLOURS[obj.colour]
        box = (cx - r, cy - r, cx + r, cy + r)
        if obj.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif obj.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    if scene.word:
        font = _font(max(14, h // 7))
        left, top, right, bottom = draw.textbbox((0, 0), scene.word, font=font)
        tx, ty = (w - (right - left)) // 2, int(h * 0.08)
        draw.rectangle((tx - 6, ty - 4, tx + right - left + 6, ty + bottom - top + 10), fill=(255, 255, 255), outline=(0, 0, 0))
        draw.text((tx - left, ty - top + 2), scene.word, fill=(0, 0, 0), font=font)
    return img


def encode_jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _phrase(obj: Obj) -> str:
    where = "in the middle" if obj.slot == "middle" else f"on the {obj.slot}"
    article = "an" if obj.colour[0] in "aeiou" else "a"
    return f"{article} {obj.colour} {obj.shape} {where}"


def caption(scene: Scene, rng: random.Random) -> str:
    parts = [_phrase(o) for o in scene.objects]
    body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    n = len(scene.objects)
    opener = rng.choice([
        "A picture of", "An image showing", "A simple drawing of",
        f"{NUMBER_WORDS[n].capitalize()} shape{'s' if n > 1 else ''}:",
    ])
    text = f"{opener} {body}."
    if scene.word:
        text = f"A sign that says {scene.word} above {body}."
    return text


def questions(scene: Scene) -> list[dict[str, str]]:
    """Question/answer pairs that are true of the scene (the trainer's held-out eval)."""
    qa = [{"q": "How many shapes are there?", "a": NUMBER_WORDS[len(scene.objects)]}]
    for o in scene.objects:
        qa.append({"q": f"What colour is the {o.shape}?", "a": o.colour})
        where = "in the middle" if o.slot == "middle" else f"on the {o.slot}"
        qa.append({"q": f"What shape is {where}?", "a": o.shape})
    if scene.word:
        qa.append({"q": "What does the sign say?", "a": scene.word.lower()})
    return qa


def document_questions(pictures: list[Scene]) -> list[dict[str, str]]:
    """Questions about a document's images, which it numbers 1, 2, ... in order: which
    image holds an object (asked only where exactly one does), and the colour of a shape
    in image k. Answering needs the images, and for the first kind all of them."""
    holders: dict[tuple[str, str], list[int]] = {}
    for k, scene in enumerate(pictures, start=1):
        for o in scene.objects:
            holders.setdefault((o.colour, o.shape), []).append(k)
    qa = [{"q": f"Which image shows the {colour} {shape}?", "a": f"image {ks[0]}"}
          for (colour, shape), ks in holders.items() if len(ks) == 1]
    for k, scene in enumerate(pictures, start=1):
        shapes = [o.shape for o in scene.objects]
        alone = [o for o in scene.objects if shapes.count(o.shape) == 1]  # "the circle" must be one circle
        if alone:
            qa.append({"q": f"In image {k}, what colour is the {alone[0].shape}?", "a": alone[0].colour})
    return qa
