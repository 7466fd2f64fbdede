"""DDP: two CPU processes (gloo) train a few iterations on tiny SynthCity.

Both ranks must end with the same weights (the run checks it and says so in train.log),
only rank 0 writes files, and the mIoU of the sharded evaluation (confusion matrices
all-reduced) must equal a single-process evaluation of the final weights.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig

REPO = Path(__file__).resolve().parents[1]
WORLD_SIZE = 2


def _compose(data_root: Path) -> DictConfig:
    overrides = [
        "+experiment=synthcity_ohem",
        f"dataset.root={data_root}",
        "dataset.generator.height=64",
        "dataset.generator.width=128",
        "dataset.generator.num_train=12",
        "dataset.generator.num_val=5",  # odd: the ranks' shards differ in size
        "dataset.crop_size=[64,128]",
        "loader.batch_size=4",  # global: 2 per rank
        "loader.num_workers=0",
        "trainer.device=cpu",
        "trainer.max_iters=3",
        "trainer.eval_interval=3",
        "trainer.ckpt_interval=3",
        "trainer.log_interval=1",
        "schedule.warmup_iters=1",
        "optim.lr=0.01",
    ]
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def _worker(rank: int, port: int, base: str) -> None:
    import os

    from seg.engine.train_run import run

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD_SIZE),
    )
    torch.set_num_threads(1)
    result = run(_compose(Path(base) / "synthcity"), run_dir=Path(base) / f"run_rank{rank}")
    torch.save({"mIoU": result.metrics["mIoU"]}, Path(base) / f"result_rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_process_gloo_training_agrees(tmp_path: Path) -> None:
    cfg = _compose(tmp_path / "synthcity")
    instantiate(cfg.dataset.train)  # generate the data once, before the ranks start
    val_set = instantiate(cfg.dataset.val)
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)

    results = [torch.load(tmp_path / f"result_rank{r}.pt", weights_only=True) for r in range(2)]
    assert results[0]["mIoU"] == results[1]["mIoU"]
    # rank 0 alone writes the run folder
    assert (tmp_path / "run_rank0" / "checkpoints" / "last.pt").is_file()
    log = (tmp_path / "run_rank0" / "train.log").read_text()
    assert "DDP: the weights are identical on all 2 ranks" in log
    assert not (tmp_path / "run_rank1").exists()
    weights0 = torch.load(tmp_path / "run_rank0" / "checkpoints" / "last.pt", weights_only=True)
    weights0 = weights0["model"]

    from seg.data.loader import build_eval_loader

    model = instantiate(cfg.model)
    model.load_state_dict(weights0)
    evaluator = instantiate(cfg.eval)
    loader = build_eval_loader(val_set, batch_size=1, num_workers=0)
    single = evaluator.evaluate(model, loader, torch.device("cpu"), progress=False)
    assert single["mIoU"] == pytest.approx(results[0]["mIoU"], abs=1e-12)


def test_more_processes_than_gpus_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun --nproc_per_node=2 on a 1-GPU machine: the second process names the fault
    instead of dying in ``torch.cuda.set_device`` (found on an H100 machine)."""
    from seg import dist
    from seg.errors import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)

    def no_set_device(index: int) -> None:
        raise AssertionError(f"set_device({index}) reached")

    monkeypatch.setattr(torch.cuda, "set_device", no_set_device)
    with pytest.raises(ConfigError, match=r"started 2 processes .* 1 GPU\(s\).*--nproc_per_node=1"):
        dist.init_distributed()
    assert not dist.is_distributed()
    dist.check_gpu_per_process(0, 1)  # one process per GPU is fine


@pytest.mark.gpu
def test_torchrun_with_more_processes_than_gpus_exits_2(tmp_path: Path) -> None:
    import subprocess
    import sys

    nproc = torch.cuda.device_count() + 1
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            str(REPO / "tools" / "train.py"),
            f"dataset.root={tmp_path / 'synthcity'}",
            "dataset.generator.height=64",
            "dataset.generator.width=128",
            "dataset.generator.num_train=4",
            "dataset.generator.num_val=2",
            "dataset.crop_size=[64,128]",
            "trainer.max_iters=1",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert f"error: torchrun started {nproc} processes" in result.stderr, result.stderr
    assert "invalid device ordinal" not in result.stderr


def test_cpu_run_on_a_gpu_machine_joins_over_gloo(monkeypatch: pytest.MonkeyPatch) -> None:
    """trainer.device=cpu under torchrun on a GPU machine: Gloo and no GPU pinning (NCCL
    cannot reduce CPU tensors; found by the first GPU run of the suite)."""
    from seg import dist

    joined: list[str] = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: joined.append(f"gpu{index}"))
    monkeypatch.setattr(
        torch.distributed, "init_process_group", lambda backend: joined.append(backend)
    )
    assert dist.init_distributed(use_cuda=dist.wants_cuda("cpu"))
    assert joined == ["gloo"]
    assert [dist.wants_cuda(s) for s in ("auto", "cuda", "cuda:0", "cpu", "bogus")] == [
        True,
        True,
        True,
        False,
        False,
    ]
