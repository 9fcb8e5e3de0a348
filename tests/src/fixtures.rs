//! Captured third-party traffic (`protocol/tests/captured/*.jsonl`), for replay against the hub.

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::Deserialize;
use serde_json::Value;

/// One line of a capture file.
#[derive(Debug, Clone, Deserialize)]
pub struct CapturedFrame {
    /// `node->hub` or `hub->node`.
    pub dir: String,
    /// Milliseconds since the first upgrade of the capture session.
    pub t_ms: f64,
    /// The JSON frame, or a `{"http_upgrade"|"ws_close"|"http_response": ...}` marker.
    pub frame: Value,
    /// The script step, starting with `conn#N`.
    #[serde(default)]
    pub note: String,
}

impl CapturedFrame {
    /// Whether the node sent this line.
    pub fn from_node(&self) -> bool {
        self.dir == "node->hub"
    }

    /// The frame's `type`, for real frames (not upgrade/close markers).
    pub fn frame_type(&self) -> Option<&str> {
        self.frame.get("type").and_then(Value::as_str)
    }

    /// The connection number from the note (`conn#N`), 0 if absent.
    pub fn conn(&self) -> u32 {
        self.note
            .strip_prefix("conn#")
            .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }
}

/// Directory holding the capture files.
pub fn captured_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../protocol/tests/captured")
}

/// Reads a capture file by name, e.g. `vcp-distributed-server.jsonl`.
///
/// # Errors
/// If the file is missing or a line is not a capture record.
pub fn captured(name: &str) -> Result<Vec<CapturedFrame>> {
    let path = captured_dir().join(name);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| format!("{}:{}", path.display(), i + 1))
        })
        .collect()
}
