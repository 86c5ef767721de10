//! The built-in vswitch that serves the datapath's slow path.
//!
//! Frames the eBPF fast path cannot handle (ARP for the gateway, ICMP echo to
//! the gateway, unknown destinations, non-IPv4) are
//! steered into the slow-path port: a veth pair whose vswitch end carries an
//! XDP program redirecting every frame into an AF_XDP socket. This crate owns
//! that socket ([`AfXdpPort`], [`RunningPort`]) and the frames-in / frames-out
//! seam behind it ([`SlowPath`]), with the built-in backend
//! ([`BuiltinVswitch`]) answering ARP and ICMP echo for the pods' gateway.
//!
//! Wiring, as the agent does it:
//! ```no_run
//! use std::os::fd::AsRawFd;
//! use contiv_vswitch::{BuiltinVswitch, GatewayConfig, spawn};
//!
//! let vswitch = BuiltinVswitch::new(GatewayConfig {
//!     ip: "10.1.0.1".parse().unwrap(),
//!     mac: [0x02, 0xfe, 0, 0, 0, 1],
//!     path_mtu: None,
//! });
//! let port = spawn("cslow1", 0, vswitch).expect("AF_XDP port");
//! // With aya: XskMap::try_from(map)?.set(port.queue(), port.as_raw_fd(), 0)?;
//! let fd = port.as_raw_fd();
//! # let _ = fd;
//! println!("{:?} {:?}", port.counters(), port.backend_counters());
//! ```

mod backend;
mod builtin;
pub mod packet;
mod port;

pub use backend::{DropCounters, DropReason, ReplyKind, SlowPath, Verdict, VswitchCounters};
pub use builtin::{BuiltinVswitch, GatewayConfig, Refusals};
pub use port::{AfXdpPort, BUSY_RETRY, PortConfig, PortCounters, PortError, RunningPort, spawn};
