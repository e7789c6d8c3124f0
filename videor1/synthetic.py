"""Synthetic temporal video tasks -> real H.264 mp4 files, still images and one Video-R1 JSON list.

    python -m videor1.synthetic --out DIR --n N --seed S [--split train|heldout] [--size 64]
                                [--frames 16] [--fps 8] [--tasks motion_direction color_first ...]

writes DIR/<split>.json (a list of rows in the exact Video-R1-260K schema, see videor1.data),
DIR/videos/*.mp4 (libx264, yuv420p), DIR/images/*.png|jpg and DIR/<split>.manifest.json, a sidecar
with what each file declares (frame count, size, fps) and the scene that was drawn (the ground
truth), which the tests check against the decoded pixels.

Scenes are coloured shapes and white words on a grey background (the processor's normalisation
mean, so the background is ~0 after normalisation, see BACKGROUND). Every task is a small function
in the TASKS registry; its docstring says whether one frame, or the frames in any order, suffice.
Most video tasks need the frames in order: reversing the video (same frames, other order) changes
their answer. The temporal changes (a colour switch, an object appearing) happen between frames
2j and 2j+1, i.e. inside one Qwen2.5-VL temporal patch, when every frame is read (sample as many
frames as the manifest declares, not by fps): a tiny model reads order inside a 2-frame patch but
not across tokens (see DESIGN.md).

Samples cycle through the tasks (sample i gets tasks[i % len(tasks)]), so with the default task
order any n >= 5 contains every Video-R1 problem type. Sample i is drawn from its own generator
seeded by (seed, split, i): the same arguments give the same JSON, and a larger n extends a smaller
one. Train and held-out never overlap: problem ids (held-out ids start at HELDOUT_ID_OFFSET), file
names (they carry split and seed) and scenes (a scene belongs to the split given by the parity of
its content hash, whatever the seeds) are disjoint.

Every string a row can hold comes from a Template with closed value sets; `text_corpus()` expands
the same templates, so it covers every emitted string by construction (the tokenizer corpus).
"""

from __future__ import annotations

import argparse
import contextvars
import functools
import hashlib
import itertools
import json
import math
import os
import string
import sys
import time
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Sequence

import numpy as np

# ----------------------------------------------------------------------------------------------
# Vocabulary: every value a template slot can take.

PALETTE: dict[str, tuple[int, int, int]] = {
    # Saturated and far apart in RGB, so the colour survives yuv420p and a 64 -> 56 resize.
    "red": (220, 30, 30),
    "green": (30, 200, 30),
    "blue": (40, 80, 255),
    "yellow": (240, 220, 30),
    "magenta": (220, 40, 220),
    "cyan": (30, 210, 220),
}
COLORS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle", "diamond")
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
WORDS = (
    "CAT", "DOG", "SUN", "MOON", "STAR", "TREE", "FISH", "BIRD", "RAIN", "SNOW", "BOOK", "LAMP",
    "DOOR", "KITE", "SHIP", "BELL", "CAKE", "MILK", "ROSE", "WIND", "BOX", "CUP", "HAT", "KEY",
)  # fmt: skip
SPEEDS = ("1.0", "1.5", "2.0", "2.5", "3.0")  # pixels per frame; strings, as the answer writes them
MIN_DIRECTION_SPEED = 1.5  # direction questions: enough motion inside one 2-frame patch
FLASH_COUNTS = ("1", "2", "3", "4")
IMAGE_COUNTS = ("1", "2", "3", "4", "5")
EVENTS = ("appears", "disappears")
LETTERS = ("A", "B", "C", "D")

# The OpenAI CLIP mean that Qwen2.5-VL's processor subtracts, in 0..255: the background normalises to
# ~0, so a patch of background embeds to ~0 (the patch embedding has no bias) and only the shapes
# speak. On black, every patch embeds to one large constant vector that drowns the shapes: the tiny
# model's vision tower then learned motion direction far slower (measured: chance after 600 steps of
# a direct probe on black, 100% held-out after 400 on this grey; docs/demo.md).
BACKGROUND = (123, 117, 104)
TEXT_RGB = (255, 255, 255)
# libx264 constant rate factor. 4 keeps the High profile (crf 0 switches to High 4:4:4 Predictive,
# which hardware decoders refuse) and decodes shape interiors within ~14 levels of the drawn RGB
# (crf 10: 20, crf 18: 44); the rest is yuv420p's half-resolution chroma at the shapes' edges.
CRF = 4
HELDOUT_ID_OFFSET = 1_000_000
SPLITS = ("train", "heldout")
MANIFEST_VERSION = 1


# ----------------------------------------------------------------------------------------------
# Templates: one source for the generator and for text_corpus().


