"""Convert a published BiSeNetV2 checkpoint (CoinCheung/BiSeNet, mmsegmentation) into a
seg checkpoint for tools/eval.py, tools/predict.py, tools/export.py and model.weights=.

    python tools/convert_weights.py src=PATH out=PATH [format=auto|coincheung|mmseg]
        [dataset_config=auto|cityscapes|folder] [dataset_name=NAME] [mean=[r,g,b]] [std=[r,g,b]]
        [class_names=[...]]

Exit status 2 on a bad file or setting (one 'error:' line on stderr; nothing is written).
Settings: configs/convert_weights.yaml; logic: seg/models/convert.py (key mapping) and
seg/models/published.py (the checkpoint); docs/weights.md.
"""

import sys
from pathlib import Path

import hydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from seg.errors import SegError
from seg.models.published import convert_checkpoint

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "convert_weights.yaml"


def unknown_setting(argv: list[str]) -> str | None:
    """The first ``key=value`` argument whose key configs/convert_weights.yaml lacks."""
    known = set(OmegaConf.load(CONFIG)) - {"defaults"}
    try:
        overrides = OverridesParser.create().parse_overrides(
            [a for a in argv if not a.startswith("-")]
        )
    except HydraException:
        return None  # Hydra reports syntax errors itself
    for override in overrides:
        key = override.key_or_group
        if key.split(".")[0] not in known and not key.startswith("hydra"):
            return key
    return None


@hydra.main(config_path="../configs", config_name="convert_weights", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        options = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as error:
        print(f"error: {error.full_key}=PATH is required", file=sys.stderr)
        sys.exit(2)
    assert isinstance(options, dict)
    try:
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
    except (SegError, OSError) as error:  # OSError: an unreadable path, named in it
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(summary.describe())


if __name__ == "__main__":
    bad = unknown_setting(sys.argv[1:])
    if bad is not None:
        expected = ", ".join(k for k in OmegaConf.load(CONFIG) if k not in ("defaults", "hydra"))
        print(f"error: unknown setting {bad!r} (expected one of: {expected})", file=sys.stderr)
        sys.exit(2)
    main()
