//! Giving a PCI NIC back to its kernel driver after DPDK had it.
//!
//! While VPP runs, DPDK holds the NIC through a user-space I/O driver (vfio-pci,
//! uio_pci_generic): the kernel has no network interface for it, and when VPP exits the
//! device stays bound to that driver. Before the addresses and routes can come back, the
//! device goes back to the driver it had when contiv-stn took it (`driver_override`, then a
//! probe), and its network interface appears again.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where the PCI bus is in sysfs: `CONTIV_STN_PCI_ROOT`, else `/sys/bus/pci`. (A container
/// mounts `/sys` read-only: the DaemonSet mounts the host's PCI bus writable elsewhere.)
pub fn pci_root() -> PathBuf {
    std::env::var_os("CONTIV_STN_PCI_ROOT").map_or_else(|| PathBuf::from("/sys/bus/pci"), PathBuf::from)
}

/// Whether a sysfs device name is a PCI address (`0000:00:08.0`).
fn is_pci_name(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() == 12
        && b[4] == b':'
        && b[7] == b':'
        && b[10] == b'.'
        && b.iter().enumerate().all(|(i, c)| matches!(i, 4 | 7 | 10) || c.is_ascii_hexdigit())
}

/// The PCI function behind a network interface, in the sysfs at `sys` (`/sys`): its
/// address and the driver bound to it. The interface's `device` is the PCI function itself
/// for most NICs, but a device on a bus below it for some: a virtio NIC (most virtual
/// machines) has `virtio0`, whose parent is the PCI function, bound to `virtio-pci`. The
/// nearest PCI ancestor is what DPDK takes and what goes back to its driver. None for a
/// virtual interface.
pub fn pci_function(sys: &Path, ifname: &str) -> Option<(String, Option<String>)> {
    let device = std::fs::canonicalize(sys.join("class/net").join(ifname).join("device")).ok()?;
    let function = device.ancestors().find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(is_pci_name))?;
    let driver =
        std::fs::read_link(function.join("driver")).ok().and_then(|l| Some(l.file_name()?.to_str()?.to_owned()));
    Some((function.file_name()?.to_str()?.to_owned(), driver))
}

/// The driver a PCI device is bound to now, if any.
pub fn bound_driver(root: &Path, pci: &str) -> Option<String> {
    let link = std::fs::read_link(root.join("devices").join(pci).join("driver")).ok()?;
    Some(link.file_name()?.to_str()?.to_owned())
}

/// Binds `pci` to `driver` again: unbound from the driver it has (DPDK's), the override set
/// so that only `driver` takes it, probed, the override cleared. Nothing to do if it is
/// bound to `driver` already.
pub fn rebind(root: &Path, pci: &str, driver: &str) -> io::Result<()> {
    let dev = root.join("devices").join(pci);
    if !dev.exists() {
        return Err(io::Error::new(io::ErrorKind::NotFound, format!("no PCI device {pci} under {}", root.display())));
    }
    let current = bound_driver(root, pci);
    if current.as_deref() == Some(driver) {
        return Ok(());
    }
    let write = |path: PathBuf, value: &str| {
        std::fs::write(&path, value)
            .map_err(|e| io::Error::new(e.kind(), format!("writing {value:?} to {}: {e}", path.display())))
    };
    if current.is_some() {
        write(dev.join("driver").join("unbind"), pci)?;
    }
    write(dev.join("driver_override"), driver)?;
    let probed = write(root.join("drivers_probe"), pci);
    // Cleared whatever the probe did: the device must not stay reserved for one driver.
    let cleared = write(dev.join("driver_override"), "\n");
    probed.and(cleared)
}

