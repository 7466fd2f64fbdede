"""The SynthCity painter: one procedurally drawn street scene, image and labels together.

The order of drawing lives here; the rooms it draws with: ``canvas`` (camera, colours,
primitives), ``street`` (the frame), ``objects`` (what stands in it), ``finish``
(textures, light, noise).

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

import numpy as np

from seg.data.labels import CITYSCAPES_NAME_TO_ID as ID
from seg.data.synthcity.canvas import Scene, count
from seg.data.synthcity.finish import finish_image
from seg.data.synthcity.objects import (
    Drawer,
    bicycle,
    person,
    pole,
    rider,
    tree,
    vehicle,
    void_patch,
    wall_or_fence,
)
from seg.data.synthcity.params import SynthCityParams
from seg.data.synthcity.street import draw_background, draw_side, draw_void_frame


def render_scene(
    params: SynthCityParams, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one scene: (uint8 RGB image H x W x 3, uint8 Cityscapes label ids H x W)."""
    sc = Scene(params, rng)
    draw_background(sc)
    for side in (-1, 1):
        draw_side(sc, side)
    objects: list[tuple[float, Drawer]] = []
    sides = lambda n: [int(rng.choice([-1, 1])) for _ in range(n)]  # noqa: E731
    objects += [tree(sc, side) for side in sides(count(rng, params.trees))]
    objects += [wall_or_fence(sc, side, ID["wall"]) for side in sides(count(rng, params.walls))]
    objects += [wall_or_fence(sc, side, ID["fence"]) for side in sides(count(rng, params.fences))]
    objects += [pole(sc, side) for side in sides(count(rng, params.poles))]
    objects += [pole(sc, side, standalone_sign=True) for side in sides(count(rng, params.signs))]
    for _ in range(count(rng, params.persons)):
        s = rng.uniform(0.08, 1.2)
        u = rng.choice([-1, 1]) * (sc.road + sc.sidewalk * rng.uniform(0.1, 0.9))
        height = rng.uniform(0.38, 0.5)
        objects.append((s, lambda u=u, s=s, h=height: person(sc, u, s, ID["person"], h)))
    objects += [rider(sc, side) for side in sides(count(rng, params.riders))]
    for _ in range(count(rng, params.parked_bicycles)):
        s = rng.uniform(0.1, 1.1)
        u = rng.choice([-1, 1]) * (sc.road + sc.sidewalk * rng.uniform(0.15, 0.85))
        motor = rng.random() < 0.3
        label = ID["motorcycle"] if motor else ID["bicycle"]
        objects.append(
            (s, lambda u=u, s=s, label=label, motor=motor: bicycle(sc, u, s, label, motor))
        )
    objects += [vehicle(sc, "car") for _ in range(count(rng, params.cars))]
    for kind, prob in (
        ("truck", params.truck_prob),
        ("bus", params.bus_prob),
        ("train", params.train_prob),
    ):
        if rng.random() < prob:
            objects.append(vehicle(sc, kind))
    objects += [
        void_patch(sc, ID["unlabeled"]) for _ in range(count(rng, params.unlabeled_patches))
    ]
    objects += [void_patch(sc, ID["static"]) for _ in range(count(rng, params.static_objects))]
    # Painter's order: far (small s) first. Stable sort keeps ties deterministic.
    for _, draw in sorted(objects, key=lambda item: item[0]):
        draw()
    draw_void_frame(sc)
    return finish_image(sc), sc.label
