//! How a record is framed in a segment (length, CRC-32, fields) and how
//! recovery reads frames back, resynchronising past damage.

use bytes::Bytes;

use crate::store::NewPostback;

use super::{Journaled, FRAME_HEADER};

/// Frames one record into `out`: length, CRC-32, then the fields.
pub(super) fn encode(seq: u64, postback: &NewPostback, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&[0; FRAME_HEADER]);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&postback.received_at_ms.to_le_bytes());
    for field in [
        postback.id.as_bytes(),
        postback.dedupe_key.as_bytes(),
        &postback.envelope,
        &postback.raw_body,
    ] {
        put(out, field);
    }
    match &postback.content_type {
        None => out.push(0),
        Some(content_type) => {
            out.push(1);
            put(out, content_type.as_bytes());
        }
    }
    out.extend_from_slice(&(postback.targets.len() as u32).to_le_bytes());
    for target in &postback.targets {
        put(out, target.as_bytes());
    }
    let payload_len = (out.len() - FRAME_HEADER) as u32;
    let crc = crc32fast::hash(&out[FRAME_HEADER..]);
    out[..4].copy_from_slice(&payload_len.to_le_bytes());
    out[4..8].copy_from_slice(&crc.to_le_bytes());
}

pub(super) fn put(out: &mut Vec<u8>, field: &[u8]) {
    out.extend_from_slice(&(field.len() as u32).to_le_bytes());
    out.extend_from_slice(field);
}

/// What recovery finds in a segment.
#[derive(Default)]
pub(super) struct Decoded {
    /// Every valid record, in order.
    pub(super) records: Vec<Journaled>,
    /// It ends in a bad frame with nothing valid after it: a record torn by
    /// a crash mid-write, never acknowledged.
    pub(super) torn: bool,
    /// Damage with valid records after it: the sequence numbers missing
    /// between the records on either side, and the bytes stepped over.
    pub(super) skipped_records: u64,
    pub(super) skipped_bytes: u64,
}

/// Reads a segment's records. A zero length ends them (a written-out
/// segment); a bad frame is either a torn tail or damage, told apart by
/// whether a valid frame with a later sequence number follows it anywhere:
/// recovery then resumes there.
pub(super) fn decode_all(bytes: &[u8]) -> Decoded {
    let mut decoded = Decoded::default();
    let mut at = 0;
    let mut last_seq = 0;
    while at < bytes.len() {
        let end_mark = bytes[at..].iter().take(4).all(|byte| *byte == 0);
        if !end_mark {
            if let Some((record, used)) = decode_one(&bytes[at..]).filter(|(r, _)| r.seq > last_seq)
            {
                last_seq = record.seq;
                decoded.records.push(record);
                at += used;
                continue;
            }
        }
        match resync(bytes, at + 1, last_seq) {
            Some((next, seq)) => {
                decoded.skipped_bytes += (next - at) as u64;
                if last_seq > 0 {
                    decoded.skipped_records += seq - last_seq - 1;
                }
                at = next;
            }
            None => {
                decoded.torn = !end_mark;
                break;
            }
        }
    }
    decoded
}

/// The first offset from `from` where a whole, valid record with a sequence
/// number above `after` starts, and that number. Zeros (the written-out rest
/// of a segment) are stepped over a word at a time.
pub(super) fn resync(bytes: &[u8], from: usize, after: u64) -> Option<(usize, u64)> {
    let mut at = from;
    while at + FRAME_HEADER < bytes.len() {
        if bytes[at] == 0 && bytes[at..].iter().take(8).all(|byte| *byte == 0) {
            // A frame starts with a non-zero length: none starts in the
            // first five of eight zeros.
            at += 5;
            continue;
        }
        if let Some((record, _)) = decode_one(&bytes[at..]) {
            if record.seq > after {
                return Some((at, record.seq));
            }
        }
        at += 1;
    }
    None
}

/// The record framed at the start of `bytes`, and the frame's length.
pub(super) fn decode_one(bytes: &[u8]) -> Option<(Journaled, usize)> {
    let mut frame = Cursor(bytes);
    let len = frame.u32()? as usize;
    let crc = frame.u32()?;
    let payload = frame.take(len)?;
    if crc32fast::hash(payload) != crc {
        return None;
    }
    let mut fields = Cursor(payload);
    let seq = u64::from_le_bytes(fields.take(8)?.try_into().ok()?);
    let received_at_ms = i64::from_le_bytes(fields.take(8)?.try_into().ok()?);
    let id = fields.string()?;
    let dedupe_key = fields.string()?;
    let envelope = Bytes::copy_from_slice(fields.field()?);
    let raw_body = Bytes::copy_from_slice(fields.field()?);
    let content_type = match fields.take(1)? {
        [0] => None,
        _ => Some(fields.string()?),
    };
    let count = fields.u32()?;
    let targets = (0..count)
        .map(|_| fields.string())
        .collect::<Option<Vec<_>>>()?;
    let record = Journaled {
        seq,
        postback: NewPostback {
            id,
            dedupe_key,
            received_at_ms,
            envelope,
            raw_body,
            content_type,
            targets,
            // Not journaled: jobs moved at start-up are claimed, and a
            // claim reads it from the envelope.
            tracking_id: None,
        },
    };
    Some((record, FRAME_HEADER + len))
}

/// Reads a record's fields in order.
pub(super) struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn field(&mut self) -> Option<&'a [u8]> {
        let len = self.u32()? as usize;
        self.take(len)
    }

    fn string(&mut self) -> Option<String> {
        String::from_utf8(self.field()?.to_vec()).ok()
    }
}
