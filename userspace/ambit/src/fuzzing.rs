//! Entry points for the fuzz targets in `fuzz/` (cargo-fuzz, nightly) and for the replay of
//! their corpus in `tests/fuzz_corpus.rs` (stable, part of `cargo xtask test`): one function per
//! target, from raw bytes to the code that reads those bytes from outside the node. Both sides
//! call the same function, so a crashing input kept in the corpus stays a regression test.
//!
//! Each function returns the parser's verdict (`Err` naming what is wrong) so the replay can
//! check behaviour; a panic, or a broken invariant asserted here, is what the fuzzer hunts.

use std::{
    future::{poll_fn, Future},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    pin::{pin, Pin},
    task::{Context, Poll},
};

use anyhow::{anyhow, bail, Context as _, Result};
use bytes::Bytes;
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::{
    agent::kubernetes::{
        discovery::{PodLocation, PodLocator},
        model::{build_config, ClusterView},
    },
    config::LocalConfig,
    hbone::{request::check_connect, HboneSettings},
    policy::{Cidr, ConnectionInfo, DestinationWorkload, PolicySet},
    state::{MeshDestination, State},
    tls::{ca::pem, Identity},
};

/// The trust domain the entries build state with.
const TRUST_DOMAIN: &str = "cluster.local";

/// The file source's config (ztunnel's local config plus `ambit:`), then the state built from it
/// for the node of its first workload, then every lookup the data path makes in that state.
pub fn config(data: &[u8]) -> Result<()> {
    let text = std::str::from_utf8(data).context("config is not UTF-8")?;
    let config = LocalConfig::parse(text, "fuzz.yaml")?;
    let node = config.workloads.first().map_or("", |w| w.node.as_str());
    let state = State::from_config(&config, node, TRUST_DOMAIN).context("state from config")?;
    exercise_state(&state);
    Ok(())
}

/// A config file's `policies:` list (a YAML sequence), validated, then evaluated for a
/// destination in each policy's namespace that every policy selects.
pub fn policy(data: &[u8]) -> Result<()> {
    let values: Vec<serde_yaml::Value> =
        serde_yaml::from_slice(data).context("policies are not a YAML sequence")?;
    let set = PolicySet::from_yaml_values(&values)?;
    let keys: Vec<String> = set.iter().map(|p| p.key()).collect();
    for policy in set.iter() {
        let dst = DestinationWorkload {
            namespace: &policy.namespace,
            name: "fuzz",
            selected_policies: &keys,
        };
        for conn in connections() {
            set.evaluate(&dst, &conn);
        }
    }
    Ok(())
}

/// API-server objects as `kubectl get pods,namespaces,services,endpointslices -o json` prints
/// them (a `List`), turned into the config of node `worker` as the Kubernetes source does, then
/// into state.
pub fn kubernetes(data: &[u8]) -> Result<()> {
    #[derive(Deserialize)]
    struct List {
        items: Vec<serde_json::Value>,
    }
    let list: List = serde_json::from_slice(data).context("not a JSON List")?;
    let mut pods: Vec<Pod> = Vec::new();
    let mut namespaces: Vec<Namespace> = Vec::new();
    let mut services: Vec<Service> = Vec::new();
    let mut slices: Vec<EndpointSlice> = Vec::new();
    for (i, item) in list.items.into_iter().enumerate() {
        let kind = item
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or_default()
            .to_owned();
        let at = || format!("items[{i}] ({kind})");
        match kind.as_str() {
            "Pod" => pods.push(serde_json::from_value(item).with_context(at)?),
            "Namespace" => namespaces.push(serde_json::from_value(item).with_context(at)?),
            "Service" => services.push(serde_json::from_value(item).with_context(at)?),
            "EndpointSlice" => slices.push(serde_json::from_value(item).with_context(at)?),
            other => {
                bail!("items[{i}]: kind {other:?} is not Pod, Namespace, Service or EndpointSlice")
            }
        }
    }
    let view = ClusterView {
        pods: pods.iter().collect(),
        namespaces: namespaces.iter().collect(),
        services: services.iter().collect(),
        slices: slices.iter().collect(),
    };
    let config = build_config(&view, "worker", Some("ambit-system/ambit"), &EveryPod);
    let state = State::from_config(&config, "worker", TRUST_DOMAIN)
        .context("state from the cluster's objects")?;
    exercise_state(&state);
    Ok(())
}

/// A plug-in CA's PEM file: its certificates and its private key. `Ok` when both are there (as
/// in a bundle of `ca-cert.pem` and `ca-key.pem`); the error names the first part missing.
pub fn pem(data: &[u8]) -> Result<()> {
    let certs = pem::parse_certs(data, "fuzz.pem");
    let key = pem::parse_key(data, "fuzz.pem");
    certs?;
    key?;
    Ok(())
}

/// A SPIFFE identity (a service's `subjectAltNames`, a peer certificate's URI SAN); what
/// parses prints back to the same text.
pub fn identity(data: &[u8]) -> Result<Identity> {
    let text = std::str::from_utf8(data).context("identity is not UTF-8")?;
    let identity = Identity::parse(text)?;
    assert_eq!(
        identity.to_string(),
        text,
        "an identity prints as it was written"
    );
    Ok(identity)
}

/// An IP range of a policy's `…Ips` fields; what parses prints back to a range that parses to
/// itself and contains its own address.
pub fn cidr(data: &[u8]) -> Result<Cidr> {
    let text = std::str::from_utf8(data).context("IP range is not UTF-8")?;
    let cidr: Cidr = text.parse()?;
    let again: Cidr = cidr.to_string().parse().expect("a printed range parses");
    assert_eq!(again, cidr, "a range prints and parses back to itself");
    assert!(
        cidr.contains(cidr.addr()),
        "{cidr} contains its own address"
    );
    Ok(cidr)
}

