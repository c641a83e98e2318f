#!/usr/bin/env bash
# Every GPU speed figure of docs/performance.md's table in one call, on a machine with a CUDA GPU and torch alone
# (the music packages are not needed; the loader figure is then n/a):
#
#   bash bench_gpu.sh                  # an estimated 8 minutes on one H200, most of it compiling; a table at the end
#
# Each row is one bench.py process (compiled graphs are not shared between configurations): batch 8, 16 s of audio
# (3001 MDCT frames, or 1200 EnCodec frames with random weights), the agent on.
# DEVICE=cpu EXTRA="--seconds 0.5 --steps 1 --warmup 1" bash bench_gpu.sh   checks the script itself on a CPU.
set -uo pipefail
cd "$(dirname "$0")"
DEVICE="${DEVICE:-cuda}"
EXTRA="${EXTRA:-}"
out=$(mktemp -d)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
row() {  # NAME, then bench.py's flags
  local name=$1; shift
  echo "--- $name: python bench.py --device $DEVICE $*" >&2
  # shellcheck disable=SC2086  # EXTRA: several flags
  if python3 bench.py --device "$DEVICE" --json "$@" $EXTRA >"$out/$name.json" 2>"$out/$name.err"; then
    cat "$out/$name.json"
  else
    tail -3 "$out/$name.err" >&2
  fi
}
row default --profile                              # what training runs: --compile auto (graphs), heads of dim 128
row eager --compile none                           # no compiling
row eager_4heads --compile none --nhead 4          # the issue's eager row (the old default heads)
row graphs_4heads --compile graphs --nhead 4       # the issue's --cuda_graphs row
row encodec_fp32_eager --codec encodec --amp none --compile none   # 1200 frames, as the seed's system runs
row encodec_bf16_eager --codec encodec --compile none
row encodec_default --codec encodec
python3 - "$out" <<'PY'
import glob, json, os, sys
print("| configuration | frames | model step | per second of audio | MFU | end-to-end / model | decoder + loss |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.json")), key=os.path.getmtime):
    with open(path) as f:
        text = f.read().strip()
    if not text:
        print(f"| {os.path.basename(path)[:-5]} | failed: see above | | | | | |")
        continue
    r, c = json.loads(text), json.loads(text)["config"]
    print(f"| {os.path.basename(path)[:-5]} (compile {c['compile']}, heads {c['nhead']}, {c['amp']}) | {c['frames']} "
          f"| {r['step_ms']:.1f} ms | {r['ms_per_audio_s']:.2f} ms | {r['mfu']:.2f} | {r['e2e_over_model']:.2f} "
          f"| {r['decoder_loss_ms']:.1f} ms |")
PY
echo
echo "Where the default step's time goes (bench.py --profile: the model step, then the end-to-end step):"
head -70 "$out/default.err"
