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
    assert {type(m).__name__ for m in loss.losses.values()} == {LOSS_CLASS[cfg.loss.name]}
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


#: CoinCheung/BiSeNet's BiSeNetV2 Cityscapes recipe (configs/bisenetv2_city.py,
#: tools/train_amp.py, lib/lr_scheduler.py, lib/data/transform_cv2.py at commit 6b4b67a),
#: as config keys of cityscapes_ohem (docs/recipes.md).
PUBLISHED_RECIPE = {
    "model.aux_heads": True,
    "model.bga_upsample": "nearest",
    "loss.heads.main.loss.thresh": 0.7,
    "loss.heads.main.loss.min_kept_ratio": 1 / 16,
    "loss.heads.main.loss.ignore_index": 255,
    "optim.lr": 5e-3,
    "optim.momentum": 0.9,
    "optim.weight_decay": 5e-4,
    "optim.decay_norm_and_bias": False,
    "schedule.warmup": "exp",
    "schedule.warmup_iters": 1000,
    "schedule.warmup_ratio": 0.1,
    "schedule.poly_after_warmup": True,
    "schedule.power": 0.9,
    "schedule.min_lr": 0.0,
    "schedule.max_iters": 150000,
    "trainer.max_iters": 150000,
    "trainer.amp": "fp16",
    "loader.batch_size": 16,
    "dataset.crop_size": [512, 1024],
    "dataset.scale_range": [0.25, 2.0],
    "dataset.scale_rounding": "ceil",
    "dataset.mean": [0.3257, 0.3690, 0.3223],
    "dataset.std": [0.2112, 0.2148, 0.2115],
    "dataset.ignore_index": 255,
    "eval.mode": "whole",
    "eval.scales": [1.0],
    "eval.flip": False,
    "recipe.published_val_miou": 74.95,
}
#: The reference schedule's factor of the base rate: 0.1 ** (1 - it / 1000) during the
#: warm-up, then (1 - (it - 1000) / (150000 - 1000)) ** 0.9.
PUBLISHED_LR_FACTOR = {
    0: 0.1,
    500: 0.1**0.5,
    1000: 1.0,
    75500: 0.5**0.9,
    149999: (1 / 149000) ** 0.9,
}


@pytest.mark.parametrize("name", ["cityscapes_ohem", "cityscapes_ce", "cityscapes_focal"])
def test_cityscapes_recipe_is_the_published_one(name: str) -> None:
    cfg = compose_train([f"+experiment={name}"])
    for key, value in PUBLISHED_RECIPE.items():
        if key.startswith("loss.") and name != "cityscapes_ohem":
            continue  # the only difference: the loss
        got = OmegaConf.select(cfg, key)
        got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
        assert got == pytest.approx(value), key
    assert {head: spec.weight for head, spec in cfg.loss.heads.items()} == dict.fromkeys(HEADS, 1.0)
    if name == "cityscapes_ohem":
        assert all(h.loss.thresh == 0.7 for h in cfg.loss.heads.values())


def test_cityscapes_recipe_parameter_groups_and_schedule() -> None:
    """Base rate 5e-3 for the branches (detail, semantic, bga), 10x for the main and aux
    heads; weight decay 5e-4 on 4-d weights, 0 on the 1-d parameters (BN weights, biases)."""
    cfg = compose_train(["+experiment=cityscapes_ohem"])
    model = instantiate(cfg.model)
    optimizer = instantiate(cfg.optim, model=model)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = []
    for group in optimizer.param_groups:
        for param in group["params"]:
            name = names[id(param)]
            seen.append(name)
            is_head = name.startswith(("head.", "aux_heads."))
            assert name.startswith(("detail.", "semantic.", "bga.", "head.", "aux_heads."))
            assert group["lr"] == pytest.approx(5e-2 if is_head else 5e-3), name
            assert group["weight_decay"] == (5e-4 if param.dim() == 4 else 0.0), name
            assert param.dim() in (1, 4), name
    assert sorted(seen) == sorted(names.values())  # every parameter once
    scheduler = instantiate(cfg.schedule, optimizer=optimizer)
    for iteration, factor in PUBLISHED_LR_FACTOR.items():
        assert scheduler.lr_at(iteration, 5e-3) == pytest.approx(5e-3 * factor, rel=1e-9)
        assert scheduler.lr_at(iteration, 5e-2) == pytest.approx(5e-2 * factor, rel=1e-9)
    for _ in range(3):  # the live rates follow the same curve
        optimizer.step()
        scheduler.step()
    rates = sorted({round(g["lr"], 12) for g in optimizer.param_groups})
    assert rates == pytest.approx([5e-3 * 0.1 ** (1 - 3 / 1000), 5e-2 * 0.1 ** (1 - 3 / 1000)])


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


def test_cityscapes_recipe_says_when_it_trains_from_scratch(tmp_path: Path) -> None:
    from seg.engine.build import from_scratch_note
    from seg.errors import CheckpointError
    from seg.instantiate import build

    note = from_scratch_note(compose_train(["+experiment=cityscapes_ohem"]))
    assert note is not None and "\n" not in note
    assert "model.backbone_weights=" in note and "74.95" in note and "from scratch" in note
    given = compose_train(["+experiment=cityscapes_ohem", "model.backbone_weights=b.pth"])
    assert from_scratch_note(given) is None
    assert from_scratch_note(compose_train(["+experiment=synthcity_ohem"])) is None
    # A named backbone file that is missing or does not fit stops before anything trains.
    for bad in (tmp_path / "missing.pth", tmp_path / "wrong.pth"):
        if bad.name == "wrong.pth":
            torch.save({"detail": {"x": torch.zeros(1)}, "segment": {}}, bad)
        cfg = compose_train(["+experiment=cityscapes_ohem", f"model.backbone_weights={bad}"])
        with pytest.raises(CheckpointError) as error:
            build(cfg.model, "model")
        assert str(bad) in str(error.value) and "\n" not in str(error.value)
