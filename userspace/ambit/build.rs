//! Builds the eBPF programs (ebpf/ambit-ebpf) for bpfel-unknown-none with the nightly toolchain
//! and bpf-linker, so that a plain `cargo build` builds everything. The object is embedded in
//! the `ambit` binary (see src/datapath/loader.rs). Also generates the gRPC stubs of istiod's two
//! services (src/xds) from the hand-written messages in src/xds/proto.rs, without protoc.
use anyhow::{anyhow, Context as _};
use tonic_build::manual::{Builder, Method, Service};

/// The dated nightly the eBPF crate is built with (`-Z build-std=core`). Pinned, not floating:
/// bpf-linker 0.10.3 loads that nightly's own libLLVM, and a newer nightly ships another LLVM
/// major. `cargo xtask setup` installs it; see the README's "Kernel" section.
const NIGHTLY: &str = include_str!("../../ebpf/nightly-toolchain");

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=../../ebpf/nightly-toolchain");
    istiod_grpc_stubs();
    // Compact relative relocations (DT_RELR): the position-independent binary's 800 KiB
    // `.rela.dyn` shrinks to a few KiB. The loader reads all of it at every start, so it stayed
    // resident: ≈ 0.8 MiB of the node's idle RSS. Needs binutils ≥ 2.38 or lld to link and
    // glibc ≥ 2.36 to run (Debian bookworm, the image's base, has both).
    println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .iter()
        .find(|p| p.name.as_str() == "ambit-ebpf")
        .ok_or_else(|| anyhow!("package ambit-ebpf not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("ambit-ebpf manifest has no parent directory"))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(NIGHTLY.trim()),
    )
}

/// Client and server stubs of the two gRPC services istiod serves a node proxy:
/// `envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources` (delta
/// xDS, a bidirectional stream) and `istio.v1.auth.IstioCertificateService/CreateCertificate`.
fn istiod_grpc_stubs() {
    const PROTO: &str = "crate::xds::proto";
    let codec = "tonic_prost::ProstCodec";
    let ads = Service::builder()
        .name("AggregatedDiscoveryService")
        .package("envoy.service.discovery.v3")
        .method(
            Method::builder()
                .name("delta_aggregated_resources")
                .route_name("DeltaAggregatedResources")
                .input_type(format!("{PROTO}::discovery::DeltaDiscoveryRequest"))
                .output_type(format!("{PROTO}::discovery::DeltaDiscoveryResponse"))
                .codec_path(codec)
                .client_streaming()
                .server_streaming()
                .build(),
        )
        .build();
    let ca = Service::builder()
        .name("IstioCertificateService")
        .package("istio.v1.auth")
        .method(
            Method::builder()
                .name("create_certificate")
                .route_name("CreateCertificate")
                .input_type(format!("{PROTO}::ca::IstioCertificateRequest"))
                .output_type(format!("{PROTO}::ca::IstioCertificateResponse"))
                .codec_path(codec)
                .build(),
        )
        .build();
    Builder::new().build_transport(false).compile(&[ads, ca]);
}
