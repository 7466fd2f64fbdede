"""Deployment of exported ONNX models on a CPU with ONNX Runtime.

- :mod:`seg.deploy.onnx_model`: open an ``.onnx`` file written by this project's export
  (fp32 or int8), check its metadata, and run it like the PyTorch eval-mode model;
- :mod:`seg.deploy.quantize`: static int8 quantization (QDQ, per-channel weights) with
  onnxruntime's own tools, calibrated on images of the training dataset.

Both need the ``deploy`` extra (onnx, onnxruntime, onnxscript).
"""
