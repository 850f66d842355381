//! The bottom layer of the tunnel: plain TCP. Listeners' accept loop (`accept`), outgoing
//! connections from inside a pod's netns (`connect`), and copying bytes between two sockets
//! with half-close and resets passed on (`relay`). It knows nothing of HBONE, policy or pods.

pub mod accept;
pub mod connect;
pub mod relay;
pub mod transparent;

pub use connect::{connect_tcp, TUNNEL_SOCKET_MARK};
