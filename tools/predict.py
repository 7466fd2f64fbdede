"""Run a checkpoint, or an exported ONNX model, on images, folders of images or videos.

    python tools/predict.py ckpt=PATH input=IMAGE|FOLDER|VIDEO [out=DIR] [batch_size=N]
        [device=auto|cpu|cuda] [alpha=0.5] [amp=fp16] [flip=true] [scales=[0.75,1.0,1.25]]
    python tools/predict.py ckpt=MODEL.onnx input=... [onnx_threads=N]   # onnxruntime, CPU

Exit status: 0 when every input was predicted, 1 when some files were skipped
(each is named on stderr), 2 on a bad checkpoint, input or setting.
Settings: configs/predict.yaml; logic: seg/predict.py.
"""

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from seg.cli import EXIT_FAILED, run_app, run_job
from seg.predict import run_prediction


def predict(cfg: DictConfig) -> int:
    """Predict every input; 1 when some files were skipped."""
    options = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert isinstance(options, dict)
    summary = run_prediction(**options)
    print(summary.describe())
    if summary.skipped:
        print("skipped: " + ", ".join(str(path) for path, _ in summary.skipped), file=sys.stderr)
        return EXIT_FAILED
    return 0


@hydra.main(config_path="../configs", config_name="predict", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_job(predict, cfg)


if __name__ == "__main__":
    run_app(main)
