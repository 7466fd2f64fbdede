"""The faults of docs/reliability.md, tried as a hostile or an unlucky user would.

Checkpoints are data (no ``_target_`` outside seg's own classes is ever imported or called),
a full disk and a bad file in a loader worker are one line (also in ``train.log``), values
of the wrong type are one line naming the key. The faults met by one tool alone are tested
beside it (test_eval_run, test_predict, test_export, test_checkpoint, test_fileio,
test_data_loader, test_data_synthcity).
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from seg import checkpoint as checkpoint_module
from seg.checkpoint import load_checkpoint, save_checkpoint
from seg.engine.build import build_datasets, build_parts, parse_settings
from seg.engine.state import TrainState, checkpoint_payload
from seg.engine.train_run import run
from seg.errors import CheckpointError, ConfigError, DatasetError
from seg.instantiate import ALLOWED_TARGETS, allow_targets, build, build_from_checkpoint
from seg.models.bisenetv2 import BiSeNetV2
from seg.predict import run_prediction

REPO = Path(__file__).resolve().parents[1]
PLANTED = "seg.fileio.write_text_atomic"  # importable, and writes a file of its caller's choice


def planted(marker: Path) -> dict:
    return {"_target_": PLANTED, "path": str(marker), "text": "code ran"}


def compose_cfg(root: Path, *overrides: str) -> DictConfig:
    """A tiny CPU training config: SynthCity at 32 x 64, 4 train / 2 val images, batch 2."""
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(
            config_name="train",
            overrides=[
                f"dataset.root={root}",
                "dataset.generator.height=32",
                "dataset.generator.width=64",
                "dataset.generator.num_train=4",
                "dataset.generator.num_val=2",
                "dataset.crop_size=[32,64]",
                "loader.batch_size=2",
                "loader.num_workers=0",
                "trainer.device=cpu",
                "trainer.amp=off",
                "trainer.num_vis_images=0",
                *overrides,
            ],
        )


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data") / "synthcity"
    build_datasets(compose_cfg(root))  # training's dataset node generates it
    return root


# ------------------------------------------------------------ checkpoints are data (point 1)
def test_build_refuses_a_foreign_target_at_any_depth_before_importing_anything(
    tmp_path: Path,
) -> None:
    marker = tmp_path / "code_ran"
    never_imported = "this"  # the standard library's Zen: importing it prints
    assert never_imported not in sys.modules
    node = {
        "_target_": "seg.models.bisenetv2.BiSeNetV2",
        "num_classes": 2,
        "extra": [{"deeper": planted(marker)}, {"_target_": f"{never_imported}.s"}],
    }
    with pytest.raises(ConfigError) as info:
        build_from_checkpoint(node, "model")
    message = str(info.value)
    assert message.startswith(f"refused to build the model: extra.0.deeper._target_='{PLANTED}'")
    assert "\n" not in message and "seg.instantiate.ALLOWED_TARGETS" in message
    assert not marker.exists() and never_imported not in sys.modules


def test_refusals_name_the_full_key_of_a_config_node(tmp_path: Path) -> None:
    cfg = compose_cfg(tmp_path / "data")
    cfg.dataset.val.transform = planted(tmp_path / "code_ran")
    with pytest.raises(ConfigError, match=r"dataset\.val\.transform\._target_="):
        build_from_checkpoint(cfg.dataset.val, "dataset")
    cfg.loss.heads.main.loss = {"_target_": "os.system", "command": "touch x"}
    with pytest.raises(ConfigError, match=r"loss\.heads\.main\.loss\._target_='os\.system'"):
        build_from_checkpoint(cfg.loss, "loss")
    assert not (tmp_path / "code_ran").exists() and not (tmp_path / "data").exists()


def test_training_configs_may_name_the_users_own_classes() -> None:
    """A config the user writes is the user's code: build() takes any class."""
    assert build({"_target_": "collections.OrderedDict"}, "thing") == {}


