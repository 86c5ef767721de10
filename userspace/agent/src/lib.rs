//! The vswitch agent: one per node. It owns the node's pod subnet (IPAM), creates pod
//! interfaces, loads and programs the eBPF datapath, serves the slow path (the built-in
//! vswitch over AF_XDP, or VPP with `uplink = "vpp"`), and answers contiv-cni over gRPC.

pub mod agent;
pub mod apply;
pub mod bandwidth;
pub mod cluster;
pub mod cni_server;
pub mod cniconf;
pub mod config;
pub mod conntrack;
pub mod datapath;
pub mod healthcheck;
pub mod hostports;
pub mod http;
pub mod metrics;
pub mod monitor;
pub mod plan;
pub mod podnet;
pub mod policy;
pub mod programming;
pub mod proxy;
pub mod proxyhealth;
pub mod rps;
pub mod services;
pub mod slowpath;
pub mod sockdiag;
pub mod starting;
pub mod state;
pub mod status;
pub mod sysctl;
pub mod tcx;
#[cfg(test)]
mod testnetns;
pub mod timing;
pub mod trace;
pub mod uplink;
pub mod vpp;
pub mod vpp_host;
