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

use contiv_vswitch::{BuiltinVswitch, RunningPort};

use crate::vpp::VppNode;

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
