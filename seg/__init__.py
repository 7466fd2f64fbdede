"""seg: real-time semantic segmentation training in the BiSeNetV2 style."""

import os

__version__ = "0.1.0"

# albumentations asks PyPI for a newer release when it is imported, and warns on stderr
# where there is no network (clusters, GPU machines): a tool's stderr is kept for its own
# one `error:` line, and an import should not reach the network. A user's own setting wins.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
