//! Privileged integration tests of hostile HTTP/2 peers against the HBONE server. Each
//! test speaks raw HTTP/2 frames over real mutual TLS (a client certificate from the lab's CA, so
//! the abuser is a valid mesh identity) to pod c's port 15008, and proves:
//!
//! - too many streams: 1,000 CONNECTs at once on one connection get at most the advertised 200
//!   streams served (the rest refused), and a rapid open+RST_STREAM loop (CVE-2023-44487) is cut
//!   off with a GOAWAY; the node's memory stays bounded and its sockets return to the baseline;
//! - huge headers: a 1 MiB header, 1 MiB of small headers and a CONTINUATION flood that never
//!   ends its header block are refused early, with bounded memory and a log line;
//! - slow readers: a client that opens the largest window and then stops reading while the app
//!   in pod c sends 100 MiB makes the app block (backpressure, not buffering); a client that
//!   pushes data past its flow-control window to an app that never reads gets its stream reset,
//!   and the node closes its connection to the app at once; memory stays bounded; when the
//!   client goes away, the node lets go of every socket;
//!
//! and in every case a normal request from pod a to pod c through the tunnel works meanwhile.
//!
//! The tests run one at a time: each bounds the node's memory, which another test's lab would
//! blur on a 2-core machine. AMBIT_ABUSE_RESETS (default 5,000) scales the rapid-reset loop.

mod common;

