//! The `contiv-cni` executable: see the library crate for the logic.
//!
//! Called by a container runtime (no arguments, `CNI_*` variables, config on stdin) it is
//! the CNI plugin. Called with a subcommand it manages its own installation on a node:
//! `contiv-cni install` (the agent DaemonSet's init container), `contiv-cni uninstall`,
//! and `contiv-cni --version`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use contiv_cni::agent::Timeouts;
use contiv_cni::env::ProcessEnv;
use contiv_cni::{install, runner};

#[derive(Parser)]
#[command(
    name = "contiv-cni",
    version = concat!(env!("CARGO_PKG_VERSION"), " (CNI spec 0.3.0 - 1.1.0)"),
    about = "Contiv CNI plugin. Without arguments it serves the CNI protocol (CNI_COMMAND and the config on stdin)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install this binary and a network config list on the node, atomically.
    Install {
        /// CNI binary directory (the host's, mounted).
        #[arg(long, default_value = install::DEFAULT_BIN_DIR)]
        bin_dir: PathBuf,
        /// CNI config directory (the host's, mounted).
        #[arg(long, default_value = install::DEFAULT_CONF_DIR)]
        conf_dir: PathBuf,
        /// File name of the config list.
        #[arg(long, default_value = install::DEFAULT_CONF_NAME)]
        conf_name: String,
        /// Config list to install (JSON); default: contiv-cni then portmap.
        #[arg(long)]
        conflist: Option<PathBuf>,
        /// The agent's CNI socket, for the default config list.
        #[arg(long, default_value = contiv_cni_api::DEFAULT_SOCKET)]
        agent_socket: String,
        /// Write the config list as `<conf-name>.staged`, for the agent to put in place once
        /// it is ready (its `cniConfStaged`).
        #[arg(long)]
        staged: bool,
    },
    /// Remove the config list (and other contiv configs), then the binary.
    Uninstall {
        #[arg(long, default_value = install::DEFAULT_BIN_DIR)]
        bin_dir: PathBuf,
        #[arg(long, default_value = install::DEFAULT_CONF_DIR)]
        conf_dir: PathBuf,
        #[arg(long, default_value = install::DEFAULT_CONF_NAME)]
        conf_name: String,
        /// Then wait for SIGTERM (the uninstall DaemonSet's container stays up so a rollout
        /// status shows every node is done).
        #[arg(long)]
        wait: bool,
    },
}

fn cni_plugin() -> ! {
    contiv_cni::agent::mark_process_start();
    // The config comes on stdin; a terminal there (someone trying the binary by hand) gives
    // none rather than a wait for input.
    // SAFETY: isatty(3) on the process's own stdin.
    let outcome = if unsafe { libc::isatty(0) } == 1 {
        runner::run(&ProcessEnv, &mut std::io::empty(), Timeouts::default())
    } else {
        runner::run(&ProcessEnv, &mut std::io::stdin().lock(), Timeouts::default())
    };
    if let Some(e) = &outcome.error {
        let command = std::env::var("CNI_COMMAND").unwrap_or_default();
        let container = std::env::var("CNI_CONTAINERID").unwrap_or_default();
        eprintln!("contiv-cni: {command} {container}: {e}");
    }
    if !outcome.stdout.is_empty() {
        let mut out = std::io::stdout().lock();
        // If stdout is gone the runtime cannot read anything anyway; the exit code still tells.
        let _ = writeln!(out, "{}", outcome.stdout).and_then(|()| out.flush());
    }
    std::process::exit(outcome.exit_code);
}

fn print_report(report: &install::Report) {
    for p in &report.written {
        println!("installed {}", p.display());
    }
    for p in &report.removed {
        println!("removed {}", p.display());
    }
    for p in &report.shadowed_by {
        eprintln!(
            "warning: {} sorts before contiv's config: containerd and CRI-O use the first config, so pods get that \
             network; remove it (another network plugin's leftover?)",
            p.display()
        );
    }
}

fn wait_for_sigterm() {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
    rt.block_on(async {
        if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
    });
}

fn main() -> ExitCode {
    // A runtime calls plugins without arguments; anything else is the command line.
    if std::env::args_os().len() <= 1 {
        cni_plugin();
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Install { bin_dir, conf_dir, conf_name, conflist, agent_socket, staged } => {
            let conflist = match conflist {
                Some(path) => {
                    std::fs::read(&path).map_err(|source| install::InstallError::Io { path: path.clone(), source })
                }
                None => Ok(install::default_conflist(&agent_socket).into_bytes()),
            };
            let binary = std::env::current_exe()
                .map_err(|source| install::InstallError::Io { path: "/proc/self/exe".into(), source });
            conflist.and_then(|conflist| {
                install::Install { binary: binary?, bin_dir, conf_dir, conf_name, conflist, staged }.run()
            })
        }
        Command::Uninstall { bin_dir, conf_dir, conf_name, wait } => {
            let r = install::uninstall(&bin_dir, &conf_dir, &conf_name);
            if r.is_ok() && wait {
                if let Ok(report) = &r {
                    print_report(report);
                }
                println!("uninstalled; waiting for SIGTERM");
                wait_for_sigterm();
                return ExitCode::SUCCESS;
            }
            r
        }
    };
    match result {
        Ok(report) => {
            print_report(&report);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("contiv-cni: {e}");
            ExitCode::FAILURE
        }
    }
}
