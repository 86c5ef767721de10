//! The `contiv-cni` executable: see the library crate for the logic.

use std::io::Write;

use contiv_cni::agent::Timeouts;
use contiv_cni::env::ProcessEnv;
use contiv_cni::runner;

fn main() {
    contiv_cni::agent::mark_process_start();
    let outcome = runner::run(&ProcessEnv, &mut std::io::stdin().lock(), Timeouts::default());
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
