"""``tools/eval.py`` with the stand-in model of ``test_eval_run`` admitted (torchrun tests).

The allow-list of ``seg.instantiate`` refuses every class that is not seg's own, so a
checkpoint of ``test_eval_run.PaletteNet`` is evaluated through this wrapper.
"""

import sys

from seg.engine.eval_run import main
from seg.instantiate import allow_targets

if __name__ == "__main__":
    with allow_targets("test_eval_run.PaletteNet"):
        sys.exit(main(sys.argv[1:]))
