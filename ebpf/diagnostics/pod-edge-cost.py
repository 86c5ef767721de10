#!/usr/bin/env python3
"""What `tc_from_pod` costs per packet of a pod -> pod TCP connection (BPF_PROG_TEST_RUN).

Run as root in a one-node box with two pods, inside the node's namespace:

    cargo xtask cluster up --nodes 1
    cargo xtask cluster pod add node-1 default/a
    cargo xtask cluster pod add node-1 default/b
    id=$(bpftool prog show | awk -F: '/ tc_from_pod /{print $1}')
    ip netns exec cbox-node-1 python3 ebpf/diagnostics/pod-edge-cost.py $id [count] [first-port]

For each of `count` new connections (source ports from `first-port` on) it runs the
loaded program once on a SYN from a to b, the SYN-ACK back, an ACK, a 64-byte data segment
and an ACK from b, each with the host veth's ifindex in the context, and prints the p10 and
p50 of each kind. One run per packet: the program rewrites the frame (MACs, TTL), so a
repeat loop would time the spoofed-MAC drop from its second run on. The figures include
the test run's own clock reads. The packets are real to the datapath: the SYNs leave
conntrack entries behind, as real connections would (the agent expires them). Give each
run a new `first-port`: a port used before finds its entries, and its SYN is no longer new.
"""

import ctypes
import json
import os
import struct
import subprocess
import sys

SYS_BPF = 321  # x86_64
BPF_PROG_TEST_RUN = 10
BPF_PROG_GET_FD_BY_ID = 13
GATEWAY_MAC = "02:fe:00:00:00:01"
TC_ACT_REDIRECT = 7

libc = ctypes.CDLL(None, use_errno=True)


def bpf(cmd, attr):
    buf = ctypes.create_string_buffer(attr, 128)
    r = libc.syscall(SYS_BPF, cmd, buf, 128)
    if r < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return r, buf.raw


def mac(s):
    return bytes(int(x, 16) for x in s.split(":"))


def ipv4(s):
    return bytes(int(x) for x in s.split("."))


def checksum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def frame(src_mac, src, dst, sport, dport, flags, payload=b""):
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 1, 5 << 4, flags, 65535, 0, 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, 6, 0, ipv4(src), ipv4(dst))
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return mac(GATEWAY_MAC) + mac(src_mac) + b"\x08\x00" + ip + tcp


def pod(netns):
    """(MAC, IPv4 address, ifindex of the host end) of a pod's eth0."""
    link = json.loads(subprocess.check_output(["ip", "-n", netns, "-j", "addr", "show", "eth0"]))[0]
    addr = next(a["local"] for a in link["addr_info"] if a["family"] == "inet")
    return link["address"], addr, link["link_index"]


def main():
    prog_id = int(sys.argv[1])
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    first_port = int(sys.argv[3]) if len(sys.argv) > 3 else 10000
    fd, _ = bpf(BPF_PROG_GET_FD_BY_ID, struct.pack("III", prog_id, 0, 0))
    out = ctypes.create_string_buffer(2048)

    def run(data, ifindex):
        din = ctypes.create_string_buffer(data, len(data))
        ctx = bytearray(48)  # struct __sk_buff up to and including ifindex
        struct.pack_into("I", ctx, 40, ifindex)
        cin = ctypes.create_string_buffer(bytes(ctx), len(ctx))
        attr = struct.pack(
            "IIIIQQIIIIQQIII", fd, 0, len(data), len(out), ctypes.addressof(din), ctypes.addressof(out),
            1, 0, len(ctx), 0, ctypes.addressof(cin), 0, 0, 0, 0,
        )
        _, raw = bpf(BPF_PROG_TEST_RUN, attr)
        retval, duration = struct.unpack_from("I", raw, 4)[0], struct.unpack_from("I", raw, 36)[0]
        return retval, duration

    a, b = pod("cbox-pod-default-a"), pod("cbox-pod-default-b")
    kinds = ["syn", "syn-ack", "ack", "data", "ack from b"]
    times = {k: [] for k in kinds}
    verdicts = {k: set() for k in kinds}
    for sport in range(first_port, first_port + count):
        packets = [
            (a, frame(a[0], a[1], b[1], sport, 8080, 0x02)),
            (b, frame(b[0], b[1], a[1], 8080, sport, 0x12)),
            (a, frame(a[0], a[1], b[1], sport, 8080, 0x10)),
            (a, frame(a[0], a[1], b[1], sport, 8080, 0x18, b"x" * 64)),
            (b, frame(b[0], b[1], a[1], 8080, sport, 0x10)),
        ]
        for kind, (sender, data) in zip(kinds, packets):
            verdict, ns = run(data, sender[2])
            times[kind].append(ns)
            verdicts[kind].add(verdict)
    for kind in kinds:
        v = sorted(times[kind])
        note = "" if verdicts[kind] == {TC_ACT_REDIRECT} else f"  (verdicts {sorted(verdicts[kind])})"
        print(f"{kind:11} p10 {v[len(v) // 10]:5d} ns  p50 {v[len(v) // 2]:5d} ns{note}")


if __name__ == "__main__":
    main()
