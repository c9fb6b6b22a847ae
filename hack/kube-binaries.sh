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

build() { # name module-dir package
  local name=$1 dir=$2 pkg=$3
  if [[ -x "$cache/$name" ]]; then
    return
  fi
  echo ">> building $name ($pkg) into $cache; a cold build takes minutes" >&2
  local start=$SECONDS
  (cd "$root/hack/$dir" && CGO_ENABLED=0 go build "${flags[@]}" -ldflags "$ld" -o "$cache/$name.tmp" "$pkg")
  mv "$cache/$name.tmp" "$cache/$name"
  echo ">> built $name in $((SECONDS - start))s" >&2
}

build etcd etcd go.etcd.io/etcd/server/v3
build kube-apiserver kube k8s.io/kubernetes/cmd/kube-apiserver
build kube-controller-manager kube k8s.io/kubernetes/cmd/kube-controller-manager
build kubectl kube k8s.io/kubernetes/cmd/kubectl

for b in etcd kube-apiserver kube-controller-manager kubectl; do
  if ! cmp -s "$cache/$b" "$out/$b"; then
    cp "$cache/$b" "$out/$b.tmp" && mv "$out/$b.tmp" "$out/$b"
  fi
done
echo "$out"
