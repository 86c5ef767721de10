//! A CNI error result (spec section 5, "Error"): what the agent answers in-band and what
//! contiv-cni prints. One type for both sides of the contract.

use crate::codes;
use serde::Serialize;

/// A failed CNI operation, carrying the spec's numeric error code.
///
/// The runner prints it as `{"cniVersion","code","msg","details"}` on stdout and exits non-zero.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("CNI error {code}: {msg}{}", if details.is_empty() { String::new() } else { format!(" ({details})") })]
pub struct CniError {
    /// Spec error code ([`crate::codes`]), never 0.
    pub code: u32,
    /// Short message characterising the error.
    pub msg: String,
    /// Longer description; may be empty.
    pub details: String,
}

impl CniError {
    /// An error with an explicit code.
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self { code, msg: msg.into(), details: details.into() }
    }

    /// Code 1: the requested `cniVersion` is not supported (or too old for the command).
    pub fn incompatible_version(msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self::new(codes::INCOMPATIBLE_VERSION, msg, details)
    }

    /// Code 4: missing or invalid `CNI_*` environment variables; the message names them.
    pub fn invalid_env(msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self::new(codes::INVALID_ENV, msg, details)
    }

    /// Code 5: reading stdin failed.
    pub fn io_failure(msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self::new(codes::IO_FAILURE, msg, details)
    }

    /// Code 6: the config on stdin is not decodable JSON.
    pub fn decode_failure(msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self::new(codes::DECODE_FAILURE, msg, details)
    }

    /// Code 7: the config decodes but fails validation.
    pub fn invalid_config(msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self::new(codes::INVALID_CONFIG, msg, details)
    }

    /// Code 11: a transient condition (agent not reachable); the runtime should retry.
    pub fn try_again_later(msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self::new(codes::TRY_AGAIN_LATER, msg, details)
    }

    /// Code 50: the plugin cannot service ADD requests (STATUS only).
    pub fn not_available(msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self::new(codes::NOT_AVAILABLE, msg, details)
    }

    /// Code 100: the agent failed in a way the spec has no code for.
    pub fn internal(msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self::new(codes::INTERNAL, msg, details)
    }

    /// The error result JSON for `cni_version` (compact, one line).
    pub fn to_json(&self, cni_version: &str) -> String {
        #[derive(Serialize)]
        struct ErrorResult<'a> {
            #[serde(rename = "cniVersion")]
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            details: &'a str,
        }
        serde_json::to_string(&ErrorResult { cni_version, code: self.code, msg: &self.msg, details: &self.details })
            .unwrap_or_else(|_| {
                // Serialising four plain fields cannot fail; keep a valid fallback anyway.
                format!(r#"{{"cniVersion":"1.1.0","code":{},"msg":"error","details":""}}"#, self.code)
            })
    }
}

impl CniError {
    /// The wire form the agent sends back in a reply.
    pub fn to_proto(&self) -> crate::v1::CniError {
        crate::v1::CniError { code: self.code, msg: self.msg.clone(), details: self.details.clone() }
    }
}

impl From<crate::v1::CniError> for CniError {
    fn from(e: crate::v1::CniError) -> Self {
        Self::new(e.code, e.msg, e.details)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_json_has_all_four_keys() {
        let e = CniError::invalid_config("bad", "");
        let v: serde_json::Value = serde_json::from_str(&e.to_json("0.4.0")).unwrap();
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(v["code"], 7);
        assert_eq!(v["msg"], "bad");
        assert_eq!(v["details"], "");
        assert_eq!(v.as_object().unwrap().len(), 4);
    }

    #[test]
    fn agent_error_converts_verbatim() {
        let e: CniError = crate::v1::CniError {
            code: codes::IPAM_EXHAUSTED,
            msg: "ipam exhausted".into(),
            details: "10.1.0.0/24".into(),
        }
        .into();
        assert_eq!(e, CniError::new(codes::IPAM_EXHAUSTED, "ipam exhausted", "10.1.0.0/24"));
    }
}
