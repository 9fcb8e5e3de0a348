//! Server-Sent Events line splitting for upstream streams: yields each `data:` payload as it
//! completes, without copying when a line lies inside one network chunk.

use bytes::{Buf, Bytes, BytesMut};

/// What one upstream line carried.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Event {
    /// A `data:` payload (without the prefix and the line end).
    Data(Bytes),
    /// `data: [DONE]`.
    Done,
}

/// Splits a byte stream into SSE `data:` lines. Comments (`:`), `event:`, `id:`, `retry:` and
/// blank lines are skipped.
#[derive(Debug, Default)]
pub(crate) struct Splitter {
    buf: BytesMut,
}

/// Longest line kept while waiting for its end (16 MiB); longer input is an error.
const MAX_LINE: usize = 16 << 20;

impl Splitter {
    /// Adds received bytes.
    ///
    /// # Errors
    /// When a line grows past 16 MiB without ending.
    pub(crate) fn push(&mut self, chunk: &[u8]) -> Result<(), String> {
        self.buf.extend_from_slice(chunk);
        if self.buf.len() > MAX_LINE && memchr::memchr(b'\n', &self.buf).is_none() {
            return Err("an upstream SSE line exceeds 16 MiB".to_owned());
        }
        Ok(())
    }

    /// The next complete event, if any.
    pub(crate) fn next_event(&mut self) -> Option<Event> {
        loop {
            let nl = memchr::memchr(b'\n', &self.buf)?;
            let mut line = self.buf.split_to(nl + 1).freeze();
            line.truncate(nl);
            if line.last() == Some(&b'\r') {
                line.truncate(line.len() - 1);
            }
            if let Some(rest) = line.strip_prefix(b"data:") {
                let skip = line.len() - rest.len() + usize::from(rest.first() == Some(&b' '));
                line.advance(skip);
                if line.as_ref() == b"[DONE]" {
                    return Some(Event::Done);
                }
                return Some(Event::Data(line));
            }
        }
    }

    /// Whatever is left without a line end (at end of stream).
    pub(crate) fn rest(&mut self) -> Option<Event> {
        if self.buf.is_empty() {
            return None;
        }
        self.buf.extend_from_slice(b"\n");
        self.next_event()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn splits_across_chunks_and_skips_other_fields() {
        let mut s = Splitter::default();
        s.push(b": keep-alive\n\nevent: x\ndata: {\"a\"").unwrap();
        assert_eq!(s.next_event(), None);
        s.push(b":1}\r\n\ndata:{\"b\":2}\n\ndata: [DONE]\n\n")
            .unwrap();
        assert_eq!(
            s.next_event(),
            Some(Event::Data(Bytes::from_static(b"{\"a\":1}")))
        );
        assert_eq!(
            s.next_event(),
            Some(Event::Data(Bytes::from_static(b"{\"b\":2}")))
        );
        assert_eq!(s.next_event(), Some(Event::Done));
        assert_eq!(s.next_event(), None);
        s.push(b"data: tail").unwrap();
        assert_eq!(s.rest(), Some(Event::Data(Bytes::from_static(b"tail"))));
    }
}
