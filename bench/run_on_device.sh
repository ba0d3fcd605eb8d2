#!/usr/bin/env bash
# One prepared device call (GPU machine, no Rust there): CUDA parity of every committed case,
# then one DiffExplainer iteration at real sizes, ours vs PyTorch/diffusers, per dtype.
#
# Built here beforehand (see docs/gpu-baseline.md):
#   source ../shared/cuda/env.sh
#   CARGO_TARGET_DIR=/work/target-cuda cargo build --release --features cuda -p diffexplainer \
#       --bin diffexplainer --bin bench_iteration --bin bench_conv_grad --bin bench_group_norm
#   mkdir -p .device-carry && strip $T/release/diffexplainer &&
#     gzip -c $T/release/diffexplainer > .device-carry/diffexplainer.gz (same for bench_iteration,
#     bench_conv_grad, bench_group_norm; with .whl the carry is ~60 MB of the 64 MiB limit;
#     built from branch attn-cuda with gzip -9: 61.1 MB)
#   python3 -m pip download ... -d .whl diffusers==0.42.1 importlib_metadata   (device README)
# Called as: bash bench/run_on_device.sh   (carry: .device-carry, .whl)
# Budget (about 10 device minutes): parity ~2, conv-gradient table ~1, group-norm table ~0.5,
# iteration A/Bs (conv input gradient, group norm) ~1.5 each, ours + PyTorch per dtype ~1.5 each:
# ~9.5 with everything; DTYPES=f16 or SKIP_AB=1 keeps it under 8. Defaults: DTYPES="f16 f32",
# checkpointing run only with CKPT=1; SKIP_PARITY, SKIP_CONV, SKIP_GN, SKIP_AB, SKIP_TORCH skip parts.
# Fused attention (docs/gpu-notes.md entry 5, opt-in DIFFEXPLAINER_ATTENTION=fused), ~4 more minutes:
# CUDA parity of every case with the fused kernels (~2), `bench_group_norm --attention` f16 and f32
# (~1; the first process JIT-compiles the attention PTX for the GPU), an iteration A/B f16 with
# the fused kernels (~1.5). SKIP_ATTN=1 skips all three; SKIP_ATTN_PARITY=1 / SKIP_ATTN_AB=1 one.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
bin=/tmp/dx-bin; mkdir -p $bin
for f in .device-carry/*.gz; do gunzip -c "$f" > $bin/$(basename "$f" .gz); done
chmod +x $bin/*
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/gpu.txt

if [ -z "${SKIP_PARITY:-}" ]; then
echo "== parity on CUDA (f32, same bars as CPU)"
timeout 180 bash bench/cuda-libs.sh $bin/diffexplainer parity --device cuda tests/parity/cases > $OUT/parity_cuda.txt 2>&1
echo "parity exit $?"; grep -E "FAIL|ERROR" $OUT/parity_cuda.txt | head -20; tail -1 $OUT/parity_cuda.txt
fi

if [ -z "${SKIP_ATTN:-}${SKIP_ATTN_PARITY:-}" ]; then
echo "== parity on CUDA with DIFFEXPLAINER_ATTENTION=fused (first run of the attention kernels)"
timeout 180 env DIFFEXPLAINER_ATTENTION=fused bash bench/cuda-libs.sh $bin/diffexplainer parity --device cuda tests/parity/cases > $OUT/parity_cuda_attn.txt 2>&1
echo "parity (fused attention) exit $?"; grep -E "FAIL|ERROR" $OUT/parity_cuda_attn.txt | head -20; tail -1 $OUT/parity_cuda_attn.txt
# One file fewer to bring back (the limit is 8): appended to the default run's log.
{ echo "== DIFFEXPLAINER_ATTENTION=fused"; cat $OUT/parity_cuda_attn.txt; } >> $OUT/parity_cuda.txt; rm -f $OUT/parity_cuda_attn.txt
fi

if [ -z "${SKIP_ATTN:-}" ] && [ -x $bin/bench_group_norm ]; then
echo "== attention per shape: block-wise (default) vs fused kernels, docs/gpu-notes.md entry 5"
for dt in f16 f32; do
  timeout 90 bash bench/cuda-libs.sh $bin/bench_group_norm --attention --device cuda --dtype $dt --runs 10 > $OUT/attention_1.txt 2>&1
  echo "bench_group_norm --attention $dt exit $?" | tee -a $OUT/attention.txt; cat $OUT/attention_1.txt | tee -a $OUT/attention.txt
done
rm -f $OUT/attention_1.txt
fi

if [ -z "${SKIP_CONV:-}" ] && [ -x $bin/bench_conv_grad ]; then
echo "== conv input gradient per shape: conv_transpose2d (old) vs conv2d/GEMM (new), docs/gpu-notes.md"
for dt in f16 f32; do
  timeout 120 bash bench/cuda-libs.sh $bin/bench_conv_grad --device cuda --dtype $dt --runs 10 > $OUT/conv_grad_1.txt 2>&1
  echo "bench_conv_grad $dt exit $?" | tee -a $OUT/conv_grad.txt; cat $OUT/conv_grad_1.txt | tee -a $OUT/conv_grad.txt
done
rm -f $OUT/conv_grad_1.txt
fi

if [ -z "${SKIP_GN:-}" ] && [ -x $bin/bench_group_norm ]; then
echo "== group norm per shape: composed (old) vs fused CUDA kernels (new), docs/gpu-notes.md entry 4"
for dt in f16 f32; do
  timeout 60 bash bench/cuda-libs.sh $bin/bench_group_norm --device cuda --dtype $dt --runs 10 > $OUT/group_norm_1.txt 2>&1
  echo "bench_group_norm $dt exit $?" | tee -a $OUT/group_norm.txt; cat $OUT/group_norm_1.txt | tee -a $OUT/group_norm.txt
done
rm -f $OUT/group_norm_1.txt
fi

# Peak device memory of a whole process, sampled by nvidia-smi every 50 ms (baseline subtracted).
measure() { # name, timeout, command...
  local name=$1 limit=$2; shift 2
  local base; base=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 > $OUT/mem_$name.txt &
  local mon=$!
  timeout "$limit" "$@" > $OUT/run_$name.txt 2>&1; local rc=$?
  kill $mon 2>/dev/null; wait $mon 2>/dev/null
  local peak; peak=$(sort -n $OUT/mem_$name.txt | tail -1)
  echo "{\"run\": \"$name\", \"rc\": $rc, \"smi_peak_mib\": $((peak - base))}" | tee -a $OUT/summary.jsonl
  grep -E '^\{' $OUT/run_$name.txt | tee -a $OUT/summary.jsonl
  [ $rc -eq 0 ] || tail -5 $OUT/run_$name.txt
}
# A/Bs in the whole iteration (same binary, env var only): the conv input gradient, the group norm,
# the fused attention (opt-in: the A/B turns it on).
[ -n "${SKIP_ATTN:-}${SKIP_ATTN_AB:-}" ] || measure ours_f16_attn_fused ${OURS_LIMIT:-150} env DIFFEXPLAINER_ATTENTION=fused bash bench/cuda-libs.sh $bin/bench_iteration --device cuda --dtype f16 --iters ${ITERS:-3} --warmup 1
[ -n "${SKIP_AB:-}" ] || measure ours_f16_gn_composed ${OURS_LIMIT:-150} env DIFFEXPLAINER_GROUP_NORM=composed bash bench/cuda-libs.sh $bin/bench_iteration --device cuda --dtype f16 --iters ${ITERS:-3} --warmup 1
[ -n "${SKIP_AB:-}" ] || measure ours_f16_transpose ${OURS_LIMIT:-150} env DIFFEXPLAINER_CONV_INPUT_GRAD=transpose bash bench/cuda-libs.sh $bin/bench_iteration --device cuda --dtype f16 --iters ${ITERS:-3} --warmup 1
for dt in ${DTYPES:-f16 f32}; do
  tdt=$(echo $dt | sed 's/^f16$/float16/; s/^f32$/float32/; s/^bf16$/bfloat16/')
  measure ours_$dt ${OURS_LIMIT:-150} bash bench/cuda-libs.sh $bin/bench_iteration --device cuda --dtype $dt --iters ${ITERS:-3} --warmup 1
  [ -n "${SKIP_TORCH:-}" ] || measure torch_$dt 120 python3 bench/torch_iteration.py --dtypes $tdt --iters 5 --warmup 2
done
[ -z "${CKPT:-}" ] || measure ours_f16_ckpt ${OURS_LIMIT:-150} bash bench/cuda-libs.sh $bin/bench_iteration --device cuda --dtype f16 --iters ${ITERS:-3} --warmup 1 --checkpointing
# Keep what comes back within the limit of 8 files: the raw memory samples are summarized above,
# the per-run logs go into one file.
rm -f $OUT/mem_*.txt
for f in $OUT/run_*.txt; do echo "== $(basename $f)"; tail -n 40 $f; done > $OUT/runs.txt; rm -f $OUT/run_*.txt
echo "== summary"; cat $OUT/summary.jsonl
