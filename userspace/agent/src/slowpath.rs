//! Who serves the slow path, chosen by `uplink` in the agent config.
//!
//! # The seam
//! ```text
//! pod ─▶ tc_from_pod ─redirect─▶ cslow0 ══veth══ cslow1 ─XDP─▶ XSK map[queue] ─▶ AF_XDP socket ─▶ backend
//! pod ◀─ tc_from_vswitch (any local pod, by IPv4 dst / ARP target) ◀─ cslow0 ◀══ cslow1 ◀─ backend
//! ```
//! - **Frames carry where they came from.** Every frame a pod sends has passed the
//!   anti-spoofing checks of `tc_from_pod` before it is redirected: its source MAC and IPv4
//!   address are the sending pod's own (the PODS map has them), so a backend knows the pod
//!   from the frame alone, without metadata.
//! - **Replies can go to any local pod or out of the node.** `tc_from_vswitch` delivers a
//!   frame to whichever local pod owns its destination. In kernel mode a frame for anything
//!   else goes to the node's stack, which routes it (into the overlay, or out of the uplink);
//!   in VPP mode VPP sends node-leaving traffic out of its own NIC, tunnels and tap.
//!
//! # The backends
//! - [`SlowPathBackend::Builtin`] (`uplink = "kernel"`): the agent's own AF_XDP socket,
//!   registered in `SLOWPATH_XSKS` behind `xdp_to_vswitch`, served by
//!   [`contiv_vswitch::BuiltinVswitch`] (ARP and ICMP for the gateway, frag-needed).
//! - [`SlowPathBackend::Vpp`] (`uplink = "vpp"`): VPP's af_xdp interface on the port. The agent
//!   attaches `xdp_to_vpp`, whose XSK map is named `xsks_map`, the name libbpf/libxdp look up
//!   in the program already attached to an interface: VPP registers its own socket there
//!   when the agent creates the interface over the binary API. The agent never opens a
//!   socket itself; it programs VPP ([`crate::vpp::VppNode`]).

use anyhow::Context;
use contiv_vswitch::{BuiltinVswitch, RunningPort};

use crate::{podnet, vpp::VppNode};

/// Creates the slow-path port's veth pair (`host` <-> `vswitch`, MTU
/// [`contiv_common::SLOW_PORT_MTU`]) in place of whatever has those names, and brings both
/// ends up. `host_index`: the host end's interface index to ask for (a port re-created
/// under a running datapath must keep the index its config and traces name).
pub async fn create_port(
    node: &rtnetlink::Handle,
    host: &str,
    vswitch: &str,
    host_index: Option<u32>,
) -> anyhow::Result<()> {
    podnet::delete_link(node, host).await?;
    podnet::delete_link(node, vswitch).await?;
    let mut request = rtnetlink::LinkVeth::new(host, vswitch).mtu(contiv_common::SLOW_PORT_MTU).build();
    if let Some(index) = host_index {
        request.header.index = index;
    }
    node.link().add(request).execute().await.context("creating the slow-path port")?;
    bring_up(node, host, vswitch).await
}

/// Brings both ends of the slow-path port up; neither may originate traffic of its own
/// (IPv6 autoconf, DAD) into the vswitch.
pub async fn bring_up(node: &rtnetlink::Handle, host: &str, vswitch: &str) -> anyhow::Result<()> {
    for name in [host, vswitch] {
        let _ = crate::sysctl::set(&format!("net/ipv6/conf/{name}/disable_ipv6"), "1");
        let link = podnet::link_by_name(node, name).await?.with_context(|| format!("{name} vanished"))?;
        node.link()
            .set(rtnetlink::LinkUnspec::new_with_index(link.header.index).up().build())
            .execute()
            .await
            .with_context(|| format!("bringing {name} up"))?;
    }
    Ok(())
}

/// Whether the kernel-mode port is as the datapath was wired to it: both ends there, the
/// host end at `host_index`.
pub async fn port_intact(node: &rtnetlink::Handle, host: &str, vswitch: &str, host_index: u32) -> anyhow::Result<bool> {
    let host_end = podnet::link_by_name(node, host).await?;
    let vswitch_end = podnet::link_by_name(node, vswitch).await?;
    Ok(host_end.is_some_and(|l| l.header.index == host_index) && vswitch_end.is_some())
}

/// The slow path's backend.
pub enum SlowPathBackend {
    /// The built-in vswitch on the agent's AF_XDP socket (None while it is being restarted).
    Builtin(std::sync::Mutex<Option<RunningPort<BuiltinVswitch>>>),
    /// VPP, programmed over its binary API.
    Vpp(Box<VppNode>),
}

impl SlowPathBackend {
    /// `builtin` or `vpp`, as the status endpoint names it.
    pub fn name(&self) -> &'static str {
        match self {
            SlowPathBackend::Builtin(_) => "builtin",
            SlowPathBackend::Vpp(_) => "vpp",
        }
    }

    /// The VPP backend, in VPP mode.
    pub fn vpp(&self) -> Option<&VppNode> {
        match self {
            SlowPathBackend::Vpp(v) => Some(v),
            SlowPathBackend::Builtin(_) => None,
        }
    }

    /// The built-in vswitch's port, in kernel mode.
    pub fn builtin(&self) -> Option<&std::sync::Mutex<Option<RunningPort<BuiltinVswitch>>>> {
        match self {
            SlowPathBackend::Builtin(p) => Some(p),
            SlowPathBackend::Vpp(_) => None,
        }
    }
}
