"""``tools/eval.py`` with the stand-in model of ``test_eval_run`` admitted.

The allow-list of ``seg.instantiate`` refuses every class that is not seg's own, so a
checkpoint of ``test_eval_run.PaletteNet`` is evaluated through this wrapper: the tool
itself (its Hydra app, ``-m`` and ``--cfg`` included), with the same arguments and exit
status, also under torchrun.
"""

import runpy
from pathlib import Path

from seg.instantiate import allow_targets

if __name__ == "__main__":
    with allow_targets("test_eval_run.PaletteNet"):
        tool = Path(__file__).resolve().parents[1] / "tools" / "eval.py"
        runpy.run_path(str(tool), run_name="__main__")
