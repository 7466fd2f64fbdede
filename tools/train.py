"""Train a segmentation model (config: configs/train.yaml; logic: seg/engine/train_run.py).

    python tools/train.py                                   # SynthCity defaults
    python tools/train.py +experiment=cityscapes_ohem       # or _ce, _focal, synthcity_*
    python tools/train.py +experiment=cityscapes_ohem dataset.root=/data/cityscapes
    python tools/train.py trainer.max_iters=2000 loader.batch_size=8 trainer.amp=bf16
    python tools/train.py +experiment=cityscapes_ohem resume=auto
    python tools/train.py -m +experiment=synthcity_ohem loss=ohem,ce,focal seed=0,1,2
    torchrun --nproc_per_node=4 tools/train.py +experiment=cityscapes_ohem
    python tools/train.py --help                            # Hydra's help: groups and keys

Overrides are listed in configs/README.md. Exit status (seg/cli.py): 0 done, 1 training
failed (e.g. non-finite losses), 2 bad data, config or checkpoint (one `error:` line),
130/143 stopped by SIGINT/SIGTERM and 138/140 by SIGUSR1/SIGUSR2, with last.pt saved.
"""

import hydra
from omegaconf import DictConfig

from seg.cli import run_app, run_job
from seg.engine.train_run import run_tool


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_job(run_tool, cfg)


if __name__ == "__main__":
    run_app(main)
