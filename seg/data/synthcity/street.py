"""The street's frame: sky, road, sidewalks, facades or parks, and the void frame (ego
vehicle, rectification border) drawn last over everything."""

from __future__ import annotations

import numpy as np

from seg.data.labels import CITYSCAPES_NAME_TO_ID as ID
from seg.data.synthcity.canvas import Scene


def draw_background(sc: Scene) -> None:
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


def facade_windows(
    sc: Scene, side: int, u: float, s0: float, s1: float, height: float, colour
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


def draw_side(sc: Scene, side: int) -> None:
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
        facade_windows(sc, side, u, s, s_next, height, colour)
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


def draw_void_frame(sc: Scene) -> None:
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
