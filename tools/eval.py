"""Evaluate a checkpoint with the config stored inside it.

    python tools/eval.py ckpt=PATH [dataset.root=...] [dataset.split=val] [eval.flip=true]
        [eval.scales=[0.75,1.0,1.25]] [eval.mode=slide] [eval=PRESET] [out=DIR]
        [save_pred=labelIds|color]
    torchrun --nproc_per_node=2 tools/eval.py ckpt=PATH

Settings: configs/eval.yaml; logic: seg/engine/eval_run.py.
"""

import sys

from seg.engine.eval_run import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
