//! Benchmark probe for `cargo xtask bench vpp`: the Rust client's side, in its own (release)
//! process against a running VPP API socket (the fake in the benchmark). Prints JSON:
//! `connect_ms` (each connect + handshake) and `route_add_rate` (ip_route_add_del requests
//! per second, all in flight at once on one connection).

use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Parser;
use contiv_vpp_binapi::{Client, ClientOptions, api};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    socket: std::path::PathBuf,
    #[arg(long, default_value_t = 20)]
    connects: usize,
    #[arg(long, default_value_t = 10_000)]
    routes: u32,
    /// First octet of the route prefixes (rounds use different ones).
    #[arg(long, default_value_t = 10)]
    first_octet: u8,
}

fn route(i: u32, first: u8) -> api::IpRouteAddDel {
    let net = ipnet::Ipv4Net::new(std::net::Ipv4Addr::new(first, (i >> 8) as u8, i as u8, 0), 24).expect("prefix");
    api::IpRouteAddDel {
        is_add: true,
        is_multipath: false,
        route: api::IpRoute {
            prefix: net.into(),
            n_paths: 1,
            paths: vec![api::FibPath {
                sw_if_index: 1,
                weight: 1,
                nh: api::FibPathNh { classify_table_index: u32::MAX, ..Default::default() },
                ..Default::default()
            }],
            ..Default::default()
        },
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let opts = ClientOptions::new(&args.socket);
    let mut connect_ms = Vec::new();
    let mut table = 0;
    for _ in 0..args.connects {
        let t = Instant::now();
        let c = Client::connect(opts.clone()).await.context("connect")?;
        connect_ms.push(t.elapsed().as_secs_f64() * 1e3);
        table = c.table_len().unwrap_or(0);
        c.close().await?;
    }
    let c = Client::connect(opts).await.context("connect")?;
    let requests: Vec<api::IpRouteAddDel> = (0..args.routes).map(|i| route(i, args.first_octet)).collect();
    let t = Instant::now();
    let replies = futures::future::join_all(requests.iter().map(|r| c.request(r))).await;
    let secs = t.elapsed().as_secs_f64();
    let failed = replies.iter().filter(|r| r.is_err()).count();
    if failed > 0 {
        bail!("{failed} of {} requests failed: {:?}", args.routes, replies.into_iter().find(|r| r.is_err()));
    }
    c.close().await?;
    let out = serde_json::json!({
        "table_size": table,
        "connect_ms": connect_ms,
        "route_add_rate": f64::from(args.routes) / secs,
    });
    println!("{out}");
    Ok(())
}
