#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager, kubectl and etcd from their Go
# modules (setup-envtest's downloads are unreachable here) and caches them by
# version, outside the checkout, so a fresh clone on the same machine reuses
# them. Prints the directory to use as KUBEBUILDER_ASSETS on its last line.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
modver() { # go.mod module -> the version it requires
  awk -v m="$2" '$1 !~ /^\/\// { for (i = 1; i < NF; i++) if ($i == m) { print $(i+1); exit } }' "$1"
}
kube_version="$(modver "$root/hack/kube/go.mod" k8s.io/kubernetes)"
etcd_version="$(modver "$root/hack/etcd/go.mod" go.etcd.io/etcd/server/v3)"
if [[ -z "$kube_version" || -z "$etcd_version" ]]; then
  echo "cannot read the pinned kubernetes/etcd versions from hack/{kube,etcd}/go.mod" >&2
  exit 1
fi
minor="$(echo "$kube_version" | cut -d. -f2)"
cache="${TRELLIS_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/trellis}/k8s/${kube_version}-etcd-${etcd_version}"
out="$root/bin/k8s"
mkdir -p "$cache" "$out"

flags=(-trimpath -tags=selinux,notest,grpcnotrace)
ld="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ld+=" -X $pkg.gitVersion=$kube_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
done

# Cold build times measured on 2 cores (empty Go build cache): etcd 59 s,
# kube-apiserver 451 s, kube-controller-manager 210 s, kubectl 51 s (12.9 min
# in all); on a loaded machine kube-apiserver alone took 795 s.
declare -A expect=([etcd]="~1 min" [kube-apiserver]="~8 min (up to 13 on a loaded machine)" [kube-controller-manager]="~3.5 min" [kubectl]="~1 min")
built=() total_start=$SECONDS
build() { # name module-dir package
  local name=$1 dir=$2 pkg=$3
  if [[ -x "$cache/$name" ]]; then
    return
  fi
  echo ">> building $name ($pkg) into $cache: expect ${expect[$name]} on 2 cores with a cold Go cache" >&2
  local start=$SECONDS
  (cd "$root/hack/$dir" && CGO_ENABLED=0 go build "${flags[@]}" -ldflags "$ld" -o "$cache/$name.tmp" "$pkg") &
  local pid=$!
  # A line a minute, so a long build is not mistaken for a hang.
  while ! wait_for "$pid" 60; do
    echo ">>   still building $name: $(( (SECONDS - start) / 60 )) min so far" >&2
  done
  wait "$pid"
  mv "$cache/$name.tmp" "$cache/$name"
  echo ">> built $name in $((SECONDS - start))s" >&2
  built+=("$name $((SECONDS - start))s")
}

# wait_for pid seconds: true once pid has exited, false after seconds.
wait_for() {
  local i
  for ((i = 0; i < $2; i++)); do
    kill -0 "$1" 2>/dev/null || return 0
    sleep 1
  done
  ! kill -0 "$1" 2>/dev/null
}

build etcd etcd go.etcd.io/etcd/server/v3
build kube-apiserver kube k8s.io/kubernetes/cmd/kube-apiserver
build kube-controller-manager kube k8s.io/kubernetes/cmd/kube-controller-manager
build kubectl kube k8s.io/kubernetes/cmd/kubectl

if ((${#built[@]})); then
  echo ">> Kubernetes binaries built in $((SECONDS - total_start))s (${built[*]}), cached in $cache" >&2
fi
for b in etcd kube-apiserver kube-controller-manager kubectl; do
  if ! cmp -s "$cache/$b" "$out/$b"; then
    cp "$cache/$b" "$out/$b.tmp" && mv "$out/$b.tmp" "$out/$b"
  fi
done
echo "$out"