use std::{
    collections::BTreeMap,
    fs,
    io::{ErrorKind, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    process::Stdio,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use ambit::{
    netns::Netns,
    tls::{self, CertificateAuthority as _, Identity, PluginCa},
};
use ambit_lab::{pod, wait_until};
use common::{assert_ok, stdout, TestLab};
use rustls::{ClientConnection, StreamOwned};

/// The sink (tools/sink.py) in pod c that abusive streams target; port 8080 stays for the
/// bystander's requests.
const SINK_PORT: u16 = 9000;

// HTTP/2 frame types, flags and error codes (RFC 9113) this file uses.
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;
const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
const CANCEL: u32 = 0x8;
const REFUSED_STREAM: u32 = 0x7;
const FLOW_CONTROL_ERROR: u32 = 0x3;
const ENHANCE_YOUR_CALM: u32 = 0xb;
/// The frame size every HTTP/2 peer must accept.
const FRAME: usize = 16 * 1024;

/// What the server has said on one connection so far.
#[derive(Debug, Default)]
struct Heard {
    /// Response status → how many streams got it (`0`: a status this client cannot decode).
    statuses: BTreeMap<u16, usize>,
    /// RST_STREAM error code → how many streams got it.
    resets: BTreeMap<u32, usize>,
    /// The error code of the server's GOAWAY.
    goaway: Option<u32>,
    /// The server closed the TCP connection (or reset it).
    closed: bool,
}

/// A hand-made HTTP/2 client over blocking mutual TLS: it sends whatever frames a test wants, in
/// violation of the protocol if need be, from lab node n2's netns to pod c's port 15008.
struct RawHbone {
    tls: StreamOwned<ClientConnection, TcpStream>,
    /// Bytes read but not yet parsed into frames.
    inbox: Vec<u8>,
    next_stream: u32,
    heard: Heard,
}

impl RawHbone {
    /// Connects with a certificate for `spiffe://cluster.local/ns/default/sa/tester` and sends
    /// the connection preface with `settings`.
    fn connect(t: &TestLab, settings: &[(u16, u32)]) -> RawHbone {
        let ca = PluginCa::load(&t.dir.join("ca"), "cluster.local").unwrap();
        let cert = ca
            .issue(
                &Identity::new("cluster.local", "default", "tester"),
                Duration::from_secs(3600),
            )
            .unwrap();
        let server = Identity::parse("spiffe://cluster.local/ns/default/sa/web").unwrap();
        let config = tls::client_config(
            &cert,
            &ca.roots(),
            &[server],
            tls::CompliancePolicy::Default,
        )
        .unwrap();

        let netns = Netns::open(&t.lab.netns_path("n2")).unwrap();
        let socket = netns.socket(socket2::Domain::IPV4).unwrap();
        socket.set_nonblocking(false).unwrap();
        let hbone: SocketAddr = format!("{}:15008", pod("c").ip).parse().unwrap();
        socket
            .connect_timeout(&hbone.into(), Duration::from_secs(5))
            .unwrap();
        let tcp = TcpStream::from(socket);
        tcp.set_nodelay(true).unwrap();
        tcp.set_write_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let conn = ClientConnection::new(config, tls::dummy_server_name()).unwrap();
        let mut tls = StreamOwned::new(conn, tcp);
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock).expect("TLS handshake");
        }
        let mut client = RawHbone {
            tls,
            inbox: Vec::new(),
            next_stream: 1,
            heard: Heard::default(),
        };
        client
            .tls
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .unwrap();
        let payload: Vec<u8> = settings
            .iter()
            .flat_map(|(id, value)| [id.to_be_bytes().as_slice(), &value.to_be_bytes()].concat())
            .collect();
        client.send(SETTINGS, 0, 0, &payload).unwrap();
        client
    }

    fn send(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) -> std::io::Result<()> {
        let mut frame = Vec::with_capacity(9 + payload.len());
        frame.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
        frame.extend_from_slice(&[kind, flags]);
        frame.extend_from_slice(&stream.to_be_bytes());
        frame.extend_from_slice(payload);
        let written = self.tls.write_all(&frame).and_then(|()| self.tls.flush());
        if written.is_err() {
            self.heard.closed = true;
        }
        written
    }

    /// Sends a CONNECT to `authority` whose header block ends (END_HEADERS) and whose stream
    /// stays open; returns the stream id.
    fn open(&mut self, authority: &str) -> std::io::Result<u32> {
        let stream = self.next_stream;
        self.next_stream += 2;
        self.send(HEADERS, END_HEADERS, stream, &connect_block(authority, &[]))?;
        Ok(stream)
    }

    /// Sends a header block as HEADERS and CONTINUATION frames of 16 KiB, the last one with
    /// END_HEADERS; returns how many bytes of it were written before the connection broke.
    fn send_header_block(&mut self, block: &[u8]) -> usize {
        let stream = self.next_stream;
        self.next_stream += 2;
        let frames: Vec<&[u8]> = block.chunks(FRAME).collect();
        let mut taken = 0;
        for (i, payload) in frames.iter().enumerate() {
            let kind = if i == 0 { HEADERS } else { CONTINUATION };
            let flags = if i + 1 == frames.len() {
                END_HEADERS
            } else {
                0
            };
            if self.send(kind, flags, stream, payload).is_err() {
                break;
            }
            taken += payload.len();
        }
        taken
    }

    /// Reads and tallies the server's frames for `wait` (acknowledging its SETTINGS), or until it
    /// closes the connection.
    fn listen(&mut self, wait: Duration) {
        self.listen_until(wait, |_| false);
    }

    /// The same, ending early once `enough` holds.
    fn listen_until(&mut self, wait: Duration, enough: impl Fn(&Heard) -> bool) {
        let deadline = Instant::now() + wait;
        let mut buf = vec![0u8; 64 * 1024];
        while !self.heard.closed && !enough(&self.heard) && Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            let _ = self
                .tls
                .sock
                .set_read_timeout(Some(left.max(Duration::from_millis(1))));
            match self.tls.read(&mut buf) {
                Ok(0) => self.heard.closed = true,
                Ok(n) => {
                    self.inbox.extend_from_slice(&buf[..n]);
                    self.tally_frames();
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => self.heard.closed = true,
            }
        }
    }

    fn tally_frames(&mut self) {
        while self.inbox.len() >= 9 {
            let len = u32::from_be_bytes([0, self.inbox[0], self.inbox[1], self.inbox[2]]) as usize;
            if self.inbox.len() < 9 + len {
                return;
            }
            let frame: Vec<u8> = self.inbox.drain(..9 + len).collect();
            let (kind, flags, payload) = (frame[3], frame[4], &frame[9..]);
            let code = || u32::from_be_bytes(payload[..4].try_into().unwrap());
            match kind {
                HEADERS => {
                    *self.heard.statuses.entry(status(payload)).or_default() += 1;
                }
                RST_STREAM => *self.heard.resets.entry(code()).or_default() += 1,
                GOAWAY => {
                    self.heard.goaway = Some(u32::from_be_bytes(payload[4..8].try_into().unwrap()))
                }
                SETTINGS if flags & ACK == 0 => {
                    let _ = self.send(SETTINGS, ACK, 0, &[]);
                }
                _ => {}
            }
        }
    }
}

