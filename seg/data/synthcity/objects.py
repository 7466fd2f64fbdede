"""The objects of a street, each a ``(depth, draw)`` pair so that the painter draws them far
to near: trees, walls, fences, poles with lights and signs, people, riders, bicycles,
vehicles and void clutter. Each function draws its random layout from the scene's generator
when called and its colours when drawn, in the painter's order."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from seg.data.labels import CITYSCAPES_NAME_TO_ID as ID
from seg.data.synthcity.canvas import Scene

Drawer = Callable[[], None]


def tree(sc: Scene, side: int) -> tuple[float, Drawer]:
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


def wall_or_fence(sc: Scene, side: int, label_id: int) -> tuple[float, Drawer]:
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


def sign(sc: Scene, centre: tuple[float, float], radius: float) -> None:
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


def pole(sc: Scene, side: int, standalone_sign: bool = False) -> tuple[float, Drawer]:
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
            sign(sc, (x, y + r), r)

    return s, draw


def person(sc: Scene, u: float, s: float, label_id: int, height: float = 0.45) -> None:
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


def bicycle(sc: Scene, u: float, s: float, label_id: int, motor: bool) -> None:
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


def rider(sc: Scene, side_of_road: float) -> tuple[float, Drawer]:
    rng = sc.rng
    s = rng.uniform(0.12, 1.0)
    u = side_of_road * sc.road * rng.uniform(0.5, 0.95)
    motor = rng.random() < 0.4

    def draw() -> None:
        bicycle(sc, u, s, ID["motorcycle"] if motor else ID["bicycle"], motor)
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


def vehicle(sc: Scene, kind: str) -> tuple[float, Drawer]:
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


def void_patch(sc: Scene, label_id: int) -> tuple[float, Drawer]:
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
