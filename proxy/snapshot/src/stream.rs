//! The config stream between a controller and its proxies: its messages and their framing.
//!
//! A proxy opens `GET /v1/snapshots` (HTTP/2, mutual TLS) and reads frames: the first carries
//! the controller's current snapshot, each later one a newer version. After applying (or
//! refusing) a snapshot the proxy posts an [`Ack`] to `/v1/acks`. A frame is a 4-byte big-endian
//! length followed by that many bytes of JSON.

use serde::{Deserialize, Serialize};

use crate::Snapshot;

/// Path a proxy subscribes to.
pub const SNAPSHOTS_PATH: &str = "/v1/snapshots";
/// Path a proxy acknowledges versions on.
pub const ACKS_PATH: &str = "/v1/acks";
/// Path a proxy posts its shared-limit counts to, and reads everyone's totals from.
pub const LIMITS_PATH: &str = "/v1/limits";
/// Header naming the proxy (its pod name in a cluster).
pub const PROXY_HEADER: &str = "x-tidegate-proxy";
/// Frames larger than this are refused (a snapshot of 10,000 Ingresses is a few MiB).
pub const MAX_FRAME: usize = 256 << 20;

/// What a proxy reports about one version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Ack {
    pub proxy: String,
    pub version: u64,
    /// The version's [`crate::Snapshot::content`].
    #[serde(default)]
    pub content: u64,
    /// Why the proxy refused the version; `None` when it serves it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Counts of shared limits ([`crate::SharedLimit`]) for one window of one key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WindowCount {
    /// The limit's id.
    pub limit: String,
    pub key: String,
    /// The window: seconds since the epoch divided by the window's length.
    pub window: u64,
    pub window_seconds: u32,
    /// Posted: requests admitted since the last post. Answered: the total of every proxy in
    /// `window`.
    pub count: u64,
    /// Answered: the total of every proxy in the window before.
    #[serde(default)]
    pub previous: u64,
}

/// What a proxy posts to [`LIMITS_PATH`]: what it admitted since its last post, and the
/// sequence number of the last totals it got.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LimitSync {
    pub since: u64,
    pub counts: Vec<WindowCount>,
}

/// The controller's answer: every total that changed after `since` (the posted keys' among
/// them), and the sequence number to send next time.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LimitTotals {
    pub seq: u64,
    pub totals: Vec<WindowCount>,
}

/// Encodes a snapshot as one frame.
///
/// # Errors
/// Only when serialization fails, which the snapshot's types do not allow in practice.
pub fn encode(snapshot: &Snapshot) -> Result<Vec<u8>, serde_json::Error> {
    let json = serde_json::to_vec(snapshot)?;
    let mut frame = Vec::with_capacity(json.len() + 4);
    frame.extend_from_slice(&u32::try_from(json.len()).unwrap_or(u32::MAX).to_be_bytes());
    frame.extend_from_slice(&json);
    Ok(frame)
}

/// Reassembles frames from bytes as they arrive.
#[derive(Debug, Default)]
pub struct Decoder {
    buffer: Vec<u8>,
}

/// A frame that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("frame of {0} bytes is larger than the limit")]
    TooLarge(usize),
    #[error("frame is not a snapshot: {0}")]
    Invalid(#[from] serde_json::Error),
}

impl Decoder {
    /// Adds received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// The next complete snapshot, if one has fully arrived.
    ///
    /// # Errors
    /// When a frame is too large or does not hold a snapshot; the stream should be dropped.
    pub fn next_snapshot(&mut self) -> Result<Option<Snapshot>, DecodeError> {
        let Some(header) = self.buffer.get(..4) else { return Ok(None) };
        let length = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        if length > MAX_FRAME {
            return Err(DecodeError::TooLarge(length));
        }
        if self.buffer.len() < 4 + length {
            return Ok(None);
        }
        let snapshot = serde_json::from_slice(&self.buffer[4..4 + length])?;
        self.buffer.drain(..4 + length);
        Ok(Some(snapshot))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_survive_arbitrary_splits() {
        let a = Snapshot { version: 1, ..Snapshot::default() };
        let b = Snapshot { version: 2, ..Snapshot::default() };
        let mut bytes = encode(&a).expect("encode");
        bytes.extend(encode(&b).expect("encode"));
        let mut decoder = Decoder::default();
        let mut seen = Vec::new();
        for chunk in bytes.chunks(3) {
            decoder.push(chunk);
            while let Some(s) = decoder.next_snapshot().expect("valid") {
                seen.push(s.version);
            }
        }
        assert_eq!(seen, vec![1, 2]);
    }

    #[test]
    fn oversized_frames_are_refused() {
        let mut decoder = Decoder::default();
        decoder.push(&u32::MAX.to_be_bytes());
        assert!(decoder.next_snapshot().is_err());
    }
}
