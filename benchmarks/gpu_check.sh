#!/usr/bin/env bash
# One prepared device check for a lent NVIDIA GPU machine (H100/H200: torch with CUDA, nvcc, Triton, CuPy,
# onnxruntime for the CPU; no TensorRT, no onnxruntime-gpu, no network). It runs every GPU path that can run
# there, skips the others naming why, and writes gpu_check.json (a summary) and gpu_check.log into the folder
# given, else $OUT, else build/gpu-check. Budget: about 8 minutes; a step that would start after the budget is
# skipped, and each step has its own time limit, cut to what is left of the budget.
#
#   benchmarks/gpu_check.sh [--dry-run] [FOLDER]
#
# --dry-run lists the steps and their commands and runs nothing. Work files (engines, the kernel builds) go to
# $KILN_GPU_CHECK_WORK (default /tmp/kiln-gpu-check), not the output folder, which keeps only the few files
# that come back.
set -u
cd "$(dirname "$0")/.."

dry_run=0
dest=""
for arg in "$@"; do
    case "$arg" in
        --dry-run) dry_run=1 ;;
        -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "gpu_check.sh: unknown option $arg (expected --dry-run or a folder)" >&2; exit 2 ;;
        *) dest="$arg" ;;
    esac
done
dest="${dest:-${OUT:-build/gpu-check}}"
work="${KILN_GPU_CHECK_WORK:-/tmp/kiln-gpu-check}"
budget_s="${KILN_GPU_CHECK_BUDGET_S:-480}"
py="${PYTHON:-python3}"
kiln="$py -c 'from kiln.cli import main; main()'"
skip=77  # a step exits with this, after printing why, when what it needs is not on the machine

steps=()  # "name|time limit in seconds|command"
step() { steps+=("$1|$2|$3"); }

step facts 60 "nvidia-smi -L; $py -c 'import json, torch, onnxruntime; print(json.dumps({\"gpu\": torch.cuda.get_device_name(), \"torch\": torch.__version__, \"cuda\": torch.version.cuda, \"onnxruntime\": onnxruntime.__version__, \"providers\": onnxruntime.get_available_providers()}))' | tee $work/facts.json"
step plugin-build 180 "$py -m plugins.build cuda --arch sm_90 --arch compute_80"
# Only the modules that mark GPU or TensorRT tests are collected: the others may import what the machine lacks.
step gpu-tests 300 "$py -m pytest -q -m 'gpu or tensorrt' -p no:cacheprovider -rs \$(grep -rlE 'mark\\.(gpu|tensorrt)' tests --include='test_*.py' | sort)"
step aoti-cuda-tiny 240 "$kiln convert tiny-gpt2 --target aoti-cuda -o $work/tiny-gpt2-aoti-cuda --force --json > $work/convert.json && $kiln verify $work/tiny-gpt2-aoti-cuda --trust-native-code && $kiln generate $work/tiny-gpt2-aoti-cuda --prompt-ids 5,17,300 --max-new-tokens 16 --trust-native-code --json"
step attention-bench 180 "$py benchmarks/attention_gpu.py --json $dest/attention.json"
step onnxruntime-cuda 240 "$py -c 'import onnxruntime, sys; sys.exit(\"CUDAExecutionProvider\" not in onnxruntime.get_available_providers())' || { echo 'skipped: onnxruntime here has no CUDAExecutionProvider (onnxruntime-gpu, 256 MB, is not installed and cannot be carried)'; exit $skip; }; $kiln convert tiny-gpt2 --target cuda --precision fp16 -o $work/tiny-gpt2-cuda --force && $kiln generate $work/tiny-gpt2-cuda --prompt-ids 5,17,300 --max-new-tokens 16 --json"
step tensorrt 300 "$py -c 'import tensorrt' 2>/dev/null || { echo 'skipped: TensorRT is not installed (its libraries come from the NVIDIA package index, unreachable here); its gpu-tests were skipped too'; exit $skip; }; $kiln convert tiny-gpt2 --target tensorrt --precision fp16 --profile batch=1:1:4,sequence=1:1:64,past=0:64:192 -o $work/tiny-gpt2-tensorrt --force"
step gpt2-aoti-cuda 300 "$kiln convert gpt2 --target aoti-cuda -o $work/gpt2-aoti-cuda --force && $kiln bench $work/gpt2-aoti-cuda --prompt-lengths 32,128 --batches 1,8 --new-tokens 32 --rounds 2 --trust-native-code --json > $dest/gpt2-bench.json"

