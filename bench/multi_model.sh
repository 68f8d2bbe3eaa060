#!/usr/bin/env bash
# Many models on one backbone, measured: 4 random-weight bike-sized models (vit_small_patch16_224.dino, all
# 12 blocks) share one backbone. Writes bench/results/cpu-multi-model-rebuild.json and -mix-<N>thread.json:
#   - first build with an empty cache vs the rebuild after "retraining" one model (new own weights, same
#     backbone), twice (round 1 and 2, each from its own empty cache);
#   - bench --mix: mixed traffic through predict_many vs the same requests through the 4 one-model engines,
#     backbone calls per mixed batch, RSS added by each engine in a fresh process.
# Usage: bench/multi_model.sh [WORKDIR] [THREADS...]   (run from the repository root; default threads: 1 2)
#        REBUILD_ONLY=1 bench/multi_model.sh ...          (the build rounds only, no --mix benches)
set -euo pipefail
W=${1:-/tmp/stvfm-multi-model}
THREADS=("${@:2}")
[ ${#THREADS[@]} -eq 0 ] && THREADS=(1 2)
S="stvfm-engine"
OUT=bench/results
mkdir -p "$W" "$OUT"
rm -rf "$W"/cache-* "$W"/*.engine

$S init --preset bike --seed 1 -o "$W/bike.pt" > /dev/null
$S init --preset bike --horizon 6 --seed 2 --backbone-weights "$W/bike.pt" -o "$W/bike6h.pt" 2> /dev/null > /dev/null
$S init --preset bike --height 16 --width 12 --seed 3 --backbone-weights "$W/bike.pt" -o "$W/taxi.pt" 2> /dev/null > /dev/null
$S init --preset bike --height 16 --width 12 --steps-per-day 0 --seed 4 --backbone-weights "$W/bike.pt" \
    -o "$W/taxi0.pt" 2> /dev/null > /dev/null
CKPTS=("$W/bike.pt" "$W/bike6h.pt" "$W/taxi.pt" "$W/taxi0.pt")

build() {  # build CACHE OUT.json: the 4 checkpoints into nyc4.engine; the build's JSON + its wall seconds
    local t0 t1
    t0=$(date +%s.%N)
    $S build "${CKPTS[@]}" -o "$W/nyc4.engine" --backends onnxruntime --max-batch 16 --cache-dir "$1" -q > "$2"
    t1=$(date +%s.%N)
    python -c "import json,sys; d=json.load(open(sys.argv[1])); d['wall_seconds']=float(sys.argv[3])-float(sys.argv[2]); \
json.dump(d, open(sys.argv[1], 'w'))" "$2" "$t0" "$t1"
}

for round in 1 2; do
    cp "$W/bike.pt" "$W/bike.orig.pt"
    build "$W/cache-$round" "$W/first-$round.json"
    # "retraining" bike: new weights of its own parts, the same frozen backbone
    $S init --preset bike --seed $((10 + round)) --backbone-weights "$W/bike.orig.pt" -o "$W/bike.pt" 2> /dev/null > /dev/null
    build "$W/cache-$round" "$W/rebuild-$round.json"
done

python - "$W" "$OUT/cpu-multi-model-rebuild.json" <<'EOF'
import json, os, platform, subprocess, sys, datetime
from bench.report import device_info
w, out = sys.argv[1], sys.argv[2]
rounds = []
for r in (1, 2):
    first, again = (json.load(open(f"{w}/{k}-{r}.json")) for k in ("first", "rebuild"))
    rounds.append({"round": r, "first_build_seconds": first["build_seconds"], "first_wall_seconds": first["wall_seconds"],
                   "rebuild_seconds": again["build_seconds"], "rebuild_wall_seconds": again["wall_seconds"],
                   "rebuild_vs_first": again["build_seconds"] / first["build_seconds"],
                   "rebuild_vs_first_wall": again["wall_seconds"] / first["wall_seconds"],
                   "first": first, "rebuild": again})
sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
report = {"what": "4 random-weight bike-sized models (vit_small_patch16_224.dino, 12 blocks) on one backbone: "
                  "first multi-model build with an empty cache vs the rebuild after retraining one model "
                  "(new own weights, same backbone), onnxruntime, max batch 16",
          "machine": {**device_info(), "load_avg_1_5_15_at_end": [round(v, 2) for v in os.getloadavg()],
                      "note": "each ratio is of two builds run one after the other; seconds are comparable "
                              "only on the same machine at the same load"},
          "git_sha": sha, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "command": "bench/multi_model.sh", "rounds": rounds}
json.dump(report, open(out, "w"), indent=2)
print(json.dumps([{k: v for k, v in r.items() if k not in ("first", "rebuild")} for r in rounds], indent=1))
EOF

[ "${REBUILD_ONLY:-0}" = 1 ] && exit 0
for c in "${CKPTS[@]}"; do
    name=$(basename "$c" .pt)
    $S build "$c" -o "$W/$name.engine" --backends onnxruntime --max-batch 16 -q > /dev/null
done
memory=()
for t in "${THREADS[@]}"; do  # RSS (fresh processes) measured with the first thread count only
    $S bench "$W/nyc4.engine" "$W/bike.engine" "$W/bike6h.engine" "$W/taxi.engine" "$W/taxi0.engine" \
        --mix bike:8,bike6h:8,taxi:8,taxi0:8 --backends onnxruntime --threads "$t" --iters 12 "${memory[@]}" \
        --json "$OUT/cpu-multi-model-mix-${t}thread.json"
    memory=(--no-memory)
done
