"""Compare losses over seeds in one command (see seg/compare.py and configs/compare.yaml).

python tools/compare.py +experiment=synthcity_ohem losses=[ohem,ce,focal] seeds=[0,1,2]
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from seg.compare import run
from seg.errors import SegError


@hydra.main(config_path="../configs", config_name="compare", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except SegError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
