"""Stored dataset paths follow ``dataset.root`` / ``dataset.split`` at evaluation
(``seg/engine/dataset_paths.py``): the templates recorded at training time, checked when
read, re-resolved for the new values; older checkpoints keep the path-component rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from seg.checkpoint import save_checkpoint
from seg.engine.dataset_paths import TEMPLATES_KEY, dataset_templates, read_templates
from seg.engine.eval_run import CONFIG_DIR, build_eval_config, main
from seg.errors import CheckpointError
from seg.models.bisenetv2 import BiSeNetV2


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def test_templates_are_the_paths_built_from_root_and_split() -> None:
    cfg = compose_train(["dataset=camvid", "dataset.root=/data/camvid"])
    templates = dataset_templates(cfg)
    assert templates == {
        "dataset.train.image_dir": "${dataset.root}/train",
        "dataset.train.mask_dir": "${dataset.root}/trainannot",
        "dataset.val.image_dir": "${dataset.root}/${dataset.split}",
        "dataset.val.mask_dir": "${dataset.root}/${dataset.split}annot",
    }
    cityscapes = dataset_templates(compose_train(["dataset=cityscapes"]))
    assert cityscapes == {
        "dataset.train.root": "${dataset.root}",
        "dataset.val.root": "${dataset.root}",
        "dataset.val.split": "${dataset.split}",
    }


def test_templates_follow_chains_and_skip_resolvers() -> None:
    cfg = OmegaConf.create(
        {
            "dataset": {
                "root": "/r",
                "split": "val",
                "images": "${dataset.root}/images",  # built from the root
                "name": "x",
                "val": {
                    "image_dir": "${dataset.images}/${dataset.split}",  # through another key
                    "label": "${dataset.name}",  # not built from root or split
                    "env": "${oc.env:HOME}/${dataset.split}",  # a resolver: never recorded
                    "plain": "/r/val",
                },
            }
        }
    )
    assert dataset_templates(cfg) == {
        "dataset.images": "${dataset.root}/images",
        "dataset.val.image_dir": "${dataset.images}/${dataset.split}",
    }


def _stored(split_dir_name: str = "val") -> dict:
    """A resolved stored dataset config with a literal path that contains the split."""
    return {
        "dataset": {
            "root": "/r",
            "split": "val",
            "val": {
                "image_dir": "/r/val",
                "mask_dir": "/r/valannot",
                "other": "/r/values/val",  # not a template: left alone
                "split": "val",
            },
            "train": {"image_dir": "/r/train", "mask_dir": "/r/trainannot"},
        },
        "model": {},
        "eval": {},
    }


TEMPLATES = {
    "dataset.train.image_dir": "${dataset.root}/train",
    "dataset.train.mask_dir": "${dataset.root}/trainannot",
    "dataset.val.image_dir": "${dataset.root}/${dataset.split}",
    "dataset.val.mask_dir": "${dataset.root}/${dataset.split}annot",
    "dataset.val.split": "${dataset.split}",
}


def test_templates_rebuild_suffixes_and_leave_other_strings() -> None:
    overrides = {"dataset.root": "/s", "dataset.split": "test"}
    cfg = build_eval_config(_stored(), overrides, templates=TEMPLATES)
    assert cfg.dataset.val.image_dir == "/s/test" and cfg.dataset.val.mask_dir == "/s/testannot"
    assert cfg.dataset.val.split == "test" and cfg.dataset.train.mask_dir == "/s/trainannot"
    assert cfg.dataset.val.other == "/r/values/val"
    # A key the user sets is kept as set; the rest still follow.
    explicit = {**overrides, "dataset.val.mask_dir": "/elsewhere/masks"}
    cfg = build_eval_config(_stored(), explicit, templates=TEMPLATES)
    assert cfg.dataset.val.mask_dir == "/elsewhere/masks" and cfg.dataset.val.image_dir == "/s/test"
    # Without templates (an older checkpoint): whole path components only, as before.
    cfg = build_eval_config(_stored(), overrides)
    assert cfg.dataset.val.image_dir == "/s/test" and cfg.dataset.val.mask_dir == "/s/valannot"


@pytest.mark.parametrize(
    "templates",
    [
        {"dataset.val.image_dir": "${oc.env:HOME}/${dataset.split}"},
        {"dataset.val.image_dir": "${model.num_classes}"},
        {"model.weights": "${dataset.root}"},
        {"dataset.val.image_dir": "/no/interpolation"},
        ["dataset.val.image_dir"],
    ],
    ids=["resolver", "outside_dataset", "key_outside_dataset", "not_a_template", "not_a_dict"],
)
def test_altered_templates_are_refused_in_one_line(templates, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as error:
        read_templates({TEMPLATES_KEY: templates}, tmp_path / "x.pt")
    assert "\n" not in str(error.value) and str(tmp_path / "x.pt") in str(error.value)
    assert read_templates({}, tmp_path / "x.pt") is None  # an older checkpoint


# ------------------------------------------------------- tools/eval.py on a CamVid layout


@pytest.fixture(scope="module")
def camvid_ckpts(tmp_path_factory: pytest.TempPathFactory, make_camvid) -> tuple[Path, Path, Path]:
    """A CamVid-layout set and two checkpoints of one 11-class model: with the templates
    the trainer records, and without them (written before they were recorded)."""
    base = tmp_path_factory.mktemp("camvid_eval")
    root = make_camvid(base / "camvid", {"val": 2, "test": 3})
    cfg = compose_train(["dataset=camvid", f"dataset.root={root}", "loader.num_workers=0"])
    config = OmegaConf.to_container(cfg, resolve=True)
    torch.manual_seed(0)
    payload = {
        "model": BiSeNetV2(11).state_dict(),
        "optimizer": {},
        "scheduler": {},
        "scaler": {},
        "iteration": 1,
        "rng": {},
        "config": config,
        "metrics": {},
    }
    save_checkpoint(base / "new" / "last.pt", {**payload, TEMPLATES_KEY: dataset_templates(cfg)})
    save_checkpoint(base / "old" / "last.pt", payload)
    return root, base / "new" / "last.pt", base / "old" / "last.pt"


def test_eval_of_the_test_split_reads_test_and_testannot(camvid_ckpts, tmp_path: Path) -> None:
    root, new, _ = camvid_ckpts
    assert main([f"ckpt={new}", f"out={tmp_path}", "dataset.split=test", "progress=false"]) == 0
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["images"] == 3 and report["split"] == "test"
    assert report["image_dir"] == f"{root}/test" and report["mask_dir"] == f"{root}/testannot"


def test_an_older_checkpoint_keeps_the_component_rule(camvid_ckpts, tmp_path: Path, capsys) -> None:
    """Without templates the masks stay in valannot/ (the behaviour before them): one
    line, and the explicit mask folder is the way around it."""
    root, _, old = camvid_ckpts
    args = [f"ckpt={old}", f"out={tmp_path}", "dataset.split=test", "progress=false"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "image without a mask" in err
    assert f"{root}/valannot/test_0000.png" in err
    assert main([*args, f"dataset.val.mask_dir={root}/testannot"]) == 0
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["images"] == 3 and report["mask_dir"] == f"{root}/testannot"
