#!/usr/bin/env bash
# Regenerate the figures of README.md's Results section, and the script runs that benchmarks/NOTES-cpu.md
# and NOTES-gpu.md cite, into benchmarks/results/<machine>/ under one stable file name per figure
# (benchmarks/results/README.md maps each figure to its file).
#
#   benchmarks/reproduce.sh cpu                 # the CPU figures: run on a quiet machine
#   benchmarks/reproduce.sh gpu                 # the GPU figures (fp16; the tutorial also times the host CPU)
#   benchmarks/reproduce.sh cpu --avx2-cap      # the CPU figures with the kernels capped to AVX2
#   benchmarks/reproduce.sh cpu --quick         # a smoke test: few iterations, into <machine>-quick/
#   benchmarks/reproduce.sh gpu --only bench-bert-base-fp16,encode-host    # some steps only
#   benchmarks/reproduce.sh cpu gpu --list      # the steps, their files and what they back
#   benchmarks/reproduce.sh cpu --dry-run       # print the commands, run nothing
#
# Options:
#   --quick        every step with few iterations (and fewer texts / requests), written to
#                  <machine>-quick/: checks that everything runs; not figures to record
#   --avx2-cap     run the CPU steps under ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
#                  MKL_ENABLE_INSTRUCTIONS=AVX2 (torch's vectorized ops, oneDNN and MKL without AVX-512),
#                  written to <machine>-avx2cap/. Also: PACKFORMER_AVX2_CAP=1, or any of those three
#                  variables already set to AVX2 in the environment.
#   --only A,B     run only the named steps (names as --list prints them)
#   --list         print the steps of the chosen targets and exit
#   --dry-run      print each command, run nothing
#   --machine NAME use NAME instead of the detected machine name (the folder under benchmarks/results/)
#   --out DIR      write to DIR instead of benchmarks/results/<machine>[-avx2cap][-quick]/
#
# <machine> is derived from the hardware: cpu-<vendor-model>-<isa> (e.g. cpu-intel-xeon-avx512,
# cpu-amd-epyc-avx512; isa: amx, avx512 or avx2, from /proc/cpuinfo) and gpu-<model> (e.g. gpu-h200, from
# the first GPU's name). Each step runs in a scratch folder; its JSON (and PNG chart) are then moved to
# <name>.json / <name>.png and its terminal output to <name>.log. A step that fails leaves the recorded
# files in place, writes <name>.failed.log, and the script exits 1 after the other steps.
# Environment: PYTHON (default python3); PEERS_PYTHON (default $PYTHON): the interpreter of the steps that
# compare against Infinity and FastEmbed, one with `pip install -e ".[dev,peers]"` (that extra cannot
# share an environment with the ray extra); PACKFORMER_BUILTIN_MODEL (the all-MiniLM-L6-v2 folder where
# its PyPI package cannot be installed, e.g. an offline GPU host).
set -uo pipefail

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
PY=${PYTHON:-python3}

