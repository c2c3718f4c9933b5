#!/usr/bin/env bash
# Host memory while an elastic group of the 212 M model changes size (1 -> 2 -> 4 -> 2 ranks, idle),
# for each engine.weight_memory: shared (a joining rank of this host maps the pages it is given),
# copy (bytes over UCX into new buffers) and reallocate (copy, and every expert a rank keeps copied
# into a new buffer at the switch). The memory is the host's AnonPages + Shmem (/proc/meminfo: every
# process's anonymous memory and every memfd page, each counted once, read in one go), sampled every
# 10 ms on an otherwise idle machine; prints, per mode and change, the memory before, its peak during
# the change and after it. (The ranks' summed Pss, also sampled, can count a page twice while it
# changes hands between two reads.)
#   bench/run_scale_memory.sh [WORK_DIR]    # needs build/ (troupe, troupe-launch)
source "$(dirname "${BASH_SOURCE[0]}")/elastic_bench_lib.sh"
bench_setup "${1:-/tmp/troupe-scale-bench}" "${1:-/tmp/troupe-scale-bench}" memory.yaml
sampler=""
trap '[ -n "$sampler" ] && kill "$sampler" 2>/dev/null; [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null' EXIT
cat >"$work/pss.py" <<'PY'
import sys, time, os
log, out, stop = sys.argv[1], sys.argv[2], sys.argv[3]
import re
pids = {}
with open(out, "w") as f:
    while not os.path.exists(stop):
        for line in open(log, errors="replace"):
            m = re.search(r"supervisor: rank (\d+) joined \(pid (\d+)", line)
            if m: pids[int(m.group(1))] = int(m.group(2))
        host = 0
        for l in open("/proc/meminfo"):
            if l.startswith("AnonPages:") or l.startswith("Shmem:"): host += int(l.split()[1])
        pss = 0
        for p in pids.values():
            try:
                for l in open(f"/proc/{p}/smaps_rollup"):
                    if l.startswith("Pss:"): pss += int(l.split()[1])
            except OSError:
                pass
        f.write(f"{time.time():.3f} {host} {pss}\n"); f.flush()
        time.sleep(0.01)
PY
for mode in shared copy reallocate; do
  serve_yaml 1
  sed -i "s/engine: {ranks: 1,/engine: {ranks: 1, weight_memory: $mode,/" "$yaml"
  "$launch" --min-ranks 1 --max-ranks 4 -- "$troupe" serve "$yaml" >"$work/memory_$mode.log" 2>&1 &
  pid=$!
  up "$work/memory_$mode.log" || exit 1
  rm -f "$work/pss_stop"
  python3 "$work/pss.py" "$work/memory_$mode.log" "$work/pss_$mode.txt" "$work/pss_stop" &
  sampler=$!
  sleep 1
  : >"$work/memory_marks_$mode.txt"
  for m in 2 4 2; do
    echo "$(now) start $m" >>"$work/memory_marks_$mode.txt"
    "$troupe" scale "$url" --ranks "$m" --timeout 120 >/dev/null || exit 1
    sleep 1
    echo "$(now) end $m" >>"$work/memory_marks_$mode.txt"
  done
  touch "$work/pss_stop"; wait "$sampler"; sampler=""
  kill -TERM "$pid"; wait "$pid" 2>/dev/null; pid=""
  python3 - "$mode" "$work/pss_$mode.txt" "$work/memory_marks_$mode.txt" <<'PY'
import sys
mode, samples, marks = sys.argv[1], [tuple(map(float, l.split())) for l in open(sys.argv[2])], [l.split() for l in open(sys.argv[3])]
def at(t):  # the last sample at or before t
    return max((s for s in samples if s[0] <= t), key=lambda s: s[0])[1]
for i in range(0, len(marks), 2):
    t0, t1, m = float(marks[i][0]), float(marks[i + 1][0]), marks[i][2]
    peak = max(s[1] for s in samples if t0 <= s[0] <= t1)
    before, after = at(t0), at(t1)
    print(f"{mode}: to {m} ranks: before {before / 1024:.0f} MiB, peak {peak / 1024:.0f} MiB "
          f"(+{(peak - before) / 1024:.0f}), after {after / 1024:.0f} MiB (+{(after - before) / 1024:.0f})")
PY
done
