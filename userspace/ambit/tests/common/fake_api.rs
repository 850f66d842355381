//! A minimal Kubernetes API server on loopback for the tests: lists from the recorded objects
//! of userspace/ambit/testdata/kubernetes, and watch streams fed by the test, for the real
//! kube-rs client (no cluster).

use std::{collections::HashMap, sync::Arc};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
    sync::broadcast,
};

pub fn fixture(file: &str) -> serde_json::Value {
    let path = format!("{}/testdata/kubernetes/{file}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A minimal API server: lists from fixtures, and watch streams fed by `events`
/// (path prefix, JSON watch event).
pub async fn fake_api(events: broadcast::Sender<(String, String)>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let lists: Arc<HashMap<&str, serde_json::Value>> = Arc::new(HashMap::from([
        ("/api/v1/pods", fixture("pods.json")),
        ("/api/v1/namespaces", fixture("namespaces.json")),
        ("/api/v1/services", fixture("services.json")),
        (
            "/apis/discovery.k8s.io/v1/endpointslices",
            fixture("endpointslices.json"),
        ),
    ]));
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            let lists = lists.clone();
            let mut events = events.subscribe();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = stream.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    head.extend_from_slice(&buf[..n]);
                }
                let text = String::from_utf8_lossy(&head).into_owned();
                let target = text.split_whitespace().nth(1).unwrap_or("/").to_owned();
                let (path, query) = target.split_once('?').unwrap_or((&target, ""));
                let Some(list) = lists.get(path) else {
                    let _ = stream
                        .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                        .await;
                    return;
                };
                if query
                    .split('&')
                    .any(|kv| kv == "watch=true" || kv == "watch=1")
                {
                    let _ = stream
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n")
                        .await;
                    while let Ok((prefix, event)) = events.recv().await {
                        if prefix == path {
                            let line = format!("{event}\n");
                            let chunk = format!("{:x}\r\n{line}\r\n", line.len());
                            if stream.write_all(chunk.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    }
                    return;
                }
                let mut list = list.clone();
                list["metadata"] = serde_json::json!({"resourceVersion": "1"});
                let body = list.to_string();
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    });
    format!("http://{addr}")
}
