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

/// The name a sysfs link of a network interface points at (`device`: its PCI address;
/// `device/driver`: its driver).
pub(crate) fn device_link(ifname: &str, link: &str) -> Option<String> {
    let target = std::fs::read_link(Path::new("/sys/class/net").join(ifname).join(link)).ok()?;
    Some(target.file_name()?.to_str()?.to_owned())
}

/// The kernel driver of a network interface (`ixgbe`, `virtio-pci`), from sysfs.
pub fn kernel_driver(ifname: &str) -> Option<String> {
    device_link(ifname, "device/driver")
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

/// The network interface of `pci` once its driver made one, waited for up to `wait`.
pub fn netdev_of(root: &Path, pci: &str, wait: Duration) -> Option<String> {
    let dir = root.join("devices").join(pci).join("net");
    let started = Instant::now();
    loop {
        if let Ok(entries) = std::fs::read_dir(&dir)
            && let Some(name) = entries.filter_map(Result::ok).find_map(|e| e.file_name().into_string().ok())
        {
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

    #[test]
    fn the_interface_is_found_under_the_device_once_it_appears() {
        let root = bus("virtio-pci");
        assert_eq!(netdev_of(root.path(), PCI, Duration::from_millis(200)), None);
        std::fs::create_dir_all(root.path().join("devices").join(PCI).join("net").join("eth0")).unwrap();
        assert_eq!(netdev_of(root.path(), PCI, Duration::ZERO).as_deref(), Some("eth0"));
    }
}
