//! Runs the real vpp_papi client (PyPI `vpp-papi` 2.4.2, in the virtualenv `cargo xtask
//! setup` creates at `target/vpp-papi-venv`) as an independent check of what a server
//! speaks and holds. Used by tests and the VPP benchmark.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde_json::Value;

/// Set by `cargo xtask test` (which runs set-up first): a missing virtualenv is then an error
/// instead of a skipped test.
pub const REQUIRE_ENV: &str = "CONTIV_REQUIRE_PAPI";

/// The workspace root (this crate is userspace/vpp-fake).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The vendored `.api.json` files vpp_papi loads (the same ones our types come from).
pub fn api_dir() -> PathBuf {
    workspace_root().join("userspace/vpp-binapi/api")
}

/// The virtualenv's python (`CONTIV_PAPI_PYTHON` overrides).
pub fn python() -> PathBuf {
    std::env::var_os("CONTIV_PAPI_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/vpp-papi-venv/bin/python"))
}

/// A script of this crate's `papi/` folder.
pub fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("papi").join(name)
}

/// The vpp_papi runner.
#[derive(Debug, Clone)]
pub struct Papi {
    python: PathBuf,
}

impl Papi {
    /// Finds a python that imports vpp_papi 2.4.2, or says why not.
    pub fn find() -> Result<Self, String> {
        let python = python();
        let out = Command::new(&python)
            .args(["-c", "import importlib.metadata as m; print(m.version('vpp_papi'))"])
            .output()
            .map_err(|e| format!("{}: {e}", python.display()))?;
        let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if !out.status.success() {
            return Err(format!("{} cannot import vpp_papi", python.display()));
        }
        if version != "2.4.2" {
            return Err(format!("{} has vpp_papi {version}, not 2.4.2", python.display()));
        }
        Ok(Self { python })
    }

    /// For tests: the runner, or None after printing one line saying why the test is
    /// skipped. Under `cargo xtask test` a missing virtualenv fails the test instead.
    pub fn for_test(test: &str) -> Option<Self> {
        match Self::find() {
            Ok(p) => Some(p),
            Err(why) if std::env::var_os(REQUIRE_ENV).is_some() => {
                panic!("{test}: vpp_papi is required here but unusable: {why} (cargo xtask setup creates it)")
            }
            Err(why) => {
                eprintln!("skipping {test}: {why} (cargo xtask setup creates target/vpp-papi-venv)");
                None
            }
        }
    }

    /// The python interpreter.
    pub fn python(&self) -> &Path {
        &self.python
    }

    /// Runs `papi/papi_driver.py` with `program` (see the script) against `socket`.
    pub fn drive(&self, socket: &Path, calls: Value, subscribe_events: bool, event_wait: f64) -> Value {
        let program = serde_json::json!({
            "socket": socket,
            "apidir": api_dir(),
            "name": "papi-test",
            "calls": calls,
            "subscribe_events": subscribe_events,
            "event_wait": event_wait,
        });
        self.run_script("papi_driver.py", &program)
    }

    /// Runs a script of `papi/` with a JSON program on stdin; returns its JSON output.
    pub fn run_script(&self, name: &str, program: &Value) -> Value {
        let mut child = Command::new(&self.python)
            .arg(script(name))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.python.display()));
        child.stdin.take().expect("stdin").write_all(program.to_string().as_bytes()).expect("writing the program");
        let out = child.wait_with_output().expect("waiting for vpp_papi");
        assert!(
            out.status.success(),
            "{name} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{name} printed no JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
    }
}
