"""Label tables and dataset configs agree with cityscapesscripts."""

from pathlib import Path

import numpy as np
import pytest
from cityscapesscripts.helpers.labels import id2label, labels
from omegaconf import OmegaConf

from seg.data.labels import (
    CITYSCAPES_CLASS_NAMES,
    CITYSCAPES_PALETTE,
    build_lookup_table,
    cityscapes_lookup_table,
    identity_lookup_table,
)
from seg.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "dataset"


def test_lookup_table_matches_cityscapesscripts():
    lut, valid = cityscapes_lookup_table()
    assert lut.dtype == np.uint8 and lut.shape == (256,)
    for label_id in range(256):
        if label_id in id2label:
            train_id = id2label[label_id].trainId
            expected = 255 if train_id in (255, -1) else train_id
            assert lut[label_id] == expected, id2label[label_id].name
            assert valid[label_id]
        else:
            assert lut[label_id] == 255 and not valid[label_id]
    assert sorted(set(lut[valid]) - {255}) == list(range(19))
    assert lut[7] == 0 and lut[33] == 18 and lut[0] == 255 and lut[1] == 255


def test_class_names_and_palette_in_train_id_order():
    by_train_id = {lb.trainId: lb for lb in labels if 0 <= lb.trainId < 255}
    assert list(CITYSCAPES_CLASS_NAMES) == [by_train_id[k].name for k in range(19)]
    assert list(CITYSCAPES_PALETTE) == [tuple(by_train_id[k].color) for k in range(19)]


@pytest.mark.parametrize("name", ["cityscapes", "synthcity"])
def test_configs_agree_with_cityscapesscripts(name):
    cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
    assert list(cfg.class_names) == list(CITYSCAPES_CLASS_NAMES)
    assert [tuple(c) for c in cfg.palette] == list(CITYSCAPES_PALETTE)
    assert cfg.num_classes == 19 and cfg.ignore_index == 255
    assert cfg.mean and len(cfg.mean) == 3 and len(cfg.std) == 3


def test_identity_and_custom_tables():
    lut, valid = identity_lookup_table(3)
    assert list(np.flatnonzero(valid)) == [0, 1, 2, 255]
    assert lut[2] == 2 and lut[255] == 255
    lut, valid = build_lookup_table({10: 0, 20: 1, 30: -1}, 2)
    assert lut[10] == 0 and lut[20] == 1 and lut[30] == 255 and not valid[0]
    with pytest.raises(ConfigError, match="train id 5"):
        build_lookup_table({1: 5}, 3)
