"""an8Flower renderer: a synthetic flower whose class-defining region is known pixel for pixel.

The original an8Flower renders (Oramas et al., ICLR 2019, supplementary "an8Flower Dataset")
are no longer available, so this module renders its own following the paper's protocol:

* a 3D flower -- a curved stem, a green calyx, a flower head of eight petals of different
  lengths around a darker central disc, tilted 40 degrees to one side, and two leaves of
  different sizes on different sides of the stem -- so the picture changes with the viewpoint;
* 40 viewpoints over 360 degrees (the flower turns about the vertical axis; the camera looks
  15 degrees down, orthographic projection), Lambert shading (ambient + a key light from the
  upper left + a weak fill light at the camera; lights fixed to the camera), a plain light
  background; a software ray caster of analytic shapes (ellipsoid petals, disc and leaves,
  capsule-chain stem, sphere balls, cone thorns), numpy only;
* every render is cropped five times (the four corners and the centre; crop side = 250/300 of
  the render side) and every crop is rotated counter-clockwise by 5, 10, 15, 20 and 25 degrees
  about its centre (bilinear; what comes from outside the crop is background):
  40 x 5 x 5 = 1000 images per class, each with the ground-truth mask of its class part.

Variants (:data:`VARIANTS`)

``single-6c``   six head colours (``red-head``, ``orange-head``, ...); mask = flower head
                (petals + disc).
``double-12c``  the same six colours on the head (mask = head) or on the stem (``red-stem``, ...,
                mask = stem + calyx); the part that does not define the class keeps its
                neutral colour (cream head, green stem).
``part-2c``     ``balls``: five red balls on the flower head (at petal tips and on the disc),
                mask = balls; ``thorns``: five brown thorns on the stem, mask = thorns.

Invariant: for one (view, crop, angle), the images of two classes differ only inside the union
of their two masks, pixel for pixel at the output size. Rendering is supersampled (3 x 3 rays
per pixel); a render pixel belongs to a part's mask when any of its rays hits that part, and an
output pixel belongs to the mask when any render pixel of that part enters its bilinear
interpolation with a non-zero weight. The parts whose colour no class changes are composed
and transformed once per view; the per-part shading maps of the parts that do change are
transformed and coloured per class afterwards, always in the same order, so a pixel that no
class part reaches is computed from the same numbers, by the same operations, in every class.
The tests check this invariant for every item of every variant.

Resolution: instead of rendering 300 x 300, cropping 250 x 250 and resizing to ``size``, the
flower is rendered directly at ``R = size + 2 * round(size / 10)`` pixels (about
``size * 300 / 250``) with the geometry fixed in coordinates relative to the frame, and every
crop is ``size x size`` render pixels -- the same pictures without a resampling step (the crop
is 250/300 of the frame up to the rounding of ``round(size / 10)``).

The seed jitters the petal lengths, the leaves' angles and the light direction slightly; the
same arguments always give the same bytes on disk.

Difficulty knobs and counterfactuals (issue 27): :class:`Knobs` scales the class parts, plants a
distractor (a ball of the class attribute's colour behind the flower, in a set share of the
items; never on a class-mask pixel) and adds neutral background clutter (the same in every
class of a (view, crop, angle), so the invariant above still holds). Overlays are drawn at the
output size, after the crops and rotations, weighted by each pixel's share of background.
Counterfactual renders (``counterfactual=k``) draw every item with the part colour of
:func:`counterfactual_label` and everything else its own. The default knobs draw exactly the
bytes drawn before the knobs existed (no number of the default path changes).

Entry points: :func:`render_view` (one viewpoint's items in memory, no files), :func:`iter_views`
(every view of a variant, as :mod:`.dataset` writes them).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from scipy import sparse

from ..._checks import check_choice, check_nonnegative_int
from ...utils import describe

__all__ = [
    "VARIANTS",
    "N_VIEWS",
    "CROPS",
    "ANGLES",
    "RENDER_VERSION",
    "COLOURS",
    "ClassSpec",
    "Knobs",
    "DEFAULT_KNOBS",
    "check_knobs",
    "check_counterfactual",
    "counterfactual_label",
    "attribute_colour",
    "class_specs",
    "variant_classes",
    "check_variant",
    "check_size",
    "check_seed",
    "render_size",
    "geometries",
    "iter_views",
    "render_view",
]

#: The dataset variants of the paper.
VARIANTS: tuple[str, ...] = ("single-6c", "double-12c", "part-2c")
#: Viewpoints over 360 degrees (rotation of the flower about the vertical axis).
N_VIEWS = 40
#: The five crops of every render (corner crops touch two borders of the render).
CROPS: tuple[str, ...] = ("top-left", "top-right", "bottom-left", "bottom-right", "center")
#: Counter-clockwise rotations applied to every crop, in degrees.
ANGLES: tuple[int, ...] = (5, 10, 15, 20, 25)
#: Bumped whenever the pictures change; a cache written by another version is not trusted.
RENDER_VERSION = 1
#: Accepted image sides (the renders grow with the square of the side).
MIN_SIZE = 32
MAX_SIZE = 1024
#: Rays per render pixel along each axis (anti-aliasing).
SUPERSAMPLE = 3

#: The six class colours (linear RGB in [0, 1]).
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.07, 0.09),
    "orange": (1.00, 0.50, 0.04),
    "yellow": (0.98, 0.86, 0.10),
    "pink": (1.00, 0.52, 0.80),
    "purple": (0.50, 0.18, 0.76),
    "blue": (0.12, 0.36, 0.92),
}

# Part ids of the renderer's part map (0 is the background).
_PARTS = ("background", "stem", "leaf", "petal", "disc", "ball", "thorn")
_P = {name: i for i, name in enumerate(_PARTS)}

_BACKGROUND = (0.86, 0.90, 0.95)
_DEFAULT_ALBEDO: dict[str, tuple[float, float, float]] = {
    "stem": (0.26, 0.60, 0.16),
    "leaf": (0.16, 0.50, 0.12),
    "petal": (0.97, 0.94, 0.82),  # cream: the neutral head
    "disc": (0.80, 0.62, 0.22),
    "ball": (0.88, 0.10, 0.12),
    "thorn": (0.42, 0.20, 0.08),
}
_DISC_SHADE = 0.55  # a coloured head's disc is its colour times this

_AMBIENT = 0.28
_DIFFUSE = 0.52  # the key light
_FILL = 0.20  # a light at the camera: every visible surface gets some
# _AMBIENT + _DIFFUSE + _FILL <= 1: no clipping needed
_THIN = ("petal", "leaf")  # lit from either side (thin, translucent)
_ELEVATION_DEG = 15.0


# --------------------------------------------------------------------------------------------
# Classes of each variant
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClassSpec:
    name: str
    geometry: str  # "base", "balls" or "thorns"
    albedo: dict  # part name -> rgb, overriding the defaults
    mask_parts: tuple[str, ...]
    region: str


def class_specs(variant: str) -> list[ClassSpec]:
    head = [
        ClassSpec(f"{c}-head", "base",
                   {"petal": rgb, "disc": tuple(_DISC_SHADE * v for v in rgb)}, ("petal", "disc"), "head")
        for c, rgb in COLOURS.items()
    ]
    if variant == "single-6c":
        return head
    if variant == "double-12c":
        stem = [ClassSpec(f"{c}-stem", "base", {"stem": rgb}, ("stem",), "stem") for c, rgb in COLOURS.items()]
        return head + stem
    if variant == "part-2c":
        return [ClassSpec("balls", "balls", {}, ("ball",), "balls"),
                ClassSpec("thorns", "thorns", {}, ("thorn",), "thorns")]
    raise ValueError(f"variant: expected one of {', '.join(map(repr, VARIANTS))}, got {variant!r}")


def variant_classes(variant: str) -> list[str]:
    """The class names of ``variant`` in label order."""
    check_variant(variant)
    return [s.name for s in class_specs(variant)]


# --------------------------------------------------------------------------------------------
# Difficulty knobs and counterfactuals
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Knobs:
    """Difficulty knobs of the renderer (issue 27, item 4). The defaults draw the paper's images.

    * ``part_scale`` (0.5 to 1.5): size of the class-defining parts (petals and disc of a
      coloured head, the stem's radius of a coloured stem, the balls, the thorns) relative to
      the default;
    * ``distractor_rate`` (0 to 1): the fraction of items that carry a *distractor*, a ball of
      their class attribute's colour (:func:`attribute_colour`) somewhere behind the flower --
      a planted shortcut; its pixels never touch a class mask;
    * ``clutter`` (0 to 20): neutral (low-saturation) balls in the background of every item,
      the same for every class of one (view, crop, angle).

    Non-default knobs are written into the manifest and the cache folder's name
    (:meth:`tag`), so they are part of the dataset's content key; the defaults add nothing,
    so the default renders keep their folder, manifest and bytes.
    """

    part_scale: float = 1.0
    distractor_rate: float = 0.0
    clutter: int = 0

    @property
    def is_default(self) -> bool:
        return self == DEFAULT_KNOBS

    @property
    def overlays(self) -> bool:
        """Whether anything is drawn over the background (distractors or clutter)."""
        return self.distractor_rate > 0 or self.clutter > 0

    def tag(self) -> str:
        """Suffix of the cache folder's name: ``""`` for the defaults, else e.g. ``-ps0.8-dr0.5-cl3``."""
        out = ""
        if self.part_scale != 1.0:
            out += f"-ps{self.part_scale:g}"
        if self.distractor_rate != 0.0:
            out += f"-dr{self.distractor_rate:g}"
        if self.clutter != 0:
            out += f"-cl{self.clutter}"
        return out

    def manifest(self) -> dict:
        """The manifest entries of these knobs (none for the defaults)."""
        return {} if self.is_default else {"knobs": {"part_scale": self.part_scale,
                                                     "distractor_rate": self.distractor_rate,
                                                     "clutter": self.clutter}}


DEFAULT_KNOBS = Knobs()


def check_knobs(knobs: Any) -> Knobs:
    """``None`` -> the defaults; a :class:`Knobs` or a dict of its fields, validated."""
    if knobs is None:
        return DEFAULT_KNOBS
    if isinstance(knobs, dict):
        unknown = set(knobs) - {"part_scale", "distractor_rate", "clutter"}
        if unknown:
            raise ValueError(f"knobs: unknown keys {sorted(unknown)}; expected part_scale, distractor_rate, clutter")
        knobs = Knobs(**knobs)
    if not isinstance(knobs, Knobs):
        raise TypeError(f"knobs: expected a Knobs, a dict of its fields or None, got {describe(knobs)}")
    ps, dr, cl = knobs.part_scale, knobs.distractor_rate, knobs.clutter
    if isinstance(ps, bool) or not isinstance(ps, (int, float, np.integer, np.floating)) or not 0.5 <= ps <= 1.5:
        raise ValueError(f"knobs.part_scale: expected a number in [0.5, 1.5], got {describe(ps)}")
    if isinstance(dr, bool) or not isinstance(dr, (int, float, np.integer, np.floating)) or not 0.0 <= dr <= 1.0:
        raise ValueError(f"knobs.distractor_rate: expected a number in [0, 1], got {describe(dr)}")
    if not isinstance(cl, (int, np.integer)) or isinstance(cl, (bool, np.bool_)) or not 0 <= cl <= 20:
        raise ValueError(f"knobs.clutter: expected an int in 0..20, got {describe(cl)}")
    return Knobs(float(ps), float(dr), int(cl))


def check_counterfactual(variant: str, shift: Any) -> int:
    """``shift``: 0 (the factual renders) or 1..n-1, n the number of classes sharing a part."""
    check_variant(variant)
    if not isinstance(shift, (int, np.integer)) or isinstance(shift, (bool, np.bool_)):
        raise TypeError(f"counterfactual: expected an int, got {describe(shift)}")
    if shift == 0:
        return 0
    if variant == "part-2c":
        raise ValueError("counterfactual: part-2c's classes differ by their parts' shapes, not by a colour; "
                         "counterfactual renders swap a colour (variants 'single-6c', 'double-12c')")
    n = len(COLOURS)
    if not 1 <= shift < n:
        raise ValueError(f"counterfactual: expected 0 or a shift in 1..{n - 1}, got {int(shift)}")
    return int(shift)


def counterfactual_label(variant: str, label: int, shift: int) -> int:
    """The class whose attribute replaces ``label``'s in the counterfactual renders of ``shift``:
    the class ``shift`` steps further among those with the same part (``red-head`` with shift
    1 -> ``orange-head``; a head class never becomes a stem class)."""
    shift = check_counterfactual(variant, shift)
    specs = class_specs(variant)
    group = [k for k, s in enumerate(specs) if s.region == specs[label].region]
    return group[(group.index(label) + shift) % len(group)]


def attribute_colour(spec: ClassSpec) -> tuple[float, float, float]:
    """The colour of a class's attribute: the albedo of its (first) class-defining part."""
    part = spec.mask_parts[0]
    return tuple(spec.albedo.get(part, _DEFAULT_ALBEDO[part]))


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------
def check_variant(variant: Any, arg: str = "variant") -> str:
    """``variant`` must be one of :data:`VARIANTS` (``arg`` names it in the message)."""
    return check_choice(variant, arg, VARIANTS)


def check_size(size: Any) -> int:
    if not isinstance(size, (int, np.integer)) or isinstance(size, (bool, np.bool_)):
        raise ValueError(f"size: expected an int between {MIN_SIZE} and {MAX_SIZE}, got {describe(size)}")
    if not MIN_SIZE <= int(size) <= MAX_SIZE:
        raise ValueError(f"size: expected an int between {MIN_SIZE} and {MAX_SIZE}, got {int(size)}")
    return int(size)


def check_seed(seed: Any) -> int:
    return check_nonnegative_int(seed, "seed")



def render_size(size: int) -> int:
    """Side of the square render from which ``size x size`` crops are cut: ``size + 2*round(size/10)``."""
    size = check_size(size)
    return size + 2 * _margin(size)


def _margin(size: int) -> int:
    return int(round(size / 10))


# --------------------------------------------------------------------------------------------
# Geometry: analytic primitives, ray cast orthographically along -z in camera space
# --------------------------------------------------------------------------------------------
def _unit(v: Sequence[float]) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


class _Primitive:
    part: int

    def bound(self) -> tuple[np.ndarray, float]:  # centre, radius of a bounding sphere
        raise NotImplementedError

    def moved(self, rot: np.ndarray) -> "_Primitive":
        raise NotImplementedError

    def hit(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Front surface of the primitive under the rays (u, v): (hit, z, normal (3, ...))."""
        raise NotImplementedError


class _Ellipsoid(_Primitive):
    """Points ``c + M q`` with ``|q| = 1`` (the columns of M are the semi-axes)."""

    def __init__(self, part: int, centre: np.ndarray, axes: np.ndarray):
        self.part, self.c, self.m = part, np.asarray(centre, float), np.asarray(axes, float)
        self.minv = np.linalg.inv(self.m)

    def bound(self):
        return self.c, float(np.linalg.norm(self.m, 2))

    def moved(self, rot):
        return _Ellipsoid(self.part, rot @ self.c, rot @ self.m)

    def hit(self, u, v):
        mi = self.minv
        du, dv = u - self.c[0], v - self.c[1]
        a = [mi[k, 0] * du + mi[k, 1] * dv for k in range(3)]
        b = mi[:, 2]
        bb = float(b @ b)
        ab = a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
        aa = a[0] * a[0] + a[1] * a[1] + a[2] * a[2]
        disc = ab * ab - bb * (aa - 1.0)
        hit = disc >= 0
        s = (-ab + np.sqrt(np.maximum(disc, 0.0))) / bb
        q = [a[k] + b[k] * s for k in range(3)]
        n = [mi[0, k] * q[0] + mi[1, k] * q[1] + mi[2, k] * q[2] for k in range(3)]  # M^-T q
        return hit, self.c[2] + s, np.stack(n)


def _sphere(part: int, centre, radius: float) -> _Ellipsoid:
    return _Ellipsoid(part, centre, radius * np.eye(3))


class _Cylinder(_Primitive):
    """The side of a cylinder of radius r around the segment a-b (caps: see the joint spheres)."""

    def __init__(self, part: int, a, b, radius: float):
        self.part, self.a, self.b, self.r = part, np.asarray(a, float), np.asarray(b, float), float(radius)

    def bound(self):
        return (self.a + self.b) / 2, float(np.linalg.norm(self.b - self.a) / 2 + self.r)

    def moved(self, rot):
        return _Cylinder(self.part, rot @ self.a, rot @ self.b, self.r)

    def hit(self, u, v):
        length = float(np.linalg.norm(self.b - self.a))
        w = (self.b - self.a) / length
        g0, g1, g2 = u - self.a[0], v - self.a[1], -self.a[2]
        gw = g0 * w[0] + g1 * w[1] + g2 * w[2]
        a2 = 1.0 - w[2] ** 2
        if a2 < 1e-9:  # axis along the rays: the caps (spheres) cover it
            return np.zeros(u.shape, bool), np.zeros(u.shape), np.zeros((3,) + u.shape)
        a1 = g2 - gw * w[2]
        a0 = g0 * g0 + g1 * g1 + g2 * g2 - gw * gw - self.r ** 2
        disc = a1 * a1 - a2 * a0
        s = (-a1 + np.sqrt(np.maximum(disc, 0.0))) / a2
        h = gw + s * w[2]
        hit = (disc >= 0) & (h >= 0) & (h <= length)
        n = np.stack([g0 - h * w[0], g1 - h * w[1], g2 + s - h * w[2]])
        return hit, s, n


class _Cone(_Primitive):
    """The side of a cone from a base disc (centre ``base``, radius r) to ``apex`` (no base cap)."""

    def __init__(self, part: int, base, apex, radius: float):
        self.part, self.base, self.apex, self.r = part, np.asarray(base, float), np.asarray(apex, float), float(radius)

    def bound(self):
        h = float(np.linalg.norm(self.apex - self.base))
        return (self.base + self.apex) / 2, float(np.hypot(h / 2, self.r))

    def moved(self, rot):
        return _Cone(self.part, rot @ self.base, rot @ self.apex, self.r)

    def hit(self, u, v):
        h = float(np.linalg.norm(self.apex - self.base))
        w = (self.apex - self.base) / h
        k2 = (self.r / h) ** 2
        g0, g1, g2 = u - self.base[0], v - self.base[1], -self.base[2]
        gw = g0 * w[0] + g1 * w[1] + g2 * w[2]
        a2 = 1.0 - w[2] ** 2 - k2 * w[2] ** 2
        a1 = g2 - gw * w[2] + k2 * (h - gw) * w[2]
        a0 = g0 * g0 + g1 * g1 + g2 * g2 - gw * gw - k2 * (h - gw) ** 2
        best = np.full(u.shape, -np.inf)
        if abs(a2) < 1e-9:
            with np.errstate(divide="ignore", invalid="ignore"):
                roots = [np.where(a1 != 0, -a0 / (2 * a1), np.nan)]
        else:
            disc = a1 * a1 - a2 * a0
            sq = np.sqrt(np.where(disc >= 0, disc, np.nan))
            roots = [(-a1 + sq) / a2, (-a1 - sq) / a2]
        for s in roots:
            hq = gw + s * w[2]
            ok = np.isfinite(s) & (hq >= 0) & (hq <= h)
            best = np.where(ok & (s > best), s, best)
        hit = np.isfinite(best)
        s = np.where(hit, best, 0.0)
        hq = gw + s * w[2]
        n = np.stack([g0 - hq * w[0] + k2 * (h - hq) * w[0],
                      g1 - hq * w[1] + k2 * (h - hq) * w[1],
                      g2 + s - hq * w[2] + k2 * (h - hq) * w[2]])
        n = np.where(n[2] < 0, -n, n)  # seen from inside (no base cap): face the viewer
        return hit, s, n


def _bezier(p0, p1, p2, t):
    t = np.asarray(t, float)[..., None]
    return (1 - t) ** 2 * p0 + 2 * t * (1 - t) * p1 + t ** 2 * p2


def _frame(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two unit vectors completing ``f`` to an orthonormal frame."""
    helper = np.array([0.0, 0.0, 1.0]) if abs(f[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    e1 = _unit(np.cross(helper, f))
    return e1, np.cross(f, e1)


@dataclass(frozen=True)
class _Scene:
    primitives: tuple[_Primitive, ...]
    light: np.ndarray  # unit vector towards the light, camera coordinates


def _flower(seed: int, geometry: str, part_scale: float = 1.0, scaled: frozenset = frozenset()) -> _Scene:
    """The flower in world coordinates (y up; the frame spans [-1, 1] on both image axes).

    The parts named in ``scaled`` (``"head"``, ``"stem"``, ``"ball"``, ``"thorn"``) are drawn
    ``part_scale`` times their default size (a factor 1.0 changes no number).
    """
    rng = np.random.default_rng([int(seed), 8])
    hs = part_scale if "head" in scaled else 1.0
    P = _P
    prims: list[_Primitive] = []

    # Stem: a gentle quadratic curve from below the frame up to the head, as a chain of capsules.
    s0, s1, s2 = np.array([0.02, -1.35, 0.0]), np.array([-0.14, -0.40, 0.06]), np.array([0.05, 0.22, 0.0])
    stem_r = 0.038 * (part_scale if "stem" in scaled else 1.0)
    ts = np.linspace(0, 1, 9)
    pts = _bezier(s0, s1, s2, ts)
    for a, b in zip(pts[:-1], pts[1:]):
        prims.append(_Cylinder(P["stem"], a, b, stem_r))
    for p in pts[1:]:
        prims.append(_sphere(P["stem"], p, stem_r))

    # Head: facing f, tilted 40 degrees from the vertical towards +x (and a little towards +z).
    tilt = np.deg2rad(40.0)
    f = _unit([np.sin(tilt), np.cos(tilt), 0.15])
    e1, e2 = _frame(f)
    hc = s2 + 0.06 * f  # centre of the disc
    prims.append(_Ellipsoid(P["stem"], s2 + 0.005 * f, np.column_stack([0.085 * e1, 0.085 * e2, 0.065 * f])))  # calyx
    prims.append(_Ellipsoid(P["disc"], hc + 0.012 * f,
                            np.column_stack([0.125 * hs * e1, 0.125 * hs * e2, 0.055 * f])))
    lengths = np.array([0.44, 0.36, 0.41, 0.31, 0.43, 0.34, 0.39, 0.29]) * (1 + 0.06 * rng.uniform(-1, 1, 8)) * hs
    widths = np.array([0.10, 0.09, 0.095, 0.085, 0.10, 0.09, 0.095, 0.085]) * hs
    cup = np.deg2rad(18.0)
    phase = rng.uniform(-0.08, 0.08)
    tips = []
    for i, (ln, wd) in enumerate(zip(lengths, widths)):
        phi = 2 * np.pi * i / len(lengths) + phase
        d = np.cos(phi) * e1 + np.sin(phi) * e2
        dp = np.cos(cup) * d + np.sin(cup) * f  # petals rise a little: a shallow cup
        side = _unit(np.cross(f, d))
        normal = _unit(np.cross(dp, side))
        start = 0.06 * hs
        centre = hc + dp * (start + ln / 2) - 0.01 * f
        prims.append(_Ellipsoid(P["petal"], centre, np.column_stack([dp * ln / 2, side * wd, normal * 0.016])))
        tips.append(hc + dp * (start + ln * 0.9) - 0.01 * f + normal * 0.012)

    # Leaves: two of different sizes on different sides of the stem, rising at different angles.
    for t, az, el, ln, wd in ((0.40, 200.0, 32.0, 0.55, 0.15), (0.24, 35.0, 22.0, 0.40, 0.12)):
        base = _bezier(s0, s1, s2, t)
        az = np.deg2rad(az + rng.uniform(-5, 5))
        el = np.deg2rad(el + rng.uniform(-4, 4))
        d = _unit([np.cos(az) * np.cos(el), np.sin(el), np.sin(az) * np.cos(el)])
        side = _unit(np.cross([0.0, 1.0, 0.0], d))
        normal = _unit(np.cross(d, side))
        # a leaf: a long flat ellipsoid, bent by a second, drooping one at its outer half
        prims.append(_Ellipsoid(P["leaf"], base + d * ln * 0.36, np.column_stack([d * ln * 0.38, side * wd, normal * 0.014])))
        d2 = _unit(d - 0.35 * normal)
        prims.append(_Ellipsoid(P["leaf"], base + d * ln * 0.62 + d2 * ln * 0.16,
                                np.column_stack([d2 * ln * 0.24, side * wd * 0.72, _unit(np.cross(d2, side)) * 0.012])))

    if geometry == "balls":
        bs = part_scale if "ball" in scaled else 1.0
        for i in (0, 2, 4, 6):
            prims.append(_sphere(P["ball"], tips[i], 0.05 * bs))
        prims.append(_sphere(P["ball"], hc + 0.07 * f + 0.03 * e1, 0.045 * bs))
    elif geometry == "thorns":
        for t, az, el in ((0.56, 10.0, 15.0), (0.64, 150.0, 25.0), (0.72, 275.0, 15.0),
                          (0.80, 55.0, 25.0), (0.88, 205.0, 20.0)):
            base = _bezier(s0, s1, s2, t)
            az, el = np.deg2rad(az), np.deg2rad(el)
            d = np.array([np.cos(az) * np.cos(el), np.sin(el), np.sin(az) * np.cos(el)])
            ts_ = part_scale if "thorn" in scaled else 1.0
            prims.append(_Cone(P["thorn"], base, base + 0.12 * ts_ * d, 0.032 * ts_))
    elif geometry != "base":
        raise ValueError(f"unknown geometry {geometry!r}")

    light = _unit([-0.45 + rng.uniform(-0.05, 0.05), 0.65 + rng.uniform(-0.05, 0.05), 0.62])
    return _Scene(tuple(prims), light)


def _camera(view: int) -> np.ndarray:
    """World -> camera rotation of viewpoint ``view``: turn the flower, then look 15 degrees down."""
    phi = 2 * np.pi * view / N_VIEWS
    c, s = np.cos(phi), np.sin(phi)
    ry = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    e = np.deg2rad(_ELEVATION_DEG)
    ce, se = np.cos(e), np.sin(e)
    rx = np.array([[1, 0, 0], [0, ce, -se], [0, se, ce]])
    return rx @ ry


def _render_view(scene: _Scene, view: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ray-cast one viewpoint on an ``n x n`` grid of rays covering [-1, 1]^2.

    Returns the part map (n, n) int8 (0 = background), the shading (n, n) float32 (ambient +
    Lambert, 0 on the background) and the depth (n, n) float64 (-inf on the background).
    """
    rot = _camera(view)
    depth = np.full((n, n), -np.inf)
    part = np.zeros((n, n), np.int8)
    shade = np.zeros((n, n), np.float32)
    step = 2.0 / n
    coords = -1 + (np.arange(n) + 0.5) * step  # ray centres, left to right
    for prim in scene.primitives:
        p = prim.moved(rot)
        c, r = p.bound()
        j0, j1 = max(0, int(np.floor((c[0] - r + 1) / step))), min(n, int(np.ceil((c[0] + r + 1) / step)) + 1)
        i0, i1 = max(0, int(np.floor((1 - c[1] - r) / step))), min(n, int(np.ceil((1 - c[1] + r) / step)) + 1)
        if j0 >= j1 or i0 >= i1:
            continue
        u = coords[None, j0:j1]
        v = -coords[i0:i1, None]
        u, v = np.broadcast_arrays(u, v)
        hit, z, nrm = p.hit(u, v)
        d = depth[i0:i1, j0:j1]
        upd = hit & (z > d)
        if not upd.any():
            continue
        nrm = nrm[:, upd]
        nrm = nrm / np.maximum(np.linalg.norm(nrm, axis=0), 1e-12)
        lam = scene.light @ nrm
        lam = np.abs(lam) if _PARTS[p.part] in _THIN else np.maximum(lam, 0.0)
        d[upd] = z[upd]
        part[i0:i1, j0:j1][upd] = p.part
        shade[i0:i1, j0:j1][upd] = (_AMBIENT + _DIFFUSE * lam + _FILL * np.maximum(nrm[2], 0.0)).astype(np.float32)
    return part, shade, depth


# --------------------------------------------------------------------------------------------
# Crops + rotations as precomputed bilinear gathers
# --------------------------------------------------------------------------------------------
def _crop_offsets(size: int) -> dict[str, tuple[int, int]]:
    m2 = 2 * _margin(size)
    return {"top-left": (0, 0), "top-right": (0, m2), "bottom-left": (m2, 0),
            "bottom-right": (m2, m2), "center": (m2 // 2, m2 // 2)}  # (row, col) of the crop's corner


def _rotation_gather(size: int, rsize: int, offset: tuple[int, int], angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear gather of a ``size`` crop at ``offset`` of an ``rsize`` image, rotated by ``angle``.

    The content turns counter-clockwise by ``angle`` degrees about the crop's centre. Returns
    ``idx`` (4, size*size) int64 into the flattened image with one extra element appended (the
    fill, used for points outside the crop) and ``w`` (4, size*size) float32 weights.
    """
    c = (size - 1) / 2.0
    ii, jj = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64), indexing="ij")
    dx, dy = jj - c, ii - c
    th = np.deg2rad(angle)
    sx = np.cos(th) * dx - np.sin(th) * dy + c
    sy = np.sin(th) * dx + np.cos(th) * dy + c
    x0, y0 = np.floor(sx), np.floor(sy)
    fx, fy = sx - x0, sy - y0
    idx, w = [], []
    for oy, ox, wt in ((0, 0, (1 - fx) * (1 - fy)), (0, 1, fx * (1 - fy)), (1, 0, (1 - fx) * fy), (1, 1, fx * fy)):
        x, y = x0 + ox, y0 + oy
        inside = (x >= 0) & (x < size) & (y >= 0) & (y < size)
        flat = (y + offset[0]) * rsize + (x + offset[1])
        idx.append(np.where(inside, flat, rsize * rsize).astype(np.int64).ravel())
        w.append(wt.astype(np.float32).ravel())
    return np.stack(idx), np.stack(w)


@functools.lru_cache(maxsize=2)
def _transform_matrix(size: int) -> sparse.csr_matrix:
    """The 25 (crop, angle) bilinear gathers as one sparse matrix (25*S*S, R*R + 1), float32.

    Row ``k*S*S + p`` holds the non-zero weights of output pixel ``p`` of item ``k`` (items over
    CROPS, then ANGLES); the last column is the fill (points outside the crop).
    """
    rsize = render_size(size)
    offs = _crop_offsets(size)
    idx, w = zip(*(_rotation_gather(size, rsize, offs[c], a) for c in CROPS for a in ANGLES))
    idx, w = np.stack(idx), np.stack(w)  # (25, 4, S*S)
    rows = np.broadcast_to(np.arange(len(idx))[:, None, None] * size * size + np.arange(size * size), idx.shape)
    keep = w > 0  # a zero weight is no contribution: it must not switch a mask pixel on
    mat = sparse.coo_matrix((w[keep], (rows[keep], idx[keep])), shape=(len(idx) * size * size, rsize * rsize + 1))
    mat = mat.tocsr()
    mat.sum_duplicates()
    mat.sort_indices()
    return mat


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _pixel_keys(rsize: int, ss: int) -> np.ndarray:
    """For every ray of the supersampled grid (row-major), ``len(_PARTS) *`` its render pixel."""
    pix = np.arange(rsize)[:, None, None, None] * rsize + np.arange(rsize)[None, None, :, None]
    keys = np.broadcast_to(pix * len(_PARTS), (rsize, ss, rsize, ss)).ravel().astype(np.int64)
    keys.flags.writeable = False
    return keys


def _view_maps(scene: _Scene, view: int, size: int, fixed: list[int], varying: list[int],
               mask_parts: list[int], transform: sparse.csr_matrix, background: bool = False):
    """One view after the 25 crops/rotations, split into what the classes share and what not.

    Returns
    * ``base`` (3, 25*S*S) float32: the colour, in 0..255 plus 0.5 (for rounding by truncation),
      of the background and the parts in ``fixed`` (whose colour no class changes), composed at
      render resolution and then transformed;
    * ``{part: (25*S*S,) float32}`` for the parts in ``varying``: the mean over a pixel's rays of
      shade * [ray hits the part], transformed;
    * ``{part: (25*S*S,) bool}`` for ``mask_parts``: some render pixel with a ray on the part
      enters the output pixel with a non-zero weight (the weights are positive, so the
      transformed 0/1 map is > 0 exactly there);
    * with ``background``, a fourth output: (25*S*S,) float32, the fraction of each output
      pixel that shows the background (1 outside the crop), where overlays may be drawn.

    Every channel goes through the same sparse matrix-vector product on its own, so equal
    inputs give equal outputs bit for bit, whatever the channel.
    """
    rsize = render_size(size)
    ss = SUPERSAMPLE
    npx = rsize * rsize
    part, shade, _ = _render_view(scene, view, rsize * ss)
    # ray -> render pixel, then one weighted bincount gives every (pixel, part) sum at once;
    # each sum runs over the pixel's own rays in a fixed order
    flat_part = part.ravel().astype(np.int64)
    key = _pixel_keys(rsize, ss) + flat_part
    weight = np.where(flat_part == 0, np.float32(1), shade.ravel())
    sums = np.bincount(key, weights=weight, minlength=npx * len(_PARTS)).reshape(npx, len(_PARTS))
    cover = (sums / (ss * ss)).astype(np.float32)
    base = np.zeros((3, npx + 1), np.float32)
    for p in [0, *fixed]:
        rgb = np.asarray(_BACKGROUND if p == 0 else _DEFAULT_ALBEDO[_PARTS[p]], np.float32) * np.float32(255)
        for ch in range(3):
            base[ch, :npx] += cover[:, p] * rgb[ch]
    base[:, npx] = np.asarray(_BACKGROUND, np.float32) * np.float32(255)  # fill: background outside the crop
    base_out = np.stack([transform @ base[ch] for ch in range(3)]) + np.float32(0.5)
    col = np.zeros(npx + 1, np.float32)
    shading = {}
    for p in varying:
        col[:npx] = cover[:, p]
        shading[p] = transform @ col
    masks = {}
    for p in mask_parts:
        col[:npx] = sums[:, p] > 0  # a hit's shade is >= _AMBIENT > 0
        masks[p] = (transform @ col) > 0
    if background:
        col[:npx], col[npx] = cover[:, 0], 1.0
        return base_out.astype(np.float32), shading, masks, np.clip(transform @ col, 0.0, 1.0)
    return base_out.astype(np.float32), shading, masks


def _compose(spec: ClassSpec, base: np.ndarray, shading: dict, varying: list[int], size: int) -> np.ndarray:
    """uint8 images (25, S, S, 3) of one class: the base plus the parts whose colour changes.

    Every class adds the same parts in the same order, so a pixel that none of these parts
    reaches (all their shading values 0) gets exactly the base value in every class.
    """
    img = base.copy()
    tmp = np.empty_like(img[0])
    for p in varying:
        name = _PARTS[p]
        rgb = np.asarray(spec.albedo.get(name, _DEFAULT_ALBEDO[name]), np.float32) * np.float32(255)
        for ch in range(3):
            np.multiply(shading[p], rgb[ch], out=tmp)
            img[ch] += tmp
    out = img.astype(np.uint8)  # truncation of x + 0.5: rounding (ambient + diffuse <= 1: x < 256)
    return np.ascontiguousarray(out.reshape(3, -1, size, size).transpose(1, 2, 3, 0))



_LIGHT_2D = _unit([-0.45, 0.65, 0.62])  # the key light of the overlays (x right, y up, z to the viewer)
_DISTRACTOR_RADIUS = 0.09  # of the image side
_DISTRACTOR_TRIES = 12


def _ball(size: int, cy: float, cx: float, r: float):
    """One shaded ball (centre (cy, cx), radius r, in pixels) on the window of the image it can
    reach: ``(rows, cols, cover, shade)`` -- the window's slices, the anti-aliased coverage in
    [0, 1] (the disc's area in each pixel, to half a pixel) and the Lambert shading."""
    t, b = max(int(np.floor(cy - r - 1)), 0), min(int(np.ceil(cy + r + 2)), size)
    l, rr = max(int(np.floor(cx - r - 1)), 0), min(int(np.ceil(cx + r + 2)), size)
    dy = np.arange(t, b, dtype=np.float64)[:, None] - cy
    dx = np.arange(l, rr, dtype=np.float64)[None, :] - cx
    d = np.hypot(dx, dy)
    cover = np.clip(r + 0.5 - d, 0.0, 1.0)
    nx, ny = np.clip(dx / r, -1, 1), np.clip(-dy / r, -1, 1)
    nz = np.sqrt(np.clip(1.0 - nx ** 2 - ny ** 2, 0.0, 1.0))
    lam = np.maximum(_LIGHT_2D[0] * nx + _LIGHT_2D[1] * ny + _LIGHT_2D[2] * nz, 0.0)
    return slice(t, b), slice(l, rr), cover, _AMBIENT + _DIFFUSE * lam + _FILL * nz


def _paint(image: np.ndarray, rows: slice, cols: slice, alpha: np.ndarray, shade: np.ndarray, rgb) -> None:
    """Blend a ball of colour ``rgb`` into the window of uint8 ``image`` (..., S, S, 3) in place
    (every leading index alike); ``alpha`` already holds the background fraction (the ball is
    behind the flower). Pixels with alpha 0 are left untouched, bit for bit."""
    on = alpha > 0
    if not on.any():
        return
    win = image[..., rows, cols, :]
    a = alpha[on][:, None]
    col = shade[on][:, None] * np.asarray(rgb, np.float64)[None, :] * 255.0
    win[..., on, :] = np.clip(np.rint(win[..., on, :] * (1 - a) + col * a), 0, 255).astype(np.uint8)


def _clutter(seed: int, view: int, size: int, n: int, bg: np.ndarray, images: dict) -> None:
    """``n`` neutral balls behind the flower of every item of ``view``: the same positions, sizes
    and colours for every class (drawn in place into each class's images)."""
    rng = np.random.default_rng([int(seed), 28, int(view)])
    items = bg.shape[0]
    stack = np.stack(list(images.values()), axis=1)  # (25, classes, S, S, 3): one paint for all classes
    for _ in range(n):
        radii = rng.uniform(0.03, 0.10, items) * size
        centres = rng.uniform(0, size, (items, 2))
        grey = rng.uniform(0.35, 0.75, (items, 1))
        rgb = np.clip(grey + rng.uniform(-0.05, 0.05, (items, 3)), 0, 1)  # saturation <= ~0.3
        for k in range(items):
            rows, cols, cover, shade = _ball(size, centres[k, 0], centres[k, 1], radii[k])
            _paint(stack[k], rows, cols, cover * bg[k, rows, cols], shade, rgb[k])
    for i, imgs in enumerate(images.values()):
        imgs[...] = stack[:, i]


def _distractors(seed: int, view: int, label: int, size: int, rate: float, bg: np.ndarray,
                 images: np.ndarray, rgb: tuple) -> np.ndarray:
    """Paint, into a ``rate`` share of the 25 items of (``view``, ``label``), one ball of the
    colour ``rgb`` behind the flower, where it shows most (of a few random places, the one with the
    most background in the ball's bounding square).
    Returns the distractors' masks (25, S, S) bool (False on items without one)."""
    rng = np.random.default_rng([int(seed), 27, int(view), int(label)])
    items = bg.shape[0]
    has = rng.uniform(size=items) < rate
    r = _DISTRACTOR_RADIUS * size
    cands = rng.uniform(r, size - r, (items, _DISTRACTOR_TRIES, 2))
    masks = np.zeros(bg.shape, bool)
    # score each place by the background in the ball's bounding square (a summed-area table)
    sat = np.zeros((items, size + 1, size + 1))
    sat[:, 1:, 1:] = bg.cumsum(axis=1).cumsum(axis=2)
    lo = np.clip(np.floor(cands - r).astype(np.int64), 0, size)
    hi = np.clip(np.ceil(cands + r).astype(np.int64) + 1, 0, size)
    for k in np.flatnonzero(has):
        t, l, b, rr = lo[k, :, 0], lo[k, :, 1], hi[k, :, 0], hi[k, :, 1]
        score = sat[k, b, rr] - sat[k, t, rr] - sat[k, b, l] + sat[k, t, l]
        cy, cx = cands[k, int(np.argmax(score))]
        rows, cols, cover, shade = _ball(size, cy, cx, r)
        alpha = cover * bg[k, rows, cols]
        _paint(images[k], rows, cols, alpha, shade, rgb)
        masks[k, rows, cols] = alpha > 0
    return masks


_SCALED = {"petal": "head", "disc": "head", "stem": "stem", "ball": "ball", "thorn": "thorn"}


def geometries(specs: list[ClassSpec]) -> list[str]:
    out: list[str] = []
    for s in specs:
        if s.geometry not in out:
            out.append(s.geometry)
    return out


def iter_views(variant: str, size: int, seed: int, views: Sequence[int] | None = None, *,
               knobs: Knobs | None = None, counterfactual: int = 0, distractors: bool = False):
    """Render ``variant`` view by view, geometry by geometry (each geometry's scene built once).

    Yields ``(view, images, masks)``: ``images`` maps each label drawn on the current geometry to
    uint8 (25, S, S, 3); ``masks`` maps each of those labels' regions (``"head"``, ``"stem"``,
    ``"balls"``, ``"thorns"``) to bool (25, S, S) -- one array shared by every class of that
    region. The 25 items run over :data:`CROPS` (outer) and :data:`ANGLES` (inner).

    ``knobs`` (:class:`Knobs`) sets the difficulty. With ``counterfactual`` = shift > 0 the
    images of each label show the attribute (part colour) of
    ``counterfactual_label(variant, label, shift)`` and are otherwise the label's own items:
    same scene, crop, rotation, clutter and distractor (in the label's own colour), mask of
    the label's own part. With ``distractors`` a fourth element maps each label to its
    distractors' masks (25, S, S) bool.
    """
    knobs = check_knobs(knobs)
    shift = check_counterfactual(variant, counterfactual)
    specs = class_specs(variant)
    transform = _transform_matrix(size)
    views = range(N_VIEWS) if views is None else views
    scaled = frozenset(_SCALED[n] for s in specs for n in s.mask_parts)
    for geom in geometries(specs):
        scene = _flower(seed, geom, knobs.part_scale, scaled)
        members = [(label, s) for label, s in enumerate(specs) if s.geometry == geom]
        parts = sorted({0, *(_P[n] for n in ("stem", "leaf", "petal", "disc"))}
                       | ({_P["ball"]} if geom == "balls" else set())
                       | ({_P["thorn"]} if geom == "thorns" else set()))
        mask_parts = sorted({_P[n] for _, s in members for n in s.mask_parts})
        varying = sorted({_P[n] for _, s in members for n in s.albedo})
        fixed = [p for p in parts if p not in varying and p != 0]
        regions = {s.region: s.mask_parts for _, s in members}
        for view in views:
            maps = _view_maps(scene, int(view), size, fixed, varying, mask_parts, transform, knobs.overlays)
            base, shading, pmasks = maps[:3]
            masks = {}
            for region, region_parts in regions.items():
                mask = np.zeros(len(CROPS) * len(ANGLES) * size * size, bool)
                for n in region_parts:
                    mask |= pmasks[_P[n]]
                masks[region] = mask.reshape(-1, size, size)
            images = {label: _compose(specs[counterfactual_label(variant, label, shift)] if shift else spec,
                                      base, shading, varying, size) for label, spec in members}
            dmasks = {label: np.zeros((len(CROPS) * len(ANGLES), size, size), bool) for label, _ in members}
            if knobs.overlays:
                bg = maps[3].reshape(-1, size, size)
                _clutter(seed, int(view), size, knobs.clutter, bg, images)
                if knobs.distractor_rate > 0:
                    # never on a pixel of a class mask (not even a mixed one at its border)
                    free = bg * ~np.logical_or.reduce(list(masks.values()))
                    for label, spec in members:
                        dmasks[label] = _distractors(seed, int(view), label, size, knobs.distractor_rate, free,
                                                     images[label], attribute_colour(spec))
            yield (int(view), images, masks, dmasks) if distractors else (int(view), images, masks)


def render_view(variant: str = "single-6c", view: int = 0, size: int = 128, seed: int = 0, *,
                knobs: Knobs | dict | None = None, counterfactual: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The 25 items of one viewpoint of every class, in memory (nothing is written).

    Returns ``images`` uint8 (C, 25, size, size, 3) and ``masks`` bool (C, 25, size, size),
    C classes in label order, the 25 items over :data:`CROPS` (outer) and :data:`ANGLES`
    (inner) -- exactly the pixels :class:`An8Flower` stores for those items (with the same
    ``knobs`` and ``counterfactual``, see :func:`iter_views`).
    """
    variant, size, seed = check_variant(variant), check_size(size), check_seed(seed)
    knobs, counterfactual = check_knobs(knobs), check_counterfactual(variant, counterfactual)
    if not isinstance(view, (int, np.integer)) or isinstance(view, bool) or not 0 <= view < N_VIEWS:
        raise ValueError(f"view: expected an int in 0..{N_VIEWS - 1}, got {describe(view)}")
    specs = class_specs(variant)
    images = np.empty((len(specs), len(CROPS) * len(ANGLES), size, size, 3), np.uint8)
    masks = np.empty(images.shape[:4], bool)
    for _, imgs, regs in iter_views(variant, size, seed, views=[view], knobs=knobs, counterfactual=counterfactual):
        for label, arr in imgs.items():
            images[label] = arr
            masks[label] = regs[specs[label].region]
    return images, masks

