"""The optional ``deploy`` extra (onnx, onnxruntime, onnxscript): one check, one error.

ONNX export (:mod:`seg.export`), the onnxruntime model (:mod:`seg.models.onnx_model`), int8
quantization (:mod:`seg.deploy.quantize`) and the deployment benchmark all need these
packages, which a training install may lack; each asks here, so that a missing package is
the same one line naming it and the extra to install.
"""

from __future__ import annotations

from types import ModuleType

from seg.errors import SegError

INSTALL_HINT = "pip install -e '.[deploy]'"


class DeployDependencyError(SegError):
    """A package of the ``deploy`` extra (onnx, onnxscript, onnxruntime) is missing."""

    exit_status = 2  # the user installs it (seg/cli.py: bad input or environment)


def require_deploy() -> tuple[ModuleType, ModuleType]:
    """Import ``(onnx, onnxruntime)`` (and check onnxscript, which the exporter needs).

    Raises:
        DeployDependencyError: naming the missing package and the extra to install.
    """
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (imported by torch.onnx.export(dynamo=True))
    except ImportError as error:
        name = error.name or str(error)
        raise DeployDependencyError(
            f"ONNX export needs the 'deploy' extra ({name} is not installed): {INSTALL_HINT}"
        ) from None
    return onnx, onnxruntime
