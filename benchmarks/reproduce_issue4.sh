#!/usr/bin/env bash
# Reproduce every recorded run of issue 4 (tutorial + bench) in one go.
#
#   benchmarks/reproduce_issue4.sh cpu  [OUT]   # a quiet CPU machine      (default OUT: benchmarks/results/cpu)
#   benchmarks/reproduce_issue4.sh gpu  [OUT]   # a CUDA machine (fp16)    (default OUT: benchmarks/results/gpu)
#   DRY_RUN=1 benchmarks/reproduce_issue4.sh cpu  # print the commands only
#
# Each command writes JSON (+ PNG) named after the model, device and dtype into OUT, and its terminal
# output to OUT/<name>.log. Only ratios taken within one run are comparable; every JSON names its machine.
set -euo pipefail
target=${1:?usage: $0 cpu|gpu [OUT]}
out=${2:-benchmarks/results/$target}
mkdir -p "$out"
ITER=${ITERATIONS:-10}

#   ONLY="tutorial-fp16 bench-bert-base" ... runs just the named steps (to split a run across calls)
run() {  # run NAME ARGS...: one packformer command, logged; a failed step is reported, the rest still run
  local name=$1; shift
  if [[ -n "${ONLY:-}" && " $ONLY " != *" $name "* ]]; then return 0; fi
  echo "+ packformer $*" | tee "$out/$name.log"
  # `python3 -m packformer` also works from a source tree (PYTHONPATH=src) where nothing is installed
  if [[ -z "${DRY_RUN:-}" ]]; then
    python3 -m packformer "$@" 2>&1 | tee -a "$out/$name.log" || echo "!! step $name failed" | tee -a "$out/$name.log"
  fi
}

case "$target" in
cpu)
  # the tutorial's experiment (XLM-R large shape, random weights unless XLMR_CHECKPOINT/XLMR_SPM are set)
  run tutorial tutorial --device cpu --iterations "$ITER" --out "$out" \
      ${XLMR_CHECKPOINT:+--checkpoint "$XLMR_CHECKPOINT"} ${XLMR_SPM:+--spm "$XLMR_SPM"}
  # the standard CPU batches (WORKLOADS.md): all-MiniLM-L6-v2 (real weights) and bert-base (random)
  run bench-minilm bench --device cpu --workloads tutorial_big,serve_b32,offline_b128 \
      --peers hf_eager,hf_sdpa,hf_int8_dynamic,bt_nested,onnxruntime,packformer_ref \
      --iterations "$ITER" --out "$out"
  run bench-bert-base bench random:bert-base --device cpu --workloads tutorial_big,serve_b32 \
      --peers hf_eager,hf_sdpa,hf_int8_dynamic,bt_nested,onnxruntime,packformer_ref \
      --iterations "$ITER" --out "$out"
  # bf16 (AMX machines): packformer and the peers that take bf16, against the fp32 reference
  run bench-minilm-bf16 bench --device cpu --dtype bfloat16 --workloads serve_b32,offline_b128 \
      --peers hf_sdpa,bt_nested --iterations "$ITER" --out "$out"
  # end to end, tokenization included: 1,500 texts of the WORKLOADS.md generator
  run bench-minilm-e2e bench --device cpu --workloads texts_1500 --peers sentence_transformers,hf_sdpa \
      --iterations 3 --out "$out" --tag e2e
  # issue 3's summary (ratios to hf_sdpa, bt_nested and the floor)
  echo "+ python benchmarks/cpu_core.py --out $out" | tee "$out/cpu_core.log"
  [[ -n "${DRY_RUN:-}" ]] || python benchmarks/cpu_core.py --iterations "$ITER" --out "$out" 2>&1 | tee -a "$out/cpu_core.log"
  ;;
gpu)
  run tutorial-fp32 tutorial --device cuda --iterations "$ITER" --out "$out" \
      ${XLMR_CHECKPOINT:+--checkpoint "$XLMR_CHECKPOINT"} ${XLMR_SPM:+--spm "$XLMR_SPM"}
  run tutorial-fp16 tutorial --device cuda --dtype float16 --iterations "$ITER" --out "$out" \
      ${XLMR_CHECKPOINT:+--checkpoint "$XLMR_CHECKPOINT"} ${XLMR_SPM:+--spm "$XLMR_SPM"}
  run bench-bert-base bench random:bert-base --device cuda --dtype float16 \
      --workloads tutorial_small,tutorial_big,serve_b32,offline_b256 \
      --peers hf_eager,hf_sdpa,hf_sdpa_compiled,bt_nested,bt_dense,bt_slowpath,packformer_ref \
      --iterations "$ITER" --out "$out"
  # (no offline_b256 here: bt_slowpath would keep ~50 GB of autograd activations for 24 layers)
  run bench-xlmr-large bench random:xlmr-large --device cuda --dtype float16 \
      --workloads tutorial_small,tutorial_big,serve_b32 \
      --peers hf_eager,hf_sdpa,hf_sdpa_compiled,bt_nested,bt_dense,bt_slowpath \
      --iterations "$ITER" --out "$out"
  run bench-minilm bench --device cuda --dtype float16 --workloads serve_b32,offline_b256 \
      --peers hf_eager,hf_sdpa,hf_sdpa_compiled,bt_nested,bt_dense --iterations "$ITER" --out "$out"
  # end to end, tokenization included: 20,000 texts, batch_size 32 and 256 for the padded peers
  run bench-minilm-e2e-b32 bench --device cuda --dtype float16 --workloads texts_20000 \
      --peers sentence_transformers,hf_sdpa --batch-size 32 --iterations 3 --out "$out" --tag e2e-b32
  run bench-minilm-e2e-b256 bench --device cuda --dtype float16 --workloads texts_20000 \
      --peers sentence_transformers,hf_sdpa --batch-size 256 --iterations 3 --out "$out" --tag e2e-b256
  run profile-bert-base profile random:bert-base --device cuda --workload serve_b32 \
      --peers packformer,bt_nested,hf_sdpa --trace "$out/trace-bert-base-serve_b32.json" --out "$out"
  ;;
*) echo "unknown target $target (cpu or gpu)" >&2; exit 2 ;;
esac
echo "results in $out"
