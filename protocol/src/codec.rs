//! Encoding and decoding of frames: JSON text frames (the default, and the only encoding
//! third-party clients speak) or MessagePack binary frames (apex extension, negotiated with
//! `node_register.encoding: "msgpack"`).
//!
//! Both encodings carry the same envelope `{"type", "data"}`; MessagePack uses named maps
//! (`rmp_serde::to_vec_named`), so a MessagePack frame converts losslessly to the JSON one.
//! Decoding accepts either encoding at any time, chosen by the WebSocket frame kind (text is
//! JSON, binary is MessagePack), so a switch of encoding can never strand a frame in flight.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{HubMessage, NodeMessage};

/// Encoding of frames on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// JSON text frames.
    #[default]
    Json,
    /// MessagePack binary frames (named maps).
    Msgpack,
}

/// An encoded frame, ready for a WebSocket text or binary message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A JSON text frame.
    Text(String),
    /// A MessagePack binary frame.
    Binary(Vec<u8>),
}

impl Frame {
    /// Length of the payload in bytes.
    pub fn len(&self) -> usize {
        match self {
            Frame::Text(s) => s.len(),
            Frame::Binary(b) => b.len(),
        }
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why a frame could not be encoded (only possible for values serde cannot represent).
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// JSON serialization failed.
    #[error("cannot encode frame as json: {0}")]
    Json(#[from] serde_json::Error),
    /// MessagePack serialization failed.
    #[error("cannot encode frame as msgpack: {0}")]
    Msgpack(#[from] rmp_serde::encode::Error),
}

/// Why a received frame could not be used. [`DecodeError::code`] is the `error.code` sent back.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    /// A text frame that is not JSON.
    #[error("frame is not valid json: {0}")]
    InvalidJson(String),
    /// A binary frame that is not MessagePack.
    #[error("frame is not valid msgpack: {0}")]
    InvalidMsgpack(String),
    /// Valid JSON or MessagePack, but not an object with a string `type`.
    #[error("frame must be an object {{\"type\": string, \"data\": object}}")]
    NotAnEnvelope,
    /// A `type` this direction does not have.
    #[error("unknown message type `{0}`")]
    UnknownType(String),
    /// A known `type` whose `data` lacks a field or has one of the wrong type.
    #[error("invalid `{kind}` payload: {reason}")]
    InvalidPayload {
        /// The frame's `type`.
        kind: String,
        /// What was wrong, from the decoder.
        reason: String,
    },
}

impl DecodeError {
    /// The `error.code` answered for this error.
    pub fn code(&self) -> &'static str {
        match self {
            DecodeError::InvalidJson(_) | DecodeError::InvalidMsgpack(_) => "invalid_json",
            DecodeError::NotAnEnvelope => "invalid_payload",
            DecodeError::UnknownType(_) => "unknown_type",
            DecodeError::InvalidPayload { .. } => "invalid_payload",
        }
    }
}

/// A direction's message enum: knows its wire type names.
pub trait Message: Serialize + DeserializeOwned {
    /// Every wire `type` of the direction.
    const TYPES: &'static [&'static str];
}

impl Message for NodeMessage {
    const TYPES: &'static [&'static str] = NodeMessage::TYPES;
}

impl Message for HubMessage {
    const TYPES: &'static [&'static str] = HubMessage::TYPES;
}

/// Encodes a message in the given encoding.
///
/// # Errors
/// Only if serde cannot represent a value (never for the types in this crate).
pub fn encode<T: Serialize>(msg: &T, encoding: Encoding) -> Result<Frame, EncodeError> {
    Ok(match encoding {
        Encoding::Json => Frame::Text(serde_json::to_string(msg)?),
        Encoding::Msgpack => Frame::Binary(rmp_serde::to_vec_named(msg)?),
    })
}

/// Decodes a JSON text frame.
///
/// # Errors
/// [`DecodeError`] saying whether the text is not JSON, not an envelope, of an unknown type, or
/// a known type with bad data.
pub fn decode_text<T: Message>(text: &str) -> Result<T, DecodeError> {
    if !text.trim_start().starts_with('{') {
        return Err(match serde_json::from_str::<serde::de::IgnoredAny>(text) {
            Ok(_) => DecodeError::NotAnEnvelope,
            Err(e) => DecodeError::InvalidJson(e.to_string()),
        });
    }
    match serde_json::from_str::<T>(text) {
        Ok(m) => Ok(m),
        Err(e) => Err(classify::<T>(
            serde_json::from_str::<serde_json::Value>(text)
                .map_err(|je| DecodeError::InvalidJson(je.to_string())),
            e.to_string(),
        )),
    }
}

/// Decodes a MessagePack binary frame.
///
/// # Errors
/// As [`decode_text`], with [`DecodeError::InvalidMsgpack`] for bytes that are not MessagePack.
pub fn decode_binary<T: Message>(bytes: &[u8]) -> Result<T, DecodeError> {
    if !matches!(bytes.first(), Some(0x80..=0x8f | 0xde | 0xdf)) {
        return Err(
            match rmp_serde::from_slice::<serde::de::IgnoredAny>(bytes) {
                Ok(_) => DecodeError::NotAnEnvelope,
                Err(e) => DecodeError::InvalidMsgpack(e.to_string()),
            },
        );
    }
    match rmp_serde::from_slice::<T>(bytes) {
        Ok(m) => Ok(m),
        Err(e) => Err(classify::<T>(
            rmp_serde::from_slice::<serde_json::Value>(bytes)
                .map_err(|me| DecodeError::InvalidMsgpack(me.to_string())),
            e.to_string(),
        )),
    }
}

/// Decodes either kind of frame.
///
/// # Errors
/// See [`decode_text`] and [`decode_binary`].
pub fn decode<T: Message>(frame: &Frame) -> Result<T, DecodeError> {
    match frame {
        Frame::Text(t) => decode_text(t),
        Frame::Binary(b) => decode_binary(b),
    }
}

/// Works out why a frame failed to decode (cold path only).
fn classify<T: Message>(
    generic: Result<serde_json::Value, DecodeError>,
    reason: String,
) -> DecodeError {
    let value = match generic {
        Ok(v) => v,
        Err(e) => return e,
    };
    let Some(kind) = value.get("type").and_then(|t| t.as_str()) else {
        return DecodeError::NotAnEnvelope;
    };
    if !T::TYPES.contains(&kind) {
        return DecodeError::UnknownType(truncate(kind, 64));
    }
    if value.get("data").is_none_or(|d| !d.is_object()) {
        return DecodeError::InvalidPayload {
            kind: kind.to_owned(),
            reason: "`data` must be an object".to_owned(),
        };
    }
    DecodeError::InvalidPayload {
        kind: kind.to_owned(),
        reason,
    }
}

fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_owned(),
    }
}