def test_allow_targets_admits_more_only_inside_its_block() -> None:
    node = {"_target_": "collections.OrderedDict"}
    with allow_targets("collections.OrderedDict"):
        assert build_from_checkpoint(node, "thing") == {}
    with pytest.raises(ConfigError, match="refused"):
        build_from_checkpoint(node, "thing")
    assert "collections.OrderedDict" not in ALLOWED_TARGETS


def _targets(node: object) -> set[str]:
    """Every ``_target_`` value in a YAML tree, except under ``hydra``: Hydra itself builds
    what its own section names (the sweep callback), never seg's instantiate."""
    if isinstance(node, dict):
        found = {str(node["_target_"])} if "_target_" in node else set()
        for key, value in node.items():
            if key != "hydra":
                found |= _targets(value)
        return found
    if isinstance(node, list):
        return set().union(*map(_targets, node)) if node else set()
    return set()


def test_every_target_in_the_configs_is_allowed() -> None:
    """The list is complete: each _target_ the shipped configs name can be built."""
    targets = set()
    for path in (REPO / "configs").rglob("*.yaml"):
        targets |= _targets(OmegaConf.to_container(OmegaConf.load(path), resolve=False))
    assert "seg.losses.OhemCELoss" in targets  # the walk reaches nested nodes
    assert targets <= ALLOWED_TARGETS, targets - ALLOWED_TARGETS


def _checkpoint_at_start(cfg: DictConfig, path: Path, config: dict) -> Path:
    """A resumable checkpoint of iteration 0 (built, not trained: cheap) storing ``config``."""
    settings = parse_settings(cfg)
    parts = build_parts(cfg, settings, build_datasets(cfg))
    save_checkpoint(path, checkpoint_payload(parts.model, parts.step, TrainState(), config))
    return path


def test_resume_never_builds_the_checkpoints_config(data_root: Path, tmp_path: Path) -> None:
    """Resuming builds from the command's config; the stored one is data, never built."""
    cfg = compose_cfg(data_root, "trainer.max_iters=1")
    marker = tmp_path / "code_ran"
    stored = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(stored, dict)
    stored["dataset"]["val"]["transform"] = planted(marker)
    stored["model"]["extra"] = {"inner": planted(marker)}
    path = _checkpoint_at_start(cfg, tmp_path / "start" / "checkpoints" / "last.pt", stored)
    result = run(compose_cfg(data_root, "trainer.max_iters=1", f"resume={path}"), tmp_path / "r")
    assert result.iteration == 1 and not marker.exists()


