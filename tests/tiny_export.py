"""``tools/export.py`` with the tiny stand-in model of ``test_deploy`` admitted.

The allow-list of ``seg.instantiate`` refuses every class that is not seg's own, so the
tool tests on a checkpoint of ``test_deploy.TinySegmenter`` run the tool through this
wrapper (same arguments, same exit status).
"""

import runpy
from pathlib import Path

from seg.instantiate import allow_targets

if __name__ == "__main__":
    with allow_targets("test_deploy.TinySegmenter"):
        tool = Path(__file__).resolve().parents[1] / "tools" / "export.py"
        runpy.run_path(str(tool), run_name="__main__")
