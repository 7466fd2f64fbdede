"""The SynthCity painter: one procedurally drawn street scene, image and labels together.

Each image is a perspective street: sky, a road converging to a vanishing point,
sidewalks, building facades (with windows) or parks on both sides, then objects sorted
far-to-near: trees, walls, fences, poles carrying traffic lights and signs, people,
riders on bicycles and motorcycles, parked bicycles, cars, trucks, buses and the odd
train. Void regions carry Cityscapes void ids (ego vehicle 1 at the bottom,
rectification border 2, unlabeled patches 0, static objects 4), which map to 255.

Difficulty knobs (all in :class:`SynthCityParams`, so calibration is a config change):
``colour_overlap`` (0 = each class its own colour, 1 = colours independent of class),
``colour_spread``, ``texture``, ``noise_std``, ``blur_sigma``, ``lighting_range``,
``shadow_prob`` and the object counts. Rare classes are rare because they are few, thin
or small, as in Cityscapes.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

from seg.data.labels import CITYSCAPES_NAME_TO_ID as ID
from seg.data.synthcity.params import SynthCityParams

# Mean colour of each drawn class (RGB), before colour_overlap mixes in random colours.
BASE_COLOURS: dict[int, tuple[int, int, int]] = {
    ID["road"]: (88, 86, 92),
    ID["sidewalk"]: (150, 138, 132),
    ID["building"]: (122, 104, 92),
    ID["wall"]: (158, 148, 124),
    ID["fence"]: (112, 100, 78),
    ID["pole"]: (104, 104, 110),
    ID["traffic light"]: (48, 46, 40),
    ID["traffic sign"]: (196, 176, 60),
    ID["vegetation"]: (62, 102, 42),
    ID["terrain"]: (118, 134, 66),
    ID["sky"]: (150, 182, 216),
    ID["person"]: (128, 64, 80),
    ID["rider"]: (140, 70, 60),
    ID["car"]: (64, 76, 116),
    ID["truck"]: (176, 178, 168),
    ID["bus"]: (196, 164, 56),
    ID["train"]: (168, 170, 182),
    ID["motorcycle"]: (70, 56, 60),
    ID["bicycle"]: (84, 60, 70),
    ID["ego vehicle"]: (34, 34, 40),
    ID["rectification border"]: (8, 8, 8),
    ID["unlabeled"]: (128, 128, 128),
    ID["static"]: (110, 118, 96),
    ID["rail track"]: (96, 84, 74),
}

# Texture amplitude per label id (0-255 units, scaled by ``texture``): (blotches, grain).
TEXTURE_AMPLITUDE: dict[int, tuple[float, float]] = {
    ID["road"]: (12, 7),
    ID["sidewalk"]: (9, 9),
    ID["building"]: (14, 6),
    ID["wall"]: (10, 7),
    ID["fence"]: (6, 6),
    ID["vegetation"]: (24, 26),
    ID["terrain"]: (16, 20),
    ID["sky"]: (8, 1),
    ID["person"]: (6, 4),
    ID["rider"]: (6, 4),
    ID["car"]: (5, 3),
    ID["truck"]: (7, 3),
    ID["bus"]: (6, 3),
    ID["train"]: (7, 3),
    ID["unlabeled"]: (12, 12),
    ID["static"]: (10, 10),
    ID["rail track"]: (10, 12),
}


class _Scene:
    """Image (uint8 RGB) and label (uint8 ids) drawn together with one perspective camera.

    Ground point at lateral offset ``u`` (road edges at u = +-road), depth
    ``s`` (1 = bottom row, -> 0 at the horizon) and height ``h`` (same unit) lands at
    ``x = xv + u s K``, ``y = yh + s (H - yh) - h s K`` with ``K`` pixels per unit at the
    bottom row (one unit is about 4 m).
    """

    def __init__(self, params: SynthCityParams, rng: np.random.Generator) -> None:
        self.p, self.rng = params, rng
        self.h, self.w = params.height, params.width
        self.image = np.zeros((self.h, self.w, 3), np.uint8)
        self.label = np.zeros((self.h, self.w), np.uint8)
        self.yh = self.h * rng.uniform(0.36, 0.47)
        self.xv = self.w * rng.uniform(0.38, 0.62)
        self.k = self.w * rng.uniform(0.3, 0.4)
        self.road = rng.uniform(1.4, 2.3)  # road half-width (units of K at the bottom row)
        self.sidewalk = rng.uniform(0.3, 0.6)  # sidewalk width
        self.kerb = self.road + self.sidewalk  # outer sidewalk edge
        # A grass verge (terrain) between sidewalk and buildings on some streets.
        self.facade = self.kerb + (rng.uniform(0.1, 0.6) if rng.random() < 0.4 else 0.0)
        self.px = self.w / 256.0  # pixel scale for fixed-size details

    # --- geometry
    def at(self, u: float, s: float, h: float = 0.0) -> tuple[float, float]:
        return self.xv + u * s * self.k, self.yh + s * (self.h - self.yh) - h * s * self.k

    def size(self, length: float, s: float, minimum: float = 1.0) -> int:
        """Pixel size of a world ``length`` at depth ``s`` (at least ``minimum`` px)."""
        return max(int(np.rint(minimum)), int(np.rint(length * s * self.k)))

    # --- colours
    def colour(self, label_id: int, base: tuple[int, int, int] | None = None) -> tuple:
        base_rgb = np.asarray(base if base is not None else BASE_COLOURS[label_id], np.float64)
        other = self.rng.uniform(30, 230, 3)
        mixed = (1 - self.p.colour_overlap) * base_rgb + self.p.colour_overlap * other
        mixed += self.rng.normal(0.0, self.p.colour_spread, 3)
        return tuple(int(v) for v in np.clip(mixed, 0, 255))

    @staticmethod
    def shade(colour: tuple, factor: float) -> tuple:
        return tuple(int(min(255, max(0, c * factor))) for c in colour)

    # --- primitives (image and label together; label_id None paints the image only)
    def poly(self, points, label_id: int | None, colour: tuple) -> None:
        pts = [np.round(np.asarray(p, np.float64)).astype(np.int32) for p in points]
        cv2.fillPoly(self.image, pts, colour)
        if label_id is not None:
            cv2.fillPoly(self.label, pts, int(label_id))

    def ellipse(self, centre, axes, label_id: int | None, colour: tuple, thickness=-1) -> None:
        c = (int(np.rint(centre[0])), int(np.rint(centre[1])))
        a = (max(1, int(np.rint(axes[0]))), max(1, int(np.rint(axes[1]))))
        cv2.ellipse(self.image, c, a, 0, 0, 360, colour, thickness)
        if label_id is not None:
            cv2.ellipse(self.label, c, a, 0, 0, 360, int(label_id), thickness)

    def line(self, p0, p1, label_id: int | None, colour: tuple, thickness: int) -> None:
        a = (int(np.rint(p0[0])), int(np.rint(p0[1])))
        b = (int(np.rint(p1[0])), int(np.rint(p1[1])))
        cv2.line(self.image, a, b, colour, max(1, thickness))
        if label_id is not None:
            cv2.line(self.label, a, b, int(label_id), max(1, thickness))

    def rect(self, x0, y0, x1, y1, label_id: int | None, colour: tuple) -> None:
        self.poly([[(x0, y0), (x1, y0), (x1, y1), (x0, y1)]], label_id, colour)


def _count(rng: np.random.Generator, bounds: tuple[int, int]) -> int:
    return int(rng.integers(bounds[0], bounds[1] + 1))


def _draw_background(sc: _Scene) -> None:
    """Sky, terrain ground, road with lane marks, sidewalks with kerbs."""
    rng, s_far, s_near = sc.rng, 0.0, 3.0
    sc.rect(0, 0, sc.w, sc.yh + 1, ID["sky"], sc.colour(ID["sky"]))
    sc.rect(0, sc.yh, sc.w, sc.h, ID["terrain"], sc.colour(ID["terrain"]))
    road = sc.colour(ID["road"])
    r = sc.road
    sc.poly(
        [[sc.at(-r, s_far), sc.at(r, s_far), sc.at(r, s_near), sc.at(-r, s_near)]], ID["road"], road
    )
    sidewalk = sc.colour(ID["sidewalk"])
    outer = sc.kerb
    for side in (-1, 1):
        quad = [
            sc.at(side * r, s_far),
            sc.at(side * outer, s_far),
            sc.at(side * outer, s_near),
            sc.at(side * r, s_near),
        ]
        sc.poly([quad], ID["sidewalk"], sidewalk)
        kerb = sc.shade(sidewalk, rng.uniform(0.75, 1.2))
        sc.line(
            sc.at(side * r, 0.02), sc.at(side * r, s_near), ID["sidewalk"], kerb, sc.size(0.03, 1.0)
        )
    # Dashed centre line: painted road.
    mark = sc.shade((220, 220, 210), rng.uniform(0.6, 1.0))
    u = rng.uniform(-0.15, 0.15)
    s = 0.04
    while s < 1.6:
        s_end = s * 1.35
        sc.line(sc.at(u, s), sc.at(u, s_end), ID["road"], mark, sc.size(0.025, s_end))
        s = s_end * 1.3


def _facade_windows(
    sc: _Scene, side: int, u: float, s0: float, s1: float, height: float, colour
) -> None:
    """Window grid on a facade between depths s0 < s1 (building label, darker or brighter)."""
    rng = sc.rng
    rows = int(rng.integers(2, 6))
    cols = int(rng.integers(2, 6))
    window = sc.shade(colour, rng.choice([rng.uniform(0.35, 0.7), rng.uniform(1.2, 1.6)]))
    polys = []
    for c in range(cols):
        a = s0 + (s1 - s0) * (c + 0.25) / cols
        b = s0 + (s1 - s0) * (c + 0.75) / cols
        for r in range(rows):
            h0 = height * (r + 0.3) / (rows + 0.3)
            h1 = height * (r + 0.8) / (rows + 0.3)
            polys.append(
                [
                    sc.at(side * u, a, h0),
                    sc.at(side * u, b, h0),
                    sc.at(side * u, b, h1),
                    sc.at(side * u, a, h1),
                ]
            )
    sc.poly(polys, ID["building"], window)


def _draw_side(sc: _Scene, side: int) -> None:
    """Buildings (facade quads with windows) or a park (terrain and a vegetation wall)."""
    rng = sc.rng
    u = sc.facade
    if rng.random() < sc.p.park_prob:
        u_park = u + rng.uniform(0.0, 0.6)
        green = sc.colour(ID["vegetation"])
        height = rng.uniform(1.0, 3.0)
        sc.poly(
            [
                [
                    sc.at(side * u_park, 0.02, 0),
                    sc.at(side * u_park, 3.0, 0),
                    sc.at(side * u_park, 3.0, height),
                    sc.at(side * u_park, 0.02, height),
                ]
            ],
            ID["vegetation"],
            green,
        )
        # Bumpy crown line.
        for s in np.geomspace(0.04, 2.0, 7):
            sc.ellipse(
                sc.at(side * u_park, s, height),
                (0.5 * s * sc.k, 0.3 * s * sc.k),
                ID["vegetation"],
                sc.shade(green, rng.uniform(0.8, 1.2)),
            )
        return
    s = rng.uniform(0.02, 0.06)
    while s < 3.0:
        s_next = s * rng.uniform(1.5, 2.6)
        height = rng.uniform(1.5, 5.0)
        colour = sc.colour(ID["building"])
        quad = [
            sc.at(side * u, s, 0),
            sc.at(side * u, s_next, 0),
            sc.at(side * u, s_next, height),
            sc.at(side * u, s, height),
        ]
        sc.poly([quad], ID["building"], colour)
        _facade_windows(sc, side, u, s, s_next, height, colour)
        s = s_next
    # Street end: a facade across the road far away, or open sky.
    if side == 1 and rng.random() < 0.8:
        s_end = rng.uniform(0.02, 0.05)
        height = rng.uniform(2.0, 7.0)
        sc.poly(
            [
                [
                    sc.at(-u, s_end, 0),
                    sc.at(u, s_end, 0),
                    sc.at(u, s_end, height),
                    sc.at(-u, s_end, height),
                ]
            ],
            ID["building"],
            sc.colour(ID["building"]),
        )


Drawer = Callable[[], None]


def _tree(sc: _Scene, side: int) -> tuple[float, Drawer]:
    rng = sc.rng
    s = rng.uniform(0.08, 1.3)
    u = side * (sc.road + sc.sidewalk * rng.uniform(0.5, 1.1))
    height = rng.uniform(1.2, 2.6)
    crown = rng.uniform(0.35, 0.8)

    def draw() -> None:
        green = sc.colour(ID["vegetation"])
        trunk = sc.shade(sc.colour(ID["vegetation"], (90, 70, 50)), 1.0)
        sc.line(sc.at(u, s, 0), sc.at(u, s, height), ID["vegetation"], trunk, sc.size(0.07, s))
        for _ in range(int(rng.integers(3, 7))):
            du, dh = rng.normal(0, crown * 0.5), rng.normal(0, crown * 0.4)
            centre = sc.at(u + du, s, height + dh)
            axes = (
                crown * rng.uniform(0.4, 0.8) * s * sc.k,
                crown * rng.uniform(0.4, 0.8) * s * sc.k,
            )
            sc.ellipse(centre, axes, ID["vegetation"], sc.shade(green, rng.uniform(0.75, 1.25)))

    return s, draw


def _wall_or_fence(sc: _Scene, side: int, label_id: int) -> tuple[float, Drawer]:
    rng = sc.rng
    s0 = rng.uniform(0.05, 0.8)
    s1 = s0 * rng.uniform(1.3, 2.5)
    u = side * (sc.road + sc.sidewalk * rng.uniform(0.85, 1.0))
    height = rng.uniform(0.2, 0.5) if label_id == ID["wall"] else rng.uniform(0.25, 0.45)

    def draw() -> None:
        colour = sc.colour(label_id)
        if label_id == ID["wall"]:
            quad = [sc.at(u, s0), sc.at(u, s1), sc.at(u, s1, height), sc.at(u, s0, height)]
            sc.poly([quad], label_id, colour)
            return
        # Fence: rails and posts (see-through lattice, thin).
        thick = max(1, int(np.rint(sc.px)))
        for h in (height, height * 0.5):
            sc.line(sc.at(u, s0, h), sc.at(u, s1, h), label_id, colour, thick)
        for s in np.geomspace(s0, s1, int(rng.integers(4, 10))):
            sc.line(sc.at(u, s, 0), sc.at(u, s, height), label_id, colour, sc.size(0.02, s))

    return (s0 + s1) / 2, draw


def _sign(sc: _Scene, centre: tuple[float, float], radius: float) -> None:
    rng = sc.rng
    base = [(196, 40, 40), (40, 80, 176), (210, 190, 40), (230, 230, 230)][int(rng.integers(4))]
    colour = sc.colour(ID["traffic sign"], base)
    shape = int(rng.integers(3))
    x, y = centre
    r = max(1.0, radius)
    if shape == 0:
        sc.ellipse((x, y), (r, r), ID["traffic sign"], colour)
    elif shape == 1:
        sc.poly([[(x - r, y + r), (x + r, y + r), (x, y - r)]], ID["traffic sign"], colour)
    else:
        sc.rect(x - r, y - 0.8 * r, x + r, y + 0.8 * r, ID["traffic sign"], colour)


def _pole(sc: _Scene, side: int, standalone_sign: bool = False) -> tuple[float, Drawer]:
    rng = sc.rng
    s = rng.uniform(0.06, 1.0)
    u = side * (sc.road + sc.sidewalk * rng.uniform(0.05, 0.3))
    height = rng.uniform(0.5, 0.8) if standalone_sign else rng.uniform(1.0, 1.8)
    top = "sign" if standalone_sign else rng.choice(["light", "sign", "none", "light"])

    def draw() -> None:
        colour = sc.colour(ID["pole"])
        sc.line(sc.at(u, s, 0), sc.at(u, s, height), ID["pole"], colour, sc.size(0.025, s))
        x, y = sc.at(u, s, height)
        if top == "light":
            w, h = sc.size(0.09, s, 1), sc.size(0.26, s, 2)
            x = x - side * w  # hangs towards the road
            sc.rect(
                x - w / 2, y, x + w / 2, y + h, ID["traffic light"], sc.colour(ID["traffic light"])
            )
            lamp = [(230, 40, 30), (240, 180, 20), (40, 220, 90)][int(rng.integers(3))]
            sc.ellipse(
                (x, y + h * rng.choice([0.2, 0.5, 0.8])),
                (w * 0.3, w * 0.3),
                ID["traffic light"],
                lamp,
            )
        elif top == "sign":
            r = 0.09 * s * sc.k
            _sign(sc, (x, y + r), r)

    return s, draw


def _person(sc: _Scene, u: float, s: float, label_id: int, height: float = 0.45) -> None:
    """A standing figure: legs, torso, arms, head (all ``label_id``)."""
    rng = sc.rng
    clothes = sc.colour(label_id)
    trousers = sc.colour(label_id, (50, 52, 70))
    skin = sc.colour(label_id, (200, 160, 130))
    leg = sc.size(0.035, s)
    hip = height * 0.47
    for du in (-0.03, 0.03):
        sc.line(sc.at(u + du, s, 0), sc.at(u + du * 0.5, s, hip), label_id, trousers, leg)
    w = 0.06
    sc.poly(
        [
            [
                sc.at(u - w, s, hip),
                sc.at(u + w, s, hip),
                sc.at(u + w * 1.1, s, height * 0.82),
                sc.at(u - w * 1.1, s, height * 0.82),
            ]
        ],
        label_id,
        clothes,
    )
    arm = rng.uniform(-0.05, 0.05)
    for side in (-1, 1):
        sc.line(
            sc.at(u + side * w * 1.1, s, height * 0.8),
            sc.at(u + side * (w * 1.4) + arm, s, height * 0.5),
            label_id,
            clothes,
            sc.size(0.025, s),
        )
    r = 0.045 * s * sc.k
    sc.ellipse(sc.at(u, s, height * 0.9), (r * 0.85, r), label_id, skin)


def _bicycle(sc: _Scene, u: float, s: float, label_id: int, motor: bool) -> None:
    """Two wheels and a frame; a motorcycle has filled wheels and a body."""
    colour = sc.colour(label_id)
    wheel_r = (0.1 if motor else 0.11) * s * sc.k
    span = 0.2 if motor else 0.18
    rear, front = sc.at(u - span, s, 0.1), sc.at(u + span, s, 0.1)
    thick = -1 if motor else max(1, int(np.rint(wheel_r * 0.25)))
    tyre = sc.colour(label_id, (30, 30, 30))
    for c in (rear, front):
        sc.ellipse(c, (wheel_r, wheel_r), label_id, tyre, thick)
    seat = sc.at(u - span * 0.3, s, 0.28)
    bar = sc.at(u + span * 0.8, s, 0.32)
    frame = sc.size(0.02, s)
    if motor:
        sc.poly(
            [[rear, sc.at(u - span * 0.5, s, 0.3), sc.at(u + span * 0.6, s, 0.3), front]],
            label_id,
            colour,
        )
    else:
        for a, b in (
            (rear, seat),
            (seat, front),
            (seat, bar),
            (bar, front),
            (rear, sc.at(u, s, 0.1)),
        ):
            sc.line(a, b, label_id, colour, frame)


def _rider(sc: _Scene, side_of_road: float) -> tuple[float, Drawer]:
    rng = sc.rng
    s = rng.uniform(0.12, 1.0)
    u = side_of_road * sc.road * rng.uniform(0.5, 0.95)
    motor = rng.random() < 0.4

    def draw() -> None:
        _bicycle(sc, u, s, ID["motorcycle"] if motor else ID["bicycle"], motor)
        label = ID["rider"]
        clothes = sc.colour(label)
        hip = sc.at(u - 0.05, s, 0.3)
        shoulder = sc.at(u + 0.02, s, 0.56)
        sc.line(
            hip, sc.at(u + 0.02, s, 0.12), label, sc.colour(label, (50, 52, 70)), sc.size(0.035, s)
        )
        sc.line(hip, shoulder, label, clothes, sc.size(0.09, s))
        sc.line(shoulder, sc.at(u + 0.14, s, 0.34), label, clothes, sc.size(0.025, s))
        r = 0.045 * s * sc.k
        sc.ellipse(sc.at(u + 0.04, s, 0.64), (r, r), label, sc.colour(label, (200, 160, 130)))

    return s, draw


def _vehicle(sc: _Scene, kind: str) -> tuple[float, Drawer]:
    """Car, truck, bus or train seen from behind/side on the road."""
    rng = sc.rng
    s = {"car": rng.uniform(0.06, 1.1), "train": rng.uniform(0.05, 0.3)}.get(
        kind, rng.uniform(0.06, 0.6)
    )
    lane = sc.road * rng.uniform(-0.75, 0.75)
    dims = {"car": (0.45, 0.38), "truck": (0.6, 0.75), "bus": (0.62, 0.8), "train": (1.8, 0.9)}
    width, height = dims[kind]
    width *= rng.uniform(0.85, 1.15)
    label = ID[kind]

    def draw() -> None:
        body = sc.colour(label)
        x0, y0 = sc.at(lane - width / 2, s, 0.05)
        x1, y1 = sc.at(lane + width / 2, s, height)
        if kind == "car":
            xm0, ym = sc.at(lane - width * 0.38, s, height * 0.55)
            xm1, _ = sc.at(lane + width * 0.38, s, height * 0.55)
            sc.rect(x0, ym, x1, y0, label, body)
            sc.poly(
                [
                    [
                        (xm0, ym),
                        (xm1, ym),
                        (xm1 - (xm1 - xm0) * 0.1, y1),
                        (xm0 + (xm1 - xm0) * 0.1, y1),
                    ]
                ],
                label,
                body,
            )
            glass = sc.shade(sc.colour(label, (60, 70, 80)), 0.8)
            pad = (xm1 - xm0) * 0.12
            sc.poly(
                [
                    [
                        (xm0 + pad, ym),
                        (xm1 - pad, ym),
                        (xm1 - pad * 1.6, y1 + (ym - y1) * 0.2),
                        (xm0 + pad * 1.6, y1 + (ym - y1) * 0.2),
                    ]
                ],
                label,
                glass,
            )
        else:
            sc.rect(x0, y1, x1, y0, label, body)
            glass = sc.shade(sc.colour(label, (60, 70, 80)), 0.8)
            if kind == "truck":
                sc.rect(x0, y1, x1, y1 + (y0 - y1) * 0.15, label, sc.shade(body, 0.85))
            else:
                n = 6 if kind == "train" else 1
                for i in range(n):
                    a = x0 + (x1 - x0) * (i + 0.1) / n
                    b = x0 + (x1 - x0) * (i + 0.9) / n
                    sc.rect(a, y1 + (y0 - y1) * 0.12, b, y1 + (y0 - y1) * 0.45, label, glass)
        tyre = (25, 25, 25)
        r = 0.07 * s * sc.k
        for t in (0.2, 0.8):
            sc.ellipse((x0 + (x1 - x0) * t, y0), (r * 1.2, r), label, tyre)
        if kind == "train":  # rails beneath: rail track is a void id
            sc.rect(
                x0 - 2, y0, x1 + 2, y0 + max(1, r), ID["rail track"], sc.colour(ID["rail track"])
            )

    return s, draw


def _void_patch(sc: _Scene, label_id: int) -> tuple[float, Drawer]:
    """Unlabeled blob or static clutter (bins, boxes): a void id."""
    rng = sc.rng
    s = rng.uniform(0.1, 1.2)
    u = rng.choice([-1, 1]) * (sc.road + sc.sidewalk * rng.uniform(0.1, 0.9))
    size = rng.uniform(0.06, 0.25)

    def draw() -> None:
        colour = sc.colour(label_id, tuple(int(v) for v in rng.uniform(40, 220, 3)))
        n = int(rng.integers(3, 7))
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        radius = size * rng.uniform(0.5, 1.0, n)
        pts = [
            sc.at(u + r * np.cos(a), s, size + r * np.sin(a))
            for a, r in zip(angles, radius, strict=True)
        ]
        sc.poly([pts], label_id, colour)

    return s, draw


def _draw_void_frame(sc: _Scene) -> None:
    """Ego vehicle hood at the bottom and a rectification border (void ids)."""
    rng = sc.rng
    if rng.random() < sc.p.ego_vehicle_prob:
        depth = sc.h * rng.uniform(0.05, 0.13)
        centre = (sc.w * rng.uniform(0.4, 0.6), sc.h + depth * 0.6)
        hood = sc.colour(ID["ego vehicle"], (34, 34, 40))
        sc.ellipse(centre, (sc.w * rng.uniform(0.6, 0.9), depth * 1.6), ID["ego vehicle"], hood)
        sc.ellipse(
            (centre[0], sc.h - depth * 0.6),
            (sc.w * 0.05, depth * 0.15),
            ID["ego vehicle"],
            sc.shade(hood, 1.8),
        )
    if rng.random() < sc.p.border_prob:
        width = max(1, int(np.rint(sc.px * rng.uniform(1, 4))))
        colour = sc.colour(ID["rectification border"], (8, 8, 8))
        for edge in rng.permutation(4)[: int(rng.integers(1, 4))]:
            x0, y0, x1, y1 = [
                (0, 0, width, sc.h),
                (sc.w - width, 0, sc.w, sc.h),
                (0, 0, sc.w, width),
                (0, sc.h - width, sc.w, sc.h),
            ][edge]
            sc.rect(x0, y0, x1 - 1, y1 - 1, ID["rectification border"], colour)


def _finish_image(sc: _Scene) -> np.ndarray:
    """Textures by class, lighting (gain, colour cast, gradient, shadows), blur, noise."""
    p, rng, h, w = sc.p, sc.rng, sc.h, sc.w
    image = sc.image.astype(np.float32)
    if p.texture > 0:
        lo_amp = np.zeros(256, np.float32)
        hi_amp = np.zeros(256, np.float32)
        for label_id, (lo, hi) in TEXTURE_AMPLITUDE.items():
            lo_amp[label_id], hi_amp[label_id] = lo * p.texture, hi * p.texture
        cell = max(4, w // 32)
        blotches = cv2.resize(
            rng.standard_normal((h // cell + 2, w // cell + 2), dtype=np.float32),
            (w, h),
            interpolation=cv2.INTER_LINEAR,
        )
        grain = rng.standard_normal((h, w), dtype=np.float32)
        image += (lo_amp[sc.label] * blotches + hi_amp[sc.label] * grain)[:, :, None]
    gain = np.full((h, w), rng.uniform(*p.lighting_range), np.float32)
    gain *= np.linspace(1 + rng.uniform(-0.2, 0.2), 1.0, h, dtype=np.float32)[:, None]
    if rng.random() < p.shadow_prob:
        shadow = np.ones((h, w), np.float32)
        x_a, x_b = sorted(rng.uniform(-0.2, 1.2, 2) * w)
        y_a = rng.uniform(0.0, 0.6) * h
        pts = np.array(
            [
                [x_a, y_a],
                [x_b, y_a + rng.uniform(-0.2, 0.2) * h],
                [x_b + rng.uniform(-0.5, 0.5) * w, h],
                [x_a - rng.uniform(0, 0.5) * w, h],
            ]
        )
        cv2.fillPoly(shadow, [np.round(pts).astype(np.int32)], float(rng.uniform(0.45, 0.8)))
        gain *= cv2.GaussianBlur(shadow, (0, 0), 2.0 * sc.px)
    cast = rng.uniform(0.9, 1.1, 3).astype(np.float32)
    image *= gain[:, :, None] * cast
    if p.blur_sigma > 0:
        image = cv2.GaussianBlur(image, (0, 0), p.blur_sigma * sc.px)
    if p.noise_std > 0:
        image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(p.noise_std)
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


def render_scene(
    params: SynthCityParams, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one scene: (uint8 RGB image H x W x 3, uint8 Cityscapes label ids H x W)."""
    sc = _Scene(params, rng)
    _draw_background(sc)
    for side in (-1, 1):
        _draw_side(sc, side)
    objects: list[tuple[float, Drawer]] = []
    sides = lambda n: [int(rng.choice([-1, 1])) for _ in range(n)]  # noqa: E731
    objects += [_tree(sc, side) for side in sides(_count(rng, params.trees))]
    objects += [_wall_or_fence(sc, side, ID["wall"]) for side in sides(_count(rng, params.walls))]
    objects += [_wall_or_fence(sc, side, ID["fence"]) for side in sides(_count(rng, params.fences))]
    objects += [_pole(sc, side) for side in sides(_count(rng, params.poles))]
    objects += [_pole(sc, side, standalone_sign=True) for side in sides(_count(rng, params.signs))]
    for _ in range(_count(rng, params.persons)):
        s = rng.uniform(0.08, 1.2)
        u = rng.choice([-1, 1]) * (sc.road + sc.sidewalk * rng.uniform(0.1, 0.9))
        height = rng.uniform(0.38, 0.5)
        objects.append((s, lambda u=u, s=s, h=height: _person(sc, u, s, ID["person"], h)))
    objects += [_rider(sc, side) for side in sides(_count(rng, params.riders))]
    for _ in range(_count(rng, params.parked_bicycles)):
        s = rng.uniform(0.1, 1.1)
        u = rng.choice([-1, 1]) * (sc.road + sc.sidewalk * rng.uniform(0.15, 0.85))
        motor = rng.random() < 0.3
        label = ID["motorcycle"] if motor else ID["bicycle"]
        objects.append(
            (s, lambda u=u, s=s, label=label, motor=motor: _bicycle(sc, u, s, label, motor))
        )
    objects += [_vehicle(sc, "car") for _ in range(_count(rng, params.cars))]
    for kind, prob in (
        ("truck", params.truck_prob),
        ("bus", params.bus_prob),
        ("train", params.train_prob),
    ):
        if rng.random() < prob:
            objects.append(_vehicle(sc, kind))
    objects += [
        _void_patch(sc, ID["unlabeled"]) for _ in range(_count(rng, params.unlabeled_patches))
    ]
    objects += [_void_patch(sc, ID["static"]) for _ in range(_count(rng, params.static_objects))]
    # Painter's order: far (small s) first. Stable sort keeps ties deterministic.
    for _, draw in sorted(objects, key=lambda item: item[0]):
        draw()
    _draw_void_frame(sc)
    return _finish_image(sc), sc.label
