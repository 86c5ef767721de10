//! Progress for long-running steps: a line when a step starts, a heartbeat with the elapsed
//! time while it runs (every 15 s, so a CI log or a terminal never looks stuck), and its
//! duration when it ends.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

const HEARTBEAT: Duration = Duration::from_secs(15);

/// A running step; says how long it took when finished or dropped.
pub struct Step {
    label: String,
    start: Instant,
    done: Arc<(Mutex<bool>, Condvar)>,
    finished: AtomicBool,
    ticker: Option<std::thread::JoinHandle<()>>,
}

/// `m:ss` for a duration.
pub fn clock(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}:{:02}", s / 60, s % 60)
}

/// Starts a step: prints `==> label` and a heartbeat until it ends.
pub fn step(label: impl Into<String>) -> Step {
    let label = label.into();
    eprintln!("==> {label}");
    let done = Arc::new((Mutex::new(false), Condvar::new()));
    let start = Instant::now();
    let ticker = {
        let done = done.clone();
        let label = label.clone();
        std::thread::spawn(move || {
            let (lock, cvar) = &*done;
            let mut finished = lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            while !*finished {
                let (guard, timeout) =
                    cvar.wait_timeout(finished, HEARTBEAT).unwrap_or_else(std::sync::PoisonError::into_inner);
                finished = guard;
                if timeout.timed_out() && !*finished {
                    eprintln!("    ... {label}: still running ({} elapsed)", clock(start.elapsed()));
                }
            }
        })
    };
    Step { label, start, done, finished: AtomicBool::new(false), ticker: Some(ticker) }
}

impl Step {
    /// Ends the step, printing its duration.
    pub fn finish(mut self) -> Duration {
        self.end(true)
    }

    /// Prints an intermediate line under the step (`    label: message`).
    pub fn note(&self, message: impl std::fmt::Display) {
        eprintln!("    {}: {message} ({})", self.label, clock(self.start.elapsed()));
    }

    fn end(&mut self, ok: bool) -> Duration {
        let elapsed = self.start.elapsed();
        if self.finished.swap(true, Ordering::SeqCst) {
            return elapsed;
        }
        let (lock, cvar) = &*self.done;
        *lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = true;
        cvar.notify_all();
        if let Some(t) = self.ticker.take() {
            let _ = t.join();
        }
        eprintln!("<== {} {} in {}", self.label, if ok { "done" } else { "stopped" }, clock(elapsed));
        elapsed
    }
}

impl Drop for Step {
    fn drop(&mut self) {
        self.end(false);
    }
}
