// The least a TC pod edge can do between two pods of one node: set the destination MAC
// and hand the packet straight into the other pod (bpf_redirect_peer). No source check,
// no conntrack, no policy, no service, no counter, no TTL. `cargo xtask bench services`
// attaches it to the host veths of a routed node as a reference: what any eBPF pod edge
// on veths costs a new connection at the least, beside the kernel's routing and ours.
//
// Compiled by the benchmark with the two host veths' ifindexes and the pods' MACs:
//   clang -O2 -target bpf -DIF_A=<ifindex> -DIF_B=<ifindex> \
//     -DMAC_A=0x02,0xb2,0,0,0,1 -DMAC_B=0x02,0xb2,0,0,0,2 -c redirect-only.c -o redirect-only.o
// and attached with `tc filter add dev <host veth> ingress bpf da obj redirect-only.o sec tc`.
#include <linux/bpf.h>
#include <linux/pkt_cls.h>

#define SEC(name) __attribute__((section(name), used))

static long (*redirect_peer)(__u32 ifindex, __u64 flags) = (void *)BPF_FUNC_redirect_peer;
static long (*skb_store_bytes)(void *skb, __u32 offset, const void *from, __u32 len, __u64 flags) =
    (void *)BPF_FUNC_skb_store_bytes;

SEC("tc")
int redirect_only(struct __sk_buff *skb)
{
    const unsigned char mac_a[6] = {MAC_A};
    const unsigned char mac_b[6] = {MAC_B};
    int from_a = skb->ifindex == IF_A;

    if (skb_store_bytes(skb, 0, from_a ? mac_b : mac_a, 6, 0))
        return TC_ACT_SHOT;
    return redirect_peer(from_a ? IF_B : IF_A, 0);
}

char _license[] SEC("license") = "GPL";
