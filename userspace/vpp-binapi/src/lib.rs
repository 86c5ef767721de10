//! A client for FD.io VPP's binary API over its unix socket.
//!
//! - [`api`]: a Rust type for every message, type, union, enum, enumflags and alias of the
//!   vendored `.api.json` files (api/), generated at build time, with its wire encoding
//!   ([`wire`]) and a registry of every message ([`api::MESSAGES`]).
//! - [`Client`]: the async transport: framing, the `sockclnt_create` handshake and its
//!   message table, CRC checks, replies matched by context with many requests in flight,
//!   dumps closed by `control_ping`, `*_get` cursors, events, reconnect.
//!
//! ```no_run
//! # async fn f() -> Result<(), contiv_vpp_binapi::Error> {
//! use contiv_vpp_binapi::{Client, ClientOptions, api};
//! let client = Client::connect(ClientOptions::new("/run/vpp/api.sock")).await?;
//! let version = client.request(&api::ShowVersion::default()).await?;
//! let ifaces = client.dump(&api::SwInterfaceDump::default()).await?;
//! println!("{} {}: {} interfaces", version.program, version.version, ifaces.len());
//! # Ok(()) }
//! ```

/// Generated from api/*.api.json by build.rs.
#[allow(clippy::all, clippy::pedantic, missing_docs, non_camel_case_types)]
pub mod api {
    include!(concat!(env!("OUT_DIR"), "/api.rs"));
}

mod client;
mod convert;
pub mod message;
pub mod wire;

pub use client::{Client, ClientOptions, ConnectionState, Error, Event, MessageTable, errno};
pub use message::{Dump, Getter, Header, Message, MessageInfo, MessageKind, Request, Subscribe};
