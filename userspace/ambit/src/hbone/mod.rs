//! HBONE: HTTP/2 CONNECT over mutual TLS 1.3 on port 15008, as Istio's ztunnel speaks it
//! (`shared/reference/hbone.md`). `client` opens (pooled) tunnels, `server` answers them, and
//! `bridge` moves bytes between a TCP stream and an HTTP/2 stream, half-close included.

pub mod bridge;
pub mod client;
pub mod server;

use std::time::Duration;

/// HTTP/2 settings and pool limits; defaults as ztunnel's.
#[derive(Debug, Clone)]
pub struct HboneSettings {
    pub stream_window: u32,
    pub connection_window: u32,
    pub max_frame_size: u32,
    /// Streams per pooled connection before the pool opens another.
    pub max_streams_per_connection: usize,
    /// What the server advertises.
    pub server_max_concurrent_streams: u32,
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
    pub idle_timeout: Duration,
    /// Bound on a request's header block (hostile peers).
    pub max_header_list_size: u32,
    /// A peer that does not finish its TLS handshake in this time is dropped (hostile or
    /// broken peers must not hold sockets and memory).
    pub handshake_timeout: Duration,
}

impl Default for HboneSettings {
    fn default() -> Self {
        Self {
            stream_window: 4 * 1024 * 1024,
            connection_window: 16 * 1024 * 1024,
            max_frame_size: 1024 * 1024,
            max_streams_per_connection: 100,
            server_max_concurrent_streams: 200,
            ping_interval: Duration::from_secs(10),
            ping_timeout: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(300),
            max_header_list_size: 16 * 1024,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}
