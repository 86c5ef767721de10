//! The plugin's one error type: the CNI error result shared with the agent through the
//! API crate (`contiv_cni_api::CniError`), printed by the runner with `to_json`.

pub use contiv_cni_api::CniError;
