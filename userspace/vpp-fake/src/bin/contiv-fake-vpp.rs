//! `contiv-fake-vpp`: runs the FAKE VPP (tests and benchmarks only) on a unix socket until
//! SIGTERM or SIGINT. It speaks VPP's binary API and keeps state; it forwards no packets.

use anyhow::{Context, Result, bail};
use clap::Parser;
use contiv_vpp_fake::{FakeOptions, FakeVpp};

#[derive(Parser)]
#[command(name = "contiv-fake-vpp", about = "A FAKE VPP binary-API server for tests (no packet forwarding)")]
struct Args {
    /// The API socket to listen on.
    #[arg(long, default_value = "/run/vpp/api.sock")]
    socket: std::path::PathBuf,
    /// Pad the message table to a full VPP build's size (~2,200 entries) with synthetic names.
    #[arg(long)]
    full_table: bool,
    /// A DPDK NIC present from boot, NAME=MAC (repeatable). Default: GigabitEthernet0/8/0.
    #[arg(long = "nic")]
    nics: Vec<String>,
    /// List a message under another CRC, NAME=HEXCRC (repeatable), as a VPP with a
    /// different definition would.
    #[arg(long = "crc-override")]
    crc_overrides: Vec<String>,
    /// Give af_xdp interfaces a real AF_XDP socket on their Linux interface, registered in
    /// the attached XDP program's `xsks_map` as VPP's af_xdp plugin does (root; run it in
    /// the network namespace of that interface).
    #[arg(long)]
    af_xdp: bool,
    /// Give taps their Linux end in this network namespace, with the host address and MAC
    /// they are created with, as VPP does (root).
    #[arg(long)]
    host_taps: bool,
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let v: Vec<u8> = s.split(':').map(|p| u8::from_str_radix(p, 16)).collect::<Result<_, _>>().ok()?;
    v.try_into().ok()
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    let mut opts = FakeOptions::new(&args.socket);
    opts.full_table = args.full_table;
    opts.af_xdp = args.af_xdp;
    opts.host_taps = args.host_taps;
    if !args.nics.is_empty() {
        opts.nics.clear();
        for n in &args.nics {
            let Some((name, mac)) = n.split_once('=') else { bail!("--nic {n:?}: expected NAME=MAC") };
            let mac = parse_mac(mac).with_context(|| format!("--nic {n:?}: bad MAC"))?;
            opts.nics.push((name.to_owned(), mac));
        }
    }
    for o in &args.crc_overrides {
        let Some((name, crc)) = o.split_once('=') else { bail!("--crc-override {o:?}: expected NAME=HEXCRC") };
        let crc =
            u32::from_str_radix(crc.trim_start_matches("0x"), 16).with_context(|| format!("--crc-override {o:?}"))?;
        opts.crc_overrides.push((name.to_owned(), crc));
    }
    let fake = FakeVpp::start(opts).with_context(|| format!("listening on {}", args.socket.display()))?;
    println!(
        "contiv-fake-vpp (a fake, not VPP) listening on {} with {} messages",
        args.socket.display(),
        fake.table_len()
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    drop(fake);
    Ok(())
}
