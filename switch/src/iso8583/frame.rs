//! Message framing on the TCP stream: a 2-byte big-endian length header, then the message.
//!
//! Works on a byte buffer and never on a socket: "incomplete" means read more, not an error,
//! so the connection code stays a short read loop.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Bytes of the length header.
const HEADER: usize = 2;

/// A frame that cannot be accepted or sent. The connection should be closed on decode errors:
/// the stream can no longer be trusted to be in step.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The header announces more than the configured maximum.
    #[error("failed to accept frame: header claims {claimed} bytes, the maximum is {max}")]
    TooLarge {
        /// Length the header claims.
        claimed: usize,
        /// The configured maximum frame size.
        max: usize,
    },
    /// The header announces a zero-length message.
    #[error("failed to accept frame: header claims an empty message")]
    Empty,
    /// A payload that does not fit the 2-byte header.
    #[error("failed to frame message: {len} bytes do not fit a 2-byte length header (max 65535)")]
    PayloadTooLarge {
        /// Payload length.
        len: usize,
    },
}

/// Takes one complete frame's payload off the front of `buf`.
///
/// `Ok(None)` means the buffer holds only part of a frame: read more and call again. The
/// header is checked as soon as its two bytes are in, so an oversized claim is refused before
/// its body arrives, and nothing is reserved for the claimed size. On error `buf` is left
/// untouched.
pub fn decode_frame(buf: &mut BytesMut, max_frame: usize) -> Result<Option<Bytes>, FrameError> {
    let Some(&[hi, lo]) = buf.get(..HEADER) else {
        return Ok(None);
    };
    let len = usize::from(u16::from_be_bytes([hi, lo]));
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > max_frame {
        return Err(FrameError::TooLarge {
            claimed: len,
            max: max_frame,
        });
    }
    if buf.len() < HEADER + len {
        return Ok(None);
    }
    buf.advance(HEADER);
    Ok(Some(buf.split_to(len).freeze()))
}

/// Appends `payload` with its length header to `out`.
pub fn encode_frame(payload: &[u8], out: &mut BytesMut) -> Result<(), FrameError> {
    if payload.is_empty() {
        return Err(FrameError::Empty);
    }
    let len = u16::try_from(payload.len())
        .map_err(|_| FrameError::PayloadTooLarge { len: payload.len() })?;
    out.reserve(HEADER + payload.len());
    out.put_u16(len);
    out.put_slice(payload);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 8192;

    #[test]
    fn incomplete_header_and_body_ask_for_more() {
        let mut buf = BytesMut::new();
        assert_eq!(decode_frame(&mut buf, MAX), Ok(None));
        buf.extend_from_slice(&[0x00]);
        assert_eq!(decode_frame(&mut buf, MAX), Ok(None));
        buf.extend_from_slice(&[0x05, b'0', b'8', b'0']);
        assert_eq!(decode_frame(&mut buf, MAX), Ok(None));
        assert_eq!(buf.len(), 5, "an incomplete frame must not be consumed");
        buf.extend_from_slice(b"0X");
        assert_eq!(
            decode_frame(&mut buf, MAX),
            Ok(Some(Bytes::from_static(b"0800X")))
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn oversized_header_is_refused_before_the_body_without_reserving_it() {
        let mut buf = BytesMut::with_capacity(16);
        buf.extend_from_slice(&[0xff, 0xff]);
        let capacity = buf.capacity();
        assert_eq!(
            decode_frame(&mut buf, MAX),
            Err(FrameError::TooLarge {
                claimed: 65535,
                max: MAX
            })
        );
        assert_eq!(buf.capacity(), capacity);
        let mut just_over = BytesMut::from(&[0x20, 0x01][..]);
        assert_eq!(
            decode_frame(&mut just_over, MAX),
            Err(FrameError::TooLarge {
                claimed: MAX + 1,
                max: MAX
            })
        );
    }

    #[test]
    fn frame_of_exactly_the_maximum_is_accepted() {
        let payload = vec![b'7'; MAX];
        let mut buf = BytesMut::new();
        encode_frame(&payload, &mut buf).unwrap();
        assert_eq!(&buf[..2], &[0x20, 0x00]);
        assert_eq!(decode_frame(&mut buf, MAX), Ok(Some(Bytes::from(payload))));
    }

    #[test]
    fn two_frames_in_one_buffer_come_out_one_at_a_time() {
        let mut buf = BytesMut::new();
        encode_frame(b"first", &mut buf).unwrap();
        encode_frame(b"second!", &mut buf).unwrap();
        buf.extend_from_slice(&[0x00]); // start of a third
        assert_eq!(
            decode_frame(&mut buf, MAX),
            Ok(Some(Bytes::from_static(b"first")))
        );
        assert_eq!(
            decode_frame(&mut buf, MAX),
            Ok(Some(Bytes::from_static(b"second!")))
        );
        assert_eq!(decode_frame(&mut buf, MAX), Ok(None));
        assert_eq!(&buf[..], &[0x00]);
    }

    #[test]
    fn zero_length_frames_are_refused_both_ways() {
        let mut buf = BytesMut::from(&[0x00, 0x00, b'x'][..]);
        assert_eq!(decode_frame(&mut buf, MAX), Err(FrameError::Empty));
        assert_eq!(buf.len(), 3);
        assert_eq!(
            encode_frame(b"", &mut BytesMut::new()),
            Err(FrameError::Empty)
        );
    }

    #[test]
    fn payload_over_65535_cannot_be_framed() {
        let mut out = BytesMut::new();
        assert_eq!(
            encode_frame(&vec![0u8; 65536], &mut out),
            Err(FrameError::PayloadTooLarge { len: 65536 })
        );
        assert!(out.is_empty());
        encode_frame(&vec![1u8; 65535], &mut out).unwrap();
        assert_eq!(&out[..2], &[0xff, 0xff]);
        assert_eq!(out.len(), 65537);
    }
}
