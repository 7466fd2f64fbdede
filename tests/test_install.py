"""The install works: `seg` and every runtime dependency import, and torch/torchvision agree."""

from __future__ import annotations

import importlib
import importlib.metadata as metadata

import pytest
import torch

RUNTIME_MODULES = [
    "torch",
    "torchvision",
    "albumentations",
    "hydra",
    "omegaconf",
    "tensorboard",
    "cv2",
    "tqdm",
    "cityscapesscripts.helpers.labels",
    "numpy",
    "matplotlib",
]


@pytest.mark.parametrize("module", RUNTIME_MODULES)
def test_runtime_dependency_imports(module: str) -> None:
    assert importlib.import_module(module) is not None


def test_seg_imports_with_version() -> None:
    import seg

    assert seg.__version__ == metadata.version("seg")


def test_torchvision_matches_torch_and_runs_an_op() -> None:
    import torchvision
    from packaging.requirements import Requirement
    from packaging.version import Version

    # torchvision declares the torch releases it was built for; a mismatched pair fails here.
    torch_reqs = [
        Requirement(r) for r in metadata.requires("torchvision") or [] if r.startswith("torch ")
    ]
    assert torch_reqs, metadata.requires("torchvision")
    installed = Version(torch.__version__.split("+")[0])
    assert all(installed in r.specifier for r in torch_reqs), (torch.__version__, torch_reqs)
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    kept = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), iou_threshold=0.5)
    assert kept.tolist() == [0, 2]


def test_only_the_headless_opencv_is_installed() -> None:
    installed = {d.metadata["Name"].lower() for d in metadata.distributions()}
    assert "opencv-python-headless" in installed
    # The GUI build beside the headless one overwrites cv2 and breaks it.
    assert "opencv-python" not in installed


def test_albumentations_and_hydra_major_versions() -> None:
    import albumentations
    import hydra

    assert albumentations.__version__.split(".")[0] == "2"
    assert hydra.__version__.startswith("1.3")


def test_importing_seg_turns_off_albumentations_network_check() -> None:
    """albumentations asks PyPI for updates at import and warns on stderr when offline,
    which broke the one-line error output on a machine without network."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    code = "import os, seg.data.transforms; print(os.environ['NO_ALBUMENTATIONS_UPDATE'])"
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip() == "1", done.stderr
    assert done.stderr == ""