/// The network interface of `pci` once its driver made one, waited for up to `wait`: in
/// the function's `net/`, or in that of a device below it (virtio's `virtio0/net/`).
pub fn netdev_of(root: &Path, pci: &str, wait: Duration) -> Option<String> {
    let dev = root.join("devices").join(pci);
    let first_in = |dir: PathBuf| -> Option<String> {
        std::fs::read_dir(dir).ok()?.filter_map(Result::ok).find_map(|e| e.file_name().into_string().ok())
    };
    let started = Instant::now();
    loop {
        let below = || {
            std::fs::read_dir(&dev)
                .ok()?
                .filter_map(Result::ok)
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .find_map(|e| first_in(e.path().join("net")))
        };
        if let Some(name) = first_in(dev.join("net")).or_else(below) {
            return Some(name);
        }
        if started.elapsed() >= wait {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PCI: &str = "0000:00:08.0";

    /// A sysfs PCI bus with the device bound to `driver`.
    fn bus(driver: &str) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let drv = root.path().join("drivers").join(driver);
        std::fs::create_dir_all(&drv).unwrap();
        std::fs::write(drv.join("unbind"), "").unwrap();
        let dev = root.path().join("devices").join(PCI);
        std::fs::create_dir_all(&dev).unwrap();
        std::fs::write(dev.join("driver_override"), "(null)\n").unwrap();
        std::os::unix::fs::symlink(format!("../../drivers/{driver}"), dev.join("driver")).unwrap();
        std::fs::write(root.path().join("drivers_probe"), "").unwrap();
        root
    }

    #[test]
    fn a_device_dpdk_held_goes_back_to_its_kernel_driver() {
        let root = bus("vfio-pci");
        assert_eq!(bound_driver(root.path(), PCI).as_deref(), Some("vfio-pci"));
        rebind(root.path(), PCI, "virtio-pci").unwrap();
        let read =
            |p: &[&str]| std::fs::read_to_string(p.iter().fold(root.path().to_path_buf(), |a, s| a.join(s))).unwrap();
        assert_eq!(read(&["drivers", "vfio-pci", "unbind"]), PCI, "unbound from DPDK's driver");
        assert_eq!(read(&["drivers_probe"]), PCI, "probed again");
        assert_eq!(read(&["devices", PCI, "driver_override"]), "\n", "the override is cleared after the probe");
    }

    #[test]
    fn a_device_on_its_driver_is_left_alone_and_a_missing_one_is_an_error() {
        let root = bus("virtio-pci");
        rebind(root.path(), PCI, "virtio-pci").unwrap();
        assert_eq!(std::fs::read_to_string(root.path().join("drivers_probe")).unwrap(), "");
        let err = rebind(root.path(), "0000:00:09.0", "virtio-pci").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    /// A sysfs tree (`sys`) with a virtio NIC `eth0` (the PCI function 0000:00:04.0 on
    /// `virtio-pci`, the interface under its `virtio1`) and an `eth1` that is the PCI
    /// function itself (0000:00:08.0 on `ixgbe`), linked as the kernel links them.
    fn sys_tree() -> tempfile::TempDir {
        let sys = tempfile::tempdir().unwrap();
        let p = |s: &str| sys.path().join(s);
        for (function, driver, netdir) in
            [("0000:00:04.0", "virtio-pci", "virtio1/net/eth0"), ("0000:00:08.0", "ixgbe", "net/eth1")]
        {
            let dev = p(&format!("devices/pci0000:00/{function}"));
            std::fs::create_dir_all(dev.join(netdir)).unwrap();
            std::fs::create_dir_all(p(&format!("bus/pci/drivers/{driver}"))).unwrap();
            std::os::unix::fs::symlink(format!("../../../bus/pci/drivers/{driver}"), dev.join("driver")).unwrap();
            std::fs::create_dir_all(p("bus/pci/devices")).unwrap();
            std::os::unix::fs::symlink(
                format!("../../../devices/pci0000:00/{function}"),
                p(&format!("bus/pci/devices/{function}")),
            )
            .unwrap();
        }
        for (ifname, device) in [("eth0", "0000:00:04.0/virtio1"), ("eth1", "0000:00:08.0")] {
            std::fs::create_dir_all(p(&format!("class/net/{ifname}"))).unwrap();
            std::os::unix::fs::symlink(
                format!("../../../devices/pci0000:00/{device}"),
                p(&format!("class/net/{ifname}/device")),
            )
            .unwrap();
        }
        sys
    }

    /// A virtio NIC's PCI function is its `device`'s parent, with the PCI driver (which is
    /// what DPDK's driver gives it back to); its interface is found one level down.
    #[test]
    fn a_virtio_nic_is_found_by_its_pci_function() {
        let sys = sys_tree();
        assert_eq!(pci_function(sys.path(), "eth0"), Some(("0000:00:04.0".into(), Some("virtio-pci".into()))));
        assert_eq!(pci_function(sys.path(), "eth1"), Some(("0000:00:08.0".into(), Some("ixgbe".into()))));
        assert_eq!(pci_function(sys.path(), "lo"), None);
        // The bus's devices/ entries are links into devices/: the whole sysfs must be there.
        let bus = sys.path().join("bus/pci");
        assert_eq!(bound_driver(&bus, "0000:00:04.0").as_deref(), Some("virtio-pci"));
        assert_eq!(netdev_of(&bus, "0000:00:04.0", Duration::ZERO).as_deref(), Some("eth0"));
        assert_eq!(netdev_of(&bus, "0000:00:08.0", Duration::ZERO).as_deref(), Some("eth1"));
    }

    #[test]
    fn the_interface_is_found_under_the_device_once_it_appears() {
        let root = bus("virtio-pci");
        assert_eq!(netdev_of(root.path(), PCI, Duration::from_millis(200)), None);
        std::fs::create_dir_all(root.path().join("devices").join(PCI).join("net").join("eth0")).unwrap();
        assert_eq!(netdev_of(root.path(), PCI, Duration::ZERO).as_deref(), Some("eth0"));
    }
}
