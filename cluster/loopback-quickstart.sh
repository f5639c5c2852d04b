#!/usr/bin/env bash
# docs/cluster.md's launch numbers: cluster/local.yaml on two loopback SSH hosts (cluster/loopback.py), the quick
# start submitted to it and trained across both nodes, then down; prints the wall time of each step.
# As root, from the checkout with its venv active, after `apt-get install openssh-server rsync`.
set -uo pipefail
cd "$(dirname "$0")/.."
export RAY_USAGE_STATS_ENABLED=0
[ -f shards/synthetic/manifest.json ] || python jobs/shard.py --source synthetic --dest shards/synthetic > /dev/null
state=/tmp/ferdist-loopback
rm -rf "$state" "$state-runs"
t0=$(date +%s.%N)
python cluster/loopback.py up --state "$state" > "$state-up.log" 2>&1 || { echo "up failed: $state-up.log"; exit 1; }
t1=$(date +%s.%N)
# The head's autoscaler starts the worker after `ray up` returns: until `ray status` lists it.
until RAY_AUTH_MODE=token ray status --address 127.0.0.1:6379 -v 2>/dev/null | grep -q "Node: 127.0.0.2"; do :; done
t2=$(date +%s.%N)
RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/train.py \
  --config jobs/configs/quickstart.yaml --workers 2 --set workers.cpus_per_worker=2 --set data.loader_workers=0 \
  --set data.manifest="$PWD/shards/synthetic" --set checkpoint.storage_path="$state-runs" \
  --set tracking.backend=none --set name=loopback-quickstart > "$state-job.log" 2>&1
rc=$?
t3=$(date +%s.%N)
python cluster/loopback.py down --state "$state" > "$state-down.log" 2>&1
t4=$(date +%s.%N)
grep -a "best epoch" "$state-job.log" | tail -1
python3 -c 'import sys; t = list(map(float, sys.argv[1:6])); print(f"ray up {t[1] - t[0]:.1f} s; worker in ray status "
  f"{t[2] - t[0]:.1f} s after the start; job {t[3] - t[2]:.1f} s (exit {sys.argv[6]}); down {t[4] - t[3]:.1f} s")' \
  "$t0" "$t1" "$t2" "$t3" "$t4" "$rc"