/// The HPACK block of a CONNECT to `authority` with `extra` headers, every field a literal
/// without indexing and without Huffman coding (RFC 7541 §6.2.2): the simplest valid encoding.
fn connect_block(authority: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in [(":method", "CONNECT"), (":authority", authority)]
        .into_iter()
        .chain(extra.iter().copied())
    {
        block.push(0);
        hpack_length(&mut block, name.len());
        block.extend_from_slice(name.as_bytes());
        hpack_length(&mut block, value.len());
        block.extend_from_slice(value.as_bytes());
    }
    block
}

/// A string length: an HPACK integer with a 7-bit prefix, Huffman bit off.
fn hpack_length(out: &mut Vec<u8>, mut n: usize) {
    if n < 127 {
        out.push(n as u8);
        return;
    }
    out.push(127);
    n -= 127;
    while n >= 128 {
        out.push((n % 128) as u8 | 0x80);
        n /= 128;
    }
    out.push(n as u8);
}

/// The `:status` of a response header block, if its first field says it in a way this client
/// decodes: a status of HPACK's static table (200, 204, 206, 304, 400, 404, 500), or a literal
/// value under the static `:status` name, plain or Huffman-coded (digits only). That covers
/// every 200 and the first other status on a connection; anything else is 0.
fn status(block: &[u8]) -> u16 {
    const STATIC: [u16; 7] = [200, 204, 206, 304, 400, 404, 500];
    let Some(&first) = block.first() else {
        return 0;
    };
    if first & 0x80 != 0 {
        let index = usize::from(first & 0x7f);
        return STATIC.get(index.wrapping_sub(8)).copied().unwrap_or(0);
    }
    // Literal with a static name index: 01xxxxxx (indexed), 0000xxxx or 0001xxxx (not).
    let name = if first & 0x40 != 0 {
        first & 0x3f
    } else {
        first & 0x0f
    };
    if !(8..=14).contains(&name) || block.len() < 2 {
        return 0;
    }
    let (huffman, len) = (block[1] & 0x80 != 0, usize::from(block[1] & 0x7f));
    let Some(value) = block.get(2..2 + len) else {
        return 0;
    };
    let text = if huffman {
        huffman_digits(value)
    } else {
        String::from_utf8_lossy(value).into_owned()
    };
    text.parse().unwrap_or(0)
}

/// Decodes a Huffman-coded (RFC 7541 Appendix B) string of digits: '0'–'2' are the 5-bit codes
/// 0–2, '3'–'9' the 6-bit codes 0x19–0x1f; anything else (the padding) ends it.
fn huffman_digits(bytes: &[u8]) -> String {
    let bits: Vec<u8> = bytes
        .iter()
        .flat_map(|b| (0..8).rev().map(move |i| (b >> i) & 1))
        .collect();
    let take = |at: usize, n: usize| -> Option<u8> {
        bits.get(at..at + n)
            .map(|b| b.iter().fold(0, |acc, bit| acc << 1 | bit))
    };
    let (mut text, mut at) = (String::new(), 0);
    loop {
        match (take(at, 5), take(at, 6)) {
            (Some(code @ 0..=2), _) => {
                text.push(char::from(b'0' + code));
                at += 5;
            }
            (_, Some(code @ 0x19..=0x1f)) => {
                text.push(char::from(b'3' + code - 0x19));
                at += 6;
            }
            _ => return text,
        }
    }
}

/// The largest values seen while something ran.
#[derive(Debug, Default, Clone, Copy)]
struct Peak {
    rss_kib: u64,
    fds: usize,
    /// The node's established connections to the sink in pod c: the streams it serves.
    sink_connections: usize,
}

