//! A minimal Kubernetes API server on loopback for the tests: lists from the recorded objects
//! of userspace/ambit/testdata/kubernetes, and watch streams fed by the test, for the real
//! kube-rs client (no cluster). Field selectors on `spec.nodeName` are honoured, as the API
//! server does, and every request can be recorded.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
    sync::broadcast,
};

pub fn fixture(file: &str) -> serde_json::Value {
    let path = format!("{}/testdata/kubernetes/{file}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The requests a fake API server received (method, path and decoded query), in order.
pub type Requests = Arc<Mutex<Vec<String>>>;

/// A query string's `%XX` and `+` decoded.
fn decode(query: &str) -> String {
    let bytes = query.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap()
}

/// Whether `object` matches the field selector `selector` (`path.to.field=value`, the one
/// form the agent sends), as the API server decides.
fn selected(object: &serde_json::Value, selector: Option<&str>) -> bool {
    let Some(selector) = selector else {
        return true;
    };
    let (path, value) = selector
        .split_once('=')
        .unwrap_or_else(|| panic!("field selector {selector:?} is not field=value"));
    let field = path
        .split('.')
        .fold(object, |v, key| &v[key])
        .as_str()
        .unwrap_or_default();
    field == value.trim_start_matches('=')
}

/// A minimal API server: lists from fixtures, and watch streams fed by `events`
/// (path prefix, JSON watch event); both honour `fieldSelector`.
pub async fn fake_api(events: broadcast::Sender<(String, String)>) -> String {
    fake_api_recording(events).await.0
}

/// The same, with the requests it receives.
pub async fn fake_api_recording(events: broadcast::Sender<(String, String)>) -> (String, Requests) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Requests::default();
    let recorded = requests.clone();
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
            let recorded = recorded.clone();
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
                let query = decode(query);
                let method = text.split_whitespace().next().unwrap_or_default();
                recorded
                    .lock()
                    .unwrap()
                    .push(format!("{method} {path}?{query}"));
                let fields = query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("fieldSelector="))
                    .map(str::to_owned);
                let fields = fields.as_deref();
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
                        let object = serde_json::from_str::<serde_json::Value>(&event).unwrap();
                        if prefix == path && selected(&object["object"], fields) {
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
                if let Some(items) = list["items"].as_array_mut() {
                    items.retain(|item| selected(item, fields));
                }
                let body = list.to_string();
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    });
    (format!("http://{addr}"), requests)
}
