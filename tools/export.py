"""Export a checkpoint to ONNX and check it against PyTorch with onnxruntime; optionally
also write a statically quantized int8 model for CPU deployment.

    python tools/export.py ckpt=PATH [out=model.onnx] [argmax=true] [opset=18]
        [check=false] [tolerance=1e-4]
    python tools/export.py ckpt=PATH out=model.onnx quantize=int8 [calibration_images=100]
        [int8_out=model_int8.onnx] [calibration_root=DIR] [float_scopes=[head.classifier]]

Needs the deploy extra (pip install -e '.[deploy]'). Exit status: 0 written and checked;
1 the export failed or a logit differs from PyTorch by more than tolerance (nothing is
written); 2 a missing extra, a bad checkpoint or setting, or a calibration set smaller
than asked. Settings: configs/export.yaml; logic: seg/export.py (fp32) and
seg/deploy/quantize.py (int8).
"""

import hydra
from omegaconf import DictConfig, OmegaConf

from seg.cli import run_app, run_job
from seg.deploy.quantize import (
    DEFAULT_FLOAT_SCOPES,
    calibration_from_checkpoint,
    default_int8_path,
    quantize_int8,
)
from seg.errors import ConfigError
from seg.export import export_checkpoint, require_deploy

QUANTIZE_CHOICES = (None, "int8")


def export(cfg: DictConfig) -> int:
    """Export ``cfg.ckpt`` to ``cfg.out``, print the parity check, then quantize if asked."""
    if cfg.quantize not in QUANTIZE_CHOICES:
        raise ConfigError(f"quantize must be null or int8, got {cfg.quantize!r}")
    calibration = None
    if cfg.quantize == "int8":
        require_deploy()
        # Read the calibration images first: a dataset too small fails before the export.
        calibration = calibration_from_checkpoint(
            cfg.ckpt, cfg.calibration_images, cfg.calibration_root
        )
    summary = export_checkpoint(
        cfg.ckpt,
        cfg.out,
        opset=cfg.opset,
        argmax=cfg.argmax,
        check=cfg.check,
        tolerance=cfg.tolerance,
    )
    print(summary.describe())
    if calibration is not None:
        scopes = cfg.float_scopes
        quantized = quantize_int8(
            summary.path,
            cfg.int8_out or default_int8_path(summary.path),
            calibration,
            float_scopes=DEFAULT_FLOAT_SCOPES if scopes is None else OmegaConf.to_object(scopes),
            method=cfg.calibration_method,
            reduce_range=cfg.reduce_range,
        )
        print(quantized.describe())
    return 0


@hydra.main(config_path="../configs", config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_job(export, cfg)


if __name__ == "__main__":
    run_app(main)
