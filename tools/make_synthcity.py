"""Generate SynthCity (Cityscapes layout and label ids) from the dataset config.

    python tools/make_synthcity.py [dataset.root=data/synthcity] [dataset.generator.seed=1]
        [dataset.generator.height=256 dataset.generator.width=512] [force=true]

Without force=true an existing dataset made with the same parameters is kept (and one
made with other parameters is an error). Prints the generation speed (images/s).
Settings: configs/make_synthcity.yaml. Exit status: 0 done, 2 bad parameters.
"""

import hydra
from omegaconf import DictConfig

from seg.cli import run_app, run_job
from seg.data.synthcity import SynthCityParams, generate_synthcity
from seg.errors import ConfigError


def make_synthcity(cfg: DictConfig) -> int:
    """Generate ``cfg.dataset`` (a SynthCity config) into its root."""
    dataset = cfg.dataset
    if "generator" not in dataset:
        raise ConfigError(
            f"dataset {dataset.name!r} has no 'generator' node: not a SynthCity config"
        )
    params = SynthCityParams.from_mapping(dataset.generator)
    stats = generate_synthcity(dataset.root, params, force=bool(cfg.force))
    if stats["images"] == 0:
        print(
            f"{dataset.root}: SynthCity with these parameters already present (force=true to redo)"
        )
    else:
        print(
            f"{dataset.root}: wrote {stats['images']} images of {params.height}x{params.width} "
            f"in {stats['seconds']:.1f} s ({stats['images_per_s']:.1f} images/s, one process)"
        )
    return 0


@hydra.main(config_path="../configs", config_name="make_synthcity", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_job(make_synthcity, cfg)


if __name__ == "__main__":
    run_app(main)
