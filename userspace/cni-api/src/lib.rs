//! gRPC API between `contiv-cni` and the vswitch agent. See `proto/cni.proto`.

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("contiv.cni.v1");
}

mod error;
pub use error::CniError;
pub mod pending_del;

/// Default path of the agent's CNI socket (mode 0600).
pub const DEFAULT_SOCKET: &str = "/run/contiv/cni.sock";

/// The pod MTUs a network config may ask for: contiv-cni (and its installer) refuse the
/// same values the agent does, so a config is never accepted by one and refused by the other.
/// 576 is the smallest datagram every IPv4 host must take; 9000 the largest the overlay is
/// built for.
pub const POD_MTU_MIN: u32 = 576;
/// See [`POD_MTU_MIN`].
pub const POD_MTU_MAX: u32 = 9000;

/// How long the plugin took before its request reached the agent: contiv-cni sends two
/// CLOCK_MONOTONIC timestamps as request metadata, the agent subtracts them from its own
/// clock on receipt and logs the differences with the ADD's phases (`contiv_agent::timing`).
/// Both processes run on one host, so they share the clock; a value that makes no sense (a
/// different time namespace) is ignored.
pub mod plugin_timing {
    /// Metadata key: when the plugin process entered `main`, in ns of CLOCK_MONOTONIC.
    pub const STARTED_NS: &str = "contiv-cni-started-ns";
    /// Metadata key: when the plugin's connection to the agent was up.
    pub const CONNECTED_NS: &str = "contiv-cni-connected-ns";

    /// CLOCK_MONOTONIC now, in nanoseconds.
    pub fn monotonic_ns() -> u64 {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime writes into the timespec we own; CLOCK_MONOTONIC always exists.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        (ts.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec as u64)
    }
}

/// CNI error codes used between the binary and the agent (CNI spec 1.1, section "Error").
/// 0-99 are the spec's own; the spec leaves 100 and above to each plugin, and contiv's are
/// listed after [`codes::NOT_READY`] (cni/README.md has the table).
pub mod codes {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    pub const NOT_READY: u32 = 51;
    // --- contiv's own codes (the spec reserves 0-99 for itself) ---
    /// Plugin-specific: anything else the agent failed at.
    pub const INTERNAL: u32 = 100;
    /// Plugin-specific: the node's pod subnet has no free address left (ADD). Not transient
    /// in the spec's sense: only a DEL or GC of another pod frees one.
    pub const IPAM_EXHAUSTED: u32 = 101;
    /// Plugin-specific: ADD of an attachment (container and interface name) that exists;
    /// the spec asks for an error when the interface is already in the container.
    pub const ATTACHMENT_EXISTS: u32 = 102;
}
