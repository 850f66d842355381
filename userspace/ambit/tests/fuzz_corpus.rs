//! The fuzz corpus (`fuzz/corpus/<target>/`), replayed on stable through the same entry points
//! the cargo-fuzz targets call (`ambit::fuzzing`): every seed and every crash ever kept there
//! must go on parsing without a panic. One seed per target is checked for its verdict too, a
//! good one accepted and a bad one refused with an error that names the problem, so a parser
//! that started accepting or refusing everything would fail here.
//!
//! No lab, no root: this runs in `cargo test` and `cargo xtask test`.

use std::{
    fmt::Debug,
    panic::{catch_unwind, AssertUnwindSafe},
    path::{Path, PathBuf},
};

use ambit::fuzzing;

/// `fuzz/corpus/<target>`.
fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

/// Runs every file of `target`'s corpus through `entry`; fails naming each file that panics.
fn replay<T>(target: &str, entry: fn(&[u8]) -> anyhow::Result<T>) {
    let dir = corpus_dir(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("a corpus entry").path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} has no seeds", dir.display());
    let panicked: Vec<String> = files
        .iter()
        .filter(|file| {
            let data = std::fs::read(file).expect("reading a seed");
            catch_unwind(AssertUnwindSafe(|| entry(&data))).is_err()
        })
        .map(|file| file.display().to_string())
        .collect();
    assert!(panicked.is_empty(), "these inputs panic: {panicked:#?}");
}

/// The verdict on one seed of `target`'s corpus.
fn verdict<T>(
    target: &str,
    seed: &str,
    entry: fn(&[u8]) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let path = corpus_dir(target).join(seed);
    let data = std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    entry(&data)
}

/// `good` is accepted and `bad` refused with an error containing each of `named`.
fn accepts_and_refuses<T: Debug>(
    target: &str,
    entry: fn(&[u8]) -> anyhow::Result<T>,
    good: &str,
    bad: &str,
    named: &[&str],
) {
    if let Err(e) = verdict(target, good, entry) {
        panic!("{target}/{good} is refused: {e:#}");
    }
    let err = match verdict(target, bad, entry) {
        Ok(accepted) => panic!("{target}/{bad} is accepted: {accepted:?}"),
        Err(e) => format!("{e:#}"),
    };
    for part in named {
        assert!(
            err.contains(part),
            "{target}/{bad}: {err:?} does not name {part:?}"
        );
    }
}

#[test]
fn config_corpus() {
    replay("config", fuzzing::config);
    accepts_and_refuses(
        "config",
        fuzzing::config,
        "lab-hbone-policies.yaml",
        "bad-duplicate-ip.yaml",
        &["10.0.0.1", "d/a"],
    );
}

#[test]
fn policy_corpus() {
    replay("policy", fuzzing::policy);
    accepts_and_refuses(
        "policy",
        fuzzing::policy,
        "every-field.yaml",
        "bad-spiffe-principal.yaml",
        &["ns/p", "principals[0]", "spiffe://"],
    );
}

#[test]
fn kubernetes_corpus() {
    replay("kubernetes", fuzzing::kubernetes);
    accepts_and_refuses(
        "kubernetes",
        fuzzing::kubernetes,
        "cluster-list.json",
        "bad-unknown-kind.json",
        &["items[0]", "ConfigMap"],
    );
}

#[test]
fn pem_corpus() {
    replay("pem", fuzzing::pem);
    accepts_and_refuses(
        "pem",
        fuzzing::pem,
        "ca-bundle-p384-sec1.pem",
        "bad-der.pem",
        &["certificate #1 is not valid X.509"],
    );
}

#[test]
fn identity_corpus() {
    replay("identity", fuzzing::identity);
    accepts_and_refuses(
        "identity",
        fuzzing::identity,
        "sleep.txt",
        "bad-empty-sa.txt",
        &["spiffe://cluster.local/ns/default/sa/", "expected"],
    );
}

#[test]
fn cidr_corpus() {
    replay("cidr", fuzzing::cidr);
    accepts_and_refuses(
        "cidr",
        fuzzing::cidr,
        "v6-range.txt",
        "bad-prefix-length.txt",
        &["10.0.0.0/33", "prefix"],
    );
}

#[test]
fn hbone_request_corpus() {
    replay("hbone_request", fuzzing::hbone_request);
    accepts_and_refuses(
        "hbone_request",
        fuzzing::hbone_request,
        "connect-local-pod.txt",
        "connect-tunnel-port.txt",
        &["503", "tunnel port"],
    );
}

#[test]
fn hbone_h2_corpus() {
    replay("hbone_h2", fuzzing::hbone_h2);
    accepts_and_refuses(
        "hbone_h2",
        fuzzing::hbone_h2,
        "connect-with-data.bin",
        "bad-preface.bin",
        &["HTTP/2 handshake"],
    );
    let accepted = verdict("hbone_h2", "connect-with-data.bin", fuzzing::hbone_h2).unwrap();
    assert_eq!(accepted, 1, "the one CONNECT to the local pod is accepted");
}
