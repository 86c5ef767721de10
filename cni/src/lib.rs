//! contiv-cni: the CNI plugin binary (spec 1.1) the container runtime executes.
//!
//! It validates the calling convention (`CNI_*` environment, config JSON on stdin, cniVersion),
//! forwards the request to the vswitch agent over gRPC on a unix socket, and prints the result
//! (or a CNI error) for the cniVersion the runtime asked for. All state lives in the agent.
//!
//! - [`env`]: the `CNI_*` variables, read through the [`env::Env`] trait
//! - [`config`]: decoding and validating the config on stdin
//! - [`result`]: the ADD result for each spec version, `prevResult`
//! - [`error`]: [`CniError`], the one error type, carrying the CNI code
//! - [`agent`]: the gRPC client on the agent's unix socket
//! - [`runner`]: one invocation end to end
//! - [`install`]: `contiv-cni install` / `uninstall` on a node (atomic, validated)

pub mod agent;
pub mod config;
pub mod env;
pub mod error;
pub mod install;
pub mod result;
pub mod runner;

pub use error::CniError;
