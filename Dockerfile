# sluice agent image: `make image` (docker build -t sluice:dev .).
# Build stage: a static binary, so the runtime stage needs no Go and no libc match.
FROM golang:1.26-bookworm AS build
WORKDIR /src
# Modules first: this layer is reused until go.mod/go.sum change.
COPY go.mod go.sum ./
RUN --mount=type=cache,target=/root/go/pkg/mod go mod download
COPY . .
ARG VERSION=dev
RUN --mount=type=cache,target=/root/go/pkg/mod --mount=type=cache,target=/root/.cache/go-build \
    CGO_ENABLED=0 GOFLAGS=-buildvcs=false \
    go build -trimpath -ldflags="-s -w -X main.version=${VERSION}" -o /out/sluice ./cmd/sluice

# Runtime: what the kernel-rule code shells out to. iptables (both the nft and legacy
# flavours, chosen at start), ipset, conntrack for inspection and cleanup. The package list,
# binary path and entrypoint come from hack/image.env, which the offline image build for the
# local cluster (hack/images.sh) reads too; test/e2ek8s checks this file against it.
FROM debian:bookworm-slim
COPY hack/image.env /tmp/image.env
RUN . /tmp/image.env \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $SLUICE_IMAGE_PACKAGES \
 && rm -rf /var/lib/apt/lists/* /tmp/image.env
COPY --from=build /out/sluice /usr/local/bin/sluice
# Runs as root with only NET_ADMIN (+NET_RAW for iptables-legacy) granted by the DaemonSet;
# no privileged mode.
ENTRYPOINT ["/usr/local/bin/sluice"]
CMD ["agent"]
