# Two entry points: `make demo` and `make test`. Both install the Debian packages they
# need first (a fresh machine has none of them) and must run as root: netd creates
# network namespaces, links and nftables rules.

# libssl-dev and pkg-config: the bench (built with the workspace) links OpenSSL.
APT_PACKAGES := nftables conntrack iproute2 ethtool iputils-ping procps util-linux curl etcd-server protobuf-compiler \
  dnsutils unbound clang-19 libbpf-dev python3 prometheus chromium chromium-driver tcpdump \
  containerd runc podman conmon containernetworking-plugins busybox-static iptables docker.io \
  libssl-dev pkg-config
# Only `make bench` needs these.
BENCH_PACKAGES := iperf3 dnsperf haproxy netavark openssl
CARGO ?= cargo
TEST_THREADS ?= 2

.PHONY: deps build demo test bench lint clean-lab

deps:
	@missing=""; for p in $(APT_PACKAGES) $(EXTRA_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

build: deps
	$(CARGO) build --workspace --bins

# Stands up a virtual cluster in network namespaces, attaches tasks, shows traffic, tears down.
# KEEP=1: keep the cluster up at the end, its live view at http://127.0.0.1:9440/ (Ctrl-C ends it).
demo: build
	./target/debug/netd-lab demo $(if $(KEEP),--keep)

# Unit tests of every crate, then the lab's integration tests (real netns, real netd).
test: build clean-lab
	$(CARGO) test --workspace -- --test-threads $(TEST_THREADS)

# Side-by-side measurements in a lab cluster (release build); writes bench/results/.
bench:
	$(MAKE) deps EXTRA_PACKAGES="$(BENCH_PACKAGES)"
	$(CARGO) build --release --workspace --bins
	./target/release/netd-lab cleanup
	./target/release/netd-bench overlay
	./target/release/netd-bench dns
	./target/release/netd-bench vip
	./target/release/netd-bench ingress
	./target/release/netd-bench attach
	./target/release/netd-bench observe
	./target/release/netd-bench scale

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Removes namespaces left by a lab that was killed before it could tear down.
clean-lab:
	./target/debug/netd-lab cleanup
