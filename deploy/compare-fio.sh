#!/usr/bin/env bash
# Compare `streamer probe-disk` with fio on one file: per cell, fio, the threaded probe and the
# process probe run alternately, twice each. Prints Markdown table rows (GB/s).
# Usage: deploy/compare-fio.sh FILE [STREAMER]   (FILE: a large file on the disk to measure)
set -euo pipefail
f=${1:?usage: compare-fio.sh FILE [STREAMER]}
streamer=${2:-.venv/bin/streamer}
command -v fio >/dev/null || { echo "compare-fio.sh: needs fio (apt-get install fio)" >&2; exit 1; }
gbps_fio() { python3 -c "import json,sys; print(round(json.load(sys.stdin)['jobs'][0]['read']['bw_bytes']/1e9,3))"; }
gbps_probe() { python3 -c "import json,sys; print(round(json.load(sys.stdin)[0]['gb_per_s'],3))"; }
for bs in 4K 16K 64K 1M; do for j in 1 8 32; do
  fr=(); pt=(); pp=()
  for _ in 1 2; do
    fr+=("$(fio --name=r --filename="$f" --rw=randread --bs=$bs --direct=1 --ioengine=psync \
      --numjobs=$j --runtime=3 --time_based --group_reporting --output-format=json | gbps_fio)")
    pt+=("$("$streamer" probe-disk "$f" --chunks $bs --concurrency $j --seconds 3 --json | gbps_probe)")
    pp+=("$("$streamer" probe-disk "$f" --chunks $bs --concurrency $j --seconds 3 --processes --json | gbps_probe)")
  done
  echo "| $bs, $j | ${fr[0]}, ${fr[1]} | ${pt[0]}, ${pt[1]} | ${pp[0]}, ${pp[1]} |"
done; done
