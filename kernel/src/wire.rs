//! Jupyter wire protocol (5.3): the connection file, message framing and HMAC-SHA256 signing.
//!
//! Framing, per part: `[zmq identities..., "<IDS|MSG>", signature, header, parent_header,
//! metadata, content, buffers...]`; the signature is the hex HMAC-SHA256 of the four JSON parts
//! under the connection file's key. With a non-empty key a message whose signature does not
//! verify is rejected (never parsed as JSON, never answered).

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

pub type HmacSha256 = Hmac<Sha256>;

const DELIMITER: &[u8] = b"<IDS|MSG>";

/// The connection file Jupyter writes for a kernel it starts.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub transport: String,
    pub ip: String,
    pub shell_port: u16,
    pub iopub_port: u16,
    pub stdin_port: u16,
    pub control_port: u16,
    pub hb_port: u16,
    pub key: String,
    pub signature_scheme: String,
}

impl ConnectionInfo {
    pub fn parse(text: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text).context("connection file is not JSON")?;
        let port = |name: &str| -> Result<u16> {
            v[name]
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .ok_or_else(|| anyhow!("connection file: missing or invalid `{name}`"))
        };
        let string = |name: &str, default: Option<&str>| -> Result<String> {
            match (v[name].as_str(), default) {
                (Some(s), _) => Ok(s.to_string()),
                (None, Some(d)) => Ok(d.to_string()),
                (None, None) => bail!("connection file: missing `{name}`"),
            }
        };
        let info = ConnectionInfo {
            transport: string("transport", Some("tcp"))?,
            ip: string("ip", None)?,
            shell_port: port("shell_port")?,
            iopub_port: port("iopub_port")?,
            stdin_port: port("stdin_port")?,
            control_port: port("control_port")?,
            hb_port: port("hb_port")?,
            key: string("key", Some(""))?,
            signature_scheme: string("signature_scheme", Some("hmac-sha256"))?,
        };
        if info.transport != "tcp" {
            bail!(
                "connection file: transport `{}` is not supported (only tcp)",
                info.transport
            );
        }
        if !info.key.is_empty() && info.signature_scheme != "hmac-sha256" {
            bail!(
                "connection file: signature scheme `{}` is not supported",
                info.signature_scheme
            );
        }
        Ok(info)
    }

    pub fn read(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading connection file {}", path.display()))?;
        Self::parse(&text)
    }

    /// The endpoint for one port: exactly the connection file's address, nothing wider.
    pub fn endpoint(&self, port: u16) -> String {
        format!("{}://{}:{}", self.transport, self.ip, port)
    }

    /// The signer, or None when the key is empty (authentication disabled by the client).
    pub fn signer(&self) -> Option<HmacSha256> {
        if self.key.is_empty() {
            None
        } else {
            Some(HmacSha256::new_from_slice(self.key.as_bytes()).expect("HMAC accepts any key"))
        }
    }
}

fn sign(mac: &HmacSha256, parts: &[Bytes]) -> String {
    let mut mac = mac.clone();
    for p in parts {
        mac.update(p);
    }
    hex::encode(mac.finalize().into_bytes())
}

/// One Jupyter message.
#[derive(Clone, Debug)]
pub struct Message {
    pub identities: Vec<Bytes>,
    pub header: Value,
    pub parent_header: Value,
    pub metadata: Value,
    pub content: Value,
    pub buffers: Vec<Bytes>,
}

impl Message {
    /// Parses and verifies a multipart message. Errors on a missing delimiter, a bad or missing
    /// signature (when `mac` is set), or malformed JSON.
    pub fn from_parts(parts: Vec<Bytes>, mac: Option<&HmacSha256>) -> Result<Message> {
        let delim = parts
            .iter()
            .position(|p| &p[..] == DELIMITER)
            .ok_or_else(|| anyhow!("message without <IDS|MSG> delimiter"))?;
        if parts.len() < delim + 6 {
            bail!(
                "message with {} parts after the delimiter (need 5)",
                parts.len() - delim - 1
            );
        }
        let identities = parts[..delim].to_vec();
        let signature = &parts[delim + 1];
        let jparts = &parts[delim + 2..delim + 6];
        if let Some(mac) = mac {
            let mut mac = mac.clone();
            for p in jparts {
                mac.update(p);
            }
            let given = hex::decode(signature).map_err(|_| anyhow!("bad signature (not hex)"))?;
            mac.verify_slice(&given)
                .map_err(|_| anyhow!("bad signature"))?;
        }
        let json = |b: &Bytes| -> Result<Value> { Ok(serde_json::from_slice(b)?) };
        Ok(Message {
            identities,
            header: json(&jparts[0])?,
            parent_header: json(&jparts[1])?,
            metadata: json(&jparts[2])?,
            content: json(&jparts[3])?,
            buffers: parts[delim + 6..].to_vec(),
        })
    }

