//! `contiv-stn`: takes the node's NIC away from the host for VPP and gives it back.
//!
//! ```text
//! contiv-stn run --interface eth0     # take it; restore on SIGTERM/SIGINT, or when
//!                                     # the host has no default route 300 s later
//! contiv-stn restore                  # give back what a crashed run took, then exit
//! contiv-stn show                     # print the state file (the agent's handover)
//! ```

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, Subcommand};
use contiv_stn::{DEFAULT_STATE_FILE, StnError, read_state, record, restore, take, write_state};
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
        /// Give the NIC back (and exit with an error) if the host has no default route
        /// again this many seconds after the take: VPP's host interconnect gives it one
        /// once VPP runs with the NIC. A VPP that never comes up (no hugepages, a wrong PCI
        /// address) would otherwise leave the node offline, with no way to reach it. 0:
        /// never. Only when the NIC had a default route.
        #[arg(long, env = "CONTIV_STN_GIVE_BACK_AFTER_SECONDS", default_value_t = 300)]
        give_back_after: u64,
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

/// Removes the state file once the NIC is back. Already gone is fine: another
/// `contiv-stn restore` (the uninstall DaemonSet's) may have given the NIC back first.
fn remove_state_file(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// The error of a take that failed midway, after its rollback (`restore`) ran. The state
/// file goes only if the rollback gave everything back; otherwise it is the one record of
/// what the host lost, and stays for `contiv-stn restore` (or the next start).
fn failed_take(state_file: &Path, interface: &str, take: StnError, rollback: Result<(), StnError>) -> anyhow::Error {
    match rollback {
        Ok(()) => {
            let _ = remove_state_file(state_file);
            anyhow::Error::new(take).context(format!("taking {interface}; put back what was removed"))
        }
        Err(rollback) => anyhow!(
            "taking {interface}: {take}; putting back what was removed failed too: {rollback}; {} is kept: \
             run `contiv-stn restore`",
            state_file.display()
        ),
    }
}

/// Restores from the state file if there is one; true if it did.
async fn restore_leftover(h: &rtnetlink::Handle, path: &Path) -> Result<bool> {
    let Some(state) = read_state(path)? else { return Ok(false) };
    restore(h, &state).await.with_context(|| format!("restoring {} from {}", state.interface, path.display()))?;
    remove_state_file(path)?;
    eprintln!(
        "contiv-stn: gave {} back its {} addresses and {} routes",
        state.interface,
        state.addresses.len(),
        state.routes.len()
    );
    Ok(true)
}

/// Resolves if the host has no default route `after` the take (VPP did not give it one);
/// never if it gets one by then, or if there is nothing to wait for.
async fn no_way_out_after(h: &rtnetlink::Handle, state: &contiv_stn::StnState, after: Duration) -> Duration {
    if after.is_zero() || !contiv_stn::had_default_route(state) {
        return std::future::pending().await;
    }
    let started = Instant::now();
    while started.elapsed() < after {
        match contiv_stn::host_has_default_route(h).await {
            Ok(true) => {
                println!("contiv-stn: the host has a default route again, through VPP");
                return std::future::pending().await;
            }
            Ok(false) => {}
            Err(e) => eprintln!("contiv-stn: {e}"),
        }
        tokio::time::sleep(Duration::from_secs(1).min(after)).await;
    }
    after
}

async fn run(state_file: PathBuf, interface: String, give_back_after: Duration) -> Result<()> {
    // Signals first: a SIGTERM during the take must still lead to a restore.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let h = netlink().await?;
    let leftover = read_state(&state_file)?;
    let held = match &leftover {
        Some(state) => contiv_stn::held_by_dpdk(&h, state, &interface).await,
        None => None,
    };
    let state = match (leftover, held) {
        // The previous run ended (crashed, killed) while VPP has the NIC: the record stays
        // what this run gives back, and the NIC stays with VPP.
        (Some(state), Some(driver)) => {
            let state = contiv_stn::StnState { pid: std::process::id(), taken: true, ..state };
            write_state(&state_file, &state)?;
            println!(
                "contiv-stn: {interface} is held by DPDK's driver {driver} (VPP has it): keeping the previous run's \
                 record ({} addresses, {} routes) in {}",
                state.addresses.len(),
                state.routes.len(),
                state_file.display()
            );
            state
        }
        _ => {
            if restore_leftover(&h, &state_file).await? {
                eprintln!("contiv-stn: the previous run ended without giving the NIC back; restored it first");
            }
            let state = record(&h, &interface).await?;
            // Nothing for VPP to serve the node with (DHCP not done yet?): a NIC taken so
            // would leave the host without a network and VPP without the node's address.
            if !state.addresses.iter().any(|a| a.address.addr().is_ipv4()) {
                bail!(
                    "{interface} has no IPv4 address (its DHCP lease not there yet?): not taking it (a restart tries \
                     again)"
                );
            }
            // The record is on disk before anything is removed: a crash from here on is
            // repaired by the next start (or `contiv-stn restore`).
            write_state(&state_file, &state)?;
            if let Err(e) = take(&h, &state).await {
                let rollback = restore(&h, &state).await;
                return Err(failed_take(&state_file, &interface, e, rollback));
            }
            let state = contiv_stn::StnState { taken: true, ..state };
            write_state(&state_file, &state)?;
            println!(
                "contiv-stn: took {interface} ({} addresses, {} routes); handover in {}",
                state.addresses.len(),
                state.routes.len(),
                state_file.display()
            );
            state
        }
    };
    let stranded = tokio::select! {
        _ = term.recv() => None,
        _ = int.recv() => None,
        waited = no_way_out_after(&h, &state, give_back_after) => Some(waited),
    };
    restore(&h, &state).await.context("giving the NIC back (the state file is kept; run `contiv-stn restore`)")?;
    remove_state_file(&state_file)?;
    println!("contiv-stn: gave {interface} back");
    match stranded {
        Some(waited) => bail!(
            "the host had no default route {} s after {interface} was taken (VPP did not come up with it?): gave \
             it back",
            waited.as_secs()
        ),
        None => Ok(()),
    }
}

/// Whether process `pid` is running (in this PID namespace: the probe runs in the
/// sidecar's container).
fn alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else { return false };
    // SAFETY: kill(2) with signal 0 sends nothing; it only checks that the process exists.
    pid > 0
        && (unsafe { libc::kill(pid, 0) } == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    match args.command {
        Command::Run { interface, give_back_after } => {
            run(args.state_file, interface, Duration::from_secs(give_back_after)).await
        }
        Command::Restore => {
            let h = netlink().await?;
            if !restore_leftover(&h, &args.state_file).await? {
                eprintln!("contiv-stn: nothing to restore ({} does not exist)", args.state_file.display());
            }
            Ok(())
        }
        // The sidecar's startup probe: VPP and the agent start once this succeeds.
        Command::Show => match read_state(&args.state_file)? {
            Some(s) if s.taken && alive(s.pid) => {
                println!("{}", serde_json::to_string_pretty(&s)?);
                Ok(())
            }
            // A record a run left behind (it is given back and taken again by the next run,
            // the NIC's link up meanwhile), or a take still under way.
            Some(s) => bail!(
                "{} is not held: the record in {} is from {}",
                s.interface,
                args.state_file.display(),
                if s.taken { "a run that is gone" } else { "a take not finished yet" }
            ),
            None => bail!("{} does not exist: contiv-stn is not holding a NIC", args.state_file.display()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state_file() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stn.json");
        std::fs::write(&path, b"{}").unwrap();
        (dir, path)
    }

    #[test]
    fn a_failed_take_rolled_back_removes_the_state_file() {
        let (_dir, path) = state_file();
        let err = failed_take(&path, "eth0", StnError::NoSuchInterface("eth0".into()), Ok(()));
        assert!(!path.exists());
        let msg = format!("{err:#}");
        assert!(msg.contains("taking eth0") && msg.contains("interface eth0 not found"), "{msg}");
    }

    #[test]
    fn a_failed_take_whose_rollback_failed_keeps_the_state_file_and_reports_both() {
        let (_dir, path) = state_file();
        let rollback =
            StnError::Restore { interface: "eth0".into(), total: 3, failures: vec!["route 0.0.0.0/0: EPERM".into()] };
        let err = failed_take(&path, "eth0", StnError::NoSuchInterface("eth0".into()), Err(rollback));
        assert!(path.exists(), "the only record of what the host lost");
        let msg = format!("{err:#}");
        assert!(msg.contains("interface eth0 not found"), "the take's error: {msg}");
        assert!(msg.contains("1 of 3 failed: route 0.0.0.0/0: EPERM"), "the rollback's error: {msg}");
        assert!(msg.contains("contiv-stn restore"), "{msg}");
    }
}
