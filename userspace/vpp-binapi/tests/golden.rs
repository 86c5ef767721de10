//! Every entry of api/golden.json (payloads made by vpp_papi 2.4.2, VPP's own Python client)
//! encodes to exactly its bytes and decodes back to the same message.

use contiv_vpp_binapi::{
    api,
    message::{self, MessageVisitor},
};
use serde_json::Value;

fn golden() -> Vec<Value> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/api/golden.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("golden.json")).expect("golden.json is JSON")
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex")).collect()
}

/// Checks one entry against the message type `M`.
struct Check<'a>(&'a Value);

impl MessageVisitor for Check<'_> {
    type Output = ();
    fn visit<M: message::Message + serde::Serialize + serde::de::DeserializeOwned + PartialEq>(self) {
        let entry = self.0;
        let mut fields = entry["fields"].as_object().expect("fields").clone();
        let msg_id = fields.remove("_vl_msg_id").and_then(|v| v.as_u64()).expect("_vl_msg_id") as u16;
        let client_index = if M::HAS_CLIENT_INDEX {
            fields.remove("client_index").and_then(|v| v.as_u64()).expect("client_index")
        } else {
            0
        };
        let context =
            if M::HAS_CONTEXT { fields.remove("context").and_then(|v| v.as_u64()).expect("context") } else { 0 };
        let msg: M = serde_json::from_value(Value::Object(fields.clone()))
            .unwrap_or_else(|e| panic!("{}: fields do not fit the generated type: {e}", M::NAME));

        let hex = unhex(entry["hex"].as_str().expect("hex"));
        let payload = message::encode(&msg, msg_id, client_index as u32, context as u32).expect("encode");
        assert_eq!(payload, hex, "{}: payload bytes", M::NAME);
        assert_eq!(payload.len() as u64, entry["len"].as_u64().expect("len"), "{}: length", M::NAME);

        let mut frame = Vec::new();
        message::encode_frame_into(&mut frame, &msg, msg_id, client_index as u32, context as u32).expect("frame");
        assert_eq!(frame, unhex(entry["frame_hex"].as_str().expect("frame_hex")), "{}: frame bytes", M::NAME);

        let mut r = contiv_vpp_binapi::wire::Reader::new(&hex);
        let header_len = 2 + 4 * (M::HAS_CLIENT_INDEX as usize + M::HAS_CONTEXT as usize);
        r.take(header_len, "header").unwrap();
        let decoded = <M as contiv_vpp_binapi::wire::Wire>::decode(&mut r).expect("decode");
        assert_eq!(r.remaining(), 0, "{}: decoding consumes the whole payload", M::NAME);
        assert!(decoded == msg, "{}: decodes back to the same message", M::NAME);
        let (header, _) = message::decode::<M>(&hex).expect("decode with header");
        assert_eq!((header.msg_id, header.client_index as u64, header.context as u64), (msg_id, client_index, context));
    }
}

#[test]
fn every_golden_entry_encodes_to_its_bytes_and_decodes_back() {
    let entries = golden();
    assert!(entries.len() >= 12, "golden.json has {} entries", entries.len());
    for entry in &entries {
        let name_crc = entry["name_crc"].as_str().expect("name_crc");
        api::visit_message(name_crc, Check(entry))
            .unwrap_or_else(|| panic!("golden message {name_crc} has no generated type (CRC differs?)"));
    }
}

#[test]
fn a_count_that_disagrees_with_its_array_is_refused_naming_the_field() {
    let route = api::IpRoute { n_paths: 2, paths: vec![api::FibPath::default()], ..Default::default() };
    let err = message::encode(&api::IpRouteAddDel { route, ..Default::default() }, 1, 1, 1).unwrap_err();
    assert!(err.to_string().contains("ip_route.paths"), "{err}");
    assert!(err.to_string().contains("n_paths"), "{err}");
}

#[test]
fn registry_lists_every_message_of_every_file_with_memclnt_numbered_first() {
    let total: usize = api::MODULES.iter().map(|m| m.messages).sum();
    assert_eq!(api::MESSAGES.len(), total);
    assert_eq!(total, 476, "messages in the shipped files");
    // VPP numbers memclnt first from 1: sockclnt_create is 15, its reply 16, control_ping 23/24.
    let pos = |name: &str| api::MESSAGES.iter().position(|m| m.name == name).unwrap() + 1;
    assert_eq!((pos("sockclnt_create"), pos("sockclnt_create_reply")), (15, 16));
    assert_eq!((pos("control_ping"), pos("control_ping_reply")), (23, 24));
    let dump = message::find("sw_interface_dump_aa610c27").expect("sw_interface_dump");
    assert_eq!(dump.kind, contiv_vpp_binapi::MessageKind::Dump);
    assert_eq!(dump.details, Some("sw_interface_details"));
    let event = message::find_by_name("sw_interface_event").unwrap();
    assert_eq!(event.kind, contiv_vpp_binapi::MessageKind::Event);
    assert!(!event.has_context);
}

#[test]
fn defaults_from_the_api_files_apply() {
    // sw_interface_dump's sw_if_index defaults to ~0 (all interfaces), as in vpp_papi.
    assert_eq!(api::SwInterfaceDump::default().sw_if_index, u32::MAX);
}
