"""Train a segmentation model (config: configs/train.yaml; logic: seg/engine/train_run.py).

    python tools/train.py                                   # SynthCity defaults
    python tools/train.py +experiment=cityscapes_ohem       # or _ce, _focal, synthcity_*
    python tools/train.py +experiment=cityscapes_ohem dataset.root=/data/cityscapes
    python tools/train.py trainer.max_iters=2000 loader.batch_size=8 trainer.amp=bf16
    python tools/train.py +experiment=cityscapes_ohem resume=auto
    torchrun --nproc_per_node=4 tools/train.py +experiment=cityscapes_ohem
    python tools/train.py --help                            # Hydra's help: groups and keys

Overrides are listed in configs/README.md. Errors in the data, config or checkpoint are
printed as one line, with exit status 2.
"""

import sys

import hydra
from omegaconf import DictConfig

from seg.engine.train_run import run
from seg.errors import SegError


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except SegError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
