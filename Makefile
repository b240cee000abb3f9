# sluice — make targets. `make test` is what CI runs (through .ci/run); it installs what it
# needs (iptables, conntrack, ipset from Debian; kube-apiserver and etcd built from their Go
# modules and cached) and must run as root for the network-namespace lab.
GO ?= go
BIN := bin/sluice
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)

.PHONY: build test lint demo bench bench-quick image deps node-deps kube-assets e2e-k8s e2e-k8s-smoke clean

build:
	$(GO) build -ldflags "-X main.version=$(VERSION)" -o $(BIN) ./cmd/sluice

deps:
	bash hack/deps.sh

node-deps:
	bash hack/node-deps.sh node

kube-assets:
	bash hack/kube-assets.sh

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...

# The node's binaries are built before the tests (test/e2ek8s's smoke needs them), so their
# cold build does not count against a test's time-out.
test: deps node-deps kube-assets lint
	bash hack/kube-assets.sh kubelet kube-controller-manager kube-scheduler kubectl agnhost
	KUBEBUILDER_ASSETS=$$(bash hack/kube-assets.sh --print-dir) $(GO) test -count=1 -timeout 60m ./...
	$(GO) test ./filter -run '^$$' -fuzz '^FuzzDecode$$' -fuzztime 15s
	$(GO) test ./watch -run '^$$' -fuzz '^FuzzLoadPersisted$$' -fuzztime 15s

demo: build deps
	$(GO) run ./internal/demo -sluice $(BIN)

bench: build deps
	$(GO) run ./bench

bench-quick: build deps
	$(GO) run ./bench -quick

image:
	docker build -t sluice:dev .

# A real one-node cluster in a network namespace of this machine, sluice installed from deploy/,
# and the upstream NetworkPolicy e2e suite, without and with sluice; rewrites
# test/e2ek8s/RESULTS.md. Its last line is the run with sluice's "N passed, M failed".
e2e-k8s:
	bash hack/e2e-k8s.sh suite test/e2ek8s/RESULTS.md

# The same node, with one allowed and one dropped connection instead of the suite (make test
# runs it as test/e2ek8s's TestNodeSmoke).
e2e-k8s-smoke:
	bash hack/e2e-k8s.sh smoke

clean:
	rm -rf bin
