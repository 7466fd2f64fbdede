"""End-to-end ``tools/eval.py`` runs on a tiny SynthCity (Cityscapes layout and label ids).

Checkpoints carry a config composed from the project's ``configs/train.yaml``, as the
trainer stores it. Besides BiSeNetV2, the stand-in model ``PaletteNet`` picks the class
whose Cityscapes colour is nearest to each pixel: deterministic predictions spread over
many classes, right on some pixels and wrong on others, a useful case for comparing our
metrics with the official ``cityscapesscripts`` evaluation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from cityscapesscripts.helpers.labels import id2label
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from seg.checkpoint import save_checkpoint
from seg.data.labels import CITYSCAPES_PALETTE
from seg.data.synthcity import SynthCityParams, generate_synthcity
from seg.engine.eval_run import CONFIG_DIR, main
from seg.instantiate import allow_targets
from seg.models.bisenetv2 import BiSeNetV2

REPO = Path(__file__).resolve().parents[1]
NUM_VAL, NUM_TRAIN = 5, 2
H, W = 48, 96  # 48 is not a multiple of 32


class PaletteNet(nn.Module):
    """Logits = minus the squared RGB distance to each class colour (nearest-colour classifier)."""

    def __init__(self, num_classes: int = 19, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), **_):
        super().__init__()
        palette = torch.tensor(CITYSCAPES_PALETTE, dtype=torch.float32)[:num_classes]
        self.register_buffer("palette", palette)
        self.register_buffer("mean", torch.tensor(list(mean)).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(list(std)).view(1, 3, 1, 1))
        self.scale = nn.Parameter(torch.tensor(0.01))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rgb = (x * self.std + self.mean) * 255.0  # N x 3 x H x W
        dist = ((rgb[:, None] - self.palette[None, :, :, None, None]) ** 2).sum(2)
        return -self.scale * dist


def make_config(
    root: Path, model: str = "bisenetv2", num_classes: int = 19, dataset: str = "synthcity"
) -> dict:
    """The resolved config the trainer stores, composed from configs/train.yaml."""
    overrides = [
        f"dataset={dataset}",
        f"dataset.root={root}",
        f"dataset.crop_size=[{H},{H}]",
        "loader.num_workers=0",
    ]
    if dataset == "synthcity":
        overrides += [
            f"dataset.generator.height={H}",
            f"dataset.generator.width={W}",
            f"dataset.generator.num_train={NUM_TRAIN}",
            f"dataset.generator.num_val={NUM_VAL}",
        ]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    if model == "palette":
        cfg.model = {
            "_target_": "test_eval_run.PaletteNet",
            "num_classes": num_classes,
            "mean": "${dataset.mean}",
            "std": "${dataset.std}",
        }
    out = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(out, dict)
    return out


@pytest.fixture(scope="module", autouse=True)
def admit_palette_net() -> Iterator[None]:
    """The stand-in model is not one of seg's classes: admit it for these tests only."""
    with allow_targets("test_eval_run.PaletteNet"):
        yield


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data") / "synthcity"
    generator = make_config(root)["dataset"]["generator"]
    generate_synthcity(root, SynthCityParams.from_mapping(generator))  # eval only reads
    return root


def write_checkpoint(path: Path, config: dict, model: nn.Module) -> Path:
    save_checkpoint(
        path,
        {
            "model": model.state_dict(),
            "optimizer": {},
            "scheduler": {},
            "scaler": {},
            "iteration": 10,
            "rng": {},
            "config": config,
            "metrics": {},
        },
    )
    return path


def _palette_net(config: dict) -> PaletteNet:
    return PaletteNet(
        config["model"]["num_classes"], config["dataset"]["mean"], config["dataset"]["std"]
    )