/// Samples node n2 and pod c every 100 ms while `work` runs; returns what `work` returned and
/// the peaks.
fn while_sampling<T: Send>(t: &TestLab, work: impl FnOnce() -> T + Send) -> (T, Peak) {
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut peak = Peak::default();
            while !done.load(Ordering::Relaxed) {
                peak.rss_kib = peak.rss_kib.max(t.node_rss_kib("n2"));
                peak.fds = peak.fds.max(t.node_fds("n2"));
                peak.sink_connections = peak.sink_connections.max(app_connections(t, SINK_PORT));
                std::thread::sleep(Duration::from_millis(100));
            }
            peak
        });
        let result = work();
        done.store(true, Ordering::Relaxed);
        (result, sampler.join().unwrap())
    })
}

/// The node's established TCP connections to an app's `port` in pod c (the node's side: an app
/// that never reads keeps its own side established after the node closed).
fn app_connections(t: &TestLab, port: u16) -> usize {
    let filter = format!("( dport = :{port} )");
    let out = t
        .lab
        .run_in_pod("c", "ss", &["-Htn", "state", "established", &filter])
        .unwrap();
    stdout(&out).lines().count()
}

/// A lab with a and c enrolled and the sink listening in c, after one request from a to c (so
/// that the pooled connection it leaves is part of the baseline).
fn lab_with_sink() -> TestLab {
    let mut t = TestLab::start(&["a", "c"]);
    t.start_sink("c", SINK_PORT);
    bystander_request(&t, "before the abuse");
    t
}

/// A normal request from pod a to pod c through the tunnel (node n1 → node n2's HBONE server).
fn bystander_request(t: &TestLab, when: &str) {
    let out = t.curl("a", &format!("http://{}:8080/", pod("c").ip));
    assert_ok(&out, &format!("curl a → c {when}"));
    assert_eq!(stdout(&out), "hello from pod c\n");
}

/// Waits until node n2 holds no more file descriptors than at the baseline.
fn wait_fds_back(t: &TestLab, baseline: usize) {
    let back = wait_until(Duration::from_secs(10), "node n2's fds back", || {
        t.node_fds("n2") <= baseline
    });
    assert!(
        back.is_ok(),
        "node n2 holds {} fds, {baseline} before the abuse",
        t.node_fds("n2")
    );
}

#[test]
fn too_many_streams_are_refused_and_rapid_resets_are_cut_off() {
    let _serial = common::one_at_a_time();
    let t = lab_with_sink();
    let target = format!("{}:{SINK_PORT}", pod("c").ip);
    let (rss_before, fds_before) = (t.node_rss_kib("n2"), t.node_fds("n2"));

    // 1,000 CONNECTs at once on one connection, each held open.
    let (heard, many) = while_sampling(&t, || {
        let mut client = RawHbone::connect(&t, &[]);
        for _ in 0..1000 {
            client.open(&target).unwrap();
        }
        client.listen(Duration::from_secs(3));
        bystander_request(&t, "while 1,000 streams are open on one connection");
        client.heard
    });
    eprintln!("1,000 streams: {heard:?}, peak {many:?}, before {rss_before} KiB {fds_before} fds");
    let served = heard.statuses.get(&200).copied().unwrap_or(0);
    let refused = heard.resets.get(&REFUSED_STREAM).copied().unwrap_or(0);
    assert!(served <= 200, "{served} streams accepted, 200 advertised");
    assert!(
        many.sink_connections <= 200,
        "{} streams served at once, 200 advertised",
        many.sink_connections
    );
    assert_eq!(
        served + refused,
        1000,
        "every stream is answered: {heard:?}"
    );
    wait_fds_back(&t, fds_before);

    // Rapid reset: HEADERS then RST_STREAM at once, over and over; an abuser whose connection
    // is cut off reconnects, until it has sent `resets` streams.
    let resets = common::scale("AMBIT_ABUSE_RESETS", 5000);
    let (cut_off, rapid) = while_sampling(&t, || {
        std::thread::scope(|s| {
            let abuser = s.spawn(|| rapid_reset(&t, &target, resets));
            std::thread::sleep(Duration::from_millis(300));
            bystander_request(&t, "during a rapid-reset flood");
            abuser.join().unwrap()
        })
    });
    eprintln!("rapid reset: {resets} streams, {cut_off:?}, peak {rapid:?}");
    // h2 closes a connection once 20 streams were reset before the server took them (its
    // `max_pending_accept_reset_streams`); this client notices between bursts of 50. Without
    // that limit one connection would carry all of them.
    assert!(
        cut_off.most_streams_on_one_connection <= 1000,
        "a connection carried {} reset streams: {cut_off:?}",
        cut_off.most_streams_on_one_connection
    );
    // Every connection but the last (which may end because the abuser is done) is cut off:
    // GOAWAY(ENHANCE_YOUR_CALM), or a reset that beat the GOAWAY to this client.
    assert!(
        cut_off.cut_by_server >= cut_off.connections - 1,
        "connections not cut off: {cut_off:?}"
    );
    assert!(
        cut_off.calm_down > 0,
        "no GOAWAY(ENHANCE_YOUR_CALM): {cut_off:?}"
    );
    assert!(
        rapid.sink_connections <= 200,
        "{} streams served at once",
        rapid.sink_connections
    );
    for peak in [many, rapid] {
        assert!(
            peak.rss_kib < rss_before + 16 * 1024,
            "node n2 grew from {rss_before} KiB to {} KiB",
            peak.rss_kib
        );
    }
    wait_fds_back(&t, fds_before);
}