targets=() quick=0 cap=${PACKFORMER_AVX2_CAP:-0} only="" list=0 dry=0 machine_override="" out_override=""
while (($#)); do
  case "$1" in
    cpu|gpu) targets+=("$1") ;;
    --quick) quick=1 ;;
    --avx2-cap) cap=1 ;;
    --only) only=${2:?--only needs a list of steps}; shift ;;
    --only=*) only=${1#*=} ;;
    --list) list=1 ;;
    --dry-run) dry=1 ;;
    --machine) machine_override=${2:?--machine needs a name}; shift ;;
    --machine=*) machine_override=${1#*=} ;;
    --out) out_override=${2:?--out needs a folder}; shift ;;
    --out=*) out_override=${1#*=} ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
((${#targets[@]})) || { usage >&2; exit 2; }
[[ "${ATEN_CPU_CAPABILITY:-}" == avx2 || "${ONEDNN_MAX_CPU_ISA:-}" == AVX2 || "${MKL_ENABLE_INSTRUCTIONS:-}" == AVX2 ]] && cap=1
[[ "$cap" == 0 ]] && cap=""
[[ "$quick" == 1 ]] || quick=""
((${#targets[@]} == 1)) || [[ -z "$out_override" ]] || { echo "--out takes one target (cpu or gpu)" >&2; exit 2; }
CAP_ENV=(ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2)

# ---- machine names ---------------------------------------------------------------------------------
slug() {  # lower case, runs of other characters -> "-"
  tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+//; s/-+$//'
}

cpu_machine() {
  local model isa flags
  model=$(grep -m1 '^model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2-)
  [[ -n "$model" ]] || model=$(uname -p 2>/dev/null || uname -m)
  # "Intel(R) Xeon(R) Platinum 8480+" -> intel-xeon-platinum-8480; "AMD EPYC 9654 96-Core Processor" -> amd-epyc-9654
  model=$(sed -E 's/\((r|tm|c)\)//gI; s/@.*$//; s/[0-9]+-core//gI; s/\b(processor|cpu)\b//gI' <<<"$model" | slug)
  flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2-) "
  if [[ "$flags" == *" amx_tile "* ]]; then isa=amx
  elif [[ "$flags" == *" avx512f "* ]]; then isa=avx512
  elif [[ "$flags" == *" avx2 "* ]]; then isa=avx2
  else isa=$(uname -m | slug); fi
  echo "cpu-${model:-unknown}-$isa"
}

gpu_machine() {
  local name
  name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
  [[ -n "$name" ]] || name=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))' 2>/dev/null)
  [[ -n "$name" ]] || { echo "no CUDA GPU found (nvidia-smi and torch.cuda both failed)" >&2; return 1; }
  # "NVIDIA H100 80GB HBM3" -> h100; "NVIDIA GeForce RTX 4090" -> rtx-4090; "NVIDIA A100-SXM4-80GB" -> a100
  local word kept=()
  for word in $(slug <<<"$name" | tr '-' ' '); do
    [[ "$word" =~ ^(nvidia|geforce|tesla|[0-9]+gb|hbm[0-9a-z]*|sxm[0-9]*|pcie|nvl)$ ]] || kept+=("$word")
  done
  name=$(IFS=-; echo "${kept[*]}")
  echo "gpu-$name"
}

# ---- steps -----------------------------------------------------------------------------------------
# step NAME "what it backs" COMMAND...   COMMAND writes into @W@ (a scratch folder for this step); its
# one JSON and optional PNG become NAME.json / NAME.png. q FULL QUICK picks an argument by --quick.
q() { if [[ -n "$quick" ]]; then echo "$2"; else echo "$1"; fi; }
pf=("$PY" -m packformer)
pp=("${PEERS_PYTHON:-$PY}" -m packformer)

cpu_steps() {
  local it; it=$(q "" "--iterations 2 --max-seconds 10")
  step tutorial-cpu "README: the tutorial on this CPU (XLM-R large shape)" \
    "${pf[@]}" tutorial --device cpu $(q "--iterations 5" "--iterations 1 --profile-iterations 0 --shape bert-base") --out @W@
  step bench-minilm-l6-fp32 "README: CPU bench table, all-MiniLM-L6-v2 rows and the int8 column" \
    "${pf[@]}" bench --device cpu --workloads tutorial_big,serve_b32,offline_b128 \
    --peers hf_sdpa,bt_nested,onnxruntime,packformer_int8 $(q "--iterations 7" "$it") --out @W@
  step bench-bert-base-fp32 "README: CPU bench table, bert-base row (random weights)" \
    "${pf[@]}" bench random:bert-base --device cpu --workloads serve_b32 \
    --peers hf_sdpa,bt_nested,onnxruntime $(q "--iterations 5" "$it") --out @W@
  step e2e-encode-minilm-l6 "README: CPU end to end, encode() vs SentenceTransformer.encode, 1,500 texts" \
    "${pf[@]}" bench --device cpu --workloads texts_1500 --peers sentence_transformers \
    $(q "--iterations 3" "$it") --out @W@
  step e2e-peers-minilm-l6 "README: encode() vs Infinity (torch, ONNX), FastEmbed, sentence-transformers; int8" \
    "${pp[@]}" bench --device cpu --workloads texts_1500 \
    --peers sentence_transformers,infinity_torch,infinity_onnx,fastembed,packformer_int8 $(q "--iterations 3" "$it") --out @W@
  step bench-serve-infinity-minilm-l6 "README: packformer serve vs infinity_emb v2, 1,500 one-text requests from 64 clients" \
    "${pp[@]}" bench-serve --device cpu --concurrency 64 $(q "--requests 1500" "--requests 60 --duration 10") \
    --peer infinity --no-baseline --no-offline --note "reproduce.sh: load generator on the same host" \
    --output @W@/bench-serve.json
  step bench-serve-minilm-l6 "README: packformer serve on CPU vs FastAPI + SentenceTransformer" \
    "${pf[@]}" bench-serve --device cpu $(q "--requests 400" "--requests 40 --duration 10 --concurrency 1 8") \
    --note "reproduce.sh: load generator on the same host" --output @W@/bench-serve.json
  step fastpath-minilm-l6 "README + NOTES-cpu: fp32 / bf16 / int8 and their GEMM floors, round-robin in one process" \
    "$PY" "$here/cpu_fast.py" $(q "--iters 5" "--iters 1 --workloads tutorial_big,serve_b32") --json @W@/cpu_fast.json
  step fastpath-e2e-minilm-l6 "NOTES-cpu: encode() fp32 / bf16 / int8 vs SentenceTransformer; int8 embedding cosine" \
    "$PY" "$here/cpu_fast.py" $(q "--e2e 1500 --iters 3" "--e2e 100 --iters 1") --json @W@/cpu_fast.json
  step profile-minilm-l6-serve_b32 "NOTES-cpu: where the time goes (torch profiler, serve_b32)" \
    "${pf[@]}" profile --device cpu --workload serve_b32 --peers packformer $(q "" "--iterations 1") --out @W@
  step bench-rerank-cpu-float32 "README + NOTES-cpu: rerank of 100 passages vs CrossEncoder.predict" \
    "${pf[@]}" bench --device cpu --workloads rerank $(q "--iterations 20" "--iterations 2") --out @W@
  step bench-sparse-cpu "README + NOTES-cpu: SPLADE (bert-base shape) vs SparseEncoder.encode" \
    "${pf[@]}" bench random:bert-base --device cpu --workloads sparse --texts "$here/texts-300.txt" \
    $(q "--iterations 3" "--iterations 1") --out @W@
  step bench-bge_m3-cpu "README + NOTES-cpu: bge-m3's three outputs vs its dense output and FlagEmbedding" \
    "$PY" "$here/with_folder.py" bge-m3 bench @FOLDER@ --device cpu --workloads bge_m3 \
    --texts "$here/texts-150.txt" $(q "--iterations 3" "--iterations 1") --out @W@
  local fam
  for fam in mpnet-base distilbert-base modernbert-base deberta-v3-base gte-base-en-v1.5 nomic-embed-text-v1.5 \
             jina-embeddings-v3; do
    step bench-family-$fam-fp32 "README: $fam serve_b32 vs transformers' fastest attention, fp32" \
      "${pf[@]}" bench random:$fam --device cpu --workloads serve_b32 --peers hf_best \
      $(q "--iterations 3" "--iterations 1") --out @W@
  done
  for fam in qwen3-embedding-0.6b embeddinggemma-300m; do
    step bench-family-$fam-fp32 "README + NOTES-cpu: $fam serve_b32 vs transformers fp32; int8" \
      "${pf[@]}" bench random:$fam --device cpu --workloads serve_b32 --peers hf_best,packformer_int8 --no-floor \
      $(q "--iterations 2" "--iterations 1") --out @W@
  done
}

gpu_steps() {
  local it; it=$(q "" "--iterations 2 --max-seconds 10")
  step tutorial-cuda-fp16 "README: the tutorial chart and table (XLM-R large shape, fp16)" \
    "${pf[@]}" tutorial --device cuda --dtype float16 $(q "--iterations 10" "--iterations 1 --profile-iterations 0 --shape bert-base") --out @W@
  step bench-bert-base-fp16 "README: GPU bench table, bert-base rows; peak memory" \
    "${pf[@]}" bench random:bert-base --device cuda --workloads tutorial_small,serve_b32,offline_b256 \
    --peers hf_sdpa,bt_nested $(q "--iterations 15" "$it") --out @W@
  step bench-xlmr-large-fp16 "README: GPU bench table, xlmr-large rows" \
    "${pf[@]}" bench random:xlmr-large --device cuda --workloads tutorial_small,serve_b32,offline_b256 \
    --peers hf_sdpa,bt_nested $(q "--iterations 15" "$it") --out @W@
  step e2e-encode-minilm-l6 "README: GPU end to end, all-MiniLM-L6-v2, 20,000 texts" \
    "${pf[@]}" bench --device cuda --workloads texts_20000 --peers sentence_transformers --batch-size 256 \
    $(q "--iterations 3" "$it") --out @W@
  step e2e-encode-bert-base "README: GPU end to end, bert-base, 20,000 texts" \
    "${pf[@]}" bench random:bert-base --device cuda --workloads texts_20000 --peers sentence_transformers \
    --batch-size 256 $(q "--iterations 3" "$it") --out @W@
  step e2e-peers-minilm-l6 "README: GPU encode() vs Infinity (torch engine) and sentence-transformers, 20,000 texts" \
    "${pp[@]}" bench --device cuda --workloads texts_20000 --peers sentence_transformers,infinity_torch \
    --batch-size 256 $(q "--iterations 3" "$it") --out @W@
  step bench-serve-infinity-minilm-l6 "README: packformer serve --device cuda vs infinity_emb v2 at 64 clients" \
    "${pp[@]}" bench-serve --device cuda --concurrency 64 $(q "--requests 4000" "--requests 60 --duration 10") \
    --peer infinity --no-baseline --no-offline --note "reproduce.sh: load generator on the same host" \
    --output @W@/bench-serve.json
  step bench-serve-minilm-l6 "README: packformer serve on the GPU vs FastAPI + SentenceTransformer" \
    "${pf[@]}" bench-serve --device cuda $(q "" "--requests 60 --duration 10 --concurrency 1 8") \
    --note "reproduce.sh: load generator on the same host" --output @W@/bench-serve.json
  local fp=("$PY" "$here/gpu_fastpath.py" --minilm @MINILM@ $(q "" "--iters 5 --texts 2000 --budget 120") --out @W@)
  step fastpath "README: SentenceTransformer's default call; NOTES-gpu: correctness, profiles" \
    "${fp[@]}" --sections env,correct,time,profile,e2e
  step fastpath-host "NOTES-gpu: whole call vs replay vs floor on small batches; host time per call" \
    "${fp[@]}" --sections env,time,host
  step fastpath-attention "NOTES-gpu: the attention kernels (ours, FA2, mem-efficient, cuDNN) per batch and head shape" \
    "${fp[@]}" --sections env,attention
  step encode-host "NOTES-gpu: encode()'s host pipeline (threads, chunks, no-model rate, cProfile)" \
    "$PY" "$here/gpu_encode_host.py" $(q "" "--texts 2000") --out @W@
  local fam
  for fam in mpnet-base distilbert-base modernbert-base gte-base-en-v1.5 deberta-v3-base nomic-embed-text-v1.5 \
             jina-embeddings-v3; do
    step bench-family-$fam-fp16 "README + NOTES-gpu: other encoder families vs transformers' fastest attention" \
      "${pf[@]}" bench random:$fam --device cuda --workloads query_b32,serve_b32,offline_b256 --peers hf_best \
      $(q "--iterations 5" "$it") --out @W@
  done
  step rotary-in-attention "NOTES-gpu: RoPE inside flash_varlen vs the rotary pass, op and whole rotary models" \
    "${fp[@]}" --sections env,rotary
  for fam in qwen3-embedding-0.6b embeddinggemma-300m; do
    step bench-family-$fam-bf16 "README + NOTES-gpu: decoder embedders (bf16) vs transformers SDPA" \
      "${pf[@]}" bench random:$fam --device cuda --workloads serve_b32,offline_b256 --peers hf_best \
      $(q "--iterations 5" "$it") --out @W@
  done
  step e2e-encode-qwen3-0.6b "NOTES-gpu: encode() vs SentenceTransformer.encode bf16, Qwen3-0.6B shape, 20,000 texts" \
    "$PY" "$here/with_folder.py" qwen3-0.6b bench @FOLDER@ --device cuda --workloads texts_20000 \
    --peers sentence_transformers --batch-size 256 $(q "--iterations 3" "$it") --out @W@
  step e2e-encode-mpnet-base-v2 "NOTES-gpu: encode() vs SentenceTransformer.encode fp16, all-mpnet-base-v2's shape, 20,000 texts" \
    "$PY" "$here/with_folder.py" mpnet-base-v2 bench @FOLDER@ --device cuda --dtype float16 --workloads texts_20000 \
    --peers sentence_transformers --batch-size 256 --no-floor $(q "--iterations 3" "$it") --out @W@
  for fam in bert-base xlmr-large qwen3-embedding-0.6b; do
    step bench-fp8-$fam "README + NOTES-gpu: fp8 GEMMs (dtype=float8) against fp16/bf16 and the fp16 floor" \
      "${pf[@]}" bench random:$fam --device cuda --workloads serve_b32,offline_b256 --peers packformer,packformer_fp8 \
      $(q "--iterations 5" "$it") --out @W@
  done
  step bench-fp8-minilm-l6 "README + NOTES-gpu: fp8 GEMMs on all-MiniLM-L6-v2 (real weights) against fp16" \
    "${pf[@]}" bench --device cuda --workloads serve_b32,offline_b256 --peers packformer,packformer_fp8 \
    $(q "--iterations 5" "$it") --out @W@
  local prof=("${pf[@]}" profile --device cuda --breakdown --eager --peers packformer,packformer_fp8,floor
              --iterations 3 --top 30 --out @W@)
  step profile-breakdown-bert-base-offline_b256 "NOTES-gpu: fp16 / fp8 / floor kernel time by category" \
    "${prof[@]}" random:bert-base --workload offline_b256
  step profile-breakdown-bert-base-serve_b32 "NOTES-gpu: fp16 / fp8 / floor kernel time by category" \
    "${prof[@]}" random:bert-base --workload serve_b32
  step profile-breakdown-xlmr-large-offline_b256 "NOTES-gpu: fp16 / fp8 / floor kernel time by category" \
    "${prof[@]}" random:xlmr-large --workload offline_b256
  step profile-breakdown-minilm-l6-offline_b256 "NOTES-gpu: fp16 / fp8 / floor kernel time by category, real weights" \
    "${prof[@]}" --workload offline_b256
  local prof8=("${pf[@]}" profile --device cuda --breakdown --eager --peers packformer_fp8,floor,floor_fp8
               --iterations 3 --top 12 --out @W@)
  step profile-breakdown-fp8-floor-bert-base-offline_b256 "NOTES-gpu: the fp8 floor beside fp8 and the fp16 floor" \
    "${prof8[@]}" random:bert-base --workload offline_b256
  step profile-breakdown-fp8-floor-bert-base-serve_b32 "NOTES-gpu: the fp8 floor beside fp8 and the fp16 floor" \
    "${prof8[@]}" random:bert-base --workload serve_b32
  step profile-breakdown-fp8-floor-xlmr-large-offline_b256 "NOTES-gpu: the fp8 floor beside fp8 and the fp16 floor" \
    "${prof8[@]}" random:xlmr-large --workload offline_b256
  step e2e-fp8-minilm-l6 "README + NOTES-gpu: encode() of 20,000 texts, fp8 against fp16, all-MiniLM-L6-v2" \
    "${pf[@]}" bench --device cuda --workloads texts_20000 --peers packformer,packformer_fp8 --warmup 1 --no-floor \
    $(q "--iterations 3" "$it") --out @W@
  step fp8-gemm "NOTES-gpu: fp8 GEMM backends and tiles, the quantize passes" \
    "${fp[@]}" --sections env,fp8_gemm
  step fp8-gemm-roles "NOTES-gpu: fp8 GEMM tiles per layer role with its epilogue, against the fp16 path's" \
    "${fp[@]}" --sections env,fp8_roles --fp8-models bert-base,xlmr-large --fp8-tokens 2209,35201
  step e2e-fp8-bert-base "NOTES-gpu: encode() of 20,000 texts, fp8 against fp16, bert-base's shape" \
    "${pf[@]}" bench random:bert-base --device cuda --workloads texts_20000 --peers packformer,packformer_fp8 \
    --warmup 1 --no-floor $(q "--iterations 3" "$it") --out @W@
  step ray-dataset-minilm-l6 "README + NOTES-gpu: embed-dataset on Ray (1 replica, 1 and 3 shards at once; 2 replicas on one GPU) vs encode()" \
    "$PY" "$here/ray_dataset.py" --device cuda $(q "--rows 200000" "--rows 20000 --configs 1x1") --out @W@
  step bench-serve-ray-minilm-l6 "README + NOTES-gpu: serve --ray (proxy, haproxy; 1 and 2 replicas on one GPU) vs serve" \
    "$PY" "$here/ray_serve.py" --device cuda $(q "" "--requests 60") --note "reproduce.sh: load generator on the same host" --out @W@
  step bench-rerank-cuda-float16 "README + NOTES-gpu: rerank of 100 passages on the GPU vs CrossEncoder.predict" \
    "${pf[@]}" bench --device cuda --workloads rerank $(q "--iterations 50" "--iterations 5") --out @W@
}

failed=() ran=0
show() {  # a command line as the shell would take it back, quoting only what needs it
  local a out=()
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=,@+-]+$ ]]; then out+=("$a"); else out+=("$(printf '%q' "$a")"); fi
  done
  echo "${out[*]}"
}
minilm_dir() {
  [[ -n "${PACKFORMER_MINILM_DIR:-}" ]] && { echo "$PACKFORMER_MINILM_DIR"; return; }
  "$PY" -c 'from packformer.loading import builtin_model_dir; print(builtin_model_dir())'
}

step() {
  local name=$1 what=$2; shift 2
  if ((list)); then printf '  %-30s %s.json  %s\n' "$name" "$name" "$what"; return 0; fi
  if [[ -n "$only" && ",$only," != *",$name,"* ]]; then return 0; fi
  ran=$((ran + 1))
  local work="$scratch/$name" args=() a
  mkdir -p "$work"
  for a in "$@"; do
    [[ "$a" == *@MINILM@* && $dry == 0 ]] && a=${a//@MINILM@/$(minilm_dir)}
    args+=("${a//@W@/$work}")
  done
  local env=()
  [[ "$part" == cpu && -n "$cap" ]] && env=(env "${CAP_ENV[@]}")
  echo
  echo "== $name -> ${dest#"$repo"/}/$name.json ($what)"
  ((dry)) && { echo "+ $(show "${env[@]}" "${args[@]}")"; return 0; }
  # the step runs as a job of its own (set -m: its own process group), so that an interrupt of this
  # script stops the whole step (servers, workers) and nothing else
  (cd "$repo" && { echo "+ $(show "${env[@]}" "${args[@]}")"; "${env[@]}" "${args[@]}"; echo $? >"$work/rc"; } 2>&1) \
    | tee "$work/$name.log" &
  step_job=$(jobs -p %+)
  wait $!
  step_job=""
  local rc; rc=$(cat "$work/rc" 2>/dev/null || echo 1)
  local jsons=("$work"/*.json) pngs=("$work"/*.png)
  [[ -e "${jsons[0]}" ]] || jsons=()
  [[ -e "${pngs[0]}" ]] || pngs=()
  if ((rc != 0 || ${#jsons[@]} != 1)); then
    echo "!! step $name failed (exit $rc, ${#jsons[@]} JSON files); log: $dest/$name.failed.log"
    mv "$work/$name.log" "$dest/$name.failed.log"
    failed+=("$name")
    return 0
  fi
  mv "${jsons[0]}" "$dest/$name.json"
  if ((${#pngs[@]})); then mv "${pngs[0]}" "$dest/$name.png"; else rm -f "$dest/$name.png"; fi
  mv "$work/$name.log" "$dest/$name.log"
  rm -f "$dest/$name.failed.log"
  echo "wrote $dest/$name.json${pngs:+ and $name.png}"
}

if ((list)); then
  for part in "${targets[@]}"; do echo "$part steps:"; "${part}_steps"; done
  exit 0
fi

scratch=$(mktemp -d "${TMPDIR:-/tmp}/packformer-reproduce.XXXXXX")
step_job=""
set -m
trap 'rm -rf "$scratch"' EXIT
trap '[[ -n "$step_job" ]] && kill -TERM -- "-$step_job" 2>/dev/null; echo "interrupted" >&2; exit 130' INT TERM

for part in "${targets[@]}"; do
  if [[ -n "$machine_override" ]]; then machine=$machine_override
  else machine=$("${part}_machine") || exit 1; fi
  if [[ -n "$out_override" ]]; then dest=$out_override
  else
    dest="$here/results/$machine"
    [[ "$part" == cpu && -n "$cap" ]] && dest+="-avx2cap"
    [[ -n "$quick" ]] && dest+="-quick"
  fi
  echo "== $part figures of $machine${cap:+ (AVX2 cap on the CPU steps)}${quick:+ (quick: not a record)} -> ${dest#"$repo"/}"
  ((dry)) || mkdir -p "$dest"
  "${part}_steps"
done

((ran)) || { echo "no step matched --only $only (see --list)" >&2; exit 2; }
if ((${#failed[@]})); then echo; echo "failed steps: ${failed[*]}"; exit 1; fi
((dry)) || echo "done: $ran step(s)"
