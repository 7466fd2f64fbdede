"""Generate SynthCity (Cityscapes layout and label ids) from the dataset config.

    python tools/make_synthcity.py [dataset.root=data/synthcity] [dataset.generator.seed=1]
        [dataset.generator.height=256 dataset.generator.width=512] [--force]

Without ``--force`` an existing dataset made with the same parameters is kept (and one
made with other parameters is an error). Prints the generation speed (images/s).
SynthCity experiments also generate it on first use; this tool just does it up front.
"""

import sys

from seg.data.check import compose_dataset_config
from seg.data.synthcity import SynthCityParams, generate_synthcity
from seg.errors import SegError


def main(argv: list[str]) -> int:
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        return 0
    force = "--force" in argv
    overrides = [a for a in argv if a != "--force"]
    try:
        cfg = compose_dataset_config(overrides).dataset
        if "generator" not in cfg:
            raise SegError(f"dataset {cfg.name!r} has no 'generator' node: not a SynthCity config")
        params = SynthCityParams.from_mapping(cfg.generator)
        stats = generate_synthcity(cfg.root, params, force=force)
    except SegError as err:
        print(f"error: {err}")
        return 2
    if stats["images"] == 0:
        print(f"{cfg.root}: SynthCity with these parameters already present (use --force to redo)")
    else:
        print(
            f"{cfg.root}: wrote {stats['images']} images of {params.height}x{params.width} in "
            f"{stats['seconds']:.1f} s ({stats['images_per_s']:.1f} images/s, one process)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