/// How a rapid-reset abuser fared.
#[derive(Debug, Default)]
struct CutOff {
    connections: usize,
    /// Connections the server ended (GOAWAY or closed).
    cut_by_server: usize,
    /// Of those, the ones that ended with a GOAWAY(ENHANCE_YOUR_CALM) this client read.
    calm_down: usize,
    most_streams_on_one_connection: usize,
}

/// Sends `streams` CONNECTs, each followed at once by RST_STREAM(CANCEL), in bursts of 50; an
/// abuser whose connection is cut off reconnects.
fn rapid_reset(t: &TestLab, target: &str, streams: usize) -> CutOff {
    let (mut cut_off, mut sent) = (CutOff::default(), 0);
    while sent < streams {
        let mut client = RawHbone::connect(t, &[]);
        cut_off.connections += 1;
        let mut on_this_connection = 0;
        while sent < streams && !client.heard.closed && client.heard.goaway.is_none() {
            for _ in 0..50 {
                let Ok(stream) = client.open(target) else {
                    break;
                };
                let _ = client.send(RST_STREAM, 0, stream, &CANCEL.to_be_bytes());
                on_this_connection += 1;
            }
            client.listen(Duration::from_millis(1));
        }
        sent += on_this_connection;
        client.listen_until(Duration::from_secs(2), |h| h.goaway.is_some());
        if client.heard.goaway.is_some() || client.heard.closed {
            cut_off.cut_by_server += 1;
        }
        if client.heard.goaway == Some(ENHANCE_YOUR_CALM) {
            cut_off.calm_down += 1;
        }
        cut_off.most_streams_on_one_connection = cut_off
            .most_streams_on_one_connection
            .max(on_this_connection);
    }
    cut_off
}

