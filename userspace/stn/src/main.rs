//! `contiv-stn`: takes the node's NIC away from the host for VPP and gives it back.
//!
//! ```text
//! contiv-stn run --interface eth0     # take it; restore on SIGTERM/SIGINT
//! contiv-stn restore                  # give back what a crashed run took, then exit
//! contiv-stn show                     # print the state file (the agent's handover)
//! ```

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use contiv_stn::{DEFAULT_STATE_FILE, read_state, record, restore, take, write_state};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(name = "contiv-stn", version, about = "Steal the NIC for VPP on single-NIC nodes, and give it back")]
struct Args {
    /// Where the taken configuration is kept (and where the agent reads its handover).
    #[arg(long, env = "CONTIV_STN_STATE_FILE", default_value = DEFAULT_STATE_FILE, global = true)]
    state_file: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Record and remove the NIC's addresses and routes; put them back on SIGTERM/SIGINT.
    Run {
        /// The NIC.
        #[arg(long)]
        interface: String,
    },
    /// Put back what the state file records (after a crash), then exit.
    Restore,
    /// Print the state file.
    Show,
}

async fn netlink() -> Result<rtnetlink::Handle> {
    let (conn, handle, _) = rtnetlink::new_connection().context("opening a netlink socket")?;
    tokio::spawn(conn);
    Ok(handle)
}

/// Restores from the state file if there is one; true if it did.
async fn restore_leftover(h: &rtnetlink::Handle, path: &std::path::Path) -> Result<bool> {
    let Some(state) = read_state(path)? else { return Ok(false) };
    restore(h, &state).await.with_context(|| format!("restoring {} from {}", state.interface, path.display()))?;
    std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
    eprintln!(
        "contiv-stn: gave {} back its {} addresses and {} routes",
        state.interface,
        state.addresses.len(),
        state.routes.len()
    );
    Ok(true)
}

async fn run(state_file: PathBuf, interface: String) -> Result<()> {
    // Signals first: a SIGTERM during the take must still lead to a restore.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let h = netlink().await?;
    if restore_leftover(&h, &state_file).await? {
        eprintln!("contiv-stn: the previous run ended without giving the NIC back; restored it first");
    }
    let state = record(&h, &interface).await?;
    // The record is on disk before anything is removed: a crash from here on is repaired
    // by the next start (or `contiv-stn restore`).
    write_state(&state_file, &state)?;
    if let Err(e) = take(&h, &state).await {
        let _ = restore(&h, &state).await;
        let _ = std::fs::remove_file(&state_file);
        return Err(e).context(format!("taking {interface}; put back what was removed"));
    }
    println!(
        "contiv-stn: took {interface} ({} addresses, {} routes); handover in {}",
        state.addresses.len(),
        state.routes.len(),
        state_file.display()
    );
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    restore(&h, &state).await.context("giving the NIC back (the state file is kept; run `contiv-stn restore`)")?;
    std::fs::remove_file(&state_file).with_context(|| format!("removing {}", state_file.display()))?;
    println!("contiv-stn: gave {interface} back");
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    match args.command {
        Command::Run { interface } => run(args.state_file, interface).await,
        Command::Restore => {
            let h = netlink().await?;
            if !restore_leftover(&h, &args.state_file).await? {
                eprintln!("contiv-stn: nothing to restore ({} does not exist)", args.state_file.display());
            }
            Ok(())
        }
        Command::Show => match read_state(&args.state_file)? {
            Some(s) => {
                println!("{}", serde_json::to_string_pretty(&s)?);
                Ok(())
            }
            None => bail!("{} does not exist: contiv-stn is not holding a NIC", args.state_file.display()),
        },
    }
}
