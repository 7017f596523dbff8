#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go: short training runs in bf16 and fp16 (with
# the gradient scaler), then items 1, 2 and 9 of benchmarks/speed.py at 224x224 with resnet50
# (9: the JPEG folder against the same model on random tensors already on the GPU), and
# torchrun with trainer.device=cpu on a GPU machine: two processes on gloo, though CUDA is there
# (nccl needs a GPU per process, which one lent GPU cannot give).
#   bash benchmarks/gpu.sh [repeats]      (logs also go to $OUT when it is set)
set -euo pipefail
cd "$(dirname "$0")/.."
log=${OUT:-/tmp}/gpu.log
export PYTHONUNBUFFERED=1
{
  nvidia-smi -L
  python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
  python3 benchmarks/gpu_checkpoint_check.py
  for precision in bf16 16-mixed; do
    python3 train.py backbone.weights=null trainer.device=cuda trainer.precision=$precision \
      trainer.max_epochs=2 trainer.channels_last=true hydra.run.dir=/tmp/gpu-$precision
  done
  python3 -m torch.distributed.run --standalone --nproc-per-node=2 train.py backbone.weights=null \
    trainer.device=cpu trainer.max_epochs=1 hydra.run.dir=/tmp/gpu-torchrun-cpu
  grep -h "identical on all\|best epoch" /tmp/gpu-torchrun-cpu/train.log
  python3 benchmarks/speed.py --gpu --repeats "${1:-3}"
} 2>&1 | tee "$log"
