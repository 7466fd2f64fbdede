"""SynthCity's canvas: one perspective camera over an image and its label ids, drawn together.

:class:`Scene` holds the street's random geometry, the class colours and the drawing
primitives that paint the image and the label map with one call, so that a pixel's colour
and its label can never disagree.
"""

from __future__ import annotations

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


class Scene:
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


def count(rng: np.random.Generator, bounds: tuple[int, int]) -> int:
    return int(rng.integers(bounds[0], bounds[1] + 1))
