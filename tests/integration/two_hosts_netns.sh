#!/usr/bin/env bash
# Two "hosts" on one machine: network namespaces joined by a veth pair, each with its own
# address (and UTS namespace, so its own hostname). mpirun runs on host A; Open MPI's
# remote launcher (plm_rsh_agent, normally ssh) is a script that runs the command inside
# host B's namespace. Both ranks must report their rank, and each must be the only rank
# on its host (local 0 of 1), which shows they were placed on different nodes.
#   tests/integration/two_hosts_netns.sh MPIRUN TROUPE_BIN [TROUPE_LAUNCH]
# Needs root (CAP_NET_ADMIN + CAP_SYS_ADMIN); exits 77 (skip) where namespaces are not
# permitted. Removes every namespace it created, whatever happens.
set -euo pipefail
mpirun="$1"; troupe="$2"; launcher="${3:-}"

skip() { echo "SKIP: $*"; exit 77; }
[[ $(id -u) == 0 ]] || skip "needs root for ip netns (running as uid $(id -u))"
command -v ip >/dev/null || skip "ip (iproute2) not found"
command -v unshare >/dev/null || skip "unshare (util-linux) not found"

tag=$$
ns_a="troupe_hostA_$tag"; ns_b="troupe_hostB_$tag"
veth_a="trpa$tag"; veth_b="trpb$tag"                    # interface names: at most 15 chars
net="10.213.$(( tag % 250 + 1 ))"; ip_a="$net.1"; ip_b="$net.2"
work=$(mktemp -d)
created=()

cleanup() {
  local ns
  for ns in "${created[@]}"; do ip netns del "$ns" 2>/dev/null || true; done  # takes the veth pair along
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for ns in "$ns_a" "$ns_b"; do
  if ! ip netns add "$ns" 2>"$work/err"; then skip "ip netns add not permitted here: $(cat "$work/err")"; fi
  created+=("$ns")
done
ip link add "$veth_a" type veth peer name "$veth_b" 2>"$work/err" || skip "veth not permitted here: $(cat "$work/err")"
ip link set "$veth_a" netns "$ns_a"
ip link set "$veth_b" netns "$ns_b"
ip -n "$ns_a" addr add "$ip_a/24" dev "$veth_a"
ip -n "$ns_b" addr add "$ip_b/24" dev "$veth_b"
for ns in "$ns_a" "$ns_b"; do ip -n "$ns" link set lo up; done
ip -n "$ns_a" link set "$veth_a" up
ip -n "$ns_b" link set "$veth_b" up

# The "ssh" Open MPI uses to start its daemon on another host: agent HOST COMMAND...
# (COMMAND is a shell command line, as ssh would hand it to the remote shell).
agent="$work/netns_rsh"
cat >"$agent" <<EOF
#!/usr/bin/env bash
while [[ \$# -gt 0 && \$1 == -* ]]; do shift; done      # ssh-style options: none apply
host="\$1"; shift
case "\$host" in
  $ip_a) ns=$ns_a; name=hostA ;;
  $ip_b) ns=$ns_b; name=hostB ;;
  *) echo "netns_rsh: unknown host \$host" >&2; exit 255 ;;
esac
exec ip netns exec "\$ns" unshare --uts bash -c 'hostname "\$0"; exec bash -c "\$1"' "\$name" "\$*"
EOF
chmod +x "$agent"

export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_plm_rsh_agent="$agent" OMPI_MCA_oob_tcp_if_include="$net.0/24"
export OMPI_MCA_btl=self,tcp OMPI_MCA_btl_tcp_if_include="$net.0/24"
# mpirun itself runs on host A; its daemon on host B dials back to $ip_a over the veth.
set +e
out=$(timeout 120 ip netns exec "$ns_a" unshare --uts bash -c 'hostname hostA; exec "$@"' _ \
      "$mpirun" --oversubscribe -H "$ip_a,$ip_b" -np 2 "$troupe" info 2>&1)
rc=$?
set -e
if [[ $rc != 0 ]]; then echo "mpirun across two namespaces failed (exit $rc):"; echo "$out"; exit 1; fi
for r in 0 1; do
  if ! grep -q "^rank: *$r of 2 (local 0 of 1; from openmpi)" <<<"$out"; then
    echo "rank $r missing or not alone on its host in mpirun output:"; echo "$out"; exit 1
  fi
done
echo "mpirun -H $ip_a,$ip_b -np 2: rank 0 on hostA ($ns_a), rank 1 on hostB ($ns_b), one rank per host"

# The actor runtime and the data plane across the two hosts: the supervisor listens on
# host A's address, the worker on host B joins it over the veth (CAF middleman), and
# the mpi and ucx backends pass the conformance suite between the hosts.
port=$(( 20000 + RANDOM % 20000 ))
set +e
out=$(timeout 120 ip netns exec "$ns_a" unshare --uts bash -c 'hostname hostA; exec "$@"' _ \
      "$mpirun" --oversubscribe -H "$ip_a,$ip_b" -np 2 \
      -x TROUPE_SUPERVISOR="$ip_a:$port" -x TROUPE_CLUSTER_TOKEN="netns-$tag" \
      -x UCX_TLS=tcp,self -x UCX_NET_DEVICES="$veth_a,$veth_b" \
      "$troupe" selftest --pings 50 2>&1)
rc=$?
set -e
if [[ $rc != 0 ]]; then echo "selftest across two namespaces failed (exit $rc):"; echo "$out"; exit 1; fi
for b in mpi ucx; do
  for r in 0 1; do
    if ! grep -Eq "rank $r: $b: ([0-9]+)/\1 checks passed \(backend $b, 2 ranks\)" <<<"$out"; then
      echo "rank $r did not pass $b across the hosts:"; echo "$out"; exit 1
    fi
  done
done
grep -q "rank 1: pid [0-9]* on hostB" <<<"$out" || { echo "rank 1 is not on hostB:"; echo "$out"; exit 1; }
grep -E "control plane|checks passed" <<<"$out"
echo "troupe selftest across hostA and hostB: supervisor on $ip_a:$port, mpi and ucx pass between the hosts"

# The same through troupe-launch --hosts (which execs mpirun -H ... -x TROUPE_*).
if [[ -n "$launcher" ]]; then
  port=$(( 20000 + RANDOM % 20000 ))
  set +e
  out=$(timeout 120 ip netns exec "$ns_a" unshare --uts bash -c 'hostname hostA; exec "$@"' _ \
        env PATH="$(dirname "$mpirun"):$PATH" "$launcher" --hosts "$ip_a,$ip_b" -n 2 --supervisor "$ip_a:$port" -- \
        "$troupe" selftest --backends mpi --pings 20 2>&1)
  rc=$?
  set -e
  if [[ $rc != 0 ]]; then echo "troupe-launch --hosts across two namespaces failed (exit $rc):"; echo "$out"; exit 1; fi
  for r in 0 1; do
    if ! grep -Eq "rank $r: mpi: ([0-9]+)/\1 checks passed \(backend mpi, 2 ranks\)" <<<"$out"; then
      echo "troupe-launch --hosts: rank $r did not pass mpi:"; echo "$out"; exit 1
    fi
  done
  grep -q "rank 1: pid [0-9]* on hostB" <<<"$out" || { echo "troupe-launch --hosts: rank 1 not on hostB:"; echo "$out"; exit 1; }
  echo "troupe-launch --hosts $ip_a,$ip_b -n 2: selftest passed with one rank per host"
fi