@pytest.fixture(scope="module")
def palette_ckpt(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("run") / "checkpoints"
    config = make_config(synth_root, "palette")
    return write_checkpoint(folder / "best.pt", config, _palette_net(config))


@pytest.fixture(scope="module")
def bisenet_ckpt(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("run") / "checkpoints"
    config = make_config(synth_root)
    config["model"]["weights"] = "/pretrained/backbone/not/needed.pt"  # eval must ignore it
    torch.manual_seed(0)
    return write_checkpoint(folder / "last.pt", config, BiSeNetV2(19))


def run_cli(*args: str) -> int:
    return main([*args, "progress=false"])


def _val_stems(root: Path, split: str = "val") -> list[str]:
    return sorted(
        p.name.removesuffix("_gtFine_labelIds.png")
        for p in (root / "gtFine" / split).glob("*/*_gtFine_labelIds.png")
    )


def test_eval_writes_table_and_reports_beside_the_checkpoint(palette_ckpt: Path, capsys) -> None:
    assert run_cli(f"ckpt={palette_ckpt}") == 0
    printed = capsys.readouterr().out
    assert (
        "road" in printed and "vegetation" in printed and "mIoU" in printed and "fwIoU" in printed
    )
    report = json.loads((palette_ckpt.parent / "metrics.json").read_text())
    assert report["images"] == NUM_VAL and report["split"] == "val"
    assert report["dataset"] == "synthcity" and report["world_size"] == 1
    assert report["iteration"] == 10 and report["mode"] == "whole"
    assert set(report["metrics"]) == {"mIoU", "mAcc", "aAcc", "fwIoU"}
    assert 0.0 < report["metrics"]["mIoU"] < 1.0
    per_class = report["per_class"]
    assert len(per_class) == 19 and per_class["road"]["IoU"] is not None
    # A class without ground-truth pixels has no accuracy; its IoU is 0 if predicted, else null.
    assert all(c["IoU"] in (None, 0.0) for c in per_class.values() if c["Acc"] is None)
    md = (palette_ckpt.parent / "metrics.md").read_text()
    assert "| road |" in md and "| mIoU |" in md


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([], {"mode": "whole", "flip": False, "scales": [1.0]}),
        (["eval.flip=true"], {"flip": True}),
        (
            ["eval.flip=true", "eval.scales=[0.75,1.0,1.5]"],
            {"flip": True, "scales": [0.75, 1.0, 1.5]},
        ),
        (["eval.scales=[0.5,1.0]"], {"flip": False, "scales": [0.5, 1.0]}),
        (
            ["eval.mode=slide", "eval.crop_size=[32,32]", "eval.stride=[16,24]"],
            {"mode": "slide", "crop_size": [32, 32], "stride": [16, 24]},
        ),
        (["eval=slide"], {"mode": "slide", "crop_size": [H, H], "stride": [32, 32]}),
        (["dataset.split=train"], {"split": "train", "images": NUM_TRAIN}),
        (["loader.num_workers=1", "eval.batch_size=2"], {"images": NUM_VAL}),
    ],
    ids=["whole", "flip", "ms_flip", "ms", "slide", "slide_preset", "split", "loader"],
)
def test_inference_modes_and_overrides_on_synthcity(
    palette_ckpt: Path, tmp_path: Path, overrides: list[str], expected: dict
) -> None:
    assert run_cli(f"ckpt={palette_ckpt}", f"out={tmp_path}", *overrides) == 0
    report = json.loads((tmp_path / "metrics.json").read_text())
    for key, value in expected.items():
        assert report[key] == value, key
    assert 0.0 <= report["metrics"]["mIoU"] <= 1.0
    assert 0.0 <= report["metrics"]["aAcc"] <= 1.0


@pytest.mark.parametrize("overrides", [[], ["eval.flip=true", "eval.scales=[0.5,1.0]"]])
def test_eval_of_a_bisenetv2_checkpoint(bisenet_ckpt: Path, tmp_path: Path, overrides) -> None:
    args = [f"ckpt={bisenet_ckpt}", f"out={tmp_path}", "dataset.split=train", *overrides]
    assert run_cli(*args) == 0
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["images"] == NUM_TRAIN and 0.0 <= report["metrics"]["mIoU"] <= 1.0


def test_missing_synthcity_root_is_one_line_and_nothing_is_generated(
    palette_ckpt: Path, tmp_path: Path, capsys
) -> None:
    root = tmp_path / "absent"
    assert run_cli(f"ckpt={palette_ckpt}", f"out={tmp_path}", f"dataset.root={root}") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"SynthCity root {root} does not exist" in err, err
    assert "tools/make_synthcity.py" in err
    assert not root.exists() and not (tmp_path / "metrics.json").exists()


def test_dataset_root_override_reaches_the_dataset(synth_root: Path, tmp_path: Path) -> None:
    stored_root = tmp_path / "was_here"  # where the data lived at training time
    config = make_config(stored_root, "palette")
    ckpt = write_checkpoint(tmp_path / "last.pt", config, _palette_net(config))
    assert run_cli(f"ckpt={ckpt}", f"dataset.root={synth_root}") == 0
    assert json.loads((tmp_path / "metrics.json").read_text())["root"] == str(synth_root)
    assert not stored_root.exists()  # nothing was generated at the stored root


