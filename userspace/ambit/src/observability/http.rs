//! The HTTP/1.1 server of the node's operational endpoints (metrics, readiness, admin), on
//! hyper. Handlers see a small [`Request`] (method, path, query) and return a [`Response`];
//! requests carry no bodies. A client gets [`HEADER_TIMEOUT`] to send its request head, so a
//! slow or hostile one cannot hold the node's resources.

use std::{convert::Infallible, future::Future, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{header::CONTENT_TYPE, server::conn::http1, service::service_fn, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tracing::debug;

const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Bounds the request head (hyper's minimum read buffer is 8 KiB).
const MAX_REQUEST_HEAD: usize = 8 * 1024;

pub struct Request {
    pub method: String,
    pub path: String,
    /// The raw query string (after `?`), empty when absent.
    pub query: String,
}

impl Request {
    /// The value of `key` in the query string.
    pub fn param(&self, key: &str) -> Option<&str> {
        self.query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    }
}

pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }

    pub fn json(body: String) -> Self {
        Self {
            status: 200,
            content_type: "application/json",
            body,
        }
    }

    fn into_hyper(self) -> hyper::Response<Full<Bytes>> {
        let mut response = hyper::Response::new(Full::new(Bytes::from(self.body)));
        *response.status_mut() =
            StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        response.headers_mut().insert(
            CONTENT_TYPE,
            hyper::header::HeaderValue::from_static(self.content_type),
        );
        response
    }
}

/// Serves `handler` on `listener` until the task is dropped.
pub async fn serve<H, F>(listener: TcpListener, handler: H)
where
    H: Fn(Request) -> F + Send + Sync + 'static,
    F: Future<Output = Response> + Send + 'static,
{
    let handler = Arc::new(handler);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let handler = handler.clone();
        let service = service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            let request = Request {
                method: request.method().as_str().to_owned(),
                path: request.uri().path().to_owned(),
                query: request.uri().query().unwrap_or("").to_owned(),
            };
            let response = handler(request);
            async move { Ok::<_, Infallible>(response.await.into_hyper()) }
        });
        tokio::spawn(async move {
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_REQUEST_HEAD)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = connection.await {
                debug!(error = %e, "admin request failed");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    async fn exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        // A server that answers before reading everything may reset the rest; that is fine.
        let _ = stream.write_all(request).await;
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer).await;
        String::from_utf8_lossy(&answer).into_owned()
    }

    #[tokio::test]
    async fn answers_with_the_handlers_response_and_bounds_the_request_head() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, |req: Request| async move {
            let level = req.param("level").unwrap_or("none").to_owned();
            Response::text(200, format!("{} {} {level}\n", req.method, req.path))
        }));

        let answer = exchange(
            addr,
            b"POST /logging?level=debug HTTP/1.1\r\nhost: x\r\n\r\n",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(answer.contains("content-type: text/plain"), "{answer}");
        assert!(answer.ends_with("POST /logging debug\n"), "{answer}");

        let huge = format!(
            "GET /metrics HTTP/1.1\r\nx-padding: {}\r\n\r\n",
            "a".repeat(MAX_REQUEST_HEAD * 2)
        );
        let answer = exchange(addr, huge.as_bytes()).await;
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
            "an oversized request head reached the handler: {answer}"
        );
    }
}
