#!/usr/bin/env bash
# Every check that only a GPU can make, in one run, with all results written under $OUT.
#
# On a machine with a CUDA GPU and torch + triton already installed (no network needed):
#     OUT=gpu-results bash scripts/gpu_check.sh
# From a development session with the `device` tool (../shared does not travel, so carry a copy):
#     mkdir -p .gpu/shared && cp -r ../shared/grok1 .gpu/shared/        # once; .gpu/ is git-ignored
#     device run, carry [".gpu"], command "bash scripts/gpu_check.sh"
#
# Runs: the GPU-only tests (bf16 MoE kernels vs the reference, the flash-attention and int8-linear
# kernels at Grok-1 shapes in fp32 and bf16, the flash-attention backward (dq, dk, dv) at Grok-1 heads
# in fp32 and bf16 vs the dense / reference autograd (test_backward_grok_shapes_on_gpu), the released int8/bf16 model on the Triton kernels vs
# the official fixture, the captured decode step replaying the eager tokens with no sync, the
# device_map splits on every visible GPU), then
# bench_moe.py, bench_generate.py, bench_parallel.py (decode ms/token per split on the GPUs) and
# bench_attention.py (issue #9: one attention sublayer's prefill time / peak memory at T 512-8192, new
# vs the old dense path, and its decode step eager vs CUDA graph against the HBM roofline) and
# bench_finetune.py (issue #10: tokens/s and peak memory of one LoRA / LoRA + checkpointing / full
# optimizer step vs the forward, impl triton vs torch, and the Grok-1 LoRA estimate on 8 x 80 GB). Paste
# $OUT/bench_moe.md (dated, with the device, commit, table and the issue-#4 target verdicts),
# $OUT/bench_attention.md, $OUT/bench_finetune.md and the bench_generate figures into BENCHMARKS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-results}
mkdir -p "$out"

# Import grok_torch.kernels / grok_torch.convert from the source tree without installing (the GPU
# image ships its own torch/triton, and pip cannot reach an index there): link them in place.
for pkg in kernels convert; do [ -e "grok_torch/$pkg" ] || ln -s "../$pkg" "grok_torch/$pkg"; done
[ -d ../shared/grok1 ] || { [ -d .gpu/shared/grok1 ] && ln -sfn "$PWD/.gpu/shared" ../shared; }

{ git rev-parse --short HEAD 2>/dev/null; date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"; } \
  2>&1 | tee "$out/machine.txt"

# The compiled kernels are what this checks: never Triton's interpreter, whatever the caller exported
# (tests/conftest.py turns it on only where CUDA is missing; the library never does).
unset TRITON_INTERPRET

status=0
python3 -m pytest -q -rs -p no:cacheprovider tests/test_kernels_triton.py tests/test_flash_attention.py \
  tests/test_int8_linear.py tests/test_kernels_lora.py tests/test_model_parity.py tests/test_decode.py tests/test_parallel.py \
  -k gpu 2>&1 \
  | tee "$out/gpu_tests.log" || status=1
python3 benchmarks/bench_moe.py --csv "$out/bench_moe.csv" --md "$out/bench_moe.md" 2>&1 | tee "$out/bench_moe.log" || status=1
python3 benchmarks/bench_generate.py 2>&1 | tee "$out/bench_generate.log" || status=1
python3 benchmarks/bench_parallel.py --md "$out/bench_parallel.md" 2>&1 | tee "$out/bench_parallel.log" || status=1
python3 benchmarks/bench_attention.py --md "$out/bench_attention.md" 2>&1 | tee "$out/bench_attention.log" || status=1
python3 benchmarks/bench_finetune.py --md "$out/bench_finetune.md" 2>&1 | tee "$out/bench_finetune.log" || status=1
exit $status
