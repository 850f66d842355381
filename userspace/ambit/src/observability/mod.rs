//! What the node shows about itself: Prometheus metrics (:15020/metrics), readiness
//! (:15021/healthz/ready), the admin endpoint (127.0.0.1:15000: /config_dump, /logging), and
//! the per-connection access log.

pub mod admin;
pub mod connection;
pub mod http;
pub mod metrics;

pub use connection::{
    ConnectionRecord, FastPathUse, Opened, Outcome, Peer, Reporter, ResponseFlag,
};
pub use metrics::Metrics;
