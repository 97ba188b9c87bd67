#!/bin/bash
# Spike for issue 15 (run as root; needs nftables, python3): the kernel path of
# docs/design/mesh-client-address.md by hand, in namespaces sp-* (all removed on exit),
# addresses in 198.18.0.0/15. Two ingress nodes (a1, a2) DNAT without masquerade and
# route the task through the ingress sandbox of its node (b), which remembers the
# ingress node per flow (conntrack zone for the original tuple, mark for the reply).
set -u
P=sp
cleanup() { for n in hub c a1 a2 b t; do ip netns del $P-$n 2>/dev/null; done; }
cleanup
trap cleanup EXIT
set -e
for n in hub c a1 a2 b t; do ip netns add $P-$n; ip -n $P-$n link set lo up; done
ip -n $P-hub link add seg type bridge; ip -n $P-hub link set seg up
# Ingress segment (stands for the ingress overlay): a1, a2, b (isbox of B), t.
plug() { # ns ifname mac addr
  ip link add $2 netns $P-$1 type veth peer name $1-$2 netns $P-hub
  ip -n $P-hub link set $1-$2 master seg up
  ip -n $P-$1 link set $2 address $3 up
  ip -n $P-$1 addr add $4 dev $2
}
plug a1 eth0 02:00:00:00:00:01 198.19.250.1/24
plug a2 eth0 02:00:00:00:00:02 198.19.250.3/24
plug b  eth0 02:00:00:00:00:0b 198.19.250.2/24
plug t  eth0 02:00:00:00:00:50 198.19.250.50/24
# The client: one address (198.18.203.100) towards both ingress nodes.
ip -n $P-c addr add 198.18.203.100/32 dev lo
for i in 1 2; do
  ip link add c$i netns $P-c type veth peer name pub netns $P-a$i
  ip -n $P-c link set c$i up; ip -n $P-a$i link set pub up
  ip -n $P-a$i addr add 198.18.20$i.1/24 dev pub
  ip -n $P-c addr add 198.18.20$i.100/24 dev c$i
  ip -n $P-c route add 198.18.20$i.1/32 dev c$i src 198.18.203.100
  ip -n $P-a$i route add 198.18.203.100/32 via 198.18.20$i.100
  ip netns exec $P-a$i sysctl -qw net.ipv4.ip_forward=1
  # Ingress node: published port 4567 -> T:80, no masquerade; T through B's isbox.
  ip -n $P-a$i route add 198.19.250.50/32 via 198.19.250.2 dev eth0 onlink
  ip netns exec $P-a$i nft -f - <<NFT
table ip mesh {
  chain pre { type nat hook prerouting priority dstnat; ip daddr 198.18.20$i.1 tcp dport 4567 dnat to 198.19.250.50:80; ip daddr 198.18.20$i.1 udp dport 4568 dnat to 198.19.250.50:80;
  }
}
NFT
done
# isbox(B): routes between the segment and T (hairpin on eth0), remembers the ingress
# node per flow (zone for the original tuple, mark for the reply's route).
ip netns exec $P-b sh -c 'sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.send_redirects=0 net.ipv4.conf.eth0.send_redirects=0 net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.eth0.rp_filter=0'
ip netns exec $P-b nft -f - <<'NFT'
table ip isbox {
  chain raw { type filter hook prerouting priority raw;
    iifname "eth0" ip daddr 198.19.250.50 ct original zone set ether saddr map { 02:00:00:00:00:01 : 1, 02:00:00:00:00:02 : 2 };
  }
  chain mangle { type filter hook prerouting priority mangle;
    ct state new iifname "eth0" ip daddr 198.19.250.50 ct mark set ether saddr map { 02:00:00:00:00:01 : 1, 02:00:00:00:00:02 : 2 }
    ct direction reply meta mark set ct mark;
  }
  chain natpost { type nat hook postrouting priority srcnat; policy accept; }
  chain natpre { type nat hook prerouting priority dstnat; policy accept; }
}
NFT
ip -n $P-b rule add fwmark 1 lookup 101; ip -n $P-b route add default via 198.19.250.1 dev eth0 onlink table 101
ip -n $P-b rule add fwmark 2 lookup 102; ip -n $P-b route add default via 198.19.250.3 dev eth0 onlink table 102
# T: replies from its ingress address (and UDP from port 80) go to B's isbox.
ip -n $P-t rule add from 198.19.250.50 lookup 100 pref 30000
ip -n $P-t rule add ipproto udp sport 80 lookup 100 pref 30001
ip -n $P-t route add 198.19.250.0/24 dev eth0 table 100
ip -n $P-t route add default via 198.19.250.2 dev eth0 src 198.19.250.50 table 100
echo "setup ok"

# Traffic: T answers each TCP line and each UDP datagram with the peer it sees; the
# client holds connections from 198.18.203.100:61001 through both ingress nodes at once,
# and sends UDP from :61002 to both.
cat > /tmp/mesh-spike-server.py <<'PY'
import socket, threading
def tcp():
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 80)); s.listen(16)
    while True:
        c, peer = s.accept()
        def serve(c=c, peer=peer):
            f = c.makefile("rwb")
            for line in f:
                f.write(("tcp peer %s:%d\n" % peer).encode()); f.flush()
        threading.Thread(target=serve, daemon=True).start()
def udp():
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", 80))
    while True:
        d, peer = u.recvfrom(2048)
        u.sendto(("udp peer %s:%d\n" % peer).encode(), peer)
threading.Thread(target=udp, daemon=True).start()
tcp()
PY
cat > /tmp/mesh-spike-client.py <<'PY'
import socket
C = "198.18.203.100"
socks = []
for a in ("198.18.201.1", "198.18.202.1"):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((C, 61001)); s.settimeout(3); s.connect((a, 4567)); socks.append((a, s, s.makefile("rwb")))
for r in range(3):
    for a, s, f in socks:
        f.write(b"hi\n"); f.flush()
        print("via", a, "->", f.readline().decode().strip())
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind((C, 61002)); u.settimeout(3)
for a in ("198.18.201.1", "198.18.202.1"):
    u.sendto(b"x", (a, 4568))
    d, src = u.recvfrom(2048)
    print("udp via", a, "answered from", src, "->", d.decode().strip())
PY
ip netns exec $P-t python3 /tmp/mesh-spike-server.py & SRV=$!
trap 'kill $SRV 2>/dev/null; cleanup' EXIT
sleep 0.5
ip netns exec $P-c timeout 20 python3 /tmp/mesh-spike-client.py
echo "--- conntrack in isbox(B)"
ip netns exec $P-b conntrack -L 2>/dev/null || ip netns exec $P-b cat /proc/net/nf_conntrack
rm -f /tmp/mesh-spike-server.py /tmp/mesh-spike-client.py
