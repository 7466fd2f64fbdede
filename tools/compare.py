"""Compare losses over seeds in one command (see seg/compare/ and configs/compare.yaml).

    python tools/compare.py +experiment=synthcity_ohem losses=[ohem,ce,focal] seeds=[0,1,2]
        [hydra/launcher=joblib | submitit_local | submitit_slurm]
    python tools/compare.py sweep_dir=PATH       # report on an existing sweep folder

Runs the sweep `tools/train.py -m ... seed=... loss=...`, then writes the report from
the finished run folders. Exit status: 0 done, 1 a job failed or a run is short of its
budget (nothing is reported), 2 bad input or config, 128+N stopped by signal N.
"""

import hydra
from omegaconf import DictConfig

from seg.cli import run_app, run_job
from seg.compare.sweep import compare


@hydra.main(config_path="../configs", config_name="compare", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_job(compare, cfg)


if __name__ == "__main__":
    run_app(main)
