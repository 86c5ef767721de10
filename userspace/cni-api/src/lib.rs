//! gRPC API between `contiv-cni` and the vswitch agent. See `proto/cni.proto`.

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("contiv.cni.v1");
}

mod error;
pub use error::CniError;

/// Default path of the agent's CNI socket (mode 0600).
pub const DEFAULT_SOCKET: &str = "/run/contiv/cni.sock";

/// CNI error codes used between the binary and the agent (CNI spec 1.1, section "Error").
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
    pub const IPAM_EXHAUSTED: u32 = 52;
    /// Plugin-specific: anything else the agent failed at.
    pub const INTERNAL: u32 = 100;
}
