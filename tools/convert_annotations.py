"""Convert your own annotations (labelme, COCO, colour masks) into a folder dataset.

    python tools/convert_annotations.py format=labelme input=my_labelme/ out=data/my_data
    python tools/convert_annotations.py format=coco input=instances.json images=imgs/ out=data/my_coco
    python tools/convert_annotations.py format=color input=masks/ images=imgs/ out=data/my_colors \
        classes=[road,car] color_to_trainid=[[128,64,128,0],[64,0,128,1],[0,0,0,255]]

Writes images, single-channel train-id masks and a dataset config (out/dataset/<name>.yaml,
and configs/dataset/<name>.yaml with write_config=true), all or nothing, and prints the
commands that check and train on it. Exit status 2 on a bad file or setting (one 'error:'
line naming it; nothing is written). Settings: configs/convert_annotations.yaml; logic:
seg/data/annotations/; data/README.md, "Your own annotations".
"""

import hydra
from omegaconf import DictConfig

from seg.cli import run_app, run_job
from seg.data.annotations import convert


@hydra.main(config_path="../configs", config_name="convert_annotations", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_job(convert, cfg)


if __name__ == "__main__":
    run_app(main)
