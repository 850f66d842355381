//! Shared set-up for the privileged integration tests: a lab of its own per test (unique
//! prefix), Ambit nodes started on it, and helpers to read their logs.

#![allow(dead_code)]

use std::{
    fs,
    path::{Path, PathBuf},
    process::Output,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use ambit_lab::{wait_until, write_atomically, Lab};

pub const AMBIT: &str = env!("CARGO_BIN_EXE_ambit");

/// Prefix of every test lab: `cargo xtask test` sweeps leftovers with it.
pub const TEST_PREFIX: &str = "ambit-t";

pub struct TestLab {
    pub lab: Lab,
    pub dir: PathBuf,
    pub config: PathBuf,
}

impl TestLab {
    /// A fresh lab with HTTP servers in pods c (8080) and d (8080), and an Ambit node per lab
    /// node, with `enrolled` pods in ambient mode.
    pub fn start(enrolled: &[&str]) -> TestLab {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let prefix = format!(
            "{TEST_PREFIX}{}x{}",
            std::process::id() % 100_000,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut lab = Lab::create(&prefix).expect("creating the lab");
        let dir = std::env::temp_dir().join(&prefix);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("www")).unwrap();
        fs::write(dir.join("www/index.html"), "hello from pod c\n").unwrap();
        let config = dir.join("lab.yaml");
        fs::write(&config, lab.config_yaml(enrolled)).unwrap();
        for pod in ["c", "d"] {
            lab.start_http_server(pod, 8080, &dir.join("www")).unwrap();
        }
        for node in ["n1", "n2"] {
            lab.start_node(Path::new(AMBIT), node, &config, &dir.join(format!("{node}.log")))
                .unwrap();
        }
        TestLab { lab, dir, config }
    }

    pub fn log(&self, node: &str) -> String {
        fs::read_to_string(self.dir.join(format!("{node}.log"))).unwrap_or_default()
    }

    /// Waits until a node's log contains `needle` at least `count` times.
    pub fn wait_log(&self, node: &str, needle: &str, count: usize) {
        let ok = wait_until(Duration::from_secs(10), needle, || {
            self.log(node).matches(needle).count() >= count
        });
        if let Err(e) = ok {
            panic!("{e}\n--- log of {node} ---\n{}", self.log(node));
        }
    }

    /// Rewrites the config (atomically, as an editor would) and waits for `node` to apply it.
    pub fn set_enrolled(&self, node: &str, enrolled: &[&str]) {
        let before = self.log(node).matches("config applied").count();
        write_atomically(&self.config, &self.lab.config_yaml(enrolled)).unwrap();
        self.wait_log(node, "config applied", before + 1);
    }

    pub fn curl(&self, pod: &str, url: &str) -> Output {
        self.lab
            .run_in_pod(pod, "curl", &["-sS", "--max-time", "10", url])
            .unwrap()
    }

    pub fn bpftool(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("bpftool").args(args).output().unwrap();
        assert!(out.status.success(), "bpftool {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for TestLab {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
}