def test_predict_refuses_a_target_planted_under_the_model(tmp_path: Path) -> None:
    cfg = compose_cfg(tmp_path / "unused")
    config = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(config, dict)
    marker = tmp_path / "code_ran"
    config["model"]["weights"] = planted(marker)
    save_checkpoint(tmp_path / "evil.pt", {"model": {}, "config": config})
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(b"not read")
    with pytest.raises(ConfigError, match=rf"model\.weights\._target_='{PLANTED}' is not one of"):
        run_prediction(tmp_path / "evil.pt", tmp_path / "in", tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()


# -------------------------------------------------------------- a full disk (case 5)
def test_full_disk_during_a_save_is_one_line_in_train_log_and_keeps_last_pt(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_save = torch.save

    def fill_the_disk_on_the_second_last_pt(obj, file) -> None:
        # file is the temporary ".last.pt.<host>-<pid>-<hex>.partial" being written
        if ".last.pt." in file.name and (Path(file.name).parent / "last.pt").exists():
            file.write(b"part of a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, file)

    monkeypatch.setattr(checkpoint_module.torch, "save", fill_the_disk_on_the_second_last_pt)
    cfg = compose_cfg(data_root, "trainer.max_iters=2", "trainer.ckpt_interval=1")
    with pytest.raises(CheckpointError) as info:
        run(cfg, tmp_path / "run")
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    expected = f"cannot save checkpoint {last}: No space left on device (ENOSPC); "
    expected += "the previous last.pt is unchanged"
    assert str(info.value) == expected
    assert (tmp_path / "run" / "train.log").read_text().count(f"ERROR seg.train: {expected}") == 1
    assert load_checkpoint(last)["iteration"] == 1
    assert sorted(p.name for p in last.parent.iterdir()) == ["best.pt", "last.pt"]


# ----------------------------------------------------- a bad file in a worker (case 6)
def test_bad_file_met_by_a_loader_worker_is_one_line_in_train_log(
    data_root: Path, tmp_path: Path
) -> None:
    root = tmp_path / "synthcity"
    shutil.copytree(data_root, root)
    bad = sorted((root / "leftImg8bit" / "train").rglob("*.png"))[0]
    bad.write_bytes(b"\x89PNG cut short")
    cfg = compose_cfg(root, "trainer.max_iters=4", "loader.num_workers=2")
    try:
        run(cfg, tmp_path / "run")
        message = "no error"
    except DatasetError as error:
        # Keep only the text: a kept traceback holds the loader's worker processes in a
        # reference cycle, which the collector frees later after a 5 s wait per worker.
        message = str(error)
    assert message == f"corrupt, truncated or unsupported image file: {bad}"
    log = (tmp_path / "run" / "train.log").read_text()
    assert log.count(f"ERROR seg.train: corrupt, truncated or unsupported image file: {bad}") == 1


# -------------------------------------------------------------- wrong types (case 7)
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.max_iters=abc", "trainer.max_iters must be an integer, got 'abc'"),
        ("loader.batch_size=abc", "loader.batch_size must be an integer, got 'abc'"),
        ("seed=abc", "seed must be an integer, got 'abc'"),
        ("loader.batch_size=2.9", "loader.batch_size must be a whole number, got 2.9"),
        ("trainer.compile=abc", "trainer.compile must be true or false, got 'abc'"),
    ],
)
def test_training_values_of_the_wrong_type_are_one_line(
    tmp_path: Path, override: str, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings(compose_cfg(tmp_path, override))
    assert str(info.value) == message


@pytest.mark.slow
@pytest.mark.parametrize(
    ("tool", "args", "message"),
    [
        ("train", ["trainer.max_iters=abc"], "trainer.max_iters must be an integer, got 'abc'"),
        ("train", ["loader.batch_size=2.9"], "loader.batch_size must be a whole number, got 2.9"),
        ("predict", ["mode=slide", "crop_size=[32,32]", "stride=[0,0]"], "stride must be [h, w]"),
        ("predict", ["scales=abc"], "scales must be a non-empty list of positive numbers"),
        ("export", ["opset=abc"], "opset must be an integer, got 'abc'"),
    ],
)
def test_the_tools_print_one_line_for_values_of_the_wrong_type(
    tmp_path: Path, tool: str, args: list[str], message: str
) -> None:
    """Through the real command lines (train, predict, export), with a real checkpoint."""
    config = OmegaConf.to_container(compose_cfg(tmp_path / "data"), resolve=True)
    assert isinstance(config, dict)
    ckpt = tmp_path / "last.pt"
    save_checkpoint(ckpt, {"model": BiSeNetV2(19).state_dict(), "config": config})
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(b"unread")
    common = {
        "train": [f"dataset.root={tmp_path / 'data'}", "trainer.device=cpu", "trainer.amp=off"],
        "predict": [f"ckpt={ckpt}", f"input={tmp_path / 'in'}", f"out={tmp_path / 'out'}"],
        "export": [f"ckpt={ckpt}", f"out={tmp_path / 'm.onnx'}"],
    }[tool]
    command = [sys.executable, str(REPO / "tools" / f"{tool}.py"), *common, *args]
    command.append(f"hydra.run.dir={tmp_path / 'run'}")
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.onnx").exists()
