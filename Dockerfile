# seg on an official PyTorch CUDA runtime image (torch and torchvision come with the base).
#   docker build -t seg .
#   docker run --gpus all --shm-size=8g -v $PWD/data:/workspace/data -v $PWD/outputs:/workspace/outputs \
#       seg python tools/train.py +experiment=cityscapes_ohem
ARG BASE_IMAGE=pytorch/pytorch:2.7.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /workspace

# Dependencies first, so that code changes do not invalidate this layer. The base image's
# torch/torchvision satisfy the project's ranges and are kept.
COPY pyproject.toml README.md ./
COPY seg/__init__.py seg/__init__.py
RUN pip install -e '.[deploy]'

COPY . .

CMD ["python", "tools/train.py", "--help"]
