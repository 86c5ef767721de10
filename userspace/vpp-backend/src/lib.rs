//! The agent's VPP side, independent of how the agent computes its plan:
//!
//! - [`VppConfig`]: the `[vpp]` section of the agent config;
//! - [`render_startup_conf`]: VPP's `startup.conf` from it;
//! - [`VppDesired`] and [`render`]: what VPP must hold for a node, from plain inputs
//!   ([`NodeInputs`]: pod subnet, gateway, the NIC handed over by contiv-stn, remote nodes);
//!   [`render_bootstrap`]: its subset that needs no cluster store (the uplink, the host
//!   interconnect and its NAT44), which the agent applies before joining the store;
//! - [`Reconciler`]: one pass of dump / diff / apply against VPP's binary API;
//! - [`VppSupervisor`]: keeps VPP converged (desired changes, periodic resync, reconnect and
//!   replay after a VPP restart).

pub mod config;
pub mod desired;
pub mod reconcile;
pub mod startup;
pub mod supervisor;

pub use config::{AfXdpMode, HostPort, VppConfig, VppConfigError};
pub use desired::{
    ACL_TAG_PREFIX, AF_XDP_DEV_TYPE, AclRuleSpec, HandoverError, IdentityMapping, InputAcl, InterfaceKind,
    InterfaceSpec, NatSpec, NeighborSpec, NodeInputs, RemoteNode, RenderError, RouteSpec, StaticMapping,
    UPLINK_ACL_TAG, UplinkHandover, UplinkRoute, VppDesired, render, render_bootstrap, tunnel_acl_tag,
};
pub use reconcile::{Failure, ReconcileError, ReconcileReport, Reconciler};
pub use startup::{StartupError, render_startup_conf};
pub use supervisor::{SupervisorOptions, VppStatus, VppSupervisor};
