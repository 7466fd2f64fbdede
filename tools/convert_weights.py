"""Convert a published BiSeNetV2 checkpoint (CoinCheung/BiSeNet, mmsegmentation) into a
seg checkpoint for tools/eval.py, tools/predict.py, tools/export.py and model.weights=.

    python tools/convert_weights.py src=PATH out=PATH [format=auto|coincheung|mmseg]
        [dataset_config=auto|cityscapes|folder] [dataset_name=NAME] [mean=[r,g,b]] [std=[r,g,b]]
        [class_names=[...]]

Exit status 2 on a bad file or setting (one 'error:' line on stderr; nothing is written).
Settings: configs/convert_weights.yaml; logic: seg/models/convert.py (key mapping) and
seg/models/published.py (the checkpoint); docs/weights.md.
"""

import hydra
from omegaconf import DictConfig, OmegaConf

from seg.cli import run_app, run_job
from seg.models.published import convert_checkpoint


def convert(cfg: DictConfig) -> None:
    """Convert ``cfg.src`` into ``cfg.out`` and print what was mapped."""
    options = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert isinstance(options, dict)
    summary = convert_checkpoint(
        options["src"],
        options["out"],
        source_format=options["format"],
        dataset_config=options["dataset_config"],
        dataset_name=options["dataset_name"],
        mean=options["mean"],
        std=options["std"],
        class_names=options["class_names"],
    )
    print(summary.describe())


@hydra.main(config_path="../configs", config_name="convert_weights", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_job(convert, cfg)


if __name__ == "__main__":
    run_app(main)
