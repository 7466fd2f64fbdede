"""Where the time goes: onnxruntime's per-operator profile of an fp32 and an int8 model.

Runs each model (batch 1, random input) with onnxruntime's profiler on, after warm-up,
and sums the kernel time per operator kind (convolutions split into dense 3x3, depthwise
3x3 and 1x1, read from the optimised graph). The table in docs/deploy.md comes from:

    python docs/deploy/profile_ops.py model.onnx model_int8.onnx --size 512 1024 --runs 5

Nothing here is used by the package; it documents a measurement.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from seg.tables import markdown_table


def conv_kind(node: onnx.NodeProto | None) -> str:
    """``dense 3x3`` / ``depthwise 3x3`` / ``1x1`` for a (fused or quantized) convolution."""
    if node is None:
        return "?"
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    kernel = "x".join(map(str, attrs.get("kernel_shape", []))) or "?"
    if kernel == "1x1":
        return "1x1"
    return f"{'depthwise' if attrs.get('group', 1) > 1 else 'dense'} {kernel}"


def profile(path: Path, size: tuple[int, int], runs: int, folder: Path) -> dict[str, float]:
    """Milliseconds per run by operator kind (the optimised graph's node names)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.optimized_model_filepath = str(folder / f"{path.stem}.optimised.onnx")
    options.enable_profiling = True
    options.profile_file_prefix = str(folder / path.stem)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    images = np.random.default_rng(0).standard_normal((1, 3, *size), dtype=np.float32)
    session.run(None, {"images": images})  # warm-up, also profiled: dropped below
    for _ in range(runs):
        session.run(None, {"images": images})
    events = json.loads(Path(session.end_profiling()).read_text())
    nodes = {n.name: n for n in onnx.load(options.optimized_model_filepath).graph.node}
    durations: dict[str, list[float]] = collections.defaultdict(list)  # per node, call order
    kinds: dict[str, str] = {}
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        name, op = event["name"].removesuffix("_kernel_time"), event["args"]["op_name"]
        kinds[name] = f"{op} ({conv_kind(nodes.get(name))})" if "Conv" in op else op
        durations[name].append(event["dur"] / 1000.0)
    per_kind: dict[str, float] = collections.defaultdict(float)
    for name, times in durations.items():
        timed = times[1:] or times  # each node runs once per call: drop the warm-up call
        per_kind[kinds[name]] += sum(timed) / len(timed)
    return dict(per_kind)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", type=Path, nargs="+")
    parser.add_argument("--size", type=int, nargs=2, default=(512, 1024))
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for path in args.models:
            times = profile(path, tuple(args.size), args.runs, Path(tmp))
            total = sum(times.values())
            rows = [
                [kind, ms, 100 * ms / total]
                for kind, ms in sorted(times.items(), key=lambda kv: -kv[1])
                if ms >= 0.005 * total
            ]
            print(f"\n{path} at 1x3x{args.size[0]}x{args.size[1]}: {total:.0f} ms of kernels\n")
            print(markdown_table(["operator", "ms per run", "% of kernel time"], rows))


if __name__ == "__main__":
    main()
