//! The accept loop every tunnel listener runs (outbound, inbound plaintext, HBONE): one task
//! per accepted connection, and a pause instead of a spin when the process runs out of file
//! descriptors or memory.

use std::{future::Future, io, net::SocketAddr, sync::Arc, time::Duration};

use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tracing::{warn, Instrument as _};

use crate::drain::Tracked;

/// How long accepting pauses when the process is out of resources. The waiting connections stay
/// in the kernel's queue and are taken once resources are free again.
const OUT_OF_RESOURCES_PAUSE: Duration = Duration::from_millis(100);
/// At most one warning per listener this often while out of resources.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// What a listener makes of each connection it accepts.
pub trait Handler: Send + Sync + 'static {
    /// Names the listener in log lines: `outbound`, `inbound`, `HBONE`.
    const LISTENER: &'static str;

    /// The pod the listener serves, for log lines.
    fn pod(&self) -> &str;

    /// Counts one connection as open for the drain, from the moment the accept loop takes it
    /// until its task ends: a drain beginning right after the accept waits for it too.
    fn track(&self) -> Tracked;

    /// Serves one accepted connection to its end.
    fn connection(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// Accepts on `listener` forever and serves each connection with `handler` in a task of its
/// own, in a span naming the listener, the pod and the peer; a connection's error is logged
/// once, here.
pub async fn serve<H: Handler>(listener: TcpListener, handler: Arc<H>) {
    let listener_name = H::LISTENER;
    let pod = handler.pod().to_owned();
    let pod = pod.as_str();
    let mut warned_at: Option<Instant> = None;
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let span =
                    tracing::info_span!("connection", listener = listener_name, pod, src = %peer);
                // Counted here, not in the task: a drain that begins now waits for it.
                let open = handler.track();
                let handler = handler.clone();
                let connection = async move {
                    let _open = open;
                    if let Err(e) = handler.connection(stream, peer).await {
                        warn!(error = %format!("{e:#}"), "{listener_name} connection failed");
                    }
                };
                tokio::spawn(connection.instrument(span));
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
