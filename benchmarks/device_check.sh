#!/usr/bin/env bash
# A GPU machine's check in under 5 minutes, one line per figure:
#   1. the tests marked `cuda` (every engine on a small model; CPU and GPU results agree where the
#      definitions say so: noise blocks bit for bit, counts, attacks, PSNR, samples, the energy network);
#   2. the attack benchmark at GPU sizes (AutoAttack over an ε list, PGD against torchattacks);
#   3. the certification benchmark at GPU sizes (10,000 draws per pass; digits CNN and ResNet-18);
#   4. what drawing the noise on the CPU costs per pass, and copying it to the GPU.
# Without a GPU it runs a short CPU version of 2-4 and reports the cuda tests as skipped.
#
#   benchmarks/device_check.sh              # DEVICE_CHECK_COMPILE=1 also times torch.compile (+1-2 min)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
LOGS=$(mktemp -d)
started=$(date +%s)

# One line per figure from a JSON file: "<prefix> <dotted.key> = <value>".
figures() {
    "$PY" - "$1" "$2" <<'EOF'
import json, sys

def walk(prefix, value):
    if isinstance(value, dict):
        for key, item in value.items():
            walk(f"{prefix}.{key}" if prefix else str(key), item)
    elif isinstance(value, list) and value and isinstance(value[0], dict):
        for i, item in enumerate(value):
            walk(f"{prefix}[{item.get('method', item.get('model', i))}]", item)
    else:
        print(f"{sys.argv[2]} {prefix} = {round(value, 4) if isinstance(value, float) else value}")

walk("", json.load(open(sys.argv[1])))
EOF
}

if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    DEVICE=cuda
    "$PY" -c "import torch; print(f'device_check on {torch.cuda.get_device_name(0)} ({torch.cuda.device_count()} GPU), torch {torch.__version__}, CPU {torch.backends.cpu.get_cpu_capability()}')"
else
    DEVICE=cpu
    "$PY" -c "import torch; print(f'device_check without a GPU: CUDA parts skipped, CPU parts shortened; torch {torch.__version__}, CPU {torch.backends.cpu.get_cpu_capability()}')"
fi

# 1. The cuda-marked tests (skipped, with their reason, without a GPU).
status=0
"$PY" -m pytest -q -p no:cacheprovider -m cuda -rs tests > "$LOGS/tests.log" 2>&1 || status=$?
echo "cuda tests: $(tail -n 1 "$LOGS/tests.log" | sed 's/=//g; s/^ *//; s/ *$//')"
if [ "$status" -ne 0 ] && [ "$status" -ne 5 ]; then
    grep -E "^(FAILED|ERROR)" "$LOGS/tests.log" | sed 's/^/  /' || true
fi

# 2. Attacks.
if [ "$DEVICE" = cuda ]; then
    attack_args=(--device cuda --threads 4 --n 100 --eps-list 0.05,0.1,0.2 --pgd-n 500 --repeats 3)
else
    attack_args=(--device cpu --threads 1 --only pgd --pgd-n 50 --repeats 1)
fi
"$PY" benchmarks/bench_attacks.py "${attack_args[@]}" --json > "$LOGS/attacks.json" 2> "$LOGS/attacks.log" \
    || { echo "attack benchmark FAILED:"; tail -n 5 "$LOGS/attacks.log"; status=1; }
[ -s "$LOGS/attacks.json" ] && figures "$LOGS/attacks.json" "attacks"

# 3. Certification.
if [ "$DEVICE" = cuda ]; then
    certify_args=(--device cuda --models digits,resnet18 --n-images 100 --resnet-images 8 --batch-size 10000
                  --loop-batch 10000 --skip-art)
else
    certify_args=(--device cpu --threads 1 --models digits --n-images 2 --n0 100 --n 1000 --skip-art --skip-loop)
fi
if [ "${DEVICE_CHECK_COMPILE:-0}" = 1 ]; then certify_args+=(--compile); else certify_args+=(--no-compile); fi
"$PY" benchmarks/bench_certify.py "${certify_args[@]}" --json-out "$LOGS/certify.json" > "$LOGS/certify.log" 2>&1 \
    || { echo "certify benchmark FAILED:"; tail -n 5 "$LOGS/certify.log"; status=1; }
[ -s "$LOGS/certify.json" ] && figures "$LOGS/certify.json" "certify"

# 4. The noise's CPU cost per pass (and the copy to the GPU).
if [ "$DEVICE" = cuda ]; then noise_args=(--batch 10000 --shapes digits,cifar10); else noise_args=(--batch 1000 --repeats 1); fi
"$PY" benchmarks/noise_cost.py "${noise_args[@]}" 2>&1 || status=1

echo "device_check: $(( $(date +%s) - started )) s, logs in $LOGS, $([ "$status" -eq 0 ] || [ "$status" -eq 5 ] && echo ok || echo FAILED)"
[ "$status" -eq 0 ] || [ "$status" -eq 5 ]
