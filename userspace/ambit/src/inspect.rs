//! `ambit inspect`: what the kernel holds for a node, read from its pins, in plain words. Works
//! while the node runs and after it stopped.

use std::{fs, net::SocketAddr};

use ambit_abi::{
    map_names as m, Counter, DestinationKey, EnrolledPod, FastPathCounter, InboundPod, IpKey,
    MeshDestination, DESTINATION_KIND_SERVICE,
};
use anyhow::{bail, Context as _, Result};
use aya::maps::{HashMap, Map, MapData, PerCpuArray};

use crate::datapath::{ip_from_key, pins::PinLayout};

pub fn print(pins: &PinLayout) -> Result<()> {
    if !pins.root().exists() {
        bail!(
            "nothing pinned at {}: is this node's name right?",
            pins.root().display()
        );
    }
    println!("pins: {}", pins.root().display());

    println!("\npods with capture attached:");
    for pod in pins.pinned_pods()? {
        let dir = pins.pod_dir(&pod);
        let mut programs: Vec<String> = fs::read_dir(&dir)?
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect();
        programs.sort();
        println!("  {pod}: {}", programs.join(", "));
    }

    let enrolled: HashMap<MapData, u64, EnrolledPod> = open(pins, m::ENROLLED_NETNS)?;
    println!("\nenrolled network namespaces (cookie → outbound port):");
    for entry in enrolled.iter() {
        let (cookie, pod) = entry?;
        println!("  netns {cookie} → 127.0.0.1:{}", pod.outbound_port);
    }

    let inbound: HashMap<MapData, IpKey, InboundPod> = open(pins, m::INBOUND_PODS)?;
    println!("\npod addresses with inbound capture:");
    for key in inbound.keys() {
        println!("  {}", ip_from_key(key?));
    }

    let node: HashMap<MapData, IpKey, u32> = open(pins, m::NODE_ADDRESSES)?;
    println!("\nnode addresses whose connections reach the apps directly (kubelet probes):");
    for key in node.keys() {
        println!("  node {}", ip_from_key(key?));
    }

    let mesh: HashMap<MapData, DestinationKey, MeshDestination> = open(pins, m::MESH_DESTINATIONS)?;
    let mut lines: Vec<String> = Vec::new();
    for entry in mesh.iter() {
        let (key, dest) = entry?;
        let ip = ip_from_key(key.ip);
        lines.push(if dest.kind == DESTINATION_KIND_SERVICE {
            format!("  service {}", SocketAddr::new(ip, key.port))
        } else {
            format!("  workload {ip} (every port)")
        });
    }
    lines.sort();
    println!("\nmesh destinations the kernel captures ({}):", lines.len());
    for line in lines {
        println!("{line}");
    }

    let counters: PerCpuArray<MapData, u64> = open(pins, m::COUNTERS)?;
    println!("\ncounters (all CPUs):");
    for counter in Counter::ALL {
        let total: u64 = counters.get(&(counter as u32), 0)?.iter().sum();
        println!("  {:<32} {total}", counter.name());
    }
    // Pinned by Ambit versions with the fast path (absent before).
    if let Ok(fast) = open::<PerCpuArray<MapData, u64>>(pins, m::FAST_PATH_COUNTERS) {
        for counter in FastPathCounter::ALL {
            let total: u64 = fast.get(&(counter as u32), 0)?.iter().sum();
            println!("  {:<32} {total}", counter.name());
        }
    }
    Ok(())
}

fn open<T>(pins: &PinLayout, name: &str) -> Result<T>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    let path = pins.map(name);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let map = Map::from_map_data(data).with_context(|| format!("reading {}", path.display()))?;
    T::try_from(map).with_context(|| format!("{} has an unexpected layout", path.display()))
}
