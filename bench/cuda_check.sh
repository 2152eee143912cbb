#!/usr/bin/env bash
# One prepared CUDA check of the whole pipeline plus a GPU timing, for a machine with a GPU and no internet.
# It builds a random Llama-3-shaped model (GQA 4:1, 1.2B parameters, bf16) so no download is needed, then runs
# global and layer-wise pruning on cuda (taylor + lsq, block influence), and `eval` (dense vs pruned speed).
# A second taylor + lsq run offloads most layers to CPU and disk (--device_map auto) and compares its plan.
# SCALE=1 QUICK=1 runs a 0.3B model and only the first run plus eval.
# MEMORY=1 instead runs only the memory check of issue 14 (about 5 minutes): every phase of the default global
# command (taylor + lsq, 64 x 128 / 256 x 128 tokens) on a random 32-layer Llama-3-8B-shaped model in bf16, the
# process capped at 24 GiB with torch.cuda.set_per_process_memory_fraction; per-phase peak CUDA memory and time
# go to $OUT/memory_gpu.json for bench/results_memory.md. Not run on a GPU yet.
# Needs: DATA (folder with wikitext2/), TOK (a tokenizer folder, e.g. SmolLM2's), OUT (where results go).
set -euo pipefail
: "${DATA:?}" "${TOK:?}" "${OUT:?}"
export LLAMA_PRUNING_DATA=$DATA PYTHONPATH=$PWD PYTHONUNBUFFERED=1
if [ "${MEMORY:-0}" = 1 ]; then
    start=$SECONDS
    python3 bench/memory.py phases --width 8b --layer_count 32 --device cuda --dtype bfloat16 --memory_limit_gib 24 \
        --num_samples 64 --seq_len 128 --reconstruct_samples 256 --batch_size 4 --workdir /tmp/memory_gpu \
        > "$OUT/memory_gpu.json" 2> >(tee "$OUT/memory_gpu.log" >&2)
    echo "TIMING $((SECONDS - start)) s: memory check" | tee -a "$OUT/memory_gpu.log"
    python3 -m llama_pruning.cli.main global --base_model /tmp/memory_gpu/model --device cuda --dtype bfloat16 \
        --dry_run | tee "$OUT/dry_run.txt"  # the projection the measured peaks are compared with
    exit 0
fi
python3 - <<'PY'
import os, time, torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
tok = AutoTokenizer.from_pretrained(os.environ["TOK"])
scale = int(os.environ.get("SCALE", "2"))  # 2: 1.2B parameters; 1: a quick 0.3B check
config = LlamaConfig(vocab_size=len(tok), hidden_size=1024 * scale, intermediate_size=4096 * scale,
                     num_hidden_layers=8 * scale, num_attention_heads=16 * scale, num_key_value_heads=4 * scale,
                     head_dim=64, max_position_embeddings=2048)
torch.manual_seed(0)
with torch.device("cuda"):
    model = LlamaForCausalLM(config).to(torch.bfloat16)
model.config.name_or_path = "random-llama3-shape-1.2b"
model.save_pretrained("/tmp/rand_llama"); tok.save_pretrained("/tmp/rand_llama")
print("saved random model", sum(p.numel() for p in model.parameters()), torch.cuda.get_device_name())
PY
run() { local start=$SECONDS; "$@"; echo "TIMING $((SECONDS - start)) s: $*"; }
PLACED=(--base_model /tmp/rand_llama --dtype bfloat16 --num_samples 32 --seq_len 128 --gradient_batch_size 8
        --output_root /tmp/runs --test_before_prune --test_after_prune --eval_max_windows 32 --overwrite)
COMMON=(--device cuda "${PLACED[@]}")
run python3 global_pruning.py --save_ckpt_log_name g_taylor_lsq --pruning_ratio 0.2 --importance_method taylor \
    --reconstruct lsq --save_model --round_to 64 "${COMMON[@]}"
# the same run with most layers offloaded to CPU and disk (--device_map): it should give the same plan
[ "${QUICK:-0}" = 1 ] || run python3 global_pruning.py --save_ckpt_log_name g_offload --pruning_ratio 0.2 \
    --importance_method taylor --reconstruct lsq --round_to 64 --device_map auto --max_memory 0=1GiB,cpu=1GiB \
    --offload_dir /tmp/offload "${PLACED[@]}"
[ "${QUICK:-0}" = 1 ] || python3 -c "import json, sys; a, b = (json.load(open(f'/tmp/runs/{n}/pruning_plan.json')) for n in ('g_taylor_lsq', 'g_offload')); print('device map, same plan as on one GPU:', all(a[k] == b[k] for k in ('attn_groups', 'mlp_channels')))" | tee "$OUT/device_map.txt"
[ "${QUICK:-0}" = 1 ] || run python3 global_pruning.py --save_ckpt_log_name g_taylor2 --pruning_ratio 0.2 --importance_method taylor_2nd \
    --reconstruct none --remove_empty_layers "${COMMON[@]}"
[ "${QUICK:-0}" = 1 ] || run python3 layer_pruning.py --save_ckpt_log_name l_28 --pruning_ratio 0.2 --importance_method wanda \
    --reconstruct bias "${COMMON[@]}"
python3 -m llama_pruning.cli.main eval /tmp/runs/g_taylor_lsq --base_model /tmp/rand_llama --device cuda \
    --dtype bfloat16 --batch_size 8 --prefill_len 512 --decode_tokens 64 --json "$OUT/eval.json"
for d in /tmp/runs/*/; do echo "== $d"; sed -n '/## size/,$p' "$d/description.txt"; done | tee "$OUT/summary.txt"
