//! `FakeOptions::host_taps` (`contiv-fake-vpp --host-taps`): the fake's taps get their
//! Linux end, as VPP's `tap_create_v3` makes it: a tap device named `host_if_name` in the
//! fake's network namespace, with `host_mac_addr` and `host_ip4_prefix`, up. Like VPP's, it
//! lives as long as the fake holds it: it goes with `tap_delete_v2`, a simulated restart
//! and the process. Unlike VPP, the fake reads nothing from it (it forwards no packets) and
//! does not add the host's default route `host_ip4_gw` (the test's node keeps its own).

use std::{collections::BTreeMap, fs::File, os::fd::AsRawFd, process::Command, sync::Mutex};

use contiv_vpp_binapi::api;

use crate::state::{FakeState, InterfaceKind};

/// `TUNSETIFF`: `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// The Linux ends of the fake's taps, by sw_if_index.
#[derive(Default)]
pub struct HostTaps {
    taps: Mutex<BTreeMap<u32, (String, File)>>,
}

impl HostTaps {
    /// Creates the Linux end of every tap the state has and closes those of taps it no
    /// longer has (never while the state lock is held).
    pub fn sync(&self, state: &Mutex<FakeState>) {
        let want: BTreeMap<u32, api::TapCreateV3> = state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .interfaces
            .values()
            .filter_map(|i| match &i.kind {
                InterfaceKind::Tap { create, .. } => Some((i.sw_if_index, create.clone())),
                _ => None,
            })
            .collect();
        let mut taps = self.taps.lock().unwrap_or_else(|e| e.into_inner());
        // Closing the last descriptor of a tap that is not persistent deletes the device.
        taps.retain(|sw, (name, _)| want.get(sw).is_some_and(|c| c.host_if_name == *name));
        for (sw, create) in want {
            if taps.contains_key(&sw) {
                continue;
            }
            match open_tap(&create) {
                Ok(file) => {
                    taps.insert(sw, (create.host_if_name.clone(), file));
                }
                Err(e) => log::warn!("fake VPP: the Linux end {} of a tap: {e}", create.host_if_name),
            }
        }
    }
}

fn ip(args: &[&str]) -> std::io::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!("ip {args:?}: {}", String::from_utf8_lossy(&out.stderr).trim())));
    }
    Ok(())
}

fn open_tap(c: &api::TapCreateV3) -> std::io::Result<File> {
    let name = &c.host_if_name;
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::other(format!("bad interface name {name:?}")));
    }
    let file = std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun")?;
    // SAFETY: an ifreq is plain data; zeroed is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes the ifreq passed, which outlives the call.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut ifr) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if c.host_mac_addr_set {
        let m = c.host_mac_addr;
        let mac = format!("{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5]);
        ip(&["link", "set", "dev", name, "address", &mac])?;
    }
    if c.host_mtu_set {
        ip(&["link", "set", "dev", name, "mtu", &c.host_mtu_size.to_string()])?;
    }
    if c.host_ip4_prefix_set {
        let p = &c.host_ip4_prefix;
        let a = p.address;
        ip(&["addr", "add", &format!("{}.{}.{}.{}/{}", a[0], a[1], a[2], a[3], p.len), "dev", name])?;
    }
    ip(&["link", "set", "dev", name, "up"])?;
    Ok(file)
}
