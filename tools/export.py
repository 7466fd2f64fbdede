"""Export a checkpoint to ONNX and check it against PyTorch with onnxruntime.

    python tools/export.py ckpt=PATH [out=model.onnx] [argmax=true] [opset=18]
        [check=false] [tolerance=1e-4]

Needs the deploy extra (pip install -e '.[deploy]'). Exit status 2 on any failure:
missing extra, bad checkpoint, failed export, or a logit difference above tolerance.
Settings: configs/export.yaml; logic: seg/export.py.
"""

import sys

import hydra
from omegaconf import DictConfig

from seg.errors import SegError
from seg.export import export_checkpoint


@hydra.main(config_path="../configs", config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        summary = export_checkpoint(
            cfg.ckpt,
            cfg.out,
            opset=cfg.opset,
            argmax=cfg.argmax,
            check=cfg.check,
            tolerance=cfg.tolerance,
        )
    except (SegError, OSError) as error:  # OSError: an unwritable output path, named in it
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(summary.describe())


if __name__ == "__main__":
    main()
