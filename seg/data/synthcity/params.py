"""The knobs of a SynthCity dataset: size, counts, seed and difficulty."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

from seg.errors import ConfigError


@dataclass
class SynthCityParams:
    """Size, counts and difficulty of a SynthCity dataset (every field is a config key).

    Counts ``[lo, hi]`` are drawn uniformly per image (inclusive); ``*_prob`` are per-image
    probabilities. Colours are on the 0-255 scale; sizes in pixels scale with the width.
    """

    height: int = 128
    width: int = 256
    num_train: int = 400
    num_val: int = 100
    num_test: int = 0
    seed: int = 0
    # difficulty
    colour_overlap: float = (
        0.35  # as configs/dataset/synthcity.yaml (docs/synthcity_calibration.md)
    )
    colour_spread: float = 18.0
    texture: float = 1.0
    noise_std: float = 6.0
    blur_sigma: float = 0.6
    lighting_range: tuple[float, float] = (0.6, 1.3)
    shadow_prob: float = 0.5
    # object counts per image
    cars: tuple[int, int] = (1, 5)
    persons: tuple[int, int] = (2, 7)
    riders: tuple[int, int] = (0, 1)
    parked_bicycles: tuple[int, int] = (0, 2)
    poles: tuple[int, int] = (2, 6)
    signs: tuple[int, int] = (0, 2)
    trees: tuple[int, int] = (1, 5)
    walls: tuple[int, int] = (0, 2)
    fences: tuple[int, int] = (0, 2)
    unlabeled_patches: tuple[int, int] = (0, 3)
    static_objects: tuple[int, int] = (0, 2)
    truck_prob: float = 0.35
    bus_prob: float = 0.25
    train_prob: float = 0.12
    park_prob: float = 0.3
    ego_vehicle_prob: float = 0.8
    border_prob: float = 0.5

    @classmethod
    def from_mapping(cls, values: Mapping | None) -> SynthCityParams:
        """Build from a config mapping; unknown keys raise ``ConfigError`` naming them."""
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown SynthCity generator option(s): {', '.join(unknown)}")
        for f in fields(cls):
            if f.name in values and isinstance(f.default, tuple):
                values[f.name] = tuple(values[f.name])
        params = cls(**values)
        params.validate()
        return params

    def validate(self) -> None:
        if self.height < 16 or self.width < 32:
            raise ConfigError(
                f"SynthCity size must be at least 16x32, got {self.height}x{self.width}"
            )
        if min(self.num_train, self.num_val, self.num_test) < 0:
            raise ConfigError("SynthCity image counts must be >= 0")
        if not 0.0 <= self.colour_overlap <= 1.0:
            raise ConfigError(f"colour_overlap must lie in [0, 1], got {self.colour_overlap}")
        lo, hi = self.lighting_range
        if not 0 < lo <= hi:
            raise ConfigError(
                f"lighting_range must satisfy 0 < lo <= hi, got {self.lighting_range}"
            )
        for f in fields(self):
            value = getattr(self, f.name)
            is_count = isinstance(value, tuple) and f.name != "lighting_range"
            if is_count and (len(value) != 2 or not 0 <= value[0] <= value[1]):
                raise ConfigError(f"{f.name} must be [lo, hi] with 0 <= lo <= hi, got {value}")

    def as_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
