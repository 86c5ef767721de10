//! Receive packet steering (RPS) on the host end of each pod's veth, so that a pod's
//! TCP segments reach their receiver in the order they were sent.
//!
//! Why: a TCP sender transmits from two CPUs, its own (sendmsg, pacing timer) and the one
//! that processes the receiver's ACKs (softirq). Each CPU's transmission is queued on that
//! CPU's backlog when it crosses the veth, and the fast path (`bpf_redirect_peer`) then
//! delivers it straight into the receiving socket. A segment sent from a softirq (a pacing
//! hrtimer, for example) waits in its CPU's backlog until that softirq round ends, 15-30 us,
//! while a later segment sent from the other CPU is already delivered: the receiver sees
//! reordering, and the sender retransmits segments that were never lost (spurious
//! retransmits, about 10-40x kernel routing on a 2-CPU node). With RPS on the host end,
//! every packet of a flow is queued on the backlog of one CPU chosen by the flow's hash, so
//! a flow is delivered in the order it was sent, whichever CPU sent it. ebpf/README.md has
//! the measurements.
//!
//! The settings live in sysfs (`/sys/class/net/<dev>/queues/rx-0/rps_cpus`), which shows the
//! devices of the network namespace that mounted it. The agent's /sys may belong to another
//! namespace (the host's, when the agent was started with `nsenter --net`) or be read-only
//! (a container). So one thread of the agent gets a mount namespace of its own, mounts a
//! fresh sysfs of the agent's network namespace there, and does every write.

use std::{
    path::{Path, PathBuf},
    sync::mpsc,
};

/// Writes RPS settings of the agent's network namespace. Cheap to clone; the writer thread
/// lives as long as any handle.
#[derive(Clone)]
pub struct Rps {
    mask: String,
    tx: mpsc::Sender<Request>,
}

struct Request {
    ifname: String,
    mask: String,
    done: mpsc::SyncSender<Result<(), String>>,
}

