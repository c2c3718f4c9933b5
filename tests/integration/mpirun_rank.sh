#!/usr/bin/env bash
# Every rank started by mpirun sees its own rank and the world size (launch/rank_env).
#   tests/integration/mpirun_rank.sh MPIRUN TROUPE_BIN
set -euo pipefail
mpirun="$1"; troupe="$2"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl=self,vader OMPI_MCA_btl_vader_single_copy_mechanism=none
out=$(timeout 120 "$mpirun" --oversubscribe -np 3 "$troupe" info 2>&1)
for r in 0 1 2; do
  if ! grep -q "^rank: *$r of 3 (local $r of 3; from openmpi)" <<<"$out"; then
    echo "rank $r missing or wrong in mpirun output:"; echo "$out"; exit 1
  fi
done
echo "mpirun -np 3: ranks 0,1,2 of 3 discovered"
