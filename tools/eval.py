"""Evaluate a checkpoint with the config stored inside it, or an exported ONNX model.

    python tools/eval.py ckpt=PATH [dataset.root=...] [dataset.split=val] [eval.flip=true]
        [eval.scales=[0.75,1.0,1.25]] [eval.mode=slide] [eval=PRESET] [out=DIR]
        [save_pred=labelIds|color] [reference=OTHER.pt|OTHER.onnx]
    python tools/eval.py ckpt=MODEL.onnx dataset=NAME [dataset.root=...] [onnx_threads=N]
    python tools/eval.py -m ckpt=a.pt,b.pt
    torchrun --nproc_per_node=2 tools/eval.py ckpt=PATH

Settings: configs/eval.yaml; logic: seg/engine/eval_run.py. Exit status: 0 done, 2 bad
checkpoint, data or setting (one `error:` line on stderr).
"""

import hydra
from omegaconf import DictConfig

from seg.cli import run_app, run_job
from seg.engine.eval_run import evaluate


@hydra.main(config_path="../configs", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_job(evaluate, cfg)


if __name__ == "__main__":
    run_app(main)