def write_folder_dataset(root: Path, counts: dict[str, int]) -> Path:
    """configs/dataset/folder_example.yaml's layout: images/<split>, masks/<split>."""
    rng = np.random.default_rng(len(str(root)))
    for split, n in counts.items():
        for k in range(n):
            (root / "images" / split).mkdir(parents=True, exist_ok=True)
            (root / "masks" / split).mkdir(parents=True, exist_ok=True)
            image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
            cv2.imwrite(str(root / "images" / split / f"{k:03d}.png"), image)
            mask = rng.choice([0, 1, 2, 99], (H, W)).astype(np.uint8)
            cv2.imwrite(str(root / "masks" / split / f"{k:03d}.png"), mask)
    return root


def test_root_and_split_overrides_reach_a_folder_dataset(tmp_path: Path) -> None:
    """Issue 15, case 3: FolderDataset stores resolved image_dir/mask_dir paths, which
    dataset.root=B and dataset.split=train did not reach: the stored place and split were
    evaluated while metrics.json said B/train."""
    stored = write_folder_dataset(tmp_path / "A", {"train": 1, "val": 1})
    moved = write_folder_dataset(tmp_path / "B", {"train": 3, "val": 2})
    config = make_config(stored, "palette", num_classes=3, dataset="folder_example")
    assert config["dataset"]["val"]["image_dir"] == f"{stored}/images/val"
    ckpt = write_checkpoint(tmp_path / "run" / "last.pt", config, _palette_net(config))
    cases = [
        ([f"dataset.root={moved}"], 2, moved / "images" / "val"),
        ([f"dataset.root={moved}", "dataset.split=train"], 3, moved / "images" / "train"),
        (["dataset.split=train"], 1, stored / "images" / "train"),
    ]
    for args, images, image_dir in cases:
        out = tmp_path / "out" / "_".join(a.split("=")[0] for a in args)
        assert run_cli(f"ckpt={ckpt}", f"out={out}", *args) == 0
        report = json.loads((out / "metrics.json").read_text())
        assert report["images"] == images, args
        assert report["image_dir"] == str(image_dir), args
        assert report["split"] == ("train" if "dataset.split=train" in args else "val")


