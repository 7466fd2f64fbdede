"""Every experiment composes with the documented ``+experiment=NAME`` and builds its objects;
the Cityscapes experiments follow the published recipe and differ in the loss only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from seg.data.build import build_dataset
from seg.engine.evaluator import Evaluator
from seg.engine.schedule import WarmupPolyLR
from seg.errors import DatasetError
from seg.losses import MultiHeadLoss

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
HEADS = {"main", "aux2", "aux3", "aux4", "aux5_4"}
LOSS_CLASS = {
    "ohem": "OhemCELoss",
    "ce": "CrossEntropyLoss",
    "focal": "FocalLoss",
    "ghm": "GhmcLoss",
}


def compose_train(overrides: list[str], hydra_cfg: bool = False) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=hydra_cfg)


def plain(cfg: DictConfig) -> dict[str, Any]:
    out = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(out, dict)
    return out


def test_all_six_experiments_exist() -> None:
    expected = {
        f"{d}_{loss}" for d in ("cityscapes", "synthcity") for loss in ("ohem", "ce", "focal")
    }
    assert expected <= set(EXPERIMENTS)


def test_train_yaml_defaults() -> None:
    raw = OmegaConf.load(CONFIGS / "train.yaml")
    defaults = [next(iter(d)) if isinstance(d, dict) else d for d in raw.defaults]
    assert "experiment" not in defaults  # so that +experiment=NAME works
    cfg = compose_train([], hydra_cfg=True)
    assert cfg.dataset.name == "synthcity" and cfg.loss.name == "ohem"
    assert cfg.experiment_name == "default"
    assert cfg.hydra.job.chdir is False
    assert cfg.hydra.run.dir.startswith("outputs/default/")
    assert cfg.hydra.sweep.dir.startswith("multirun/default/")


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_instantiates(name: str) -> None:
    cfg = compose_train([f"+experiment={name}"], hydra_cfg=True)
    assert cfg.experiment_name == name
    assert cfg.hydra.run.dir.startswith(f"outputs/{name}/")
    model = instantiate(cfg.model)
    assert sum(p.numel() for p in model.parameters()) > 0
    loss = instantiate(cfg.loss)
    assert isinstance(loss, MultiHeadLoss) and set(loss.losses) == HEADS
    loss_kind = name.split("_", 1)[1]
    assert {type(m).__name__ for m in loss.losses.values()} == {LOSS_CLASS[loss_kind]}
    optimizer = instantiate(cfg.optim, model=model)
    scheduler = instantiate(cfg.schedule, optimizer=optimizer)
    assert isinstance(scheduler, WarmupPolyLR) and scheduler.max_iters == cfg.trainer.max_iters
    evaluator = instantiate(cfg.eval)
    assert isinstance(evaluator, Evaluator) and evaluator.num_classes == cfg.dataset.num_classes
    # One training step's worth of wiring: the model's heads match the loss's heads.
    model.train()
    outputs = model(torch.randn(2, 3, 64, 64))
    labels = torch.randint(0, cfg.dataset.num_classes, (2, 64, 64))
    assert torch.isfinite(loss(outputs, labels).total)


@pytest.mark.parametrize("name", [e for e in EXPERIMENTS if e.startswith("cityscapes")])
def test_cityscapes_without_data_is_one_clear_error(name: str, tmp_path: Path) -> None:
    cfg = compose_train([f"+experiment={name}", f"dataset.root={tmp_path / 'nowhere'}"])
    with pytest.raises(DatasetError) as info:
        build_dataset(cfg.dataset.train)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "nowhere") in message
    assert "dataset.root=" in message


def test_synthcity_datasets_instantiate(tmp_path: Path) -> None:
    cfg = compose_train(
        [
            "+experiment=synthcity_ce",
            f"dataset.root={tmp_path / 'synthcity'}",
            "dataset.generator.height=32",
            "dataset.generator.width=64",
            "dataset.generator.num_train=2",
            "dataset.generator.num_val=1",
            "dataset.crop_size=[32,64]",
        ]
    )
    train = build_dataset(cfg.dataset.train)
    val = build_dataset(cfg.dataset.val)
    assert (len(train), len(val)) == (2, 1)
    assert tuple(train[0]["image"].shape) == (32, 64, 3)


def test_cityscapes_recipe() -> None:
    """DESIGN.md: batch 16, crop 1024x1024, SGD momentum 0.9, lr 0.05, weight decay 5e-4
    (not on norm layers and biases), linear warm-up 1k, poly 0.9, 160k, heads weighted 1."""
    cfg = compose_train(["+experiment=cityscapes_ohem"])
    assert cfg.dataset.name == "cityscapes"
    assert list(cfg.dataset.crop_size) == [1024, 1024]
    assert list(cfg.dataset.scale_range) == [0.5, 2.0]
    assert cfg.loader.batch_size == 16
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (0.05, 0.9, 5e-4)
    assert cfg.optim.decay_norm_and_bias is False
    assert (cfg.schedule.warmup, cfg.schedule.warmup_iters, cfg.schedule.power) == (
        "linear",
        1000,
        0.9,
    )
    assert cfg.schedule.min_lr == 0.0
    assert cfg.trainer.max_iters == 160000 and cfg.schedule.max_iters == 160000
    assert {head: spec.weight for head, spec in cfg.loss.heads.items()} == dict.fromkeys(HEADS, 1.0)
    assert cfg.loss.heads.main.loss.thresh == 0.7


@pytest.mark.parametrize("dataset", ["cityscapes", "synthcity"])
def test_experiments_differ_in_the_loss_only(dataset: str) -> None:
    configs = {
        loss: plain(compose_train([f"+experiment={dataset}_{loss}"]))
        for loss in ("ohem", "ce", "focal")
    }
    for cfg in configs.values():
        cfg.pop("loss")
        cfg.pop("experiment_name")
    assert configs["ohem"] == configs["ce"] == configs["focal"]
    losses = {loss: compose_train([f"+experiment={dataset}_{loss}"]).loss.name for loss in configs}
    assert losses == {"ohem": "ohem", "ce": "ce", "focal": "focal"}


def test_documented_overrides_apply() -> None:
    overrides = [
        "+experiment=cityscapes_ohem",
        "trainer.max_iters=10",
        "trainer.eval_interval=5",
        "trainer.ckpt_interval=5",
        "trainer.log_interval=1",
        "trainer.amp=bf16",
        "trainer.device=cpu",
        "trainer.compile=true",
        "loader.batch_size=8",
        "loader.num_workers=0",
        "dataset.root=/data/cs",
        "dataset.crop_size=[512,1024]",
        "optim.lr=0.01",
        "seed=7",
        "resume=auto",
    ]
    cfg = compose_train(overrides)
    assert cfg.schedule.max_iters == 10  # interpolated from trainer.max_iters
    assert cfg.dataset.train.root == "/data/cs" and cfg.dataset.val.root == "/data/cs"
    assert list(cfg.dataset.train.transform.crop_size) == [512, 1024]
    assert (cfg.optim.lr, cfg.seed, cfg.resume, cfg.trainer.amp) == (0.01, 7, "auto", "bf16")
    readme = (CONFIGS / "README.md").read_text()
    for override in overrides[1:]:
        assert f"`{override.split('=')[0]}" in readme, override
