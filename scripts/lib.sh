#!/usr/bin/env bash
# Shared set-up for scripts/quickstart and scripts/test: installs the Debian packages
# troupe builds on (idempotent: apt runs only when something is missing) and builds.
set -euo pipefail

TROUPE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TROUPE_PACKAGES=(
  build-essential cmake ninja-build pkg-config git curl python3
  libopenblas-dev libfmt-dev libspdlog-dev nlohmann-json3-dev libcli11-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  libnuma-dev libhwloc-dev libcaf-dev libopenmpi-dev openmpi-bin libucx-dev
  libssl-dev libprotobuf-dev protobuf-compiler coinor-libcbc-dev libcpp-httplib-dev libyaml-cpp-dev
  libicu-dev libboost-dev libxxhash-dev
)

troupe_install_packages() {
  local missing=()
  for p in "${TROUPE_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    echo "[troupe] packages: all ${#TROUPE_PACKAGES[@]} present"
    return 0
  fi
  echo "[troupe] installing: ${missing[*]}"
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

# troupe_build BUILD_DIR [extra cmake args...]
troupe_build() {
  local dir="$1"; shift
  local gen=()
  command -v ninja >/dev/null && gen=(-G Ninja)
  if [ -d /usr/local/cuda/bin ]; then export PATH="/usr/local/cuda/bin:$PATH"; fi
  cmake -S "$TROUPE_ROOT" -B "$dir" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release "$@"
  cmake --build "$dir" -j "$(nproc)"
}
