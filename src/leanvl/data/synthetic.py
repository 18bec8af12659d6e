"""The synthetic video-text benchmark: rendered clips of simple shapes, written as real data.

Each clip is a :class:`SceneSpec`: 1-4 coloured shapes on a patterned background, each doing
one thing (standing still, moving left/right/up/down, rotating either way, growing, shrinking,
appearing, disappearing, or a time-symmetric event: blink, jump, pulse), sometimes two of them
acting one after the other. :func:`render` draws it with vectorised numpy (shape masks are
looked up through rotated coordinate grids) and :func:`generate` writes every split as H.264
mp4 files plus annotations in leanvl's record formats, so the demo and the tests exercise the
same code paths as real data.

Facts come in two kinds. *Static* facts (colour, shape, size, position, background) are visible
in any single frame; *temporal* facts (direction of motion, sense of rotation, growth,
appearance, which event comes first) flip when the clip is played backwards.
``spec.reversed()`` is the spec whose rendered frames are exactly the original frames in reverse
order (bit for bit, noise included): interpolation uses integer frame indices that are
symmetric in ``t`` and ``T-1-t``, and per-frame noise is indexed by content time. Temporal
multiple-choice distractors are captions of the reversed spec, so no single-frame or
order-blind model can beat chance on them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from leanvl.config import SynthConfig
from leanvl.data.annotations import atomic_write_text, write_annotations

FORMAT_VERSION = 2  # bump when rendering changes, so resumed runs re-encode their clips

# ----------------------------------------------------------------------------- vocabulary

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35), "orange": (250, 140, 20), "yellow": (245, 225, 40),
    "green": (40, 195, 60), "cyan": (40, 215, 230), "blue": (55, 95, 245),
    "purple": (160, 60, 215), "white": (245, 245, 245),
}
SHAPES = ("triangle", "square", "star", "arrow", "cross", "L shape", "semicircle", "heart")
SIZES: dict[str, float] = {"small": 0.09, "medium": 0.12, "large": 0.155}  # radius / frame size
POSITIONS = ("top left", "top", "top right", "left", "centre", "right",
             "bottom left", "bottom", "bottom right")  # a 3 x 3 grid, row-major
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (14, 14, 16), "grey": (100, 100, 104), "navy": (22, 30, 92),
    "brown": (92, 56, 26), "dark green": (22, 72, 38), "maroon": (100, 22, 42),
}
BACKGROUNDS = ("plain", "gradient", "horizontal stripes", "vertical stripes", "checks")

REVERSE = {
    "static": "static", "move left": "move right", "move right": "move left",
    "move up": "move down", "move down": "move up",
    "rotate clockwise": "rotate anticlockwise", "rotate anticlockwise": "rotate clockwise",
    "grow": "shrink", "shrink": "grow", "appear": "disappear", "disappear": "appear",
    "blink": "blink", "jump": "jump", "pulse": "pulse",
}
MOTIONS = tuple(REVERSE)
# Motions whose time reversal is a different motion; Something-Something style class pairs.
CLASSES = ("move left", "move right", "move up", "move down", "rotate clockwise",
           "rotate anticlockwise", "grow", "shrink", "appear", "disappear")
TRANSLATIONS = ("move left", "move right", "move up", "move down")
EVENTS = ("blink", "jump", "pulse")  # time-symmetric: they look the same played backwards
COUNT_WORDS = ("zero", "one", "two", "three", "four")
MAX_OBJECTS = 4

SPLITS = ("pretrain", "retrieval_test", "mc_test", "classify_train", "classify_test")
TRAIN_SPLITS = ("pretrain", "classify_train")  # held-out combinations never appear in these
_SPLIT_IDS = {name: i + 1 for i, name in enumerate(SPLITS)}
_SCENE, _CAPTION, _QA, _MC, _NEGATIVE = range(5)  # independent RNG streams per clip
ANNOTATION_FILES = ("pretrain.jsonl", "retrieval_test.jsonl", "qa_train.jsonl", "qa_test.jsonl",
                    "mc_test.jsonl", "classify_train.jsonl", "classify_test.jsonl")
CHUNK = 25  # clips per multiprocessing task; fixed so results do not depend on workers

QA_ANSWERS: tuple[str, ...] = tuple(dict.fromkeys(
    list(COLOURS) + list(SHAPES) + list(SIZES) + list(POSITIONS)
    + ["left", "right", "up", "down", "clockwise", "anticlockwise",
       "grow", "shrink", "appear", "disappear"]
    + list(COUNT_WORDS[1:MAX_OBJECTS + 1]) + ["yes", "no"]
    + list(BACKGROUND_COLOURS) + list(BACKGROUNDS)))

# Geometry, as fractions of the frame size.
_CELL_CENTRES = (1 / 6, 1 / 2, 5 / 6)
_JITTER = 0.03
_PATH = (0.2, 0.8)  # where translations start and end
_GROW = (0.06, 0.165)  # radius range of growing / shrinking objects
_TURN = (100.0, 140.0)  # degrees turned by rotating objects
_JUMP = 0.08
_PULSE = 0.6
_ORDER_PROBABILITY = 0.25
_HELD_OUT_IN_TEST = 0.5  # chance that a test clip is forced to show a held-out combination

# ----------------------------------------------------------------------------- phrases

_MOTION_PHRASES = {
    "static": ("stays still", "does not move", "remains still", "stays put", "sits still"),
    "move left": ("moves to the left", "slides leftwards", "travels left", "moves leftward",
                  "drifts to the left", "glides left"),
    "move right": ("moves to the right", "slides rightwards", "travels right", "moves rightward",
                   "drifts to the right", "glides right"),
    "move up": ("moves up", "rises", "slides upwards", "travels upward", "drifts up",
                "glides up"),
    "move down": ("moves down", "sinks", "slides downwards", "travels downward", "drifts down",
                  "falls"),
    "rotate clockwise": ("rotates clockwise", "spins clockwise", "turns clockwise",
                         "rotates in a clockwise direction", "revolves clockwise"),
    "rotate anticlockwise": ("rotates anticlockwise", "spins counterclockwise",
                             "turns anti-clockwise", "rotates in a counterclockwise direction",
                             "revolves anticlockwise"),
    "grow": ("grows", "gets bigger", "expands", "grows larger", "increases in size"),
    "shrink": ("shrinks", "gets smaller", "contracts", "shrinks in size", "decreases in size"),
    "appear": ("appears", "fades in", "comes into view", "gradually appears", "emerges"),
    "disappear": ("disappears", "fades out", "vanishes", "gradually disappears", "fades away"),
    "blink": ("blinks", "flickers off and on", "briefly vanishes", "blinks out and back"),
    "jump": ("jumps", "hops", "jumps up and lands", "bounces up once"),
    "pulse": ("pulses", "briefly swells", "throbs", "swells and shrinks back"),
}
_MOTION_BASE = {  # infinitive, for yes/no questions
    "move left": "move to the left", "move right": "move to the right", "move up": "move up",
    "move down": "move down", "rotate clockwise": "rotate clockwise",
    "rotate anticlockwise": "rotate anticlockwise", "grow": "grow", "shrink": "shrink",
    "appear": "appear", "disappear": "disappear",
}
_POSITION_PHRASES = {
    "top left": ("in the top left corner", "at the top left", "in the upper left"),
    "top": ("at the top", "at the top centre", "near the top edge"),
    "top right": ("in the top right corner", "at the top right", "in the upper right"),
    "left": ("on the left", "at the middle left", "on the left side"),
    "centre": ("in the centre", "in the middle", "at the centre"),
    "right": ("on the right", "at the middle right", "on the right side"),
    "bottom left": ("in the bottom left corner", "at the bottom left", "in the lower left"),
    "bottom": ("at the bottom", "at the bottom centre", "near the bottom edge"),
    "bottom right": ("in the bottom right corner", "at the bottom right", "in the lower right"),
}
_BACKGROUND_PHRASES = {
    "plain": ("a plain {c} background", "a solid {c} background", "a uniform {c} background"),
    "gradient": ("a {c} gradient background", "a background with a {c} gradient",
                 "a {c} background that fades in tone"),
    "horizontal stripes": ("a {c} background with horizontal stripes",
                           "a horizontally striped {c} background", "{c} horizontal stripes"),
    "vertical stripes": ("a {c} background with vertical stripes",
                         "a vertically striped {c} background", "{c} vertical stripes"),
    "checks": ("a {c} checkerboard background", "a {c} checked background",
               "a chequered {c} background"),
}
# Sentence templates; their fixed words differ, so two templates never give the same text.
TEMPLATES = (
    "{clauses} on {bg}",
    "on {bg}, {clauses}",
    "{clauses}, in front of {bg}",
    "a clip of {bg} where {clauses}",
    "{clauses}; the backdrop is {bg}",
    "against {bg}, {clauses}",
    "this video shows {bg} in which {clauses}",
)
_ORDER_CONNECTORS = ("{first}, then {second}", "first {first}, and then {second}",
                     "{first} before {second}", "{second} after {first}",
                     "{first}, and afterwards {second}")


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _phase_bounds(phase: str, frames: int) -> tuple[int, int]:
    """First and last frame of a phase; 'early' and 'late' mirror each other in time.

    Each takes half the clip (sharing the middle frame when the count is odd), at least three
    frames (needs frames >= 6), so that a blink, jump or pulse spans the middle of its half:
    4 frames sampled from 8 or 16 (``middle`` or ``uniform``), as the demo and the defaults
    take, see both events of an ordered pair (a phase of 3 frames out of 8 showed its event in
    one frame, which the evaluation's frames skipped). Other counts may miss an event.
    """
    if phase == "all":
        return 0, frames - 1
    m = (frames - 1) // 2
    return (0, m) if phase == "early" else (frames - 1 - m, frames - 1)


# ----------------------------------------------------------------------------- scene specs

@dataclass(frozen=True)
class ObjectSpec:
    """One shape: its identity, what it does, and its state at the start and end of its phase.

    ``start``/``end`` are (x, y, angle in degrees clockwise, radius, opacity); x, y and radius
    are fractions of the frame size. ``size`` is None for objects that grow or shrink and
    ``position`` (a 3 x 3 grid cell) is None for objects that travel.
    """

    shape: str
    colour: str
    size: str | None
    position: str | None
    motion: str = "static"
    phase: str = "all"  # all | early | late: when the motion happens
    start: tuple[float, float, float, float, float] = (0.5, 0.5, 0.0, 0.1, 1.0)
    end: tuple[float, float, float, float, float] = (0.5, 0.5, 0.0, 0.1, 1.0)

    def reversed(self) -> ObjectSpec:
        """The same object played backwards."""
        return replace(self, motion=REVERSE[self.motion],
                       phase={"all": "all", "early": "late", "late": "early"}[self.phase],
                       start=self.end, end=self.start)

    def state(self, t: int, frames: int) -> tuple[float, float, float, float, float]:
        """(x, y, angle, radius, opacity) at frame ``t``; equals reversed().state(T-1-t, T)."""
        a, b = _phase_bounds(self.phase, frames)
        tc = min(max(t, a), b)
        # Integer weights (b - tc, tc - a) swap under reversal, and float addition commutes,
        # so the reversed object reproduces these values bit for bit.
        x, y, angle, radius, opacity = (
            (s * (b - tc) + e * (tc - a)) / (b - a) for s, e in zip(self.start, self.end))
        bump = min(tc - a, b - tc)  # 0 at both ends of the phase, largest in the middle
        if self.motion == "blink" and 4 * bump > b - a:
            opacity = 0.0
        elif self.motion == "jump":
            y = y - _JUMP * (2 * bump / (b - a))
        elif self.motion == "pulse":
            radius = radius * (1 + _PULSE * (2 * bump / (b - a)))
        return x, y, angle, radius, opacity

    @property
    def facts(self) -> dict[str, Any]:
        """The object's describable facts."""
        return {"colour": self.colour, "shape": self.shape, "size": self.size,
                "position": self.position, "motion": self.motion}

    def noun(self) -> str:
        """'small red triangle' (no article; size left out when it changes)."""
        return " ".join(w for w in (self.size, self.colour, self.shape) if w)


def temporal_fact_keys(facts: dict[str, Any]) -> list[str]:
    """Keys (as in :func:`fact_differences`) of the facts that time reversal flips, from a
    clip's facts (``SceneSpec.facts``, as records carry them)."""
    keys = [f"objects.{i}.motion" for i, o in enumerate(facts["objects"])
            if REVERSE[o["motion"]] != o["motion"]]
    return keys + (["order"] if facts.get("order") else [])


@dataclass(frozen=True)
class SceneSpec:
    """A whole clip: objects (drawn in order), background and noise; renders with :func:`render`."""

    objects: tuple[ObjectSpec, ...]
    background: str = "plain"
    background_colour: str = "black"
    background_params: tuple[float, float, float] = (0.1, 0.0, 0.0)  # period, phase, angle
    noise: float = 0.0
    noise_seed: int = 0
    time_reversed: bool = False  # noise is indexed by content time, so it reverses too

    def reversed(self) -> SceneSpec:
        """The spec whose frames are this spec's frames in reverse order, exactly."""
        return replace(self, objects=tuple(o.reversed() for o in self.objects),
                       time_reversed=not self.time_reversed)

    @property
    def order(self) -> list[int] | None:
        """[first, second] object indices when two objects act one after the other."""
        early = [i for i, o in enumerate(self.objects) if o.phase == "early"]
        late = [i for i, o in enumerate(self.objects) if o.phase == "late"]
        return [early[0], late[0]] if early and late else None

    @property
    def facts(self) -> dict[str, Any]:
        """Everything a caption states, as JSON-serialisable data."""
        return {"count": len(self.objects), "background": self.background,
                "background_colour": self.background_colour,
                "objects": [o.facts for o in self.objects], "order": self.order}

    def temporal_facts(self) -> list[str]:
        """Keys (as in :func:`fact_differences`) of the facts that time reversal flips."""
        return temporal_fact_keys(self.facts)

    def with_fact(self, key: str, value: Any) -> SceneSpec:
        """A copy stating a different value for one fact (for distractor captions)."""
        if key in ("background", "background_colour"):
            return replace(self, **{key: value})
        _, index, name = key.split(".")
        objects = list(self.objects)
        objects[int(index)] = replace(objects[int(index)], **{name: value})
        return replace(self, objects=tuple(objects))

    def caption(self, template_rng: np.random.Generator | int | None = None,
                template: int | None = None) -> str:
        """A full description: every object, what it does, the order of events, the background.

        ``template_rng`` (a Generator or a seed) picks the sentence template (unless
        ``template`` is given) and the paraphrase of every fact.
        """
        rng = template_rng if isinstance(template_rng, np.random.Generator) \
            else np.random.default_rng(template_rng)
        if template is None:
            template = int(rng.integers(len(TEMPLATES)))
        colour = self.background_colour
        bg = _pick(rng, _BACKGROUND_PHRASES[self.background]).format(c=colour)
        clauses = [self._clause(o, rng) for o in self.objects]
        order = self.order
        if order:
            first, second = (clauses[i] for i in order)
            text = _pick(rng, _ORDER_CONNECTORS).format(first=first, second=second)
            rest = [c for i, c in enumerate(clauses) if i not in order]
            if rest:
                text += _pick(rng, (", and ", ", while ")) + _join(rest, rng)
        else:
            text = _join(clauses, rng)
        return TEMPLATES[template].format(clauses=text, bg=bg)

    @staticmethod
    def _clause(obj: ObjectSpec, rng: np.random.Generator) -> str:
        subject = _with_article(obj.noun())
        verb = _pick(rng, _MOTION_PHRASES[obj.motion])
        if obj.position is None:
            return f"{subject} {verb}"
        where = _pick(rng, _POSITION_PHRASES[obj.position])
        return f"{subject} {where} {verb}" if rng.integers(2) else f"{subject} {verb} {where}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (``SceneSpec.from_dict`` inverts it)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SceneSpec:
        """Rebuild a spec from :meth:`to_dict` output."""
        objects = tuple(ObjectSpec(**{**o, "start": tuple(o["start"]), "end": tuple(o["end"])})
                        for o in data["objects"])
        return cls(**{**data, "objects": objects,
                      "background_params": tuple(data["background_params"])})


def _join(clauses: list[str], rng: np.random.Generator) -> str:
    if len(clauses) == 1:
        return clauses[0]
    if len(clauses) == 2:
        return _pick(rng, ("{0} and {1}", "{0}, while {1}", "{0}; {1}")).format(*clauses)
    return ", ".join(clauses[:-1]) + _pick(rng, (" and ", ", and ")) + clauses[-1]


def _flatten(facts: dict[str, Any]) -> dict[str, Any]:
    flat = {k: v for k, v in facts.items() if k != "objects"}
    for i, obj in enumerate(facts["objects"]):
        flat.update({f"objects.{i}.{k}": v for k, v in obj.items()})
    return flat


def fact_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Keys of the facts that differ between two ``SceneSpec.facts`` dicts ('objects.1.colour')."""
    fa, fb = _flatten(a), _flatten(b)
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))


# ----------------------------------------------------------------------------- rendering

_TEMPLATE_RES = 216
_EXTENT = 1.5  # shape templates cover [-1.5, 1.5]^2 in units of the object radius
_REACH = 1.06  # every shape lies within this radius; sample offsets are clamped to it


def _shape_inside(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Implicit shapes in unit-radius coordinates (v points up); none is rotation-symmetric."""
    def halfplanes(points):
        inside = np.ones(u.shape, bool)
        for (x1, y1), (x2, y2) in zip(points, points[1:] + points[:1]):
            inside &= (x2 - x1) * (v - y1) - (y2 - y1) * (u - x1) >= 0  # left of each edge
        return inside

    if name == "triangle":
        return halfplanes([(math.cos(a), math.sin(a)) for a in np.radians([90, 210, 330])])
    if name == "square":
        return (np.abs(u) <= 0.72) & (np.abs(v) <= 0.72)
    if name == "star":
        angles = np.radians(90 + 36 * np.arange(10))
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        inside = np.zeros(u.shape, bool)
        for k in range(5):  # five convex kites around the centre
            i, j, m = 2 * k, (2 * k + 1) % 10, (2 * k - 1) % 10
            pts = [(0.0, 0.0), (radii[m] * np.cos(angles[m]), radii[m] * np.sin(angles[m])),
                   (np.cos(angles[i]), np.sin(angles[i])),
                   (radii[j] * np.cos(angles[j]), radii[j] * np.sin(angles[j]))]
            inside |= halfplanes(pts)
        return inside
    if name == "arrow":
        shaft = (u >= -0.9) & (u <= 0.2) & (np.abs(v) <= 0.24)
        head = (u >= 0.1) & (np.abs(v) <= 0.62 * (0.95 - u) / 0.85)
        return shaft | head
    if name == "cross":
        return ((np.abs(u) <= 0.28) & (np.abs(v) <= 0.9)) | ((np.abs(v) <= 0.28) & (np.abs(u) <= 0.9))
    if name == "L shape":
        return ((u >= -0.55) & (u <= -0.1) & (v >= -0.8) & (v <= 0.85)) \
            | ((u >= -0.55) & (u <= 0.6) & (v >= -0.8) & (v <= -0.35))
    if name == "semicircle":
        return (u ** 2 + (v + 0.4) ** 2 <= 0.95 ** 2) & (v >= -0.4)
    if name == "heart":
        x, y = u * 1.25, v * 1.25 + 0.15
        return (x ** 2 + y ** 2 - 1) ** 3 - x ** 2 * y ** 3 <= 0
    raise ValueError(f"unknown shape {name!r}; expected one of {SHAPES}")


@cache
def _template(name: str) -> np.ndarray:
    """A binary mask of the shape over [-_EXTENT, _EXTENT]^2 (float32, rows point down)."""
    centres = (np.arange(_TEMPLATE_RES) + 0.5) / _TEMPLATE_RES * 2 * _EXTENT - _EXTENT
    u, v_down = np.meshgrid(centres, centres)
    return _shape_inside(name, u, -v_down).astype(np.float32)


def _background(spec: SceneSpec, size: int) -> np.ndarray:
    base = np.array(BACKGROUND_COLOURS[spec.background_colour], np.float32)
    tone = np.clip(base * 1.3 + 32, 0, 255)
    period, phase, angle = spec.background_params
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    x, y = coords[None, :], coords[:, None]
    if spec.background == "plain":
        weight = np.zeros((size, size), np.float32)
    elif spec.background == "gradient":
        c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
        ramp = (x - 0.5) * c + (y - 0.5) * s
        weight = np.clip(ramp / (abs(c) + abs(s)) + 0.5, 0, 1)
    elif spec.background == "horizontal stripes":
        weight = np.broadcast_to(((y / period + phase) % 1.0) < 0.5, (size, size))
    elif spec.background == "vertical stripes":
        weight = np.broadcast_to(((x / period + phase) % 1.0) < 0.5, (size, size))
    elif spec.background == "checks":
        weight = (np.floor(x / period + phase) + np.floor(y / period + phase)) % 2
    else:
        raise ValueError(f"unknown background {spec.background!r}; expected one of {BACKGROUNDS}")
    weight = np.asarray(weight, np.float32)[..., None]
    return base + (tone - base) * weight


def _coverage(template: np.ndarray, cx: float, cy: float, angle: float, radius: float,
              height: int, width: int, antialias: int):
    """(y0, y1, x0, x1) and the fraction of each pixel there that a rotated shape covers."""
    reach = radius * _REACH + 0.5
    x0, x1 = max(0, int(math.floor(cx - reach))), min(width, int(math.ceil(cx + reach)))
    y0, y1 = max(0, int(math.floor(cy - reach))), min(height, int(math.ceil(cy + reach)))
    if x0 >= x1 or y0 >= y1:
        return None
    a = antialias
    # Sub-pixel sample offsets from the centre in radius units, clamped to _REACH (beyond it
    # every shape is empty) so that rotated offsets stay inside the template.
    xs = np.clip((x0 + (np.arange((x1 - x0) * a) + 0.5) / a - cx) / radius, -_REACH, _REACH)
    ys = np.clip((y0 + (np.arange((y1 - y0) * a) + 0.5) / a - cy) / radius, -_REACH, _REACH)
    scale = _TEMPLATE_RES / (2 * _EXTENT)
    c, s = math.cos(math.radians(angle)) * scale, math.sin(math.radians(angle)) * scale
    offset = _EXTENT * scale
    # Inverse rotation, screen offsets -> shape coordinates; the angle grows clockwise on screen.
    cols = (xs * c)[None, :] + (ys * s + offset)[:, None]
    rows = (ys * c + offset)[:, None] - (xs * s)[None, :]
    cover = template[rows.astype(np.intp), cols.astype(np.intp)]
    if a > 1:
        cover = cover.reshape(y1 - y0, a, x1 - x0, a).sum(axis=(1, 3))
    return (y0, y1, x0, x1), cover * np.float32(1 / (a * a))


def render(spec: SceneSpec, frames: int, size: int, antialias: int = 2) -> np.ndarray:
    """Draw a scene as uint8 ``frames x size x size x 3`` (deterministic for a spec)."""
    if frames < 6:
        raise ValueError(f"frames must be >= 6 (two events in order need room), got {frames}")
    # +0.5 on every colour makes the final truncation to uint8 a rounding.
    video = np.repeat(_background(spec, size)[None] + np.float32(0.5), frames, axis=0)
    for obj in spec.objects:
        template = _template(obj.shape)
        colour = np.array(COLOURS[obj.colour], np.float32) + np.float32(0.5)
        groups: dict[tuple, list[int]] = {}
        for t in range(frames):  # frames in which the object looks the same are drawn at once
            groups.setdefault(obj.state(t, frames), []).append(t)
        for (x, y, angle, radius, opacity), times in groups.items():
            if opacity <= 0 or radius <= 0:
                continue
            found = _coverage(template, x * size, y * size, angle, radius * size, size, size,
                              antialias)
            if found is None:
                continue
            (y0, y1, x0, x1), cover = found
            alpha = (cover * np.float32(opacity))[..., None]
            if len(times) == 1:
                region = video[times[0], y0:y1, x0:x1]
                region += alpha * (colour - region)
            else:
                index = np.array(times)
                region = video[index, y0:y1, x0:x1]
                region += alpha * (colour - region)
                video[index, y0:y1, x0:x1] = region
    if spec.noise > 0:
        video += _noise(spec.noise_seed, video.shape, spec.time_reversed, spec.noise)
    return np.clip(video, 0, 255, out=video).astype(np.uint8)


@lru_cache(maxsize=8)
def _noise_table(level: float) -> np.ndarray:
    """Maps a random 16-bit value to the sum of its two bytes, centred and scaled to std level*255."""
    value = np.arange(65536)
    return (((value >> 8) + (value & 255)) - 255).astype(np.float32) * np.float32(
        level * 255 / 104.51)


def _noise(seed: int, shape: tuple[int, ...], time_reversed: bool, level: float) -> np.ndarray:
    """Triangular per-pixel noise (std ``level`` * 255), one frame per content-time index."""
    raw = np.random.default_rng(seed).bytes(2 * int(np.prod(shape)))
    noise = np.take(_noise_table(level), np.frombuffer(raw, np.uint16).reshape(shape))
    return noise[::-1] if time_reversed else noise


# ----------------------------------------------------------------------------- sampling

def held_out_combos(seed: int, fraction: float) -> list[tuple[str, str]]:
    """The (colour, shape) pairs kept out of the training splits; every colour and shape stays seen."""
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    wanted = int(round(fraction * len(combos)))
    rng = np.random.default_rng([seed, 7919])
    left_per_colour = {c: len(SHAPES) for c in COLOURS}
    left_per_shape = {s: len(COLOURS) for s in SHAPES}
    chosen = []
    for i in rng.permutation(len(combos)):
        if len(chosen) == wanted:
            break
        colour, shape = combos[i]
        if left_per_colour[colour] > len(SHAPES) // 2 and left_per_shape[shape] > len(COLOURS) // 2:
            chosen.append((colour, shape))
            left_per_colour[colour] -= 1
            left_per_shape[shape] -= 1
    return sorted(chosen)


def _identities(rng: np.random.Generator, count: int, banned: set, force: tuple | None
                ) -> list[tuple[str, str]]:
    """Distinct colours and distinct shapes (so 'the red object' and 'the star' are unambiguous)."""
    colours, shapes = list(COLOURS), list(SHAPES)
    for _ in range(1000):
        pairs = [(colours[c], shapes[s]) for c, s in zip(rng.permutation(len(colours))[:count],
                                                          rng.permutation(len(shapes))[:count])]
        if force is not None:
            pairs[int(rng.integers(count))] = force
        if len({p[0] for p in pairs}) == count and len({p[1] for p in pairs}) == count \
                and not any(p in banned for p in pairs):
            return pairs
    raise RuntimeError("could not sample object identities; is held_out_fraction too large?")


def _place(rng: np.random.Generator, motions: list[str]) -> list[tuple] | None:
    """Grid cells / lanes so static objects never sit on a travelling object's path."""
    rows_taken, cols_taken, cells_taken = set(), set(), set()
    placed: list[tuple | None] = [None] * len(motions)
    for i, motion in enumerate(motions):
        if motion in ("move left", "move right"):
            free = [r for r in range(3) if r not in rows_taken]
            if not free:
                return None
            row = free[int(rng.integers(len(free)))]
            rows_taken.add(row)
            placed[i] = ("row", row)
        elif motion in ("move up", "move down"):
            free = [c for c in range(3) if c not in cols_taken]
            if not free:
                return None
            col = free[int(rng.integers(len(free)))]
            cols_taken.add(col)
            placed[i] = ("col", col)
    for i in range(len(motions)):
        if placed[i] is None:
            free = [k for k in range(9) if k // 3 not in rows_taken and k % 3 not in cols_taken
                    and k not in cells_taken]
            if not free:
                return None
            cell = free[int(rng.integers(len(free)))]
            cells_taken.add(cell)
            placed[i] = ("cell", cell)
    return placed


def _make_object(rng: np.random.Generator, colour: str, shape: str, motion: str, phase: str,
                 place: tuple) -> ObjectSpec:
    def jitter():
        return float(rng.uniform(-_JITTER, _JITTER))

    kind, where = place
    size = None if motion in ("grow", "shrink") else _pick(rng, list(SIZES))
    radius = SIZES[size] * float(rng.uniform(0.95, 1.05)) if size else 0.0
    angle = float(rng.uniform(0, 360))
    position = POSITIONS[where] if kind == "cell" else None
    if kind == "row":
        y = _CELL_CENTRES[where] + jitter()
        xa, xb = _PATH[0] + jitter(), _PATH[1] + jitter()
        start, end = ((xb, y), (xa, y)) if motion == "move left" else ((xa, y), (xb, y))
    elif kind == "col":
        x = _CELL_CENTRES[where] + jitter()
        ya, yb = _PATH[0] + jitter(), _PATH[1] + jitter()
        start, end = ((x, yb), (x, ya)) if motion == "move up" else ((x, ya), (x, yb))
    else:
        xy = (_CELL_CENTRES[where % 3] + jitter(), _CELL_CENTRES[where // 3] + jitter())
        start = end = xy
    angles = (angle, angle)
    if motion in ("rotate clockwise", "rotate anticlockwise"):
        turn = float(rng.uniform(*_TURN))
        angles = (angle, angle + turn if motion == "rotate clockwise" else angle - turn)
    radii = (radius, radius)
    if motion in ("grow", "shrink"):
        small, large = (_GROW[0] * float(rng.uniform(0.9, 1.1)),
                        _GROW[1] * float(rng.uniform(0.9, 1.1)))
        radii = (small, large) if motion == "grow" else (large, small)
    opacities = {"appear": (0.0, 1.0), "disappear": (1.0, 0.0)}.get(motion, (1.0, 1.0))

    def state(k):
        return tuple(round(float(v), 5) for v in (*(start, end)[k], angles[k], radii[k],
                                                   opacities[k]))
    return ObjectSpec(shape=shape, colour=colour, size=size, position=position, motion=motion,
                      phase=phase, start=state(0), end=state(1))


_GENERAL_MOTIONS = ("static",) + CLASSES + EVENTS
_GENERAL_WEIGHTS = np.array([6.0] + [1.8] * len(CLASSES) + [1.0] * len(EVENTS))
_GENERAL_WEIGHTS /= _GENERAL_WEIGHTS.sum()


def sample_scene(rng: np.random.Generator, kind: str = "general", max_objects: int = 3,
                 noise: float = 0.03, banned: set | frozenset = frozenset(),
                 force: tuple[str, str] | None = None, label: str | None = None) -> SceneSpec:
    """Draw a random scene.

    ``kind``: ``general`` (any motions, sometimes two events in order), ``classify`` (one
    object doing ``label``, others still), ``temporal_single`` (exactly one directional motion)
    or ``temporal_order`` (two time-symmetric events one after the other, others still).
    ``banned`` (colour, shape) pairs never appear; ``force`` puts one pair in the scene.
    """
    for _ in range(1000):
        if kind == "temporal_order":
            count = int(rng.integers(2, max(2, max_objects) + 1))
        else:
            count = int(rng.integers(1, max_objects + 1))
        motions, phases = ["static"] * count, ["all"] * count
        if kind == "general":
            if count >= 2 and rng.random() < _ORDER_PROBABILITY:
                first, second = (int(i) for i in rng.choice(count, 2, replace=False))
                for index, phase in ((first, "early"), (second, "late")):
                    motions[index] = _pick(rng, CLASSES + EVENTS)
                    phases[index] = phase
            else:
                motions = [str(m) for m in rng.choice(_GENERAL_MOTIONS, count, p=_GENERAL_WEIGHTS)]
        elif kind == "classify":
            if label not in CLASSES:
                raise ValueError(f"unknown class {label!r}; expected one of {CLASSES}")
            motions[int(rng.integers(count))] = label
        elif kind == "temporal_single":
            motions[int(rng.integers(count))] = _pick(rng, CLASSES)
        elif kind == "temporal_order":
            first, second = (int(i) for i in rng.choice(count, 2, replace=False))
            for index, phase in ((first, "early"), (second, "late")):
                motions[index], phases[index] = _pick(rng, EVENTS), phase
        else:
            raise ValueError(f"unknown scene kind {kind!r}")
        placement = _place(rng, motions)
        if placement is not None:
            break
    else:
        raise RuntimeError("could not place objects")
    pairs = _identities(rng, count, set(banned), force)
    objects = tuple(_make_object(rng, c, s, m, p, where)
                    for (c, s), m, p, where in zip(pairs, motions, phases, placement))
    params = (round(float(rng.uniform(0.08, 0.16)), 5), round(float(rng.uniform(0, 1)), 5),
              round(float(rng.uniform(0, 360)), 5))
    return SceneSpec(objects=objects, background=_pick(rng, BACKGROUNDS),
                     background_colour=_pick(rng, list(BACKGROUND_COLOURS)),
                     background_params=params, noise=float(noise),
                     noise_seed=int(rng.integers(2 ** 62)))


def _clip_rng(cfg: SynthConfig, split: str, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, _SPLIT_IDS[split], index, stream])


def scene_for(cfg: SynthConfig, split: str, index: int,
              held_out: Sequence[tuple[str, str]] | None = None) -> SceneSpec:
    """The scene of clip ``index`` of ``split``; a function of (seed, split, index) only."""
    cfg = _as_config(cfg)
    if held_out is None:
        held_out = held_out_combos(cfg.seed, cfg.held_out_fraction)
    held_out = [tuple(p) for p in held_out]
    rng = _clip_rng(cfg, split, index, _SCENE)
    train = split in TRAIN_SPLITS
    banned = set(held_out) if train else set()
    force = None
    if not train and held_out and rng.random() < _HELD_OUT_IN_TEST:
        force = held_out[int(rng.integers(len(held_out)))]
    common = dict(max_objects=cfg.max_objects, noise=cfg.noise, banned=banned, force=force)
    if split in ("classify_train", "classify_test"):
        return sample_scene(rng, "classify", label=CLASSES[index % len(CLASSES)], **common)
    if split == "mc_test" and index % 2 == 0:  # even items temporal, odd static
        temporal = "temporal_order" if cfg.max_objects >= 2 and rng.random() < 0.5 \
            else "temporal_single"
        return sample_scene(rng, temporal, **common)
    return sample_scene(rng, "general", **common)


# ----------------------------------------------------------------------------- records

def _captions(spec: SceneSpec, rng: np.random.Generator, count: int) -> list[str]:
    """``count`` distinct captions with distinct sentence templates where possible."""
    templates = [int(t) for t in rng.permutation(len(TEMPLATES))]
    captions: list[str] = []
    for k in range(count * 4):
        text = spec.caption(rng, template=templates[k % len(templates)])
        if text not in captions:
            captions.append(text)
        if len(captions) == count:
            break
    return captions


def _questions(spec: SceneSpec, rng: np.random.Generator, count: int,
               avoid: set | frozenset = frozenset()) -> list[dict[str, Any]]:
    """Closed-vocabulary questions (answers in QA_ANSWERS) about static and temporal facts.

    ``avoid``: (colour, shape) pairs that "is there a ...?" questions must not name.
    """
    objs = spec.objects

    def name(o):
        return f"{o.colour} {o.shape}"

    def one(options):
        return options[int(rng.integers(len(options)))]

    makers: dict[str, Any] = {}

    def colour():
        o = one(objs)
        q = _pick(rng, ("what colour is the {s}?", "which colour does the {s} have?",
                        "what is the colour of the {s}?"))
        return q.format(s=o.shape), o.colour

    def shape():
        o = one(objs)
        q = _pick(rng, ("what shape is the {c} object?", "what is the {c} shape?",
                        "which shape is {c}?"))
        return q.format(c=o.colour), o.shape

    def count_objects():
        return _pick(rng, ("how many objects are there?", "how many shapes are in the video?",
                           "how many objects can be seen?")), COUNT_WORDS[len(objs)]

    def background_colour():
        return _pick(rng, ("what colour is the background?", "which colour is the backdrop?")), \
            spec.background_colour

    def background():
        return _pick(rng, ("what pattern does the background have?",
                           "what does the background look like?",
                           "which pattern is behind the objects?")), spec.background

    def existence():
        o = one(objs)
        phrasing = _pick(rng, ("is there {x}?", "does the video contain {x}?", "can you see {x}?"))
        if rng.integers(2):
            return phrasing.format(x=_with_article(name(o))), "yes"
        present = {(p.colour, p.shape) for p in objs}
        # An absent object that differs from a present one in colour or in shape only.
        absent = [(c, o.shape) for c in COLOURS] + [(o.colour, s) for s in SHAPES]
        absent = [p for p in absent if p not in present and p not in avoid]
        c, s = absent[int(rng.integers(len(absent)))]
        return phrasing.format(x=_with_article(f"{c} {s}")), "no"

    makers.update(colour=colour, shape=shape, count=count_objects,
                  background_colour=background_colour, background=background,
                  existence=existence)
    sized = [o for o in objs if o.size]
    if sized:
        def size():
            o = one(sized)
            return _pick(rng, ("what size is the {x}?", "how big is the {x}?",
                               "is the {x} small, medium or large?")).format(x=name(o)), o.size
        makers["size"] = size
    placed = [o for o in objs if o.position]
    if placed:
        def position():
            o = one(placed)
            return _pick(rng, ("where is the {x}?", "in which part of the frame is the {x}?",
                               "where in the frame is the {x}?")).format(x=name(o)), o.position
        makers["position"] = position
    temporal_types = set()
    groups = {
        "direction": (TRANSLATIONS, ("which way does the {x} move?",
                                     "in which direction does the {x} travel?",
                                     "where does the {x} move to?"),
                      lambda m: m.split()[1]),
        "rotation": (("rotate clockwise", "rotate anticlockwise"),
                     ("which way does the {x} rotate?",
                      "does the {x} spin clockwise or anticlockwise?",
                      "in which direction does the {x} turn?"), lambda m: m.split()[1]),
        "growth": (("grow", "shrink"), ("does the {x} grow or shrink?",
                                        "does the {x} get bigger or smaller?"), lambda m: m),
        "visibility": (("appear", "disappear"), ("does the {x} appear or disappear?",
                                                 "does the {x} fade in or fade out?"),
                       lambda m: m),
    }
    for qtype, (motions, phrasings, answer) in groups.items():
        movers = [o for o in objs if o.motion in motions]
        if movers:
            def ask(movers=movers, phrasings=phrasings, answer=answer):
                o = one(movers)
                return _pick(rng, phrasings).format(x=name(o)), answer(o.motion)
            makers[qtype] = ask
            temporal_types.add(qtype)
    movers = [o for o in objs if o.motion in CLASSES]
    if movers:
        def motion_yes_no():
            o = one(movers)
            truth = bool(rng.integers(2))
            motion = o.motion if truth else REVERSE[o.motion]
            return f"does the {name(o)} {_MOTION_BASE[motion]}?", "yes" if truth else "no"
        makers["motion_yes_no"] = motion_yes_no
        temporal_types.add("motion_yes_no")
    order = spec.order
    if order:
        first, second = objs[order[0]], objs[order[1]]

        def order_first():
            a, b = (first, second) if rng.integers(2) else (second, first)
            q = _pick(rng, ("which acts first, the {a} or the {b}?",
                            "which object does something first: the {a} or the {b}?",
                            "what starts its action first, the {a} or the {b}?"))
            return q.format(a=name(a), b=name(b)), first.shape

        def order_yes_no():
            truth = bool(rng.integers(2))
            a, b = (first, second) if truth else (second, first)
            q = _pick(rng, ("does the {a} act before the {b}?",
                            "does the {a} do something before the {b} does?"))
            return q.format(a=name(a), b=name(b)), "yes" if truth else "no"
        makers.update(order_first=order_first, order_yes_no=order_yes_no)
        temporal_types |= {"order_first", "order_yes_no"}
    types = sorted(makers)
    # Temporal questions are drawn three times as often: they are what the benchmark is for.
    weights = np.array([3.0 if t in temporal_types else 1.0 for t in types])
    picks = rng.choice(len(types), min(count, len(types)), replace=False, p=weights / weights.sum())
    chosen = [types[int(i)] for i in picks]
    records = []
    for qtype in chosen:
        question, answer = makers[qtype]()
        records.append({"question": question, "answer": answer, "type": qtype,
                        "temporal": qtype in temporal_types})
    return records


def _static_slots(spec: SceneSpec) -> list[tuple[str, list]]:
    """One-fact changes with at least four alternative values each (so options stay balanced)."""
    slots = [("background", [b for b in BACKGROUNDS if b != spec.background]),
             ("background_colour", [c for c in BACKGROUND_COLOURS if c != spec.background_colour])]
    used_colours = {o.colour for o in spec.objects}
    used_shapes = {o.shape for o in spec.objects}
    used_cells = {o.position for o in spec.objects}
    for i, o in enumerate(spec.objects):
        slots.append((f"objects.{i}.colour", [c for c in COLOURS if c not in used_colours]))
        slots.append((f"objects.{i}.shape", [s for s in SHAPES if s not in used_shapes]))
        if o.position:
            slots.append((f"objects.{i}.position", [p for p in POSITIONS if p not in used_cells]))
    return [(key, values) for key, values in slots if len(values) >= 4]


def _mc_item(spec: SceneSpec, rng: np.random.Generator, temporal: bool) -> dict[str, Any]:
    """Five options: the truth and four distractors that each change exactly one fact.

    Temporal items: all four distractors are captions of the time-reversed clip (four other
    templates). Static items: one single-frame fact takes four other values, in the truth's
    template, so no option is the odd one out by its wording.
    """
    if temporal:
        changed = spec.temporal_facts()
        if len(changed) != 1:
            raise ValueError(f"a temporal item needs exactly one temporal fact, got {changed}")
        changed = changed[0]
        distractors = [spec.reversed()] * 4
        templates = [int(t) for t in rng.permutation(len(TEMPLATES))[:5]]
    else:
        slots = _static_slots(spec)
        changed, values = slots[int(rng.integers(len(slots)))]
        picks = rng.permutation(len(values))[:4]
        distractors = [spec.with_fact(changed, values[int(i)]) for i in picks]
        templates = [int(rng.integers(len(TEMPLATES)))] * 5
    answer = int(rng.integers(5))
    option_specs = distractors[:answer] + [spec] + distractors[answer:]
    option_templates = templates[1:answer + 1] + templates[:1] + templates[answer + 1:]
    for _ in range(100):
        seed = int(rng.integers(2 ** 31))
        options = [s.caption(np.random.default_rng(seed), template=t)
                   for s, t in zip(option_specs, option_templates)]
        if len(set(options)) == 5:
            break
    else:
        raise RuntimeError("could not make five distinct options")
    return {"caption": options, "answer": answer, "kind": "temporal" if temporal else "static",
            "changed": changed, "facts": spec.facts,
            "option_facts": [s.facts for s in option_specs],
            "option_templates": option_templates, "caption_seed": seed}


def video_name(split: str, index: int) -> str:
    """Relative path of a clip inside the output folder."""
    return f"videos/{split}_{index:06d}.mp4"


def clip_records(cfg: SynthConfig, split: str, index: int,
                 held_out: Sequence[tuple[str, str]]) -> tuple[SceneSpec, dict[str, Any]]:
    """The scene and the annotation records of one clip (keyed by annotation file stem)."""
    spec = scene_for(cfg, split, index, held_out)
    video = video_name(split, index)
    held = {tuple(p) for p in held_out}
    base = {"video": video, "facts": spec.facts,
            "held_out": any((o.colour, o.shape) in held for o in spec.objects)}
    records: dict[str, Any] = {}
    if split in ("pretrain", "retrieval_test"):
        count = cfg.captions_per_clip if split == "pretrain" else 1
        captions = _captions(spec, _clip_rng(cfg, split, index, _CAPTION), count)
        records[split] = {**base, "caption": captions if split == "pretrain" else captions[0]}
        if split == "pretrain" and cfg.negative_captions and spec.temporal_facts():
            # what the clip played backwards shows: false for this clip, and telling the two
            # apart takes the order of its frames (hard negatives for training)
            records[split]["negative_caption"] = _captions(
                spec.reversed(), _clip_rng(cfg, split, index, _NEGATIVE), count)
        if split == "pretrain" and cfg.reversal_negatives:
            # whether the clip played backwards contradicts its captions (a negative in training)
            records[split]["reversal_negative"] = bool(spec.temporal_facts())
        qa = _questions(spec, _clip_rng(cfg, split, index, _QA), cfg.qa_per_clip,
                        avoid=held if split in TRAIN_SPLITS else frozenset())
        records["qa_train" if split == "pretrain" else "qa_test"] = [{"video": video, **q}
                                                                    for q in qa]
    elif split == "mc_test":
        item = _mc_item(spec, _clip_rng(cfg, split, index, _MC), temporal=index % 2 == 0)
        records[split] = {"video": video, **item, "held_out": base["held_out"]}
    else:
        records[split] = {**base, "label": CLASSES[index % len(CLASSES)]}
    return spec, records


# ----------------------------------------------------------------------------- generation

def _as_config(cfg: Any) -> SynthConfig:
    if isinstance(cfg, SynthConfig):
        return cfg
    if isinstance(cfg, dict):
        return SynthConfig(**cfg)
    from omegaconf import OmegaConf  # a DictConfig from load_config

    return SynthConfig(**OmegaConf.to_container(cfg, resolve=True))


def _check(cfg: SynthConfig) -> None:
    problems = []
    for name in ("pretrain_clips", "retrieval_test_clips", "mc_test_clips",
                 "classify_train_clips", "classify_test_clips", "qa_per_clip"):
        if getattr(cfg, name) < 0:
            problems.append(f"{name} must be >= 0")
    if cfg.frames < 6:
        problems.append("frames must be >= 6 (two events in order need room)")
    if cfg.size < 16 or cfg.size % 2:
        problems.append("size must be an even number >= 16 (H.264 needs even sizes)")
    if not 1 <= cfg.max_objects <= MAX_OBJECTS:
        problems.append(f"max_objects must be between 1 and {MAX_OBJECTS}")
    if not 0 <= cfg.held_out_fraction <= 0.5:
        problems.append("held_out_fraction must be between 0 and 0.5")
    if cfg.noise < 0 or cfg.fps <= 0 or cfg.captions_per_clip < 1 or cfg.workers < 0:
        problems.append("noise >= 0, fps > 0, captions_per_clip >= 1 and workers >= 0 are needed")
    if problems:
        raise ValueError("invalid synth config: " + "; ".join(problems))


def _split_sizes(cfg: SynthConfig) -> dict[str, int]:
    return {"pretrain": cfg.pretrain_clips, "retrieval_test": cfg.retrieval_test_clips,
            "mc_test": cfg.mc_test_clips, "classify_train": cfg.classify_train_clips,
            "classify_test": cfg.classify_test_clips}


def _clip_key(spec: SceneSpec, cfg: SynthConfig) -> str:
    """Identifies a clip's encoded content, for skipping files a previous run already wrote."""
    payload = json.dumps([FORMAT_VERSION, spec.to_dict(), cfg.frames, cfg.size, cfg.fps,
                          cfg.crf], sort_keys=True)
    return hashlib.sha1(payload.encode()).hexdigest()[:20]


def _run_chunk(task: dict[str, Any]) -> dict[str, Any]:
    """Worker: build, render and encode clips ``start..stop`` of one split."""
    from leanvl.data.video import write_video

    cfg = SynthConfig(**task["cfg"])
    out = Path(cfg.out)
    records, keys, encoded = [], {}, 0
    for index in range(task["start"], task["stop"]):
        spec, clip = clip_records(cfg, task["split"], index, task["held_out"])
        video = video_name(task["split"], index)
        key = _clip_key(spec, cfg)
        if task["known"].get(video) != key or not (out / video).is_file():
            write_video(out / video, render(spec, cfg.frames, cfg.size), fps=cfg.fps,
                        crf=cfg.crf)
            encoded += 1
        keys[video] = key
        records.append(clip)
    return {"split": task["split"], "start": task["start"], "records": records, "keys": keys,
            "encoded": encoded}


def _load_manifest(path: Path) -> dict[str, str]:
    known: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
                known[entry["video"]] = entry["key"]
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by an interrupted run
    return known


def generate(cfg: SynthConfig, progress: bool = True) -> dict[str, Any]:
    """Render, encode and annotate every split into ``cfg.out``; returns the summary dict.

    Deterministic for a config (each clip's randomness comes from (seed, split, index)), the
    same for any number of workers, and resumable: clips whose mp4 a previous run wrote for
    the same content (tracked in ``videos/.manifest.jsonl``) are not encoded again.
    """
    from tqdm import tqdm

    began = time.perf_counter()
    cfg = _as_config(cfg)
    _check(cfg)
    out = Path(cfg.out)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    held_out = held_out_combos(cfg.seed, cfg.held_out_fraction)
    manifest_path = out / "videos" / ".manifest.jsonl"
    known = _load_manifest(manifest_path)
    sizes = _split_sizes(cfg)
    tasks = []
    for split, total in sizes.items():
        for start in range(0, total, CHUNK):
            stop = min(total, start + CHUNK)
            names = [video_name(split, i) for i in range(start, stop)]
            tasks.append({"cfg": dataclasses.asdict(cfg), "split": split, "start": start,
                          "stop": stop, "held_out": held_out,
                          "known": {n: known[n] for n in names if n in known}})
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = min(cfg.workers or cores or 1, max(1, len(tasks)))
    chunks: dict[tuple[str, int], list] = {}
    encoded = 0
    pool, results = None, map(_run_chunk, tasks)
    if workers > 1:
        # fork where the platform has it: spawn would re-import the caller's main module, which
        # hangs scripts without a __main__ guard. Workers use only numpy and PyAV. The pool
        # starts before the progress bar so no tqdm thread is forked.
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else None)
        pool = context.Pool(workers)
        results = pool.imap_unordered(_run_chunk, tasks)
    with tqdm(total=sum(sizes.values()), unit="clip", desc="synth", disable=not progress) as bar, \
            open(manifest_path, "a", encoding="utf-8") as manifest:
        try:
            for result in results:
                chunks[(result["split"], result["start"])] = result["records"]
                encoded += result["encoded"]
                known.update(result["keys"])
                manifest.write("".join(json.dumps({"video": v, "key": k}) + "\n"
                                       for v, k in result["keys"].items()))
                manifest.flush()
                bar.update(len(result["records"]))
        finally:
            if pool is not None:
                pool.terminate() if bar.n < bar.total else pool.close()
                pool.join()
    atomic_write_text(manifest_path, "".join(json.dumps({"video": v, "key": k}) + "\n"
                                             for v, k in sorted(known.items())))
    files: dict[str, list] = {Path(name).stem: [] for name in ANNOTATION_FILES}
    for split in SPLITS:
        for start in range(0, sizes[split], CHUNK):
            for clip in chunks[(split, start)]:
                for stem, value in clip.items():
                    files[stem].extend(value if isinstance(value, list) else [value])
    kinds = {"pretrain": "retrieval", "retrieval_test": "retrieval", "qa_train": "qa",
             "qa_test": "qa", "mc_test": "mc", "classify_train": "classification",
             "classify_test": "classification"}
    for stem, records in files.items():
        write_annotations(records, out / f"{stem}.jsonl", kind=kinds[stem])
    atomic_write_text(out / "answers.json", json.dumps(list(QA_ANSWERS), indent=1) + "\n")
    atomic_write_text(out / "classes.json", json.dumps(list(CLASSES), indent=1) + "\n")
    summary = _summarize(cfg, files, held_out, encoded, time.perf_counter() - began)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    return summary


def _summarize(cfg: SynthConfig, files: dict[str, list], held_out: list, encoded: int,
               seconds: float) -> dict[str, Any]:
    retrieval = files["retrieval_test"]
    captions = [r["caption"] for r in retrieval]
    descriptions = [json.dumps(r["facts"], sort_keys=True) for r in retrieval]
    clips = sum(_split_sizes(cfg).values())
    mc_kinds = {"temporal": 0, "static": 0}
    for item in files["mc_test"]:
        mc_kinds[item["kind"]] += 1
    qa_temporal = sum(q["temporal"] for q in files["qa_test"])
    test = [r for stem in ("retrieval_test", "mc_test", "classify_test") for r in files[stem]]
    return {
        "out": str(cfg.out),
        "clips": _split_sizes(cfg),
        "records": {stem: len(records) for stem, records in files.items()},
        "frames": cfg.frames, "size": cfg.size, "fps": cfg.fps, "seed": cfg.seed,
        "pretrain_captions": sum(len(r["caption"]) for r in files["pretrain"]),
        "retrieval_unique_captions": round(len(set(captions)) / len(captions), 4) if captions else 0.0,
        "retrieval_unique_descriptions": round(len(set(descriptions)) / len(descriptions), 4)
        if descriptions else 0.0,
        "qa_test_temporal_fraction": round(qa_temporal / len(files["qa_test"]), 4)
        if files["qa_test"] else 0.0,
        "mc_kinds": mc_kinds,
        "classes": list(CLASSES),
        "answers": len(QA_ANSWERS),
        "held_out_combos": [list(p) for p in held_out],
        "test_clips_with_held_out": round(sum(r["held_out"] for r in test) / len(test), 4)
        if test else 0.0,
        "encoded": encoded, "reused": clips - encoded,
        "seconds": round(seconds, 2),
        "clips_per_second": round(clips / seconds, 1) if seconds > 0 else 0.0,
    }


def sample_sheet(cfg: SynthConfig, clips: Sequence[tuple[str, int]], frames: int = 6,
                 gap: int = 2, noise: float | None = None) -> np.ndarray:
    """A picture (uint8 H x W x 3) of clips as rows of ``frames`` evenly spaced frames.

    ``noise`` replaces the clips' noise level (0 gives a picture that compresses well).
    """
    cfg = _as_config(cfg)
    held_out = held_out_combos(cfg.seed, cfg.held_out_fraction)
    rows = []
    for split, index in clips:
        spec = scene_for(cfg, split, index, held_out)
        if noise is not None:
            spec = replace(spec, noise=float(noise))
        video = render(spec, cfg.frames, cfg.size)
        picks = np.linspace(0, cfg.frames - 1, frames).round().astype(int)
        row = np.full((cfg.size, frames * (cfg.size + gap) - gap, 3), 255, np.uint8)
        for k, t in enumerate(picks):
            row[:, k * (cfg.size + gap):k * (cfg.size + gap) + cfg.size] = video[t]
        rows.append(row)
    sheet = np.full((len(rows) * (cfg.size + gap) - gap, rows[0].shape[1], 3), 255, np.uint8)
    for k, row in enumerate(rows):
        sheet[k * (cfg.size + gap):k * (cfg.size + gap) + cfg.size] = row
    return sheet


def format_summary(summary: dict[str, Any]) -> str:
    """A human-readable, multi-line account of a generated benchmark."""
    s, r = summary, summary["records"]
    clips = sum(s["clips"].values())
    held = ", ".join(f"{c} {h}" for c, h in s["held_out_combos"]) or "none"
    lines = [
        f"Synthetic benchmark in {s['out']}: {clips} clips of {s['frames']} frames at "
        f"{s['size']}x{s['size']}, {s['fps']:g} fps (seed {s['seed']})",
        f"  pretrain.jsonl        {r['pretrain']:>6} clips, {s['pretrain_captions']} captions",
        f"  retrieval_test.jsonl  {r['retrieval_test']:>6} clips, "
        f"{100 * s['retrieval_unique_captions']:.1f}% unique captions "
        f"({100 * s['retrieval_unique_descriptions']:.1f}% unique scene descriptions)",
        f"  qa_train.jsonl        {r['qa_train']:>6} questions",
        f"  qa_test.jsonl         {r['qa_test']:>6} questions "
        f"({100 * s['qa_test_temporal_fraction']:.0f}% temporal), "
        f"{s['answers']} answers in answers.json",
        f"  mc_test.jsonl         {r['mc_test']:>6} items, 5 options "
        f"({s['mc_kinds']['temporal']} temporal, {s['mc_kinds']['static']} static)",
        f"  classify_train.jsonl  {r['classify_train']:>6} clips, {len(s['classes'])} classes "
        "in classes.json",
        f"  classify_test.jsonl   {r['classify_test']:>6} clips",
        f"  held-out (colour, shape): {held}; in {100 * s['test_clips_with_held_out']:.0f}% "
        "of test clips",
        f"  {s['encoded']} clips encoded, {s['reused']} reused, in {s['seconds']:.1f} s "
        f"({s['clips_per_second']:.1f} clips/s)",
    ]
    return "\n".join(lines)
