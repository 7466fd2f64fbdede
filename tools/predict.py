"""Run a checkpoint on images, folders of images or videos.

    python tools/predict.py ckpt=PATH input=IMAGE|FOLDER|VIDEO [out=DIR] [batch_size=N]
        [device=auto|cpu|cuda] [alpha=0.5] [amp=fp16] [flip=true] [scales=[0.75,1.0,1.25]]

Exit status: 0 when every input was predicted, 1 when some files were skipped
(each is named on stderr), 2 on a bad checkpoint, input or setting.
Settings: configs/predict.yaml; logic: seg/predict.py.
"""

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from seg.errors import SegError
from seg.predict import run_prediction


@hydra.main(config_path="../configs", config_name="predict", version_base="1.3")
def main(cfg: DictConfig) -> None:
    options = OmegaConf.to_container(cfg, resolve=True)
    try:
        summary = run_prediction(**options)
    except (SegError, OSError) as error:  # OSError: an unwritable output path, named in it
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(summary.describe())
    if summary.skipped:
        print("skipped: " + ", ".join(str(path) for path, _ in summary.skipped), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
