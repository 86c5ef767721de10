//! What every generated message is: its name and CRC, its header shape, and how it relates to
//! other messages (the `services` of the `.api.json` files).

use crate::wire::{DecodeError, EncodeError, Reader, Wire};

/// A message of the binary API. The struct holds the body; the header (`_vl_msg_id`, and
/// `client_index` / `context` when the message has them) is written by [`encode`].
pub trait Message: Wire + Clone + std::fmt::Debug + Send + Sync + 'static {
    /// The message name, e.g. `sw_interface_dump`.
    const NAME: &'static str;
    /// vppapigen's CRC of the definition.
    const CRC: u32;
    /// `name_crc`, the key of VPP's message table (e.g. `sw_interface_dump_aa610c27`).
    const NAME_CRC: &'static str;
    /// Whether the header has `client_index` (requests, and a few others).
    const HAS_CLIENT_INDEX: bool;
    /// Whether the header has `context`; messages without one are events.
    const HAS_CONTEXT: bool;

    /// The `retval` field of a reply, if the message has one.
    fn retval(&self) -> Option<i32> {
        None
    }
}

/// A request answered by exactly one reply.
pub trait Request: Message {
    /// Its reply.
    type Reply: Message;
}

/// A dump: answered by zero or more details, closed by the client's `control_ping`.
pub trait Dump: Message {
    /// The details message.
    type Details: Message;
}

/// A `*_get` with a cursor: details, then its own reply; `retval == -165` (EAGAIN) asks
/// for another call with the reply's cursor.
pub trait Getter: Message {
    /// The closing reply (carries `cursor`).
    type Reply: Message + CursorReply;
    /// The details message.
    type Details: Message;
    /// Sets the request's cursor.
    fn set_cursor(&mut self, cursor: u32);
}

/// A getter's reply, which carries the cursor to continue from.
pub trait CursorReply {
    /// The cursor to send in the next request.
    fn cursor(&self) -> u32;
}

/// A request that subscribes the client to event `E` (e.g. `want_interface_events` to
/// `sw_interface_event`).
pub trait Subscribe<E: Message>: Request {}

/// Something done with a message type chosen at run time (see [`crate::api::visit_message`]).
pub trait MessageVisitor {
    /// What the visit returns.
    type Output;
    /// Called with the generated type of the message.
    fn visit<M: Message + serde::Serialize + serde::de::DeserializeOwned + PartialEq>(self) -> Self::Output;
}

/// The header fields of a message as they were on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// `_vl_msg_id`.
    pub msg_id: u16,
    /// `client_index`, 0 if the message has none.
    pub client_index: u32,
    /// `context`, 0 if the message has none.
    pub context: u32,
}

/// Encodes a message payload (header and body, no frame header).
pub fn encode<M: Message>(msg: &M, msg_id: u16, client_index: u32, context: u32) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::with_capacity(64);
    encode_into(&mut out, msg, msg_id, client_index, context)?;
    Ok(out)
}

/// Appends a message payload to `out`. On error `out` is left as it was.
pub fn encode_into<M: Message>(
    out: &mut Vec<u8>,
    msg: &M,
    msg_id: u16,
    client_index: u32,
    context: u32,
) -> Result<(), EncodeError> {
    let start = out.len();
    let result = (|| {
        msg_id.encode(out)?;
        if M::HAS_CLIENT_INDEX {
            client_index.encode(out)?;
        }
        if M::HAS_CONTEXT {
            context.encode(out)?;
        }
        msg.encode(out)
    })();
    if result.is_err() {
        out.truncate(start);
    }
    result
}

/// Appends a whole socket frame (16-byte frame header and payload) to `out`.
pub fn encode_frame_into<M: Message>(
    out: &mut Vec<u8>,
    msg: &M,
    msg_id: u16,
    client_index: u32,
    context: u32,
) -> Result<(), EncodeError> {
    let start = out.len();
    out.extend_from_slice(&[0u8; crate::wire::FRAME_HEADER_LEN]);
    if let Err(e) = encode_into(out, msg, msg_id, client_index, context) {
        out.truncate(start);
        return Err(e);
    }
    let len = out.len() - start - crate::wire::FRAME_HEADER_LEN;
    out[start..start + crate::wire::FRAME_HEADER_LEN].copy_from_slice(&crate::wire::frame_header(len));
    Ok(())
}

