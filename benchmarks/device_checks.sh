#!/usr/bin/env bash
# Issue 20's GPU measurements, in priority order, each step capped in time: ONE script for a
# session that is lent a GPU (an H200: 15 minutes of device time in all, 10 per command).
#
#   benchmarks/device_checks.sh                       # every step (about 11 min at the caps)
#   benchmarks/device_checks.sh --steps edit,model    # first call (~5 min), then:
#   benchmarks/device_checks.sh --steps train,ddp     # second call (~5.5 min)
#   benchmarks/device_checks.sh --dry-run             # print the commands, run nothing
#
# Steps (names for --steps):
#   edit   the command's rate, `bench_edit --cli` at 1024 px --aligned, batch 32, PNG then JPEG,
#          with CLIPINVERT_TIMING=1: start-up phases, main-thread/reader/writer ms per image
#          and the GPU's idle % between batches (CUDA events around each batch)
#   model  model-only ms/image at B=32 (encode + adapter + generator + uint8), fp16 and fp32
#   train  bench_train at 1024, batch 8, stages 1,2,e4e: fp32, then --amp bf16
#   sync   `clipinvert edit` on the demo domain's photos (3 batches) with
#          CLIPINVERT_SYNC_DEBUG=1: every call that waits for the GPU after the loads warns;
#          the count (and the log's lines) says what still synchronises in the loop
#   ddp    torchrun --nproc-per-node 1 (NCCL) on the demo domain, 50 steps; prints the loss of
#          the first and last logged steps (it should fall)
# Everything goes under $OUT (the device tool's output folder; ./device-out without it): one
# .log and, where the benchmark writes one, one .json per step, and summary.txt.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/device-out}"
PY="${PYTHON:-python}"
DRY=0
STEPS="edit,model,train,ddp,sync"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --steps) STEPS="$2"; shift ;;
    *) echo "device_checks.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
[ "$DRY" = 1 ] || mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"

wanted() { case ",$STEPS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

# step NAME SECONDS COMMAND...: run COMMAND under `timeout`, its output in $OUT/NAME.log.
step() {
  local name="$1" limit="$2"
  shift 2
  echo "STEP $name ($limit s): $(printf '%q ' "$@")"
  [ "$DRY" = 1 ] && return 0
  local t0=$SECONDS
  timeout --signal=TERM --kill-after=15 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc in $((SECONDS - t0)) s$([ $rc = 124 ] && echo ' (timed out)')" \
    | tee -a "$SUMMARY"
  tail -n 25 "$OUT/$name.log" >>"$SUMMARY"
  return 0
}

EDIT=(benchmarks/bench_edit.py --device cuda --dtype float16 --size 1024 --cli-only
      --cli-counts 64,512 --cli-batch-sizes 32 --cli-timing --skip-loads)
if wanted edit; then
  # the command in float16 too (--cli-args), as the model-only figure of the target
  step edit-png 150 "$PY" "${EDIT[@]}" --cli-args "--dtype float16" --json "$OUT/edit-png.json"
  step edit-jpg 120 "$PY" "${EDIT[@]}" --cli-args "--dtype float16 --ext jpg" \
    --json "$OUT/edit-jpg.json"
fi
if wanted model; then
  for dtype in float16 float32; do
    step "model-$dtype" 75 "$PY" benchmarks/bench_edit.py --device cuda --dtype "$dtype" \
      --size 1024 --batch-sizes 32 --skip-loads --repeats 3 --json "$OUT/model-$dtype.json"
  done
fi
if wanted train; then
  step train-fp32 150 "$PY" benchmarks/bench_train.py --device cuda --stages 1,2,e4e \
    --sizes 1024 --batch-sizes 8 --timeout 140 --json "$OUT/train.json"
  step train-bf16 150 "$PY" benchmarks/bench_train.py --device cuda --stages 1,2,e4e \
    --sizes 1024 --batch-sizes 8 --amp bf16 --timeout 140 --json "$OUT/train-bf16.json"
fi
DEMO="$OUT/demo"
demo() {  # the demo domain (random weights, 32 px), made once for ddp and sync
  [ -f "$DEMO/models.toml" ] && [ "$DRY" = 0 ] && return 0
  step demo 60 "$PY" -m clipinvert models demo "$DEMO" --no-register --overwrite
}
if wanted ddp; then
  demo
  step ddp-train 150 "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 \
    -m clipinvert train --data "$DEMO/captions" -o "$OUT/ddp-run" --models "$DEMO/models.toml" \
    --domain demo --device cuda --workers 0 -b 2 --max-steps 50 --val-fraction 0.2 \
    --log-every 5 --val-every 50 --save-every 50 --image-every 50
  if [ "$DRY" = 0 ] && [ -f "$OUT/ddp-run/metrics.jsonl" ]; then
    "$PY" - "$OUT/ddp-run/metrics.jsonl" <<'PYEOF' | tee -a "$SUMMARY"
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
train = [r for r in rows if r.get("split") == "train"]
if train:
    first, last = train[0], train[-1]
    print(f"ddp loss: step {first['step']} {first['loss']:.4f} -> step {last['step']} "
          f"{last['loss']:.4f} ({'falls' if last['loss'] < first['loss'] else 'DOES NOT FALL'})")
PYEOF
  fi
fi
if wanted sync; then
  demo
  step sync 90 env CLIPINVERT_SYNC_DEBUG=1 CLIPINVERT_TIMING=1 PYTHONWARNINGS=always \
    "$PY" -m clipinvert edit "$DEMO/captions" "a smile" --aligned --models "$DEMO/models.toml" --domain demo \
    --device cuda -b 2 -o "$OUT/sync-out"
  [ "$DRY" = 1 ] || echo "sync warnings: $(grep -c 'synchronizing CUDA operation' \
    "$OUT/sync.log")" | tee -a "$SUMMARY"
fi
[ "$DRY" = 1 ] || echo "summary: $SUMMARY"
