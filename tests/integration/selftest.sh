#!/usr/bin/env bash
# `troupe selftest` on 4 ranks with both launchers: the actor runtime comes up, the
# control plane is timed, and every backend the launch offers passes the conformance
# suite on every rank (mpirun: mpi + ucx; troupe-launch: ucx, bootstrapped through
# the supervisor; nccl too where GPUs exist).
#   tests/integration/selftest.sh TROUPE_LAUNCH TROUPE_BIN [MPIRUN]
set -uo pipefail
launch="$1"; troupe="$2"; mpirun="${3:-}"
fail() { echo "FAIL: $*"; exit 1; }
check() {  # check NAME OUTPUT BACKENDS...
  local name="$1" out="$2"; shift 2
  grep -q "selftest: PASS" <<<"$out" || fail "$name: no PASS: $out"
  grep -q "control plane: command round trip to all 4 workers: mean" <<<"$out" || fail "$name: no round trip: $out"
  for b in "$@"; do
    for r in 0 1 2 3; do
      grep -Eq "rank $r: $b: ([0-9]+)/\1 checks passed \(backend $b, 4 ranks\)" <<<"$out" \
        || fail "$name: rank $r did not pass $b: $out"
    done
  done
  grep -E "control plane|checks passed" <<<"$out" | head -3
  echo "$name: PASS"
}

out=$(timeout 120 "$launch" -n 4 -- "$troupe" selftest 2>&1); rc=$?
[ $rc -eq 0 ] || fail "troupe-launch -n 4 exited $rc: $out"
check "troupe-launch -n 4" "$out" ucx

if [ -n "$mpirun" ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl=self,vader \
         OMPI_MCA_btl_vader_single_copy_mechanism=none
  out=$(timeout 120 "$mpirun" --oversubscribe -np 4 "$troupe" selftest 2>&1); rc=$?
  [ $rc -eq 0 ] || fail "mpirun -np 4 exited $rc: $out"
  check "mpirun -np 4" "$out" mpi ucx
  grep -q "x a bare MPI_Barrier" <<<"$out" || fail "mpirun: no comparison with MPI_Barrier: $out"
fi
