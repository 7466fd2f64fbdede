"""Check a dataset: images per split, class pixel frequencies, bad files.

    python tools/check_dataset.py dataset=cityscapes [dataset.root=/path/to/cityscapes]

Exits 0 when all files are fine, 1 listing the bad files, 2 when the dataset cannot be
opened (missing root or split folder) or an override is wrong. Settings:
configs/check_dataset.yaml; logic: seg/data/check.py.
"""

import hydra
from omegaconf import DictConfig

from seg.cli import run_app, run_job
from seg.data.check import check


@hydra.main(config_path="../configs", config_name="check_dataset", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_job(check, cfg)


if __name__ == "__main__":
    run_app(main)
