//! `bench-relay`, the relay mode's proxy, relays what a tunnel hop must: every byte both ways
//! and the half-close, through two chained relays as in the benchmark (on loopback here).

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Shutdown, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    thread,
};

/// A relay process, killed when dropped (also when an assertion fails).
struct Relay(Child);

impl Relay {
    fn start(pairs: &[String]) -> Relay {
        let mut child = Command::new(env!("CARGO_BIN_EXE_bench-relay"))
            .arg("1")
            .args(pairs)
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting bench-relay");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "listening");
        Relay(child)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn two_chained_relays_carry_every_byte_and_the_half_close() {
    // The server echoes everything, then answers the client's half-close with "bye" and
    // its own close.
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let server_port = server.local_addr().unwrap().port();
    let echo = thread::spawn(move || {
        let (mut conn, _) = server.accept().unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = conn.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            conn.write_all(&buf[..n]).unwrap();
        }
        conn.write_all(b"bye").unwrap();
    });
    let (first, second) = (free_port(), free_port());
    let _server_side = Relay::start(&[format!("127.0.0.1:{second}=127.0.0.1:{server_port}")]);
    let _client_side = Relay::start(&[format!("127.0.0.1:{first}=127.0.0.1:{second}")]);

    let mut client = TcpStream::connect(("127.0.0.1", first)).unwrap();
    let sent: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let mut writer = client.try_clone().unwrap();
    let to_send = sent.clone();
    let sender = thread::spawn(move || {
        writer.write_all(&to_send).unwrap();
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let mut received = Vec::new();
    client.read_to_end(&mut received).unwrap();
    sender.join().unwrap();
    echo.join().unwrap();
    assert_eq!(received.len(), sent.len() + 3);
    assert!(received[..sent.len()] == sent[..], "the echo differs");
    assert_eq!(&received[sent.len()..], b"bye");
}

#[test]
fn a_bad_pair_is_named() {
    let out = Command::new(env!("CARGO_BIN_EXE_bench-relay"))
        .args(["1", "127.0.0.1:1=nowhere"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("\"nowhere\""), "{err}");
}
