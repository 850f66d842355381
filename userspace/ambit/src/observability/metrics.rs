//! Prometheus metrics with Istio's names and labels (what dashboards for ztunnel already read),
//! plus Ambit's eBPF counters, read from the pinned per-CPU map at each scrape.

use std::sync::{Arc, Mutex};

use ambit_abi::{Counter as EbpfCounter, FastPathCounter};
use aya::maps::{Map, MapData, PerCpuArray};
use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

/// Istio's labels for `istio_tcp_*`. Unknown values render as `unknown`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    // ztunnel's label set, in its order (Istio's dashboards read these).
    pub reporter: String,
    pub source_workload: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_cluster: String,
    pub destination_service: String,
    pub destination_service_namespace: String,
    pub destination_service_name: String,
    pub destination_workload: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_cluster: String,
    pub request_protocol: String,
    pub response_flags: String,
    pub connection_security_policy: String,
    pub source_region: String,
    pub source_zone: String,
    pub destination_region: String,
    pub destination_zone: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EbpfLabels {
    event: String,
}

/// `ambit_fast_path_connections`: one per connection with a loopback hop on this node, by
/// which hop (`outbound`: app → tunnel in the client's pod; `inbound`: tunnel → app in the
/// server's) and what the fast path did (`yes`, `fell_back`, `no`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FastPathLabels {
    pub hop: &'static str,
    pub fast_path: &'static str,
}

/// A pinned per-CPU counter array and the event name of each index.
type EbpfSource = (PerCpuArray<MapData, u64>, Vec<(u32, &'static str)>);

pub struct Metrics {
    registry: Registry,
    pub opened: Family<TcpLabels, Counter>,
    pub closed: Family<TcpLabels, Counter>,
    pub failed: Family<TcpLabels, Counter>,
    pub sent_bytes: Family<TcpLabels, Counter>,
    pub received_bytes: Family<TcpLabels, Counter>,
    pub fast_path: Family<FastPathLabels, Counter>,
    ebpf: Family<EbpfLabels, Counter>,
    ebpf_sources: Mutex<Vec<EbpfSource>>,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::default();
        let opened = Family::<TcpLabels, Counter>::default();
        let closed = Family::<TcpLabels, Counter>::default();
        let failed = Family::<TcpLabels, Counter>::default();
        let sent_bytes = Family::<TcpLabels, Counter>::default();
        let received_bytes = Family::<TcpLabels, Counter>::default();
        let ebpf = Family::<EbpfLabels, Counter>::default();
        let fast_path = Family::<FastPathLabels, Counter>::default();
        // prometheus-client adds the `_total` suffix of counters.
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            closed.clone(),
        );
        registry.register(
            "istio_tcp_connections_failed",
            "TCP connections that failed",
            failed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent during a TCP connection",
            sent_bytes.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received during a TCP connection",
            received_bytes.clone(),
        );
        registry.register(
            "ambit_ebpf_events",
            "Decisions of Ambit's eBPF programs (all CPUs)",
            ebpf.clone(),
        );
        registry.register(
            "ambit_fast_path_connections",
            "Connections by loopback hop and whether the fast path (sk_msg) carried it",
            fast_path.clone(),
        );
        Arc::new(Self {
            registry,
            opened,
            closed,
            failed,
            sent_bytes,
            received_bytes,
            fast_path,
            ebpf,
            ebpf_sources: Mutex::new(Vec::new()),
        })
    }

    /// Reads the eBPF counters from these pinned maps (`COUNTERS`, `FAST_PATH_COUNTERS`) from
    /// now on.
    pub fn watch_ebpf_counters(
        &self,
        counters: &std::path::Path,
        fast_path_counters: &std::path::Path,
    ) -> anyhow::Result<()> {
        let open = |pinned: &std::path::Path| -> anyhow::Result<PerCpuArray<MapData, u64>> {
            let map = Map::from_map_data(MapData::from_pin(pinned)?)?;
            Ok(PerCpuArray::try_from(map)?)
        };
        let mut sources = self.ebpf_sources.lock().unwrap();
        sources.clear();
        sources.push((
            open(counters)?,
            EbpfCounter::ALL
                .iter()
                .map(|c| (*c as u32, c.name()))
                .collect(),
        ));
        sources.push((
            open(fast_path_counters)?,
            FastPathCounter::ALL
                .iter()
                .map(|c| (*c as u32, c.name()))
                .collect(),
        ));
        Ok(())
    }

    /// The OpenMetrics text of everything.
    pub fn render(&self) -> String {
        for (map, counters) in self.ebpf_sources.lock().unwrap().iter() {
            for (index, name) in counters {
                let total: u64 = map.get(index, 0).map(|v| v.iter().sum()).unwrap_or(0);
                let metric = self.ebpf.get_or_create(&EbpfLabels {
                    event: (*name).to_owned(),
                });
                let seen = metric.get();
                if total > seen {
                    metric.inc_by(total - seen);
                }
            }
        }
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}
