//! The accept loop every tunnel listener runs (outbound, inbound plaintext, HBONE): one task
//! per accepted connection, and a pause instead of a spin when the process runs out of file
//! descriptors or memory.

use std::{future::Future, io, net::SocketAddr, time::Duration};

use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tracing::warn;

/// How long accepting pauses when the process is out of resources. The waiting connections stay
/// in the kernel's queue and are taken once resources are free again.
const OUT_OF_RESOURCES_PAUSE: Duration = Duration::from_millis(100);
/// At most one warning per listener this often while out of resources.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Accepts on `listener` forever and spawns `handle(stream, peer)` for each connection.
/// `listener_name` and `pod` only label log lines.
pub async fn serve<F, Fut>(listener: TcpListener, listener_name: &'static str, pod: &str, handle: F)
where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut warned_at: Option<Instant> = None;
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tokio::spawn(handle(stream, peer));
            }
            Err(e) => match ran_out_of(&e) {
                // The listener stays readable while connections wait, so accept() would fail
                // again at once: without the pause this loop spins a core and floods the log.
                Some(resource) => {
                    if warned_at.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
                        warn!(
                            pod,
                            listener = listener_name,
                            error = %e,
                            "accept failed: out of {resource}; pausing accepts, waiting connections stay queued"
                        );
                        warned_at = Some(Instant::now());
                    }
                    tokio::time::sleep(OUT_OF_RESOURCES_PAUSE).await;
                }
                None => warn!(pod, listener = listener_name, error = %e, "accept failed"),
            },
        }
    }
}

/// What an accept() error says the process ran out of, if that is what it says.
fn ran_out_of(e: &io::Error) -> Option<&'static str> {
    match e.raw_os_error()? {
        libc::EMFILE | libc::ENFILE => Some("file descriptors"),
        libc::ENOBUFS | libc::ENOMEM => Some("memory"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_errors_are_told_apart_from_others() {
        let os = io::Error::from_raw_os_error;
        assert_eq!(ran_out_of(&os(libc::EMFILE)), Some("file descriptors"));
        assert_eq!(ran_out_of(&os(libc::ENFILE)), Some("file descriptors"));
        assert_eq!(ran_out_of(&os(libc::ENOBUFS)), Some("memory"));
        assert_eq!(ran_out_of(&os(libc::ECONNABORTED)), None);
        assert_eq!(ran_out_of(&io::Error::other("not an OS error")), None);
    }
}