#[test]
fn huge_header_blocks_and_continuation_floods_are_refused_early() {
    let _serial = common::one_at_a_time();
    let t = lab_with_sink();
    let target = format!("{}:{SINK_PORT}", pod("c").ip);
    let (rss_before, fds_before) = (t.node_rss_kib("n2"), t.node_fds("n2"));
    let grown = |peak: Peak| peak.rss_kib.saturating_sub(rss_before);

    // Header blocks of about 1 MiB (the server allows 16 KiB), ending properly.
    let one_huge_value = "v".repeat(1 << 20);
    let small_names: Vec<String> = (0..90_000).map(|i| format!("x-h{i}")).collect();
    let small_headers: Vec<(&str, &str)> = small_names.iter().map(|n| (n.as_str(), "v")).collect();
    for (what, block) in [
        (
            "a 1 MiB header",
            connect_block(&target, &[("x-huge", &one_huge_value)]),
        ),
        (
            "90,000 small headers",
            connect_block(&target, &small_headers),
        ),
    ] {
        let ((taken, heard), peak) = while_sampling(&t, || {
            let mut client = RawHbone::connect(&t, &[]);
            let taken = client.send_header_block(&block);
            client.listen_until(Duration::from_secs(3), |h| !h.statuses.is_empty());
            (taken, client.heard)
        });
        eprintln!(
            "{what}: {} bytes, the server took {taken} before closing; {heard:?}; \
             grew {} KiB",
            block.len(),
            grown(peak)
        );
        assert!(
            heard.closed || heard.goaway.is_some() || heard.statuses.contains_key(&431),
            "{what}: not refused: {heard:?}"
        );
        assert_eq!(peak.sink_connections, 0, "{what}: the stream was served");
        assert!(
            grown(peak) < 16 * 1024,
            "{what}: node n2 grew {} KiB",
            grown(peak)
        );
    }

    // A header block that never ends: CONTINUATION frames, full or empty, for as long as the
    // server takes them (up to 64 MiB, or 100,000 empty frames).
    for (what, payload, frames, most_taken) in [
        ("full CONTINUATION frames", vec![0u8; FRAME], 4096, 256),
        ("empty CONTINUATION frames", Vec::new(), 100_000, 10_000),
    ] {
        let ((sent, heard), peak) = while_sampling(&t, || {
            let mut client = RawHbone::connect(&t, &[]);
            let stream = client.next_stream;
            client
                .send(HEADERS, 0, stream, &connect_block(&target, &[]))
                .unwrap();
            let mut sent: usize = 0;
            while sent < frames && client.send(CONTINUATION, 0, stream, &payload).is_ok() {
                sent += 1;
                if sent.is_multiple_of(64) {
                    client.listen(Duration::from_millis(1));
                    if client.heard.closed || client.heard.goaway.is_some() {
                        break;
                    }
                }
            }
            client.listen_until(Duration::from_secs(3), |h| h.goaway.is_some());
            (sent, client.heard)
        });
        eprintln!(
            "{what}: cut off after {sent} frames; {heard:?}; grew {} KiB",
            grown(peak)
        );
        assert!(
            sent <= most_taken,
            "{what}: the server took {sent} frames of a header block"
        );
        assert!(heard.closed || heard.goaway.is_some(), "{what}: {heard:?}");
        assert!(
            grown(peak) < 16 * 1024,
            "{what}: node n2 grew {} KiB",
            grown(peak)
        );
    }

    bystander_request(&t, "after the header abuse");
    // The node says which peer it dropped and why, once per connection.
    let log = t.log("n2");
    let dropped: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("HBONE connection failed"))
        .collect();
    assert_eq!(dropped.len(), 4, "{log}");
    // The abuser connects from node n2's own netns: its address on the pods' bridge.
    let abuser = format!("src={}:", ambit_lab::NODES[1].bridge_ip);
    assert!(dropped.iter().all(|l| l.contains(&abuser)), "{dropped:#?}");
    wait_fds_back(&t, fds_before);
}

/// An app that sends: for each connection on PORT in turn, writes BYTES as fast as they are
/// taken, printing "sent N" after each write, then "done N", or "stopped N <error>" if the peer
/// goes away first.
const SENDER: &str = r#"
import socket, sys
port, total = int(sys.argv[1]), int(sys.argv[2])
srv = socket.create_server(("0.0.0.0", port))
chunk = b"x" * 65536
while True:
    conn, _ = srv.accept()
    sent = 0
    try:
        while sent < total:
            sent += conn.send(chunk[: total - sent])
            print(f"sent {sent}", flush=True)
        print(f"done {sent}", flush=True)
    except OSError as e:
        print(f"stopped {sent} {e}", flush=True)
    conn.close()
"#;

/// An app that never reads: accepts connections on PORT and holds them.
const NON_READER: &str = r#"
import socket, sys
srv = socket.create_server(("0.0.0.0", int(sys.argv[1])))
held = []
while True:
    held.append(srv.accept()[0])
"#;

