"""Export a checkpoint to ONNX and check it against PyTorch with onnxruntime.

    python tools/export.py ckpt=PATH [out=model.onnx] [argmax=true] [opset=18]
        [check=false] [tolerance=1e-4]

Needs the deploy extra (pip install -e '.[deploy]'). Exit status: 0 written and checked;
1 the export failed or a logit differs from PyTorch by more than tolerance (nothing is
written); 2 a missing extra, a bad checkpoint or setting. Settings: configs/export.yaml;
logic: seg/export.py.
"""

import hydra
from omegaconf import DictConfig

from seg.cli import run_app, run_job
from seg.export import export_checkpoint


def export(cfg: DictConfig) -> int:
    """Export ``cfg.ckpt`` to ``cfg.out`` and print the parity check."""
    summary = export_checkpoint(
        cfg.ckpt,
        cfg.out,
        opset=cfg.opset,
        argmax=cfg.argmax,
        check=cfg.check,
        tolerance=cfg.tolerance,
    )
    print(summary.describe())
    return 0


@hydra.main(config_path="../configs", config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_job(export, cfg)


if __name__ == "__main__":
    run_app(main)
