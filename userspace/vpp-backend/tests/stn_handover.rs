//! The agent reads the NIC handover from the file contiv-stn writes.

use contiv_stn::{Handover, HandoverRoute, StnState, write_state};
use contiv_vpp_backend::{UplinkHandover, UplinkRoute};

#[test]
fn the_handover_contiv_stn_writes_is_what_the_backend_reads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stn.json");
    let state = StnState {
        version: contiv_stn::STATE_VERSION,
        interface: "eth0".into(),
        ifindex: 2,
        mac: None,
        mtu: Some(9000),
        pci_address: Some("0000:00:08.0".into()),
        driver: Some("ixgbe".into()),
        link_up: true,
        handover: Handover {
            addresses: vec!["192.168.16.1/24".parse().unwrap(), "192.168.17.1/24".parse().unwrap()],
            routes: vec![
                HandoverRoute { dst: "0.0.0.0/0".parse().unwrap(), gateway: Some("192.168.16.254".parse().unwrap()) },
                HandoverRoute { dst: "10.200.0.0/16".parse().unwrap(), gateway: None },
            ],
            mtu: Some(9000),
        },
        addresses: vec![],
        routes: vec![],
        pid: 1,
        taken: true,
    };
    write_state(&path, &state).unwrap();
    let h = UplinkHandover::from_stn_state_file(&path).unwrap();
    assert_eq!(
        h,
        UplinkHandover {
            addresses: state.handover.addresses.clone(),
            routes: vec![
                UplinkRoute { dst: "0.0.0.0/0".parse().unwrap(), gateway: Some("192.168.16.254".parse().unwrap()) },
                UplinkRoute { dst: "10.200.0.0/16".parse().unwrap(), gateway: None },
            ],
            mtu: Some(9000),
        }
    );
    let missing = UplinkHandover::from_stn_state_file(&dir.path().join("nope.json")).unwrap_err();
    assert!(missing.to_string().contains("nope.json"));
    std::fs::write(&path, br#"{"handover": {"addresses": [], "routes": []}}"#).unwrap();
    assert!(UplinkHandover::from_stn_state_file(&path).unwrap_err().to_string().contains("no IPv4 address"));
}