impl Rps {
    /// Starts the writer thread. Fails if the online CPUs cannot be read or the private sysfs
    /// cannot be mounted; a kernel without RPS shows up later, as a failed write.
    pub fn start() -> Result<Self, String> {
        let mask = cpu_mask(&read_online_cpus()?)?;
        // The process's network namespace (its main thread's), whichever thread calls.
        let netns = std::fs::File::open("/proc/self/ns/net").map_err(|e| format!("opening /proc/self/ns/net: {e}"))?;
        let (tx, rx) = mpsc::channel::<Request>();
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("rps-sysfs".into())
            .spawn(move || {
                let root = match nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| format!("entering the agent's network namespace: {e}"))
                    .and_then(|()| private_sysfs())
                {
                    Ok(root) => {
                        let _ = ready_tx.send(Ok(()));
                        root
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                for req in rx {
                    let _ = req.done.send(write_rps(&root, &req.ifname, &req.mask));
                }
            })
            .map_err(|e| format!("starting the RPS thread: {e}"))?;
        ready_rx.recv().map_err(|_| "the RPS thread stopped".to_string())??;
        Ok(Self { mask, tx })
    }

    /// The mask written: every online CPU.
    pub fn mask(&self) -> &str {
        &self.mask
    }

    /// Steers what `ifname` (a device of the agent's namespace) receives over every online
    /// CPU by flow hash (`on`), or turns RPS off there. Blocking (a sysfs write on the
    /// writer thread, tens of microseconds).
    pub fn set(&self, ifname: &str, on: bool) -> Result<(), String> {
        let mask = if on { self.mask.clone() } else { "0".to_owned() };
        let (done, result) = mpsc::sync_channel(1);
        self.tx
            .send(Request { ifname: ifname.to_owned(), mask, done })
            .map_err(|_| "the RPS thread stopped".to_string())?;
        result.recv().map_err(|_| "the RPS thread stopped".to_string())?
    }
}

/// Gives the calling thread a mount namespace of its own and mounts a sysfs of the thread's
/// network namespace in it. Returns where. Nothing is visible outside the thread.
fn private_sysfs() -> Result<PathBuf, String> {
    use nix::mount::{MsFlags, mount};
    // The thread's filesystem attributes must be its own before it can leave the mount
    // namespace (CLONE_NEWNS implies CLONE_FS).
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(|e| format!("unshare(CLONE_NEWNS) for a private sysfs: {e}"))?;
    // Copied mounts keep their propagation: make them slaves first, or the sysfs mounted
    // below would show up in the host's mount namespace.
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_SLAVE, None::<&str>)
        .map_err(|e| format!("making / a slave mount: {e}"))?;
    let root = PathBuf::from("/sys");
    // Detach whatever /sys is here (maybe read-only, maybe another namespace's) and mount
    // this namespace's.
    let _ = nix::mount::umount2(&root, nix::mount::MntFlags::MNT_DETACH);
    mount(
        Some("sysfs"),
        &root,
        Some("sysfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| format!("mounting a sysfs for the agent's network namespace: {e}"))?;
    Ok(root)
}

fn write_rps(sysfs: &Path, ifname: &str, mask: &str) -> Result<(), String> {
    if ifname.is_empty() || ifname.contains('/') || ifname == "." || ifname == ".." {
        return Err(format!("not an interface name: {ifname:?}"));
    }
    let path = sysfs.join("class/net").join(ifname).join("queues/rx-0/rps_cpus");
    std::fs::write(&path, mask).map_err(|e| format!("writing {mask} to {}: {e}", path.display()))
}

fn read_online_cpus() -> Result<Vec<usize>, String> {
    let path = "/sys/devices/system/cpu/online";
    let text = std::fs::read_to_string(path).map_err(|e| format!("reading {path}: {e}"))?;
    parse_cpu_list(&text).map_err(|e| format!("{path}: {e}"))
}

/// Parses the kernel's CPU list format ("0-3,5,7-8").
pub fn parse_cpu_list(text: &str) -> Result<Vec<usize>, String> {
    let mut cpus = vec![];
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        let num = |s: &str| s.trim().parse::<usize>().map_err(|_| format!("not a CPU list: {text:?}"));
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b {
                    return Err(format!("not a CPU list: {text:?}"));
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(num(part)?),
        }
    }
    if cpus.is_empty() {
        return Err(format!("no CPUs in {text:?}"));
    }
    Ok(cpus)
}

/// The kernel's cpumask format for these CPUs: hex, in comma-separated 32-bit groups, most
/// significant group first ("3" for CPUs 0-1, "1,00000000" for CPU 32).
pub fn cpu_mask(cpus: &[usize]) -> Result<String, String> {
    let Some(&max) = cpus.iter().max() else {
        return Err("no CPUs".into());
    };
    let mut groups = vec![0u32; max / 32 + 1];
    for &c in cpus {
        groups[c / 32] |= 1 << (c % 32);
    }
    let mut out: Vec<String> = vec![];
    for (i, g) in groups.iter().enumerate().rev() {
        out.push(if i == groups.len() - 1 { format!("{g:x}") } else { format!("{g:08x}") });
    }
    Ok(out.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse_like_the_kernel_prints_them() {
        assert_eq!(parse_cpu_list("0-1\n").unwrap(), vec![0, 1]);
        assert_eq!(parse_cpu_list("0-3,5,7-8").unwrap(), vec![0, 1, 2, 3, 5, 7, 8]);
        assert_eq!(parse_cpu_list("0").unwrap(), vec![0]);
        assert!(parse_cpu_list("").is_err());
        assert!(parse_cpu_list("3-1").is_err());
        assert!(parse_cpu_list("a").is_err());
    }

    #[test]
    fn masks_use_the_kernels_32_bit_groups() {
        assert_eq!(cpu_mask(&[0, 1]).unwrap(), "3");
        assert_eq!(cpu_mask(&[0]).unwrap(), "1");
        assert_eq!(cpu_mask(&(0..8).collect::<Vec<_>>()).unwrap(), "ff");
        assert_eq!(cpu_mask(&[32]).unwrap(), "1,00000000");
        assert_eq!(cpu_mask(&(0..40).collect::<Vec<_>>()).unwrap(), "ff,ffffffff");
        assert!(cpu_mask(&[]).is_err());
    }

    #[test]
    fn interface_names_cannot_leave_the_class_directory() {
        let root = Path::new("/nonexistent-sysfs");
        assert!(write_rps(root, "../x", "3").unwrap_err().contains("not an interface name"));
        assert!(write_rps(root, "..", "3").unwrap_err().contains("not an interface name"));
        assert!(write_rps(root, "", "3").unwrap_err().contains("not an interface name"));
    }
}