    /// Serializes and signs.
    pub fn to_parts(&self, mac: Option<&HmacSha256>) -> Vec<Bytes> {
        let jparts: Vec<Bytes> = [
            &self.header,
            &self.parent_header,
            &self.metadata,
            &self.content,
        ]
        .iter()
        .map(|v| Bytes::from(serde_json::to_vec(v).expect("JSON values serialize")))
        .collect();
        let signature = mac.map(|m| sign(m, &jparts)).unwrap_or_default();
        let mut parts = self.identities.clone();
        parts.push(Bytes::from_static(DELIMITER));
        parts.push(Bytes::from(signature));
        parts.extend(jparts);
        parts.extend(self.buffers.iter().cloned());
        parts
    }

    pub fn msg_type(&self) -> &str {
        self.header["msg_type"].as_str().unwrap_or("")
    }

    /// A new message whose parent is `self` (no identities: for iopub).
    pub fn child(&self, msg_type: &str, content: Value) -> Message {
        Message {
            identities: Vec::new(),
            header: new_header(msg_type, self.header["session"].as_str().unwrap_or("")),
            parent_header: self.header.clone(),
            metadata: json!({}),
            content,
            buffers: Vec::new(),
        }
    }

    /// The reply to a request (`x_request` -> `x_reply`), routed back to the same identities.
    pub fn reply(&self, content: Value) -> Message {
        let msg_type = self.msg_type().replace("_request", "_reply");
        let mut m = self.child(&msg_type, content);
        m.identities.clone_from(&self.identities);
        m
    }
}

pub fn new_header(msg_type: &str, session: &str) -> Value {
    json!({
        "msg_id": uuid::Uuid::new_v4().to_string(),
        "session": session,
        "username": "kernel",
        "date": chrono::Utc::now().to_rfc3339(),
        "msg_type": msg_type,
        "version": "5.3",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> Message {
        Message {
            identities: vec![Bytes::from_static(b"client-id")],
            header: new_header("kernel_info_request", "s1"),
            parent_header: json!({}),
            metadata: json!({}),
            content: json!({}),
            buffers: vec![],
        }
    }

    #[test]
    fn signed_roundtrip_and_rejection() {
        let info = ConnectionInfo::parse(
            r#"{"ip":"127.0.0.1","transport":"tcp","shell_port":1,"iopub_port":2,"stdin_port":3,
                "control_port":4,"hb_port":5,"key":"secret","signature_scheme":"hmac-sha256"}"#,
        )
        .unwrap();
        let mac = info.signer().unwrap();
        let parts = request().to_parts(Some(&mac));
        let back = Message::from_parts(parts.clone(), Some(&mac)).unwrap();
        assert_eq!(back.msg_type(), "kernel_info_request");
        assert_eq!(back.identities, vec![Bytes::from_static(b"client-id")]);

        // Tampered content: rejected.
        let mut tampered = parts.clone();
        tampered[5] = Bytes::from_static(b"{\"code\":\"evil\"}");
        assert!(Message::from_parts(tampered, Some(&mac)).is_err());
        // Signed with another key: rejected.
        let other = HmacSha256::new_from_slice(b"other").unwrap();
        assert!(Message::from_parts(request().to_parts(Some(&other)), Some(&mac)).is_err());
        // Unsigned: rejected.
        assert!(Message::from_parts(request().to_parts(None), Some(&mac)).is_err());
    }

    #[test]
    fn reply_keeps_identities_and_parent() {
        let req = request();
        let rep = req.reply(json!({"status": "ok"}));
        assert_eq!(rep.msg_type(), "kernel_info_reply");
        assert_eq!(rep.identities, req.identities);
        assert_eq!(rep.parent_header, req.header);
        assert!(req.child("status", json!({})).identities.is_empty());
    }

    #[test]
    fn connection_file_endpoint() {
        let info = ConnectionInfo::parse(
            r#"{"ip":"127.0.0.1","shell_port":5001,"iopub_port":2,"stdin_port":3,
                "control_port":4,"hb_port":5,"key":""}"#,
        )
        .unwrap();
        assert_eq!(info.endpoint(info.shell_port), "tcp://127.0.0.1:5001");
        assert!(info.signer().is_none());
        assert!(ConnectionInfo::parse(r#"{"ip":"x","transport":"ipc"}"#).is_err());
    }
}
