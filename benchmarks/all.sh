#!/usr/bin/env bash
# One dated run of every benchmark, one after another (the README's Performance section comes from
# one such run). Figures go to benchmarks/results-<UTC time>/<name>.txt; run it on a quiet machine.
set -uo pipefail
cd "$(dirname "$0")/.."
out="benchmarks/results-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$out"
run() {
    local name=$1; shift
    echo "== $name start $(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg)" | tee "$out/$name.txt"
    .venv/bin/python "$@" >> "$out/$name.txt" 2>&1
    echo "== $name end $(date -u +%FT%TZ) exit $?" | tee -a "$out/$name.txt"
}
run fanout benchmarks/fanout.py --models 1,10,50,100 --rounds 100
run metrics benchmarks/fanout.py --metrics --models 50 --rounds 100
run compute benchmarks/compute.py --models 50 --rounds 60
run payload benchmarks/payload.py --models 1,10 --sizes 64K,1M,16M
run isolation benchmarks/isolation_floor.py --models 50 --rounds 100
run scale benchmarks/scale.py --models 100,500,1000 --fresh-workers 100,300 --reference-models 100,200 --rounds 20
echo "figures in $out"