const SENDER_PORT: u16 = 9100;
const NON_READER_PORT: u16 = 9200;
/// The largest flow-control window HTTP/2 allows (2^31 - 1).
const MAX_WINDOW: u32 = 0x7fff_ffff;

/// Starts an inline python app in pod c with its stdout in `out`, and waits until it listens
/// (watching `ss`, since a probe connection would be a connection to the app).
fn start_app(t: &mut TestLab, name: &str, code: &str, args: &[&str], out: &std::path::Path) {
    let mut app = t.lab.pod_command("c", "python3");
    app.args(["-c", code])
        .args(args)
        .stdin(Stdio::null())
        .stdout(fs::File::create(out).unwrap());
    t.lab.spawn(name, app).unwrap();
    let filter = format!("( sport = :{} )", args[0]);
    let listening = wait_until(Duration::from_secs(10), name, || {
        let out = t.lab.run_in_pod("c", "ss", &["-Hltn", &filter]).unwrap();
        !stdout(&out).trim().is_empty()
    });
    listening.unwrap();
}

/// The last line the sender printed.
fn sender_said(progress: &std::path::Path) -> String {
    let text = fs::read_to_string(progress).unwrap_or_default();
    text.lines().last().unwrap_or_default().to_owned()
}

#[test]
fn slow_readers_get_backpressure_not_buffers() {
    let _serial = common::one_at_a_time();
    let mut t = lab_with_sink();
    let c = pod("c").ip;
    let (rss_before, fds_before) = (t.node_rss_kib("n2"), t.node_fds("n2"));
    let grown = |peak: Peak| peak.rss_kib.saturating_sub(rss_before);
    let total: u64 = 100 << 20;

    // The app in c sends 100 MiB to a client that opened the largest windows HTTP/2 allows
    // (so that only the server's own bounds hold), read the 200, and then never reads again.
    let progress = t.dir.join("sender.out");
    let port = SENDER_PORT.to_string();
    start_app(
        &mut t,
        "sender in c",
        SENDER,
        &[&port, &total.to_string()],
        &progress,
    );
    let mut client = RawHbone::connect(&t, &[(SETTINGS_INITIAL_WINDOW_SIZE, MAX_WINDOW)]);
    client
        .send(WINDOW_UPDATE, 0, 0, &(MAX_WINDOW - 65_535).to_be_bytes())
        .unwrap();
    client.open(&format!("{c}:{SENDER_PORT}")).unwrap();
    client.listen_until(Duration::from_secs(5), |h| h.statuses.contains_key(&200));
    assert_eq!(
        client.heard.statuses.get(&200),
        Some(&1),
        "{:?}",
        client.heard
    );
    let (stalled_at, peak) = while_sampling(&t, || {
        // Stalled: no progress for a second.
        let mut last = String::new();
        let stalled = wait_until(Duration::from_secs(20), "the sender blocks", || {
            std::thread::sleep(Duration::from_secs(1));
            let now = sender_said(&progress);
            std::mem::replace(&mut last, now.clone()) == now
        });
        assert!(stalled.is_ok(), "the sender never blocked: {last}");
        bystander_request(&t, "while a client does not read");
        last
    });
    let sent: u64 = stalled_at
        .strip_prefix("sent ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the sender said {stalled_at:?}"));
    eprintln!(
        "slow reader: the sender blocked after {sent} of {total} bytes; node n2 grew {} KiB, \
         {} fds at most",
        grown(peak),
        peak.fds
    );
    assert!(
        sent < total / 4,
        "the sender was not held back: {sent} bytes"
    );
    assert!(grown(peak) < 32 * 1024, "node n2 grew {} KiB", grown(peak));
    // The client goes away: the app's connection is closed, the node lets go of everything.
    drop(client);
    let released = wait_until(Duration::from_secs(10), "the sender stopped", || {
        sender_said(&progress).starts_with("stopped")
    });
    assert!(
        released.is_ok(),
        "the sender said {}",
        sender_said(&progress)
    );
    wait_fds_back(&t, fds_before);

    // The other way round: an app in c that never reads, and a client that pushes DATA past
    // every flow-control window.
    let port = NON_READER_PORT.to_string();
    let out = t.dir.join("non-reader.out");
    start_app(&mut t, "non-reader in c", NON_READER, &[&port], &out);
    let ((pushed, app_released, heard), peak) = while_sampling(&t, || {
        let mut client = RawHbone::connect(&t, &[]);
        let stream = client.open(&format!("{c}:{NON_READER_PORT}")).unwrap();
        client.listen_until(Duration::from_secs(5), |h| h.statuses.contains_key(&200));
        let frame = vec![0u8; FRAME];
        let mut pushed = 0usize;
        while pushed < 64 << 20 && client.send(DATA, 0, stream, &frame).is_ok() {
            pushed += FRAME;
            if pushed.is_multiple_of(1 << 20) {
                client.listen(Duration::from_millis(1));
                if client.heard.closed || client.heard.goaway.is_some() {
                    break;
                }
            }
        }
        // The stream is reset: the app's connection closes even though the app never reads
        // and the client stays connected.
        let app_released = wait_until(Duration::from_secs(5), "app connection closed", || {
            app_connections(&t, NON_READER_PORT) == 0
        });
        bystander_request(&t, "while a client pushes to an app that does not read");
        client.listen(Duration::from_millis(100));
        (pushed, app_released.is_ok(), client.heard)
    });
    eprintln!(
        "pushing past the window: {pushed} bytes pushed, the app's connection released: \
         {app_released}; {heard:?}; node n2 grew {} KiB",
        grown(peak)
    );
    assert_eq!(
        heard.resets.get(&FLOW_CONTROL_ERROR),
        Some(&1),
        "the stream was not reset for breaking flow control: {heard:?}"
    );
    assert!(
        app_released,
        "the app's connection outlived its reset stream"
    );
    // h2 drops what arrives for a reset stream (and gives the connection window back, as
    // HTTP/2 wants), so the client may go on pushing; none of it is kept.
    assert!(grown(peak) < 32 * 1024, "node n2 grew {} KiB", grown(peak));
    wait_fds_back(&t, fds_before);
}

