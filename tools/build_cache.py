"""Build the decoded cache of a dataset (config: configs/build_cache.yaml; logic: seg/data/cache.py).

    python tools/build_cache.py dataset.cache=PATH [dataset=cityscapes] [dataset.root=...]
        [nodes=[train,val]] [progress=false]

Decodes every image and label of the dataset's train and val nodes into uint8 arrays under
PATH (about 8 MiB per 1024x2048 image), with a progress bar. Resumable: entries already
cached and still matching their source files are kept. Exit status: 0 done, 2 on a bad
dataset, setting or file (one 'error:' line), 130 when interrupted (finished entries kept).
"""

import sys

import hydra
from omegaconf import DictConfig

from seg.cli import run_app, run_job
from seg.data.build import build_dataset
from seg.data.cache import build_cache
from seg.errors import ConfigError


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.2f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.1f} MiB"


def run(cfg: DictConfig) -> int:
    """Build the cache of each node in ``cfg.nodes`` of ``cfg.dataset`` under ``dataset.cache``;
    the exit status (130 when Ctrl-C stopped it, finished entries kept)."""
    root = cfg.dataset.get("cache")
    if root is None:
        raise ConfigError("dataset.cache is not set: pass dataset.cache=PATH (the cache folder)")
    for node in cfg.nodes:
        if node not in cfg.dataset or "_target_" not in cfg.dataset[node]:
            raise ConfigError(f"nodes: dataset {cfg.dataset.name!r} has no dataset node {node!r}")
        # Built without transform and without cache: the cache is built from the files here.
        dataset = build_dataset(cfg.dataset[node], transform=None, cache=None)
        try:
            result = build_cache(dataset, root, progress=cfg.progress, desc=f"caching {node}")
        except KeyboardInterrupt:
            print("interrupted: finished entries are kept; run again to resume", file=sys.stderr)
            return 130
        print(
            f"{node}: {result.images} images in {result.folder} ({_size(result.bytes)}): "
            f"{result.built} decoded now, {result.images - result.built} already cached",
            flush=True,
        )
    return 0


@hydra.main(config_path="../configs", config_name="build_cache", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_job(run, cfg)


if __name__ == "__main__":
    run_app(main)
