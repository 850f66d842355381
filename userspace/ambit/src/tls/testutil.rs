//! Test helpers: temporary directories and a TLS handshake over real loopback TCP.

use std::{
    io,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use rustls::{ClientConfig, ServerConfig};
use tokio::{
    io::AsyncReadExt,
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{client, server, TlsAcceptor, TlsConnector};

use super::config::dummy_server_name;

/// A directory under the system temp dir, removed on drop.
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub(crate) fn new() -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "ambit-tls-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Both ends of a handshake.
pub(super) struct Handshake {
    pub(super) server: io::Result<server::TlsStream<TcpStream>>,
    pub(super) client: io::Result<client::TlsStream<TcpStream>>,
}

/// After the server refused the client: in TLS 1.3 the client may finish its side first, but
/// its first read must then fail with the server's alert.
pub(super) async fn assert_refused(client: io::Result<client::TlsStream<TcpStream>>) {
    if let Ok(mut client) = client {
        let mut buf = [0; 16];
        let read = client.read(&mut buf).await;
        assert!(
            read.is_err(),
            "client read {read:?} from a server that refused it"
        );
    }
}

/// Runs a TLS handshake between `server` and `client` over a 127.0.0.1 TCP connection.
pub(super) async fn handshake(server: Arc<ServerConfig>, client: Arc<ClientConfig>) -> Handshake {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accept = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        TlsAcceptor::from(server).accept(tcp).await
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let client = TlsConnector::from(client)
        .connect(dummy_server_name(), tcp)
        .await;
    let server = accept.await.unwrap();
    Handshake { server, client }
}
