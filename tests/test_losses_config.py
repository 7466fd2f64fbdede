"""MultiHeadLoss and the loss/ config group: totals, terms, stats, errors, Hydra composition."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from seg.errors import ConfigError
from seg.losses import (
    CrossEntropyLoss,
    FocalLoss,
    GhmcLoss,
    LossOutput,
    MultiHeadLoss,
    OhemCELoss,
)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
HEADS = ["main", "aux2", "aux3", "aux4", "aux5_4"]
C = 19


def head_outputs(heads=HEADS, n=2, h=16, w=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (n, h, w), generator=gen)
    labels[:, 0] = 255
    outputs = {head: torch.randn(n, C, h, w, generator=gen).requires_grad_() for head in heads}
    return outputs, labels


def test_multi_head_total_terms_and_stats() -> None:
    weights = {"main": 1.0, "aux2": 0.4, "aux3": 0.4, "aux4": 0.0, "aux5_4": 2.5}
    modules = {
        "main": OhemCELoss(),
        "aux2": CrossEntropyLoss(),
        "aux3": FocalLoss(),
        "aux4": OhemCELoss(thresh=0.3),
        "aux5_4": CrossEntropyLoss(),
    }
    loss = MultiHeadLoss({h: {"loss": modules[h], "weight": weights[h]} for h in HEADS})
    outputs, labels = head_outputs()
    out = loss(outputs, labels)
    assert isinstance(out, LossOutput)
    assert list(out.terms) == HEADS
    for head in HEADS:
        assert torch.equal(out.terms[head], modules[head](outputs[head], labels))
    expected = sum(weights[h] * out.terms[h] for h in HEADS)
    torch.testing.assert_close(out.total, expected)
    assert set(out.stats) == {"main/kept_fraction", "aux4/kept_fraction"}
    assert all(v.dim() == 0 for v in out.stats.values())
    assert out.stats["main/kept_fraction"].item() == pytest.approx(
        modules["main"].forward_with_stats(outputs["main"], labels)[1]["kept_fraction"].item()
    )
    out.total.backward()
    assert torch.equal(outputs["aux4"].grad, torch.zeros_like(outputs["aux4"]))  # weight 0
    assert outputs["main"].grad.abs().sum() > 0


def test_multi_head_weight_defaults_to_one_and_accepts_dictconfig() -> None:
    heads = OmegaConf.create({"main": {"weight": 2.0}}, flags={"allow_objects": True})
    heads.main.loss = CrossEntropyLoss()
    loss = MultiHeadLoss(heads)
    outputs, labels = head_outputs(["main"])
    assert torch.equal(
        loss(outputs, labels).total, 2.0 * CrossEntropyLoss()(outputs["main"], labels)
    )
    assert MultiHeadLoss({"main": {"loss": CrossEntropyLoss()}}).weights == {"main": 1.0}


def test_multi_head_errors_name_the_head() -> None:
    loss = MultiHeadLoss({h: {"loss": CrossEntropyLoss(), "weight": 1.0} for h in HEADS})
    outputs, labels = head_outputs(["main"])  # a model built without aux heads
    with pytest.raises(ConfigError, match=r"\['aux2', 'aux3', 'aux4', 'aux5_4'\].*does not output"):
        loss(outputs, labels)
    outputs, labels = head_outputs(["main", "aux9"])
    with pytest.raises(ConfigError, match=r"\['aux9'\] have no configured loss"):
        MultiHeadLoss({"main": {"loss": CrossEntropyLoss()}})(outputs, labels)
    with pytest.raises(ConfigError, match="dict of head outputs"):
        loss(outputs["main"], labels)
    with pytest.raises(ConfigError, match="'main' needs a 'loss'"):
        MultiHeadLoss({"main": {"weight": 1.0}})
    with pytest.raises(ConfigError, match="'main' weight"):
        MultiHeadLoss({"main": {"loss": CrossEntropyLoss(), "weight": -1.0}})
    with pytest.raises(ConfigError, match="unknown keys"):
        MultiHeadLoss({"main": {"loss": CrossEntropyLoss(), "wieght": 1.0}})
    with pytest.raises(ConfigError, match="loss module"):
        MultiHeadLoss({"main": {"loss": torch.nn.functional.cross_entropy}})
    with pytest.raises(ConfigError, match="non-empty"):
        MultiHeadLoss({})


def compose_loss(name: str, overrides: tuple[str, ...] = ()) -> MultiHeadLoss:
    """Compose configs/loss/<name>.yaml over a dataset stub and instantiate it."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(overrides=[f"+loss={name}", *overrides])
    stub = OmegaConf.create({"dataset": {"num_classes": C, "ignore_index": 255}})
    cfg = OmegaConf.merge(stub, cfg)
    return instantiate(cfg.loss)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("ohem", dict.fromkeys(HEADS, OhemCELoss)),
        ("ce", dict.fromkeys(HEADS, CrossEntropyLoss)),
        ("focal", dict.fromkeys(HEADS, FocalLoss)),
        ("ghm", dict.fromkeys(HEADS, GhmcLoss)),
        ("ohem_main_ce_aux", {"main": OhemCELoss} | dict.fromkeys(HEADS[1:], CrossEntropyLoss)),
    ],
)
def test_loss_configs_compose_and_instantiate(name: str, expected: dict) -> None:
    loss = compose_loss(name)
    assert isinstance(loss, MultiHeadLoss) and loss.name == name
    assert list(loss.losses) == HEADS
    assert loss.weights == dict.fromkeys(HEADS, 1.0)
    for head, module in loss.losses.items():
        assert type(module) is expected[head]
        assert module.ignore_index == 255 and module.num_classes == C  # interpolated
    outputs, labels = head_outputs()
    out = loss(outputs, labels)
    assert torch.isfinite(out.total) and set(out.terms) == set(HEADS)


def test_loss_config_defaults_match_the_design() -> None:
    loss = compose_loss("ohem")
    for module in loss.losses.values():
        assert module.thresh == 0.7 and module.min_kept_ratio == 1 / 16
    assert all(m.gamma == 2.0 and m.alpha is None for m in compose_loss("focal").losses.values())
    # The official GHM-C settings; every head has its own moving counts.
    ghm = compose_loss("ghm").losses.values()
    assert all(m.bins == 10 and m.momentum == 0.75 for m in ghm)
    assert len({id(m.bin_counts) for m in ghm}) == len(HEADS)


def test_per_head_override_from_the_command_line() -> None:
    loss = compose_loss("ohem", ("loss.heads.main.loss.thresh=0.6", "loss.heads.aux2.weight=0.4"))
    assert loss.losses["main"].thresh == 0.6 and loss.losses["aux3"].thresh == 0.7
    assert loss.weights["aux2"] == 0.4