if [ "$dry_run" = 1 ]; then
    echo "gpu_check.sh would run, in $(pwd), within ${budget_s} s, writing $dest/gpu_check.json and $dest/gpu_check.log:"
    for entry in "${steps[@]}"; do
        IFS='|' read -r name limit command <<< "$entry"
        printf '  %-16s (at most %3s s) %s\n' "$name" "$limit" "$command"
    done
    exit 0
fi

mkdir -p "$dest" "$work"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export KILN_CACHE_DIR="${KILN_CACHE_DIR:-$work/cache}"
log="$dest/gpu_check.log"
results="$work/results.tsv"
: > "$log"
: > "$results"
started=$(date +%s)
for entry in "${steps[@]}"; do
    IFS='|' read -r name limit command <<< "$entry"
    elapsed=$(( $(date +%s) - started ))
    if [ $(( elapsed + 30 )) -gt "$budget_s" ]; then
        printf '%s\tskipped\t0\t-\tthe %s s budget was spent (%s s used)\n' "$name" "$budget_s" "$elapsed" >> "$results"
        continue
    fi
    # No step outlives the budget: a lent machine's time is counted from outside.
    [ "$limit" -gt $(( budget_s - elapsed )) ] && limit=$(( budget_s - elapsed ))
    echo "=== $name (at most $limit s): $command" | tee -a "$log"
    step_start=$(date +%s)
    timeout "$limit" bash -o pipefail -c "$command" > "$work/$name.out" 2>&1
    rc=$?
    cat "$work/$name.out" >> "$log"
    seconds=$(( $(date +%s) - step_start ))
    case $rc in
        0) status=passed ;;
        "$skip") status=skipped ;;
        124) status=timed-out ;;
        *) status=failed ;;
    esac
    note=$(grep -v '^\s*$' "$work/$name.out" | tail -n 1 | tr '\t' ' ' | cut -c1-300)
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$seconds" "$rc" "$note" >> "$results"
    echo "=== $name: $status in ${seconds} s" | tee -a "$log"
done

"$py" - "$results" "$work/facts.json" "$dest/gpu_check.json" "$started" <<'EOF'
import json, sys, time
from pathlib import Path

results, facts, summary, started = sys.argv[1:]


def machine():
    """The facts step's JSON line (GPU, torch, CUDA, onnxruntime and its providers), or None if it failed."""
    lines = Path(facts).read_text().strip().splitlines() if Path(facts).is_file() else []
    try:
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        return None


steps = []
for line in Path(results).read_text().splitlines():
    name, status, seconds, rc, note = (line.split("\t") + [""] * 5)[:5]
    steps.append({"step": name, "status": status, "seconds": int(seconds), "exit_code": rc, "last_line": note})
document = {
    "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    "machine": machine(),
    "seconds": int(time.time()) - int(started),
    "passed": [s["step"] for s in steps if s["status"] == "passed"],
    "not_passed": {s["step"]: s["status"] for s in steps if s["status"] != "passed"},
    "steps": steps,
}
Path(summary).write_text(json.dumps(document, indent=2) + "\n")
print(json.dumps({k: document[k] for k in ("machine", "seconds", "passed", "not_passed")}, indent=2))
EOF
# Exit 1 when a step failed or ran out of time; skipped steps are not failures.
awk -F'\t' '$2 == "failed" || $2 == "timed-out" { bad = 1 } END { exit !bad }' "$results" && exit 1
exit 0