/// The address the `hbone_request` entry's connections arrive on; the one local workload has it.
const HBONE_LOCAL: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5)), 15008);

/// An HBONE CONNECT request as h2 hands it to the server: the method on the first line, the
/// request target (for CONNECT, the authority) on the second, then `name: value` header lines
/// (empty ones skipped). A request `http` cannot represent is an error (h2 would have reset the
/// stream); the others get the server's verdict, the status included in the error.
pub fn hbone_request(data: &[u8]) -> Result<SocketAddr> {
    let mut lines = data.split(|b| *b == b'\n');
    let method = lines.next().unwrap_or_default();
    let target = lines.next().unwrap_or_default();
    let mut request = http::Request::builder().method(method).uri(target);
    for line in lines.filter(|line| !line.is_empty()) {
        let (name, value) = match line.iter().position(|b| *b == b':') {
            Some(at) => (&line[..at], line[at + 1..].trim_ascii()),
            None => (line, &b""[..]),
        };
        request = request.header(name, value);
    }
    let request = request
        .body(())
        .map_err(|e| anyhow!("not an HTTP request: {e}"))?;
    let target = check_connect(&request, HBONE_LOCAL, |ip| ip == HBONE_LOCAL.ip())
        .map_err(|(status, why)| anyhow!("{status}: {why}"))?;
    assert_eq!(
        target.ip(),
        HBONE_LOCAL.ip(),
        "only the local pod is a target"
    );
    Ok(target)
}

/// A client's side of an HBONE connection once TLS is up: the HTTP/2 preface and frames, served
/// by h2 with the server's settings ([`HboneSettings::h2_server`]). Every request that arrives
/// gets the server's CONNECT check and a response with its status. Returns the number of
/// requests the check accepted; an error is h2's verdict on the connection.
///
/// The client then goes silent (it does not close: h2 would drop the streams not yet accepted),
/// so the server has nothing left to do once h2 waits for more input; no runtime or timer is
/// involved and every input ends.
pub fn hbone_h2(data: &[u8]) -> Result<usize> {
    futures::executor::block_on(async {
        let handshake = HboneSettings::default()
            .h2_server()
            .handshake::<_, Bytes>(SilentClient { rest: data });
        let mut connection = until_silent(handshake)
            .await
            .context("the client's bytes end within the HTTP/2 preface")?
            .context("HTTP/2 handshake")?;
        let mut accepted = 0;
        while let Some(next) = until_silent(poll_fn(|cx| connection.poll_accept(cx)))
            .await
            .flatten()
        {
            let (request, mut respond) = next.context("HTTP/2")?;
            let status = match check_connect(&request, HBONE_LOCAL, |ip| ip == HBONE_LOCAL.ip()) {
                Ok(_) => {
                    accepted += 1;
                    http::StatusCode::OK
                }
                Err((status, _)) => status,
            };
            let response = http::Response::builder().status(status).body(())?;
            // The client may have reset the stream already: that error is the client's doing.
            let _ = respond.send_response(response, true);
        }
        Ok(accepted)
    })
}

/// The transport under `hbone_h2`'s server: reads give the client's bytes and then nothing
/// ever again (pending), writes are dropped.
struct SilentClient<'a> {
    rest: &'a [u8],
}

impl AsyncRead for SilentClient<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.rest.is_empty() {
            return Poll::Pending; // no waker kept: `until_silent` does not wait
        }
        let n = self.rest.len().min(buf.remaining());
        buf.put_slice(&self.rest[..n]);
        self.rest = &self.rest[n..];
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for SilentClient<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// `future`'s output, or `None` if it waits: over a [`SilentClient`] the only thing h2 can wait
/// for is more input, which never comes.
async fn until_silent<F: Future>(future: F) -> Option<F::Output> {
    let mut future = pin!(future);
    poll_fn(|cx| match future.as_mut().poll(cx) {
        Poll::Ready(output) => Poll::Ready(Some(output)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}

/// Finds every pod (at made-up paths): whether a pod is enrolled then depends on the objects only.
struct EveryPod;

impl PodLocator for EveryPod {
    fn locate(&self, pod_uid: &str, _ips: &[std::net::IpAddr]) -> Option<PodLocation> {
        Some(PodLocation {
            netns: PathBuf::from("/proc/1/ns/net"),
            cgroup: PathBuf::from(format!("/kubepods/pod{pod_uid}")),
        })
    }
}

/// A plaintext and an mTLS connection, to port 80.
fn connections() -> [ConnectionInfo; 2] {
    let ip = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
    let conn = |src_identity| ConnectionInfo {
        src_ip: ip,
        src_identity,
        dst_ip: ip,
        dst_port: 80,
    };
    [
        conn(None),
        conn(Some(Identity::new(TRUST_DOMAIN, "default", "fuzz"))),
    ]
}

/// The lookups the data path makes: every captured destination resolved (with the identities
/// its server may present), every workload's policies evaluated, the config dump rendered.
fn exercise_state(state: &State) {
    for destination in state.mesh_destinations() {
        let dst = match destination {
            MeshDestination::Workload(ip) => {
                let workload = state
                    .workload_by_ip(ip)
                    .expect("a captured address is a workload's");
                for conn in connections() {
                    state.authorize(workload, &conn);
                }
                SocketAddr::new(ip, 80)
            }
            MeshDestination::Service(vip) => vip,
        };
        let _ = state.resolve(dst, None);
    }
    for key in state.enrolled.keys() {
        assert!(
            state.workloads.contains_key(key),
            "enrolled {key} is a workload"
        );
    }
    state.policies_json();
}
