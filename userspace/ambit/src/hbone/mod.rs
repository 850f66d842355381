//! HBONE: HTTP/2 CONNECT over mutual TLS 1.3 on port 15008, as Istio's ztunnel speaks it
//! (`docs/hbone.md`). `client` opens (pooled) tunnels; `request` holds the checks a server
//! makes before it connects anywhere (the server is `proxy::inbound`); `bridge` moves bytes
//! between a TCP stream and an HTTP/2 stream, half-close included; `keepalive` PINGs.

pub mod bridge;
pub mod client;
pub mod keepalive;
pub mod request;

use std::time::Duration;

/// HTTP/2 settings and pool limits; defaults as ztunnel's.
#[derive(Debug, Clone)]
pub struct HboneSettings {
    pub stream_window: u32,
    pub connection_window: u32,
    pub max_frame_size: u32,
    /// Streams per pooled connection before the pool opens another.
    pub max_streams_per_connection: usize,
    /// Streams a pooled connection carries in its life before it is retired (it closes once
    /// its last stream ends); 0: no limit. 1 makes every tunneled connection do its own TLS
    /// handshake: the benchmark measures the handshake's cost that way.
    pub max_requests_per_connection: usize,
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
            max_requests_per_connection: 0,
            server_max_concurrent_streams: 200,
            ping_interval: Duration::from_secs(10),
            ping_timeout: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(300),
            max_header_list_size: 16 * 1024,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

impl HboneSettings {
    /// The HTTP/2 server side of a tunnel with these settings: the HBONE server's, and the one
    /// the `hbone_h2` fuzz target serves hostile clients with.
    pub fn h2_server(&self) -> h2::server::Builder {
        let mut builder = h2::server::Builder::new();
        builder
            .initial_window_size(self.stream_window)
            .initial_connection_window_size(self.connection_window)
            .max_frame_size(self.max_frame_size)
            .max_concurrent_streams(self.server_max_concurrent_streams)
            .max_header_list_size(self.max_header_list_size)
            // Hostile peers (tests/abuse.rs), h2's defaults pinned so that an upgrade cannot
            // loosen them: GOAWAY(ENHANCE_YOUR_CALM) after 20 streams reset before the server
            // took them (rapid reset, CVE-2023-44487) or after 1,024 streams h2 had to refuse
            // or reset itself; and at most 400 KiB queued per stream for a peer that opens a
            // huge window but does not read.
            .max_pending_accept_reset_streams(20)
            .max_local_error_reset_streams(Some(1024))
            .max_send_buffer_size(400 * 1024);
        builder
    }
}
