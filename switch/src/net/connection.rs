//! One buffered TCP (or TLS) connection speaking length-prefixed ISO 8583 frames.
//!
//! Reading is cancel-safe (mini-redis style): bytes accumulate in our own buffer and a frame is
//! only taken out once complete, so the read future can lose a `select!` race without losing data.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::tls::NetStream;

use crate::iso8583::{FrameError, decode_frame, encode_frame};

/// Why reading a frame ended the connection.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The peer broke the framing rules; the connection must be closed.
    #[error("failed to read frame: {0}")]
    Frame(#[from] FrameError),
    /// The peer closed the socket in the middle of a frame.
    #[error("failed to read frame: connection closed with {0} bytes of an incomplete frame")]
    Truncated(usize),
    /// Socket error.
    #[error("failed to read frame: {0}")]
    Io(#[from] std::io::Error),
}

/// A framed connection.
#[derive(Debug)]
pub struct Connection {
    stream: NetStream,
    buffer: BytesMut,
    max_frame: usize,
    out: BytesMut,
}

impl Connection {
    /// Wraps an accepted socket (plain or TLS); frames above `max_frame` bytes are refused.
    pub fn new(stream: impl Into<NetStream>, max_frame: usize) -> Self {
        let stream = stream.into();
        // Disable Nagle: every frame is a complete request or answer and latency matters.
        let _ = stream.tcp().set_nodelay(true);
        Self {
            stream,
            buffer: BytesMut::with_capacity(1024),
            max_frame,
            out: BytesMut::with_capacity(1024),
        }
    }

    /// Reads the next frame. `Ok(None)` is a clean close between frames.
    pub async fn read_frame(&mut self) -> Result<Option<Bytes>, ReadError> {
        loop {
            if let Some(frame) = decode_frame(&mut self.buffer, self.max_frame)? {
                return Ok(Some(frame));
            }
            // Never grow the buffer past one maximum frame plus its header, whatever the peer
            // claims: decode_frame has already refused a larger header.
            if self.buffer.capacity() - self.buffer.len() < 512 {
                self.buffer.reserve(1024.min(self.max_frame + 2));
            }
            if self.stream.read_buf(&mut self.buffer).await? == 0 {
                return if self.buffer.is_empty() {
                    Ok(None)
                } else {
                    Err(ReadError::Truncated(self.buffer.len()))
                };
            }
        }
    }

    /// Writes one frame and flushes it.
    pub async fn write_frame(&mut self, payload: &[u8]) -> std::io::Result<()> {
        self.out.clear();
        encode_frame(payload, &mut self.out)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
        self.stream.write_all(&self.out).await?;
        self.stream.flush().await
    }

    /// Closes the write side so the peer sees a clean end of stream.
    pub async fn shutdown(&mut self) {
        let _ = self.stream.shutdown().await;
    }
}
