"""Check a dataset: images per split, class pixel frequencies, bad files.

    python tools/check_dataset.py dataset=cityscapes [dataset.root=/path/to/cityscapes]

Exits 0 when all files are fine, 1 listing the bad files, 2 when the dataset cannot be
opened (missing root or split folder). Logic: ``seg/data/check.py``.
"""

import sys

from seg.data.check import main

if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(__doc__)
        sys.exit(0)
    sys.exit(main(sys.argv[1:]))