/// Decodes a payload (header and body) as message `M`; the id is not checked.
pub fn decode<M: Message>(payload: &[u8]) -> Result<(Header, M), DecodeError> {
    let mut r = Reader::new(payload);
    let msg_id = u16::decode(&mut r)?;
    let client_index = if M::HAS_CLIENT_INDEX { u32::decode(&mut r)? } else { 0 };
    let context = if M::HAS_CONTEXT { u32::decode(&mut r)? } else { 0 };
    let body = M::decode(&mut r)?;
    Ok((Header { msg_id, client_index, context }, body))
}

/// The message id at the start of a payload.
pub fn msg_id_of(payload: &[u8]) -> Option<u16> {
    payload.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]]))
}

/// How a message takes part in the conversation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageKind {
    /// A request with one reply.
    Request,
    /// A dump (details, closed by control_ping).
    Dump,
    /// A `*_get` with a cursor.
    Getter,
    /// Anything with a context that is not a request: replies and details.
    Reply,
    /// A message without context: an event (or a one-way message).
    Event,
}

/// Static facts about one generated message, for code that handles messages by id (the
/// client's reader, the fake server).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MessageInfo {
    /// Name.
    pub name: &'static str,
    /// CRC.
    pub crc: u32,
    /// `name_crc`.
    pub name_crc: &'static str,
    /// API file (module) it comes from.
    pub module: &'static str,
    /// Position in its file's message list (what `get_first_msg_id` numbering adds).
    pub index_in_module: u16,
    /// Header has `client_index`.
    pub has_client_index: bool,
    /// Header has `context`.
    pub has_context: bool,
    /// Size of the fixed part, header included (variable arrays empty, strings of length 0).
    pub fixed_size: usize,
    /// Offset of `retval` in the payload, if it has one.
    pub retval_offset: Option<usize>,
    /// The reply a request or getter is answered with.
    pub reply: Option<&'static str>,
    /// The details a dump or getter streams.
    pub details: Option<&'static str>,
    /// Role.
    pub kind: MessageKind,
}

impl MessageInfo {
    /// Offset of `context` in the payload, if the message has one.
    pub fn context_offset(&self) -> Option<usize> {
        self.has_context.then_some(if self.has_client_index { 6 } else { 2 })
    }

    /// Reads `context` from a payload of this message (0 if absent or too short).
    pub fn context_of(&self, payload: &[u8]) -> u32 {
        self.context_offset()
            .and_then(|o| payload.get(o..o + 4))
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            .unwrap_or(0)
    }

    /// Reads `retval` from a payload of this message.
    pub fn retval_of(&self, payload: &[u8]) -> Option<i32> {
        self.retval_offset.and_then(|o| payload.get(o..o + 4)).map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// One API file: the module name and CRC `get_first_msg_id` takes, and its message count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiModule {
    /// Module name (e.g. `interface`).
    pub name: &'static str,
    /// The file's CRC (`vl_api_version`).
    pub crc: u32,
    /// The API version.
    pub version: &'static str,
    /// Number of messages.
    pub messages: usize,
}

/// Looks a generated message up by `name_crc`.
pub fn find(name_crc: &str) -> Option<&'static MessageInfo> {
    index().get(name_crc).copied()
}

/// Looks a generated message up by name (any CRC).
pub fn find_by_name(name: &str) -> Option<&'static MessageInfo> {
    crate::api::MESSAGES.iter().find(|m| m.name == name)
}

fn index() -> &'static std::collections::HashMap<&'static str, &'static MessageInfo> {
    static INDEX: std::sync::OnceLock<std::collections::HashMap<&'static str, &'static MessageInfo>> =
        std::sync::OnceLock::new();
    INDEX.get_or_init(|| crate::api::MESSAGES.iter().map(|m| (m.name_crc, m)).collect())
}