class Template:
    """A format string whose every placeholder ranges over a closed tuple of values.

    render(**values) refuses a value outside its slot's tuple, so the generator cannot emit a
    string that expand() (and so text_corpus()) does not list.
    """

    def __init__(self, text: str, **slots: Sequence[str]):
        names = {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
        if names != set(slots):
            raise ValueError(f"template {text!r}: placeholders {sorted(names)} != slots {sorted(slots)}")
        self.text = text
        self.slots = {name: tuple(values) for name, values in slots.items()}

    def render(self, **values: str) -> str:
        """The text with the placeholders filled; every value must be in its slot's tuple."""
        if set(values) != set(self.slots):
            raise KeyError(f"template {self.text!r}: got slots {sorted(values)}, needs {sorted(self.slots)}")
        for name, value in values.items():
            if value not in self.slots[name]:
                raise ValueError(f"template {self.text!r}: slot '{name}' = {value!r} is not one of {self.slots[name]}")
        return self.text.format(**values)

    def expand(self) -> list[str]:
        """Every string render() can return (the product of the slot values)."""
        names = list(self.slots)
        return [
            self.text.format(**dict(zip(names, combo)))
            for combo in itertools.product(*(self.slots[name] for name in names))
        ]


MC_SOLUTION = Template("<answer>{letter}</answer>", letter=LETTERS)


def _option_template(labels: Sequence[str]) -> Template:
    return Template("{letter}. {label}", letter=LETTERS, label=labels)


def _answer_template(values: Sequence[str]) -> Template:
    return Template("<answer>{value}</answer>", value=values)


# ----------------------------------------------------------------------------------------------
# Geometry and drawing (numpy; Pillow only rasterises text).


@dataclass(frozen=True)
class Geometry:
    """Frame size (square, pixels) and frame count, and the sizes derived from them."""

    size: int
    frames: int

    @property
    def radius(self) -> int:
        """Shape half-extent: 5 px at 64x64 (an 11-px shape), scaled with the frame."""
        return max(3, round(self.size * 5 / 64))

    @property
    def margin(self) -> int:
        return max(1, self.size // 32)

    @property
    def font_size(self) -> int:
        return max(8, round(self.size * 14 / 64))

    @property
    def center_range(self) -> tuple[int, int]:
        """Inclusive range of a shape centre coordinate that keeps the whole shape in the frame."""
        lo = self.margin + self.radius
        return lo, self.size - 1 - lo

    def fits(self, speed: str) -> bool:
        """Whether a shape moving `speed` px/frame for frames-1 steps stays inside the frame."""
        lo, hi = self.center_range
        return math.ceil(float(speed) * (self.frames - 1)) <= hi - lo


@functools.lru_cache(maxsize=None)
def shape_mask(shape: str, radius: int) -> np.ndarray:
    """Boolean mask [2r+1, 2r+1] of a shape centred in its box (a triangle points up)."""
    y, x = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    if shape == "circle":
        mask = x * x + y * y <= (radius + 0.3) ** 2
    elif shape == "square":
        mask = (np.abs(x) <= radius - 1) & (np.abs(y) <= radius - 1)
    elif shape == "diamond":
        mask = np.abs(x) + np.abs(y) <= radius
    elif shape == "triangle":
        mask = 2 * np.abs(x) <= y + radius
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    mask.flags.writeable = False
    return mask


def draw_shape(canvas: np.ndarray, shape: str, rgb: Sequence[int], cx: int, cy: int, radius: int) -> None:
    """Paint a shape of colour `rgb` centred at (cx, cy) into canvas uint8 [H, W, 3], in place."""
    mask = shape_mask(shape, radius)
    canvas[cy - radius : cy + radius + 1, cx - radius : cx + radius + 1][mask] = rgb


@functools.lru_cache(maxsize=None)
def text_mask(word: str, font_size: int) -> np.ndarray:
    """Boolean mask [h, w] of `word` in Pillow's built-in font, cropped to the ink's bounding box."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=font_size)
    left, top, right, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), word, font=font)
    image = Image.new("L", (right + 2, bottom + 2), 0)
    ImageDraw.Draw(image).text((0, 0), word, font=font, fill=255)
    ink = np.asarray(image) >= 128  # binary, so the drawn word has one colour
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    mask = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].copy()
    mask.flags.writeable = False
    return mask


def _video(geom: Geometry) -> np.ndarray:
    return np.full((geom.frames, geom.size, geom.size, 3), BACKGROUND, np.uint8)


def _image(geom: Geometry) -> np.ndarray:
    return np.full((geom.size, geom.size, 3), BACKGROUND, np.uint8)


# ----------------------------------------------------------------------------------------------
# Tasks.


@dataclass
class Sample:
    """One generated question before it is written to disk.

    media: uint8 [T, H, W, 3] for a video, [H, W, 3] for an image (RGB).
    scene: JSON-serialisable description of what was drawn and the answer label (no option order);
           it decides the train / held-out split and goes to the manifest.
    """

    media: np.ndarray
    problem: str
    options: list[str]
    process: str
    solution: str
    scene: dict


@dataclass(frozen=True)
class Task:
    """A task: its Video-R1 type, what it needs from the frames, its generator and its templates.

    needs_order: the answer changes when the frames are reordered (shuffled frames do not suffice).
    single_frame: one frame (not knowing which) suffices.
    """

    name: str
    data_type: str  # "video" | "image"
    problem_type: str
    needs_order: bool
    single_frame: bool
    make: Callable[[np.random.Generator, Geometry], Sample]
    templates: tuple[Template, ...]
    image_format: str = ""  # "PNG" | "JPEG" for image tasks

    @property
    def data_source(self) -> str:
        return f"synthetic/{self.name}"


TASKS: dict[str, Task] = {}


def register_task(
    name: str,
    data_type: str,
    problem_type: str,
    templates: Sequence[Template],
    *,
    needs_order: bool,
    single_frame: bool,
    image_format: str = "",
) -> Callable:
    """Decorator: register `make(rng, geom) -> Sample` as task `name` in TASKS.

    templates: every Template the task renders (text_corpus() expands them).
    image_format: "PNG" or "JPEG" for an image task, "" for a video task.
    """

    def wrap(make: Callable[[np.random.Generator, Geometry], Sample]) -> Callable:
        if name in TASKS:
            raise ValueError(f"task {name!r} is already registered")
        TASKS[name] = Task(
            name, data_type, problem_type, needs_order, single_frame, make, tuple(templates), image_format
        )
        return make

    return wrap


def _pick(rng: np.random.Generator, values: Sequence[str], k: int | None = None):
    """One value (k None) or k distinct values, uniformly."""
    if k is None:
        return values[int(rng.integers(len(values)))]
    return [values[i] for i in rng.choice(len(values), size=k, replace=False)]


def _position(rng: np.random.Generator, geom: Geometry) -> tuple[int, int]:
    lo, hi = geom.center_range
    return int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))


# Canonical label order for OPTION_ORDERS "fixed": the order of the vocabulary tuples.
_CANONICAL = {label: i for i, label in enumerate((*DIRECTIONS, *COLORS, *EVENTS, *SHAPES))}
OPTION_ORDERS = ("shuffled", "fixed")
_option_order: contextvars.ContextVar[str] = contextvars.ContextVar("option_order", default="shuffled")


def _multiple_choice(rng: np.random.Generator, answer: str, labels: Sequence[str], option: Template):
    """Options in a uniformly random order, or (generate_dataset(option_order="fixed")) in the
    vocabulary's order (A. left, B. right, C. up, D. down); returns (option strings, letter of `answer`).

    The permutation is drawn either way, so both orders give the same scenes from the same seed.
    """
    order = [labels[i] for i in rng.permutation(len(labels))]
    if _option_order.get() == "fixed":
        order = sorted(labels, key=_CANONICAL.__getitem__)
    letter = LETTERS[order.index(answer)]
    return [option.render(letter=LETTERS[i], label=label) for i, label in enumerate(order)], letter


def _change_frame(rng: np.random.Generator, frames: int) -> int:
    """An odd frame index k in [3, frames-3]: frames k-1 and k share a Qwen2.5-VL temporal patch."""
    return int(rng.choice(np.arange(3, frames - 2, 2)))


def _motion(rng: np.random.Generator, geom: Geometry, min_speed: float) -> dict:
    """A constant-velocity straight path that stays inside the frame: direction, speed, centres."""
    speeds = [s for s in SPEEDS if geom.fits(s) and float(s) >= min_speed] or [s for s in SPEEDS if geom.fits(s)]
    direction, speed = _pick(rng, tuple(DIRECTIONS)), _pick(rng, speeds)
    dx, dy = DIRECTIONS[direction]
    lo, hi = geom.center_range
    travel = math.ceil(float(speed) * (geom.frames - 1))
    start = []
    for d in (dx, dy):  # along the motion the start leaves room for the travel
        a, b = (lo, hi - travel) if d > 0 else (lo + travel, hi) if d < 0 else (lo, hi)
        start.append(int(rng.integers(a, b + 1)))
    steps = np.floor(float(speed) * np.arange(geom.frames) + 0.5).astype(int)
    centers = [(start[0] + dx * int(s), start[1] + dy * int(s)) for s in steps]
    return {"direction": direction, "speed": speed, "start": start, "centers": centers}


def _render_path(geom: Geometry, shape: str, color: str, centers) -> np.ndarray:
    video = _video(geom)
    for t, (cx, cy) in enumerate(centers):
        draw_shape(video[t], shape, PALETTE[color], cx, cy, geom.radius)
    return video


# motion_direction ------------------------------------------------------------------------------
MD_Q = Template("Which way does the {color} {shape} move in the video?\n", color=COLORS, shape=SHAPES)
MD_OPT = _option_template(tuple(DIRECTIONS))
MD_THINK = Template(
    "<think>Let me think. Comparing consecutive frames, the {shape} moves {direction}. "
    "Option {letter} is {direction}, so the answer is {letter}.</think>",
    shape=SHAPES, direction=tuple(DIRECTIONS), letter=LETTERS,
)  # fmt: skip


@register_task("motion_direction", "video", "multiple choice", (MD_Q, MD_OPT, MD_THINK, MC_SOLUTION),
               needs_order=True, single_frame=False)  # fmt: skip
def make_motion_direction(rng: np.random.Generator, geom: Geometry) -> Sample:
    """Which way (left / right / up / down) a shape moves at a constant 1.5-3 px per frame.

    Single frame: no (a static shape). Shuffled frames: no (they give the axis, never the sign;
    the reversed video has the same frames and the opposite answer). Every 2-frame temporal patch
    shows the motion.
    """
    shape, color = _pick(rng, SHAPES), _pick(rng, COLORS)
    path = _motion(rng, geom, MIN_DIRECTION_SPEED)
    options, letter = _multiple_choice(rng, path["direction"], tuple(DIRECTIONS), MD_OPT)
    return Sample(
        _render_path(geom, shape, color, path["centers"]),
        MD_Q.render(color=color, shape=shape),
        options,
        MD_THINK.render(shape=shape, direction=path["direction"], letter=letter),
        MC_SOLUTION.render(letter=letter),
        {"shape": shape, "color": color, **path, "answer": path["direction"]},
    )


# flash_count -----------------------------------------------------------------------------------
FC_Q = Template("How many times does the {color} {shape} flash in the video?", color=COLORS, shape=SHAPES)
FC_THINK = Template(
    "<think>Let me think. I count each separate time the {shape} lights up. "
    "The number of flashes is {count}.</think>",
    shape=SHAPES, count=FLASH_COUNTS,
)  # fmt: skip
FC_A = _answer_template(FLASH_COUNTS)


def flash_pattern(rng: np.random.Generator, frames: int, count: int) -> list[int]:
    """On/off per frame (1/0) with exactly `count` on-runs, each 1 or 2 frames long, at random gaps."""
    runs = rng.integers(1, 3, size=count)
    while runs.sum() + count - 1 > frames:  # too long for the clip: shorten a 2-frame run
        runs[int(np.flatnonzero(runs == 2)[0])] = 1
    spare = frames - int(runs.sum()) - (count - 1)
    gaps = rng.multinomial(spare, [1 / (count + 1)] * (count + 1))
    on, t = [0] * frames, int(gaps[0])
    for j in range(count):
        on[t : t + runs[j]] = [1] * int(runs[j])
        t += int(runs[j]) + 1 + int(gaps[j + 1])
    return on


@register_task("flash_count", "video", "numerical", (FC_Q, FC_THINK, FC_A), needs_order=True, single_frame=False)
def make_flash_count(rng: np.random.Generator, geom: Geometry) -> Sample:
    """How many times a static shape flashes on (1-4 on-runs of 1 or 2 frames).

    Single frame: no. Shuffled frames: no (the number of lit frames does not fix the number of
    runs; sorting the frames merges every flash into one). Counting needs order across tokens,
    so a tiny model may not learn it.
    """
    shape, color = _pick(rng, SHAPES), _pick(rng, COLORS)
    count = _pick(rng, FLASH_COUNTS[: (geom.frames + 1) // 2])
    on = flash_pattern(rng, geom.frames, int(count))
    cx, cy = _position(rng, geom)
    video = _video(geom)
    for t in np.flatnonzero(on):
        draw_shape(video[t], shape, PALETTE[color], cx, cy, geom.radius)
    return Sample(
        video,
        FC_Q.render(color=color, shape=shape),
        [],
        FC_THINK.render(shape=shape, count=count),
        FC_A.render(value=count),
        {"shape": shape, "color": color, "center": [cx, cy], "on": on, "answer": count},
    )


# OCR (video and image) -------------------------------------------------------------------------
OCR_VIDEO_Q = Template("What word is written in the video?")
OCR_VIDEO_THINK = Template("<think>Let me think. The frames show letters that spell {word}.</think>", word=WORDS)
OCR_IMAGE_Q = Template("What word is written in the image?")
OCR_IMAGE_THINK = Template("<think>Let me think. The image shows letters that spell {word}.</think>", word=WORDS)
OCR_A = _answer_template(WORDS)


def _draw_word(rng: np.random.Generator, geom: Geometry, canvas: np.ndarray) -> dict:
    """Paint a random word at a random place into canvas [..., H, W, 3] (every frame), in place."""
    word = _pick(rng, WORDS)
    mask = text_mask(word, geom.font_size)
    h, w = mask.shape
    x = int(rng.integers(geom.margin, geom.size - geom.margin - w + 1))
    y = int(rng.integers(geom.margin, geom.size - geom.margin - h + 1))
    canvas[..., y : y + h, x : x + w, :][..., mask, :] = TEXT_RGB
    return {"word": word, "box": [x, y, w, h], "answer": word}


@register_task("video_ocr", "video", "OCR", (OCR_VIDEO_Q, OCR_VIDEO_THINK, OCR_A), needs_order=False, single_frame=True)
def make_video_ocr(rng: np.random.Generator, geom: Geometry) -> Sample:
    """Read a white word shown at a fixed place in every frame. Single frame: yes."""
    video = _video(geom)
    scene = _draw_word(rng, geom, video)
    word = scene["word"]
    return Sample(video, OCR_VIDEO_Q.render(), [], OCR_VIDEO_THINK.render(word=word), OCR_A.render(value=word), scene)


@register_task("image_ocr", "image", "OCR", (OCR_IMAGE_Q, OCR_IMAGE_THINK, OCR_A),
               needs_order=False, single_frame=True, image_format="JPEG")  # fmt: skip
def make_image_ocr(rng: np.random.Generator, geom: Geometry) -> Sample:
    """Read a white word on a still image (written as JPEG). Single frame: yes."""
    image = _image(geom)
    scene = _draw_word(rng, geom, image)
    word = scene["word"]
    return Sample(image, OCR_IMAGE_Q.render(), [], OCR_IMAGE_THINK.render(word=word), OCR_A.render(value=word), scene)


# motion_caption --------------------------------------------------------------------------------
CAP_Q = Template("Describe the motion of the {color} {shape} in the video in one sentence.", color=COLORS, shape=SHAPES)
CAP_THINK = Template(
    "<think>Let me think. Comparing consecutive frames, the {shape} moves {direction}.</think>",
    shape=SHAPES, direction=tuple(DIRECTIONS),
)  # fmt: skip
CAP_A = Template(
    "<answer>The {color} {shape} moves {direction}.</answer>", color=COLORS, shape=SHAPES, direction=tuple(DIRECTIONS)
)


@register_task("motion_caption", "video", "free-form", (CAP_Q, CAP_THINK, CAP_A), needs_order=True, single_frame=False)
def make_motion_caption(rng: np.random.Generator, geom: Geometry) -> Sample:
    """One sentence naming the shape, its colour and its direction (scored by ROUGE).

    Single frame: no (colour and shape yes, direction no). Shuffled frames: no (the direction's
    sign needs order, as in motion_direction).
    """
    shape, color = _pick(rng, SHAPES), _pick(rng, COLORS)
    path = _motion(rng, geom, MIN_DIRECTION_SPEED)
    direction = path["direction"]
    return Sample(
        _render_path(geom, shape, color, path["centers"]),
        CAP_Q.render(color=color, shape=shape),
        [],
        CAP_THINK.render(shape=shape, direction=direction),
        CAP_A.render(color=color, shape=shape, direction=direction),
        {"shape": shape, "color": color, **path, "answer": direction},
    )


# motion_speed ----------------------------------------------------------------------------------
SP_Q = Template(
    "The {color} {shape} moves at a constant speed. How many pixels does it move per frame?",
    color=COLORS, shape=SHAPES,
)  # fmt: skip
SP_THINK = Template(
    "<think>Let me think. Between consecutive frames the {shape} shifts by about {speed} pixels.</think>",
    shape=SHAPES, speed=SPEEDS,
)  # fmt: skip
SP_A = _answer_template(SPEEDS)


@register_task("motion_speed", "video", "regression", (SP_Q, SP_THINK, SP_A), needs_order=False, single_frame=False)
def make_motion_speed(rng: np.random.Generator, geom: Geometry) -> Sample:
    """Speed in pixels per frame (1.0 to 3.0 in steps of 0.5, a decimal answer).

    Single frame: no. Shuffled frames: yes in principle (the spread of the positions over the
    frame count gives it); each 2-frame temporal patch shows one step.
    """
    shape, color = _pick(rng, SHAPES), _pick(rng, COLORS)
    path = _motion(rng, geom, 0.0)
    speed = path["speed"]
    return Sample(
        _render_path(geom, shape, color, path["centers"]),
        SP_Q.render(color=color, shape=shape),
        [],
        SP_THINK.render(shape=shape, speed=speed),
        SP_A.render(value=speed),
        {"shape": shape, "color": color, **path, "answer": speed},
    )


# color_first -----------------------------------------------------------------------------------
CF_Q = Template("The {shape} in the video changes color once. Which color does it have first?\n", shape=SHAPES)
CF_OPT = _option_template(COLORS)
CF_THINK = Template(
    "<think>Let me think. The {shape} is {first} in the early frames and {second} in the later frames. "
    "So it is {first} first, which is option {letter}.</think>",
    shape=SHAPES, first=COLORS, second=COLORS, letter=LETTERS,
)  # fmt: skip


@register_task("color_first", "video", "multiple choice", (CF_Q, CF_OPT, CF_THINK, MC_SOLUTION),
               needs_order=True, single_frame=False)  # fmt: skip
def make_color_first(rng: np.random.Generator, geom: Geometry) -> Sample:
    """A static shape switches colour once; which colour came first (the second one is always a
    distractor, plus two colours never shown).

    Single frame: no (it shows one of the two colours, not whether it is early). Shuffled frames:
    no (both colours, no order; reversing the video swaps the answer). The switch falls inside one
    2-frame temporal patch.
    """
    shape = _pick(rng, SHAPES)
    first, second, *others = _pick(rng, COLORS, 4)
    k = _change_frame(rng, geom.frames)
    cx, cy = _position(rng, geom)
    video = _video(geom)
    for t in range(geom.frames):
        draw_shape(video[t], shape, PALETTE[first if t < k else second], cx, cy, geom.radius)
    options, letter = _multiple_choice(rng, first, [first, second, *others], CF_OPT)
    return Sample(
        video,
        CF_Q.render(shape=shape),
        options,
        CF_THINK.render(shape=shape, first=first, second=second, letter=letter),
        MC_SOLUTION.render(letter=letter),
        {"shape": shape, "first": first, "second": second, "distractors": others, "change_frame": k,
         "center": [cx, cy], "answer": first},
    )  # fmt: skip


# appear_disappear ------------------------------------------------------------------------------
AD_Q = Template("Does the {color} {shape} appear or disappear in the video?\n", color=COLORS, shape=SHAPES)
AD_OPT = _option_template(EVENTS)
AD_THINK = {
    "appears": Template(
        "<think>Let me think. The early frames are empty and the {shape} shows up later. "
        "So it appears, which is option {letter}.</think>",
        shape=SHAPES, letter=LETTERS,
    ),
    "disappears": Template(
        "<think>Let me think. The {shape} is visible in the early frames and gone later. "
        "So it disappears, which is option {letter}.</think>",
        shape=SHAPES, letter=LETTERS,
    ),
}  # fmt: skip


@register_task("appear_disappear", "video", "multiple choice", (AD_Q, AD_OPT, *AD_THINK.values(), MC_SOLUTION),
               needs_order=True, single_frame=False)  # fmt: skip
def make_appear_disappear(rng: np.random.Generator, geom: Geometry) -> Sample:
    """A static shape is absent then present (appears) or present then absent (disappears).

    Single frame: no. Shuffled frames: no (the reversed video is the other answer; the number of
    frames showing the shape has the same distribution for both answers). The change falls inside
    one 2-frame temporal patch.
    """
    shape, color, event = _pick(rng, SHAPES), _pick(rng, COLORS), _pick(rng, EVENTS)
    k = _change_frame(rng, geom.frames)
    cx, cy = _position(rng, geom)
    video = _video(geom)
    for t in range(geom.frames):
        if (t >= k) == (event == "appears"):
            draw_shape(video[t], shape, PALETTE[color], cx, cy, geom.radius)
    options, letter = _multiple_choice(rng, event, EVENTS, AD_OPT)
    return Sample(
        video,
        AD_Q.render(color=color, shape=shape),
        options,
        AD_THINK[event].render(shape=shape, letter=letter),
        MC_SOLUTION.render(letter=letter),
        {"shape": shape, "color": color, "change_frame": k, "center": [cx, cy], "answer": event},
    )


# still images ----------------------------------------------------------------------------------
IC_Q = Template("What color is the {shape} in the image?\n", shape=SHAPES)
IC_OPT = _option_template(COLORS)
IC_THINK = Template(
    "<think>Let me think. The {shape} in the image is {color}, which is option {letter}.</think>",
    shape=SHAPES, color=COLORS, letter=LETTERS,
)  # fmt: skip


@register_task("image_color", "image", "multiple choice", (IC_Q, IC_OPT, IC_THINK, MC_SOLUTION),
               needs_order=False, single_frame=True, image_format="PNG")  # fmt: skip
def make_image_color(rng: np.random.Generator, geom: Geometry) -> Sample:
    """The colour of one shape on a still image (4 options). Single frame: yes."""
    shape = _pick(rng, SHAPES)
    color, *others = _pick(rng, COLORS, 4)
    cx, cy = _position(rng, geom)
    image = _image(geom)
    draw_shape(image, shape, PALETTE[color], cx, cy, geom.radius)
    options, letter = _multiple_choice(rng, color, [color, *others], IC_OPT)
    return Sample(
        image,
        IC_Q.render(shape=shape),
        options,
        IC_THINK.render(shape=shape, color=color, letter=letter),
        MC_SOLUTION.render(letter=letter),
        {"shape": shape, "color": color, "distractors": others, "center": [cx, cy], "answer": color},
    )


IS_Q = Template("What shape is the {color} object in the image?\n", color=COLORS)
IS_OPT = _option_template(SHAPES)
IS_THINK = Template(
    "<think>Let me think. The {color} object in the image is a {shape}, which is option {letter}.</think>",
    color=COLORS, shape=SHAPES, letter=LETTERS,
)  # fmt: skip


@register_task("image_shape", "image", "multiple choice", (IS_Q, IS_OPT, IS_THINK, MC_SOLUTION),
               needs_order=False, single_frame=True, image_format="PNG")  # fmt: skip
def make_image_shape(rng: np.random.Generator, geom: Geometry) -> Sample:
    """The shape (circle / square / triangle / diamond) of one object on a still image. Single frame: yes."""
    shape, color = _pick(rng, SHAPES), _pick(rng, COLORS)
    cx, cy = _position(rng, geom)
    image = _image(geom)
    draw_shape(image, shape, PALETTE[color], cx, cy, geom.radius)
    options, letter = _multiple_choice(rng, shape, SHAPES, IS_OPT)
    return Sample(
        image,
        IS_Q.render(color=color),
        options,
        IS_THINK.render(color=color, shape=shape, letter=letter),
        MC_SOLUTION.render(letter=letter),
        {"shape": shape, "color": color, "center": [cx, cy], "answer": shape},
    )


CNT_Q = Template("How many shapes are in the image?")
CNT_THINK = Template(
    "<think>Let me think. I count the separate shapes one by one. The number of shapes is {count}.</think>",
    count=IMAGE_COUNTS,
)
CNT_A = _answer_template(IMAGE_COUNTS)


@register_task("image_count", "image", "numerical", (CNT_Q, CNT_THINK, CNT_A),
               needs_order=False, single_frame=True, image_format="PNG")  # fmt: skip
def make_image_count(rng: np.random.Generator, geom: Geometry) -> Sample:
    """How many separate shapes (1-5, random shapes and colours, never touching) are on a still
    image. Single frame: yes."""
    count = _pick(rng, IMAGE_COUNTS)
    gap = 2 * geom.radius + 3  # centres this far apart (Chebyshev) leave >= 2 background pixels
    centers: list[tuple[int, int]] = []
    while len(centers) < int(count):
        c = _position(rng, geom)
        if all(max(abs(c[0] - o[0]), abs(c[1] - o[1])) >= gap for o in centers):
            centers.append(c)
    objects = [(_pick(rng, SHAPES), _pick(rng, COLORS), c) for c in centers]
    image = _image(geom)
    for shape, color, (cx, cy) in objects:
        draw_shape(image, shape, PALETTE[color], cx, cy, geom.radius)
    return Sample(
        image,
        CNT_Q.render(),
        [],
        CNT_THINK.render(count=count),
        CNT_A.render(value=count),
        {"objects": [{"shape": s, "color": c, "center": list(p)} for s, c, p in objects], "answer": count},
    )


# Default order: the first five cover all five Video-R1 problem types, so any n >= 5 has them all.
DEFAULT_TASKS = (
    "motion_direction", "flash_count", "video_ocr", "motion_caption", "motion_speed",
    "color_first", "appear_disappear", "image_color", "image_shape", "image_count", "image_ocr",
)  # fmt: skip
assert sorted(DEFAULT_TASKS) == sorted(TASKS), "DEFAULT_TASKS must list every registered task"


def text_corpus() -> list[str]:
    """Every question, option, reasoning and answer string the generator can emit (sorted, unique).

    Expanded from the same Template objects the tasks render, so it covers any generated dataset;
    used to train the tiny model's tokenizer (videor1.tiny).
    """
    return sorted({text for task in TASKS.values() for template in task.templates for text in template.expand()})


# ----------------------------------------------------------------------------------------------
# Writing media.


def write_video(path: str, frames: np.ndarray, fps: int, crf: int = CRF) -> None:
    """Encode frames uint8 [T, H, W, 3] (RGB, H and W even) as H.264 (libx264, yuv420p) in an mp4.

    The same frames give the same bytes: one encoder thread, and no lookahead (rc-lookahead 0, so no
    mb-tree). With x264's lookahead two generations of the demo's 3000 train videos (same seed, same
    frames, same YUV planes) differed in 4 to 13 files, a few by one decoded level, although a file
    re-encoded 20 times in one process came out the same each time; without it, two generations
    differed in none (measured twice).
    """
    import av

    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"write_video: frames must be uint8 [T, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"write_video: yuv420p needs even height and width, got {frames.shape[1]}x{frames.shape[2]}")
    with av.open(path, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.codec_context.thread_count = 1
        stream.options = {"crf": str(crf), "preset": "medium", "x264-params": "rc-lookahead=0:mbtree=0"}
        for t, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = t, Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def write_image(path: str, image: np.ndarray, image_format: str) -> None:
    """Save image uint8 [H, W, 3] (RGB) as PNG, or as JPEG at quality 95 without chroma subsampling."""
    from PIL import Image

    if image_format == "PNG":
        Image.fromarray(image).save(path, format="PNG")
    elif image_format == "JPEG":
        Image.fromarray(image).save(path, format="JPEG", quality=95, subsampling=0)
    else:
        raise ValueError(f"write_image: image_format must be 'PNG' or 'JPEG', got {image_format!r}")


# ----------------------------------------------------------------------------------------------
# The dataset.


def content_key(task: str, scene: dict, geom: Geometry) -> str:
    """SHA-1 of what a sample shows and asks (not its option order): equal keys = the same sample."""
    blob = json.dumps([task, geom.size, geom.frames, scene], sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(blob.encode()).hexdigest()


def _check_args(out_dir, n, seed, split, size, frames, fps, tasks, option_order="shuffled") -> tuple[str, ...]:
    def bad(name: str, need: str, got) -> ValueError:
        return ValueError(f"generate_dataset: argument '{name}' must be {need}, got {got!r}")

    def is_int(v) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    if not isinstance(out_dir, (str, os.PathLike)) or not str(out_dir):
        raise bad("out_dir", "a directory path", out_dir)
    if not is_int(n) or not 1 <= n < HELDOUT_ID_OFFSET:
        raise bad("n", f"an integer in [1, {HELDOUT_ID_OFFSET - 1}]", n)
    if not is_int(seed) or seed < 0:
        raise bad("seed", "a non-negative integer", seed)
    if split not in SPLITS:
        raise bad("split", f"one of {SPLITS}", split)
    if option_order not in OPTION_ORDERS:
        raise bad("option_order", f"one of {OPTION_ORDERS}", option_order)
    if not is_int(size) or not 48 <= size <= 256 or size % 2:
        raise bad("size", "an even integer in [48, 256] (yuv420p needs even sizes)", size)
    if not is_int(frames) or not 8 <= frames <= 64:
        raise bad("frames", "an integer in [8, 64]", frames)
    if not is_int(fps) or not 1 <= fps <= 60:
        raise bad("fps", "an integer in [1, 60]", fps)
    tasks = tuple(tasks)
    if not tasks:
        raise bad("tasks", "a non-empty list of task names", tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"generate_dataset: argument 'tasks': unknown task(s) {unknown}; known: {sorted(TASKS)}")
    geom = Geometry(int(size), int(frames))
    if any(t.startswith("motion_") for t in tasks) and not geom.fits(SPEEDS[0]):
        raise ValueError(
            f"generate_dataset: argument 'frames' = {frames} is too many for size {size}: a shape moving "
            f"{SPEEDS[0]} px/frame leaves the frame; use fewer frames or a larger size"
        )
    return tasks


def generate_dataset(
    out_dir: str,
    n: int,
    seed: int,
    split: str = "train",
    size: int = 64,
    frames: int = 16,
    fps: int = 8,
    tasks: Sequence[str] = DEFAULT_TASKS,
    option_order: str = "shuffled",
) -> str:
    """Write n samples (media + <split>.json + <split>.manifest.json) under out_dir; return the JSON path.

    Sample i is task tasks[i % len(tasks)] (repeat a name to weight it), drawn from
    np.random.default_rng([seed, split index, i]). Videos: `frames` frames of size x size pixels at
    `fps` (mp4, "./videos/..."); images: size x size ("./images/..."). Paths in the JSON are
    relative to out_dir. option_order: "shuffled" (uniformly random option order, the default) or
    "fixed" (every multiple-choice question lists its options in the vocabulary's order, so the
    answer letter is a function of the answer; the scenes are the same either way). Raises
    ValueError naming the bad argument before writing anything.
    """
    tasks = _check_args(out_dir, n, seed, split, size, frames, fps, tasks, option_order)
    from videor1.data import validate_row

    geom = Geometry(int(size), int(frames))
    split_index = SPLITS.index(split)
    out_dir = str(out_dir)
    for sub in ("videos", "images"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    rows, items = [], []
    for i in range(n):
        task = TASKS[tasks[i % len(tasks)]]
        rng = np.random.default_rng([seed, split_index, i])
        while True:  # a scene belongs to the split given by its hash's parity: splits never share one
            token = _option_order.set(option_order)
            try:
                sample = task.make(rng, geom)
            finally:
                _option_order.reset(token)
            key = content_key(task.name, sample.scene, geom)
            if int(key, 16) % 2 == split_index:
                break
        stem = f"{split}-s{seed}-{i:05d}-{task.name}"
        if task.data_type == "video":
            rel = f"./videos/{stem}.mp4"
            write_video(os.path.join(out_dir, rel), sample.media, fps)
        else:
            rel = f"./images/{stem}.{'png' if task.image_format == 'PNG' else 'jpg'}"
            write_image(os.path.join(out_dir, rel), sample.media, task.image_format)
        problem_id = i + (HELDOUT_ID_OFFSET if split == "heldout" else 0)
        row = {
            "problem_id": problem_id,
            "problem": sample.problem,
            "data_type": task.data_type,
            "problem_type": task.problem_type,
            "options": sample.options,
            "process": sample.process,
            "solution": sample.solution,
            "path": rel,
            "data_source": task.data_source,
        }
        rows.append(validate_row(row, f"generated {split} row {i}"))
        items.append(
            {
                "problem_id": problem_id,
                "path": rel,
                "task": task.name,
                "data_type": task.data_type,
                "frames": geom.frames if task.data_type == "video" else 1,
                "height": geom.size,
                "width": geom.size,
                "fps": fps if task.data_type == "video" else None,
                "needs_order": task.needs_order,
                "content_key": key,
                "scene": sample.scene,
            }
        )
    json_path = os.path.join(out_dir, f"{split}.json")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=1, ensure_ascii=False)
    manifest = {
        "version": MANIFEST_VERSION,
        "split": split,
        "seed": seed,
        "n": n,
        "size": geom.size,
        "frames": geom.frames,
        "fps": fps,
        "crf": CRF,
        "tasks": list(tasks),
        "option_order": option_order,
        "items": items,
    }
    with open(manifest_path(json_path), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    return json_path


def manifest_path(json_path: str) -> str:
    """The sidecar of a generated JSON: DIR/<split>.json -> DIR/<split>.manifest.json."""
    root, _ = os.path.splitext(json_path)
    return root + ".manifest.json"


def load_manifest(json_path: str) -> dict:
    """The manifest written next to a generated JSON (frame counts, sizes, scenes per item)."""
    path = manifest_path(json_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"synthetic manifest not found: {path}")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def main(argv: Sequence[str] | None = None) -> str:
    """The command line: parse arguments, generate, print a one-line summary; returns the JSON path."""
    parser = argparse.ArgumentParser(prog="python -m videor1.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output directory (the data root)")
    parser.add_argument("--n", type=int, required=True, help="number of samples")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--split", choices=SPLITS, default="train")
    parser.add_argument("--size", type=int, default=64, help="frame / image side in pixels (even)")
    parser.add_argument("--frames", type=int, default=16, help="frames per video")
    parser.add_argument("--fps", type=int, default=8)
    parser.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), metavar="TASK", help=f"from {list(TASKS)}")
    parser.add_argument("--option-order", choices=OPTION_ORDERS, default="shuffled",
                        help="multiple-choice options in random order, or always in the vocabulary's order")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    path = generate_dataset(args.out, args.n, args.seed, args.split, args.size, args.frames, args.fps, args.tasks,
                            args.option_order)
    counts = Counter(args.tasks[i % len(args.tasks)] for i in range(args.n))
    print(
        f"wrote {path}: {args.n} samples ({', '.join(f'{k} {v}' for k, v in counts.items())}), "
        f"{args.size}x{args.size}, {args.frames} frames at {args.fps} fps, in {time.perf_counter() - start:.1f} s"
    )
    return path


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        sys.exit(f"error: {e}")
