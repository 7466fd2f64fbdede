"""Deployment of exported ONNX models on a CPU with ONNX Runtime.

- :mod:`seg.deploy.quantize`: static int8 quantization (QDQ, per-channel weights) with
  onnxruntime's own tools, calibrated on images of the training dataset.

It needs the ``deploy`` extra (onnx, onnxruntime, onnxscript). The runtime wrapper that
eval and predict use for any ``.onnx`` file is a model: :mod:`seg.models.onnx_model`.
"""