def test_an_explicit_path_override_is_kept(tmp_path: Path) -> None:
    from seg.engine.eval_run import build_eval_config

    stored = {
        "dataset": {
            "root": "/a",
            "split": "val",
            "val": {"image_dir": "/a/images/val", "mask_dir": "/a/masks/val", "split": "val"},
            "train": {"image_dir": "/a/images/train", "other": "/elsewhere/val"},
        },
        "model": {},
        "eval": {},
    }
    overrides = {
        "dataset.root": "/b",
        "dataset.split": "test",
        "dataset.val.mask_dir": "/c/val",
    }
    cfg = build_eval_config(stored, overrides)
    assert cfg.dataset.val.image_dir == "/b/images/test"
    assert cfg.dataset.val.mask_dir == "/c/val"  # set by the user: kept as set
    assert cfg.dataset.val.split == "test"
    assert cfg.dataset.train.image_dir == "/b/images/train"  # the training split stays
    assert cfg.dataset.train.other == "/elsewhere/val"  # not below the root: untouched


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["dataset.rooot=x"], "dataset.rooot"),
        (["eval.tiles=2"], "eval.tiles"),
        (["foo=1"], "foo=1"),
        (["eval.mode=tiles"], "eval.mode"),
        (["save_pred=jpeg"], "save_pred"),
        (["eval=nonexistent"], "eval/nonexistent"),
        (["dataset.split=nosuchsplit"], "nosuchsplit"),
        (
            ["eval.scales=abc"],
            "eval.scales must be a non-empty list of positive numbers, got 'abc'",
        ),
        (["eval.crop_size=abc", "eval.mode=slide"], "eval.crop_size must be [h, w]"),
        (["eval.flip=abc"], "eval.flip must be true or false, got 'abc'"),
        (["dataset.num_classes=3"], "predicts 19 classes but dataset.num_classes is 3"),
    ],
)
def test_bad_arguments_give_one_line_errors(
    palette_ckpt: Path, args: list[str], message: str, capsys
) -> None:
    assert run_cli(f"ckpt={palette_ckpt}", *args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_missing_ckpt_argument(capsys) -> None:
    assert run_cli() == 2
    assert "ckpt=PATH is required" in capsys.readouterr().err


class _MarkerOnUnpickle:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _planted(marker: Path) -> dict:
    """A config node that would write ``marker`` if it were instantiated."""
    return {"_target_": "seg.fileio.write_text_atomic", "path": str(marker), "text": "ran"}


@pytest.mark.parametrize(
    "case",
    [
        "text",
        "truncated",
        "hostile",
        "head_classes",
        "config_classes",
        "planted_in_dataset",
        "planted_under_model",
        "generate_in_val",
        "interpolation",
        "directive",
    ],
)
def test_bad_checkpoints_give_one_line_errors_and_run_no_code(
    synth_root: Path, palette_ckpt: Path, tmp_path: Path, case: str, capsys
) -> None:
    path = tmp_path / "bad.pt"
    marker = tmp_path / "code_ran"
    config = make_config(synth_root, "palette")
    if case == "text":
        path.write_text("not a checkpoint\n")
        expected = "not a PyTorch checkpoint"
    elif case == "truncated":
        data = palette_ckpt.read_bytes()
        path.write_bytes(data[: len(data) * 3 // 4])
        expected = "truncated"
    elif case == "hostile":
        torch.save({"model": {}, "config": config, "metrics": _MarkerOnUnpickle(marker)}, path)
        expected = "refused"
    elif case == "head_classes":  # weights for 5 classes, config says 19
        write_checkpoint(path, config, PaletteNet(num_classes=5))
        expected = "shape mismatches (palette"
    elif case == "config_classes":  # a 5-class model evaluated on the 19-class dataset
        config = make_config(synth_root, "palette", num_classes=5)
        write_checkpoint(path, config, _palette_net(config))
        expected = "predicts 5 classes but dataset.num_classes is 19"
    elif case == "planted_in_dataset":  # checkpoints are data: no foreign _target_ is called
        config["dataset"]["val"]["transform"] = _planted(marker)
        write_checkpoint(path, config, _palette_net(config))
        expected = "dataset.val.transform._target_='seg.fileio.write_text_atomic' is not one"
    elif case == "planted_under_model":
        config["model"]["extra"] = {"inner": [_planted(marker)]}
        write_checkpoint(path, config, _palette_net(config))
        expected = "model.extra.inner.0._target_='seg.fileio.write_text_atomic' is not one"
    elif case == "interpolation":  # resolving it would copy an environment variable out
        config["dataset"]["name"] = "${oc.env:HOME}"
        write_checkpoint(path, config, _palette_net(config))
        expected = "config.dataset.name='${oc.env:HOME}' is an interpolation"
    elif case == "directive":  # a partial instead of a model: would fail with a traceback
        config["model"]["_partial_"] = True
        write_checkpoint(path, config, _palette_net(config))
        expected = "config.model._partial_ is a Hydra directive"
    else:  # a stored config that would make evaluation write a dataset where it says
        config["dataset"]["val"]["root"] = str(tmp_path / "made_here")
        config["dataset"]["val"]["generate"] = True
        write_checkpoint(path, config, _palette_net(config))
        expected = "config.dataset.val.generate=True: evaluating a checkpoint never generates"
        marker = tmp_path / "made_here"
    assert run_cli(f"ckpt={path}") == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and str(path) in err and len(err.splitlines()) == 1, err
    assert not marker.exists()
    assert not (tmp_path / "metrics.json").exists()


def _official_cityscapes_eval(gt_root: Path, pred_dir: Path) -> dict:
    """cityscapesscripts' pixel-level evaluation, called without its env-var/CLI set-up."""
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official

    args = official.CArgs()
    vars(args).update(vars(official.args))
    args.evalInstLevelScore = False  # needs *_instanceIds.png, not part of the mIoU
    args.JSONOutput = False
    args.quiet = True
    args.predictionPath = str(pred_dir)  # the official per-image file matching runs
    args.predictionWalk = None
    gts = sorted(str(p) for p in gt_root.glob("gtFine/val/*/*_gtFine_labelIds.png"))
    assert len(gts) == NUM_VAL
    preds = [official.getPrediction(args, gt) for gt in gts]
    return official.evaluateImgLists(preds, gts, args)


def test_save_pred_labelids_matches_official_cityscapes_evaluation(
    synth_root: Path, palette_ckpt: Path, tmp_path: Path
) -> None:
    assert run_cli(f"ckpt={palette_ckpt}", f"out={tmp_path}", "save_pred=labelIds") == 0
    pred_dir = tmp_path / "pred_labelIds"
    files = sorted(p.name for p in pred_dir.iterdir())
    assert files == [f"{n}_labelIds.png" for n in _val_stems(synth_root)]
    masks = [cv2.imread(str(pred_dir / f), cv2.IMREAD_UNCHANGED) for f in files]
    assert all(m.shape == (H, W) and m.dtype == np.uint8 for m in masks)
    ids = set(np.unique(np.concatenate([m.ravel() for m in masks])).tolist())
    assert ids <= {label.id for label in id2label.values() if 0 <= label.trainId < 255}
    assert len(ids) > 3  # predictions spread over several classes
    ours = json.loads((tmp_path / "metrics.json").read_text())
    official = _official_cityscapes_eval(synth_root, pred_dir)
    assert abs(100 * official["averageScoreClasses"] - 100 * ours["metrics"]["mIoU"]) < 0.01
    for name, scores in ours["per_class"].items():
        theirs = official["classScores"][name]
        if scores["IoU"] is None:
            assert np.isnan(theirs), name
        else:
            assert abs(theirs - scores["IoU"]) < 1e-4, name


def test_save_pred_color_writes_masks_and_overlays(
    synth_root: Path, palette_ckpt: Path, tmp_path: Path
) -> None:
    assert run_cli(f"ckpt={palette_ckpt}", f"out={tmp_path}", "save_pred=color") == 0
    folder = tmp_path / "pred_color"
    stems = _val_stems(synth_root)
    assert sorted(p.name for p in folder.glob("*_color.png")) == [f"{n}_color.png" for n in stems]
    assert len(list(folder.glob("*_overlay.png"))) == NUM_VAL
    mask = cv2.cvtColor(cv2.imread(str(folder / f"{stems[0]}_color.png")), cv2.COLOR_BGR2RGB)
    assert mask.shape == (H, W, 3)
    colours = {tuple(int(v) for v in c) for c in mask.reshape(-1, 3)}
    assert colours <= set(CITYSCAPES_PALETTE) and len(colours) > 1


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(
    synth_root: Path, palette_ckpt: Path, tmp_path: Path
) -> None:
    single, double = tmp_path / "one", tmp_path / "two"
    # Both on the CPU: the comparison is of 1 vs 2 processes, not of devices.
    assert run_cli(f"ckpt={palette_ckpt}", f"out={single}", "device=cpu") == 0
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), str(REPO), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(REPO / "tests" / "palette_eval.py"), f"ckpt={palette_ckpt}", f"out={double}",
        "save_pred=labelIds", "progress=false", "device=cpu",
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    one = json.loads((single / "metrics.json").read_text())
    two = json.loads((double / "metrics.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["metrics"] == pytest.approx(one["metrics"], abs=1e-12)
    assert two["per_class"] == one["per_class"]
    # 5 images over 2 ranks: each written once, none twice or missing.
    assert sorted(p.name for p in (double / "pred_labelIds").iterdir()) == [
        f"{n}_labelIds.png" for n in _val_stems(synth_root)
    ]
    assert done.stdout.count("mIoU") == 1  # only rank 0 prints


def _eval_tool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)  # PaletteNet lives in this file
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), str(REPO), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, str(REPO / "tests" / "palette_eval.py"), *args],  # admits PaletteNet
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cfg_job_shows_the_overrides_of_the_stored_config(tmp_path: Path) -> None:
    done = _eval_tool(
        "ckpt=x.pt", "dataset.root=/data/B", "eval.flip=true", "eval=slide", "--cfg", "job",
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    shown = OmegaConf.create(done.stdout)
    assert shown.ckpt == "x.pt" and shown.dataset == {"root": "/data/B"}
    assert shown.eval.mode == "slide" and shown.eval.flip is True
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.slow
def test_multirun_evaluates_each_checkpoint(palette_ckpt: Path, tmp_path: Path) -> None:
    second = tmp_path / "second" / "best.pt"
    second.parent.mkdir()
    second.write_bytes(palette_ckpt.read_bytes())
    done = _eval_tool(
        "-m", f"ckpt={palette_ckpt},{second}", "progress=false", "device=cpu", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    first = json.loads((palette_ckpt.parent / "metrics.json").read_text())
    other = json.loads((second.parent / "metrics.json").read_text())
    assert first["checkpoint"] == str(palette_ckpt) and other["checkpoint"] == str(second)
    assert other["metrics"] == first["metrics"]  # the same weights, the same numbers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multirun", "second"]