/// A client whose TCP connection stays up but which stops answering (not even PINGs: a peer
/// that crashed behind a NAT, or one holding streams on purpose) is dropped after the ping
/// timeout, and the node lets go of the app connections its streams held. A client that answers
/// its PINGs (node n1's pooled connection) is kept.
#[test]
fn a_client_that_stops_answering_pings_is_dropped() {
    let _serial = common::one_at_a_time();
    let mut t = TestLab::start_with(
        &ambit_lab::LabConfig {
            enrolled: &["a", "c"],
            ..Default::default()
        },
        &["--hbone-ping-interval", "1s", "--hbone-ping-timeout", "1s"],
    );
    t.start_sink("c", SINK_PORT);
    bystander_request(&t, "before the silent client");
    let fds_before = t.node_fds("n2");

    let mut silent = RawHbone::connect(&t, &[]);
    silent
        .open(&format!("{}:{SINK_PORT}", pod("c").ip))
        .unwrap();
    silent.listen_until(Duration::from_secs(5), |h| h.statuses.contains_key(&200));
    assert_eq!(
        silent.heard.statuses.get(&200),
        Some(&1),
        "{:?}",
        silent.heard
    );
    assert_eq!(app_connections(&t, SINK_PORT), 1);

    // From here the client reads but answers nothing.
    let went_silent = Instant::now();
    silent.listen(Duration::from_secs(10));
    assert!(
        silent.heard.closed,
        "the node kept a client that answered no PING for 10 s"
    );
    let dropped_after = went_silent.elapsed();
    assert!(
        dropped_after < Duration::from_secs(6),
        "dropped only after {dropped_after:?} with a 1 s interval and 1 s timeout"
    );
    t.wait_log("n2", "the peer stopped answering PINGs", 1);
    wait_until(
        Duration::from_secs(5),
        "the app connection released",
        || app_connections(&t, SINK_PORT) == 0,
    )
    .unwrap();
    wait_fds_back(&t, fds_before);
    // Node n1's pooled connection answered its PINGs all along and still carries requests.
    bystander_request(&t, "after the silent client was dropped");
}
