"""Turning the flat-coloured drawing into a photo-like image: class textures, lighting
(gain, gradient, colour cast, shadows), blur and sensor noise."""

from __future__ import annotations

import cv2
import numpy as np

from seg.data.labels import CITYSCAPES_NAME_TO_ID as ID
from seg.data.synthcity.canvas import Scene

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


def finish_image(sc: Scene) -> np.ndarray:
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
