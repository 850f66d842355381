//! The protobuf messages exchanged with istiod, written by hand as prost structs so that the build
//! needs neither protoc nor a build script.
//!
//! Field numbers and types follow the `.proto` files ztunnel builds from (`workload.proto`,
//! `authorization.proto`, `xds.proto`) and Istio's `security/v1alpha1/ca.proto`; they are the wire
//! contract with istiod, so a tag here is never renumbered, only added. Every upstream field is
//! present even where Ambit ignores it, so nothing istiod sends is dropped unseen.
//! Message and enum names follow what prost-build would generate, so code reads like the generated
//! code of other implementations.
//!
//! One Rust module per protobuf package; the package is part of the type URL of a resource packed
//! in an `Any` and of the gRPC method path, so it matters for [`ADDRESS_TYPE_URL`],
//! [`AUTHORIZATION_TYPE_URL`], [`DELTA_ADS_PATH`] and [`CREATE_CERTIFICATE_PATH`].

/// Type URL of the `Address` resources (workloads and services) on the delta xDS stream.
pub const ADDRESS_TYPE_URL: &str = "type.googleapis.com/istio.workload.Address";
/// Type URL of the `Authorization` resources (L4 authorization policies) on the delta xDS stream.
pub const AUTHORIZATION_TYPE_URL: &str = "type.googleapis.com/istio.security.Authorization";
/// gRPC method of the bidirectional delta aggregated discovery stream.
pub const DELTA_ADS_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";
/// gRPC method (unary) that signs a CSR into a workload certificate.
pub const CREATE_CERTIFICATE_PATH: &str =
    "/istio.v1.auth.IstioCertificateService/CreateCertificate";

/// `envoy.service.discovery.v3`: the delta xDS stream, with the fields ztunnel's copy keeps
/// (Envoy's own files have more, which a decoder here skips as unknown fields).
///
/// ztunnel's copy declares `Node` and `Status` in this package rather than in
/// `envoy.config.core.v3` and `google.rpc`. Neither travels inside an `Any`, so the package does
/// not reach the wire: the encoding is the same as Envoy's `Node` (for the fields kept) and
/// `google.rpc.Status`.
pub mod discovery {
    /// Error report attached to a NACK; wire-identical to `google.rpc.Status`.
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct Status {
        /// A `google.rpc.Code` value.
        #[prost(int32, tag = "1")]
        pub code: i32,
        #[prost(string, tag = "2")]
        pub message: ::prost::alloc::string::String,
        #[prost(message, repeated, tag = "3")]
        pub details: ::prost::alloc::vec::Vec<::prost_types::Any>,
    }

    /// The client's identity, sent with a stream's requests.
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct Node {
        /// Istio parses this as `type~ip~pod.namespace~namespace.svc.cluster.local`.
        #[prost(string, tag = "1")]
        pub id: ::prost::alloc::string::String,
        #[prost(string, tag = "2")]
        pub cluster: ::prost::alloc::string::String,
        /// Proxy metadata (pod name, namespace, IPs, node name, ...), read by istiod.
        #[prost(message, optional, tag = "3")]
        pub metadata: ::core::option::Option<::prost_types::Struct>,
        // Tag 4 (locality) is left out of ztunnel's copy.
        /// Retired in Envoy's v3 `Node` (istiod ignores it); kept because ztunnel's copy has it.
        #[prost(string, tag = "5")]
        pub build_version: ::prost::alloc::string::String,
    }

    /// A client message on the delta stream: a subscription change, an ACK or a NACK.
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct DeltaDiscoveryRequest {
        #[prost(message, optional, tag = "1")]
        pub node: ::core::option::Option<Node>,
        #[prost(string, tag = "2")]
        pub type_url: ::prost::alloc::string::String,
        #[prost(string, repeated, tag = "3")]
        pub resource_names_subscribe: ::prost::alloc::vec::Vec<::prost::alloc::string::String>,
        #[prost(string, repeated, tag = "4")]
        pub resource_names_unsubscribe: ::prost::alloc::vec::Vec<::prost::alloc::string::String>,
        /// Resource name to version already held, sent in the first request of a type after a
        /// reconnect so the server can skip what the client has.
        #[prost(map = "string, string", tag = "5")]
        pub initial_resource_versions: ::std::collections::HashMap<
            ::prost::alloc::string::String,
            ::prost::alloc::string::String,
        >,
        /// The nonce of the response being ACKed or NACKed; empty otherwise.
        #[prost(string, tag = "6")]
        pub response_nonce: ::prost::alloc::string::String,
        /// Set only on a NACK.
        #[prost(message, optional, tag = "7")]
        pub error_detail: ::core::option::Option<Status>,
    }

    /// A server message on the delta stream: resources added or changed, and names removed.
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct DeltaDiscoveryResponse {
        /// For debugging only.
        #[prost(string, tag = "1")]
        pub system_version_info: ::prost::alloc::string::String,
        #[prost(message, repeated, tag = "2")]
        pub resources: ::prost::alloc::vec::Vec<Resource>,
        #[prost(string, tag = "4")]
        pub type_url: ::prost::alloc::string::String,
        #[prost(string, repeated, tag = "6")]
        pub removed_resources: ::prost::alloc::vec::Vec<::prost::alloc::string::String>,
        /// Echoed in the `response_nonce` of the ACK or NACK for this response.
        #[prost(string, tag = "5")]
        pub nonce: ::prost::alloc::string::String,
    }

    /// One named, versioned resource of a delta response.
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct Resource {
        #[prost(string, tag = "3")]
        pub name: ::prost::alloc::string::String,
        /// Other names the resource is known by (for addresses, `network/IP` keys).
        #[prost(string, repeated, tag = "4")]
        pub aliases: ::prost::alloc::vec::Vec<::prost::alloc::string::String>,
        #[prost(string, tag = "1")]
        pub version: ::prost::alloc::string::String,
        /// The resource itself; its type URL matches the response's `type_url`.
        #[prost(message, optional, tag = "2")]
        pub resource: ::core::option::Option<::prost_types::Any>,
        /// If set, the resource is dropped when not refreshed within this time.
        #[prost(message, optional, tag = "6")]
        pub ttl: ::core::option::Option<::prost_types::Duration>,
        #[prost(message, optional, tag = "7")]
        pub cache_control: ::core::option::Option<resource::CacheControl>,
    }

    /// Nested types of [`Resource`].
    pub mod resource {
        /// Caching hints for xDS proxies (not for the end client, which always keeps resources).
        #[derive(Clone, PartialEq, ::prost::Message)]
        pub struct CacheControl {
            #[prost(bool, tag = "1")]
            pub do_not_cache: bool,
        }
    }
}

/// `istio.workload`: workloads and services, both delivered as [`Address`](workload::Address).
pub mod workload {
    /// One xDS resource of type [`ADDRESS_TYPE_URL`](super::ADDRESS_TYPE_URL): a workload or a
    /// service, named by its primary key and aliased by its `network/IP` pairs.
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct Address {
        #[prost(oneof = "address::Type", tags = "1, 2")]
        pub r#type: ::core::option::Option<address::Type>,
    }

    /// Nested types of [`Address`].
    pub mod address {
        /// What the address is.
        // Unboxed: an Address lives only while it is converted into Ambit's own state, so the
        // size gap costs nothing, and a box would cost an allocation per decoded resource.
        #[allow(clippy::large_enum_variant)]
        #[derive(Clone, PartialEq, ::prost::Oneof)]
        pub enum Type {
            #[prost(message, tag = "1")]
            Workload(super::Workload),
            #[prost(message, tag = "2")]
            Service(super::Service),
        }
    }

    impl ::prost::Name for Address {
        const NAME: &'static str = "Address";
        const PACKAGE: &'static str = "istio.workload";
        fn full_name() -> ::prost::alloc::string::String {
            "istio.workload.Address".into()
        }
        fn type_url() -> ::prost::alloc::string::String {
            super::ADDRESS_TYPE_URL.into()
        }
    }

    /// A group of workloads reachable together; the primary key is `namespace/hostname`.
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct Service {
        #[prost(string, tag = "1")]
        pub name: ::prost::alloc::string::String,
        #[prost(string, tag = "2")]
        pub namespace: ::prost::alloc::string::String,
        /// The FQDN, e.g. `name.namespace.svc.cluster.local`.
        #[prost(string, tag = "3")]
        pub hostname: ::prost::alloc::string::String,
        /// The VIPs, one per network and IP family; empty for a headless service.
        #[prost(message, repeated, tag = "4")]
        pub addresses: ::prost::alloc::vec::Vec<NetworkAddress>,
        /// Service ports; a workload may override the target port (`Workload::services`).
        #[prost(message, repeated, tag = "5")]
        pub ports: ::prost::alloc::vec::Vec<Port>,
        /// Identities to accept from the backends instead of each workload's own.
        #[prost(string, repeated, tag = "6")]
        pub subject_alt_names: ::prost::alloc::vec::Vec<::prost::alloc::string::String>,
        #[prost(message, optional, tag = "7")]
        pub waypoint: ::core::option::Option<GatewayAddress>,
        /// Endpoint selection when connecting to workloads directly (not through a waypoint).
        #[prost(message, optional, tag = "8")]
        pub load_balancing: ::core::option::Option<LoadBalancing>,
        #[prost(enumeration = "IpFamilies", tag = "9")]
        pub ip_families: i32,
        #[prost(message, repeated, tag = "10")]
        pub extensions: ::prost::alloc::vec::Vec<Extension>,
        /// Wins a hostname lookup from a namespace that has no service of that name.
        #[prost(bool, tag = "11")]
        pub canonical: bool,
    }

    /// The IP families a service is served on.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, ::prost::Enumeration)]
    #[repr(i32)]
    pub enum IpFamilies {
        /// Inferred from the service's addresses.
        Automatic = 0,
        Ipv4Only = 1,
        Ipv6Only = 2,
        Dual = 3,
    }

    /// How a workload's addresses identify it.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, ::prost::Enumeration)]
    #[repr(i32)]
    pub enum NetworkMode {
        /// The address is unique within the workload's network.
        Standard = 0,
        /// The address is shared (host network): it must not be used to look the workload up.
        HostNetwork = 1,
    }

    /// Locality-aware endpoint selection for a service.
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct LoadBalancing {
        /// Scopes to keep traffic within, most important first.
        #[prost(enumeration = "load_balancing::Scope", repeated, tag = "1")]
        pub routing_preference: ::prost::alloc::vec::Vec<i32>,
        #[prost(enumeration = "load_balancing::Mode", tag = "2")]
        pub mode: i32,
        #[prost(enumeration = "load_balancing::HealthPolicy", tag = "3")]
        pub health_policy: i32,
        /// How connections to DNS-resolved endpoints are made.
        #[prost(enumeration = "load_balancing::DnsConnectStrategy", tag = "4")]
        pub dns_connect_strategy: i32,
    }

    /// Nested types of [`LoadBalancing`].
    pub mod load_balancing {
        /// A locality level that endpoints can share with the client.
        #[derive(
            Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, ::prost::Enumeration,
        )]
        #[repr(i32)]
        pub enum Scope {
            UnspecifiedScope = 0,
            Region = 1,
            Zone = 2,
            Subzone = 3,
            Node = 4,
            Cluster = 5,
            Network = 6,
        }

        /// How `routing_preference` is applied.
        #[derive(
            Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, ::prost::Enumeration,
        )]
        #[repr(i32)]
        pub enum Mode {
            UnspecifiedMode = 0,
            /// Only endpoints matching every preference; none otherwise.
            Strict = 1,
            /// Best match first, then progressively fewer matching preferences, then any.
            Failover = 2,
            /// No endpoint selection: connect to the original destination address.
            Passthrough = 3,
        }

        /// Which endpoints are eligible.
        #[derive(
            Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, ::prost::Enumeration,
        )]
        #[repr(i32)]
        pub enum HealthPolicy {
            OnlyHealthy = 0,
            AllowAll = 1,
        }

        /// Connection strategy for endpoints behind a DNS name.
        #[derive(
            Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, ::prost::Enumeration,
        )]
        #[repr(i32)]
        pub enum DnsConnectStrategy {
            /// One address picked at random from the DNS answer.
            Default = 0,
            /// Connect to every resolved address at once, keep the first to succeed.
            FirstHealthyRace = 1,
        }
    }

    /// An endpoint (or a set of them behind a hostname); the primary key is `uid`.
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct Workload {
        /// Opaque, globally unique; for Kubernetes `cluster/group/kind/namespace/name[/section]`.
        #[prost(string, tag = "20")]
        pub uid: ::prost::alloc::string::String,
        /// Informational only (may be elided).
        #[prost(string, tag = "1")]
        pub name: ::prost::alloc::string::String,
        /// Informational only (may be elided).
        #[prost(string, tag = "2")]
        pub namespace: ::prost::alloc::string::String,
        /// IPv4 (4 bytes) or IPv6 (16 bytes) addresses, without ports.
        #[prost(bytes = "vec", repeated, tag = "3")]
        pub addresses: ::prost::alloc::vec::Vec<::prost::alloc::vec::Vec<u8>>,
        /// A DNS name to resolve when the workload has no addresses.
        #[prost(string, tag = "21")]
        pub hostname: ::prost::alloc::string::String,
        /// Empty for the default network.
        #[prost(string, tag = "4")]
        pub network: ::prost::alloc::string::String,
        #[prost(enumeration = "TunnelProtocol", tag = "5")]
        pub tunnel_protocol: i32,
        /// SPIFFE identity part; empty means the mesh's default (usually `cluster.local`).
        #[prost(string, tag = "6")]
        pub trust_domain: ::prost::alloc::string::String,
        /// SPIFFE identity part; empty means `default`.
        #[prost(string, tag = "7")]
        pub service_account: ::prost::alloc::string::String,
        /// If set, inbound traffic must come through this waypoint.
        #[prost(message, optional, tag = "8")]
        pub waypoint: ::core::option::Option<GatewayAddress>,
        /// The east-west gateway through which other networks reach this workload.
        #[prost(message, optional, tag = "19")]
        pub network_gateway: ::core::option::Option<GatewayAddress>,
        /// The Kubernetes node the workload runs on.
        #[prost(string, tag = "9")]
        pub node: ::prost::alloc::string::String,
        /// Telemetry label.
        #[prost(string, tag = "10")]
        pub canonical_name: ::prost::alloc::string::String,
        /// Telemetry label.
        #[prost(string, tag = "11")]
        pub canonical_revision: ::prost::alloc::string::String,
        #[prost(enumeration = "WorkloadType", tag = "12")]
        pub workload_type: i32,
        /// Name of the owning object of kind `workload_type`; telemetry label.
        #[prost(string, tag = "13")]
        pub workload_name: ::prost::alloc::string::String,
        /// The workload sends and receives `tunnel_protocol` traffic itself: do not tunnel its
        /// outbound traffic again, do not de-tunnel its inbound traffic.
        #[prost(bool, tag = "14")]
        pub native_tunnel: bool,
        /// How the workload wants to receive traffic after the last tunnel hop.
        #[prost(message, optional, tag = "23")]
        pub application_tunnel: ::core::option::Option<ApplicationTunnel>,
        /// Services this workload backs, keyed `namespace/hostname`, with per-service ports.
        #[prost(map = "string, message", tag = "22")]
        pub services: ::std::collections::HashMap<::prost::alloc::string::String, PortList>,
        /// Keys (`namespace/name`) of the selector-based policies that apply; namespace- and
        /// mesh-wide policies are not listed.
        #[prost(string, repeated, tag = "16")]
        pub authorization_policies: ::prost::alloc::vec::Vec<::prost::alloc::string::String>,
        #[prost(enumeration = "WorkloadStatus", tag = "17")]
        pub status: i32,
        #[prost(string, tag = "18")]
        pub cluster_id: ::prost::alloc::string::String,
        #[prost(message, optional, tag = "24")]
        pub locality: ::core::option::Option<Locality>,
        #[prost(enumeration = "NetworkMode", tag = "25")]
        pub network_mode: i32,
        #[prost(message, repeated, tag = "26")]
        pub extensions: ::prost::alloc::vec::Vec<Extension>,
        /// Relative traffic weight among a service's endpoints; unset means 1.
        #[prost(message, optional, tag = "27")]
        pub capacity: ::core::option::Option<u32>,
        // Tag 15 (the former `virtual_ips` map) is reserved upstream.
    }

    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct Locality {
        #[prost(string, tag = "1")]
        pub region: ::prost::alloc::string::String,
        #[prost(string, tag = "2")]
        pub zone: ::prost::alloc::string::String,
        #[prost(string, tag = "3")]
        pub subzone: ::prost::alloc::string::String,
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, ::prost::Enumeration)]
    #[repr(i32)]
    pub enum WorkloadStatus {
        Healthy = 0,
        Unhealthy = 1,
    }

    /// Kind of the object owning a workload (telemetry).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, ::prost::Enumeration)]
    #[repr(i32)]
    pub enum WorkloadType {
        Deployment = 0,
        Cronjob = 1,
        Pod = 2,
        Job = 3,
    }

    /// The ports of one service as served by one workload.
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct PortList {
        #[prost(message, repeated, tag = "1")]
        pub ports: ::prost::alloc::vec::Vec<Port>,
    }

    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct Port {
        /// The port clients connect to.
        #[prost(uint32, tag = "1")]
        pub service_port: u32,
        /// The port the workload listens on.
        #[prost(uint32, tag = "2")]
        pub target_port: u32,
    }

    /// How traffic to a workload is tunneled.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, ::prost::Enumeration)]
    #[repr(i32)]
    pub enum TunnelProtocol {
        /// Plain TCP, forwarded as is.
        None = 0,
        /// HTTP CONNECT over mutual TLS (port 15008).
        Hbone = 1,
    }

    /// A workload (for instance a sandwiched waypoint) that consumes tunnel metadata itself.
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct ApplicationTunnel {
        #[prost(enumeration = "application_tunnel::Protocol", tag = "1")]
        pub protocol: i32,
        /// If non-zero, the port to deliver to after the last tunnel hop.
        #[prost(uint32, tag = "2")]
        pub port: u32,
    }

    /// Nested types of [`ApplicationTunnel`].
    pub mod application_tunnel {
        #[derive(
            Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, ::prost::Enumeration,
        )]
        #[repr(i32)]
        pub enum Protocol {
            /// The inner stream's bytes, unchanged.
            None = 0,
            /// A PROXY protocol header first, with TLVs 0xD0 (source SPIFFE identity) and 0xD1
            /// (target service hostname).
            Proxy = 1,
        }
    }

    /// Where a waypoint or an east-west gateway is reached.
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct GatewayAddress {
        #[prost(oneof = "gateway_address::Destination", tags = "1, 2")]
        pub destination: ::core::option::Option<gateway_address::Destination>,
        /// The gateway's HBONE (mutual TLS) port.
        #[prost(uint32, tag = "3")]
        pub hbone_mtls_port: u32,
        // Tag 4 (`hbone_single_tls_port`) is reserved upstream.
    }

    /// Nested types of [`GatewayAddress`].
    pub mod gateway_address {
        #[derive(Clone, PartialEq, ::prost::Oneof)]
        pub enum Destination {
            /// A service, to be resolved through the `Service` resources.
            #[prost(message, tag = "1")]
            Hostname(super::NamespacedHostname),
            #[prost(message, tag = "2")]
            Address(super::NetworkAddress),
        }
    }

    /// An IP address within a network.
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct NetworkAddress {
        #[prost(string, tag = "1")]
        pub network: ::prost::alloc::string::String,
        /// 4 or 16 bytes.
        #[prost(bytes = "vec", tag = "2")]
        pub address: ::prost::alloc::vec::Vec<u8>,
    }

    /// A service named by namespace and hostname.
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct NamespacedHostname {
        #[prost(string, tag = "1")]
        pub namespace: ::prost::alloc::string::String,
        #[prost(string, tag = "2")]
        pub hostname: ::prost::alloc::string::String,
    }

    /// Opaque extra configuration attached to an object.
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct Extension {
        /// Unique among an object's extensions.
        #[prost(string, tag = "1")]
        pub name: ::prost::alloc::string::String,
        #[prost(message, optional, tag = "2")]
        pub config: ::core::option::Option<::prost_types::Any>,
    }
}

/// `istio.security`: L4 authorization policies as istiod translates them for the node proxy.
///
/// ztunnel's names (`Rule`, `Clause`) are used; Istio's own copy of the file calls the same
/// messages `Group` and `Rules`, which does not change the encoding.
pub mod security {
    /// One xDS resource of type [`AUTHORIZATION_TYPE_URL`](super::AUTHORIZATION_TYPE_URL),
    /// named `namespace/name`.
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct Authorization {
        #[prost(string, tag = "1")]
        pub name: ::prost::alloc::string::String,
        #[prost(string, tag = "2")]
        pub namespace: ::prost::alloc::string::String,
        /// Which workloads the policy applies to (with `namespace` for `Namespace`).
        #[prost(enumeration = "Scope", tag = "3")]
        pub scope: i32,
        #[prost(enumeration = "Action", tag = "4")]
        pub action: i32,
        /// The policy matches when any rule matches.
        #[prost(message, repeated, tag = "5")]
        pub rules: ::prost::alloc::vec::Vec<Rule>,
        /// Evaluate and report, but do not enforce.
        #[prost(bool, tag = "6")]
        pub dry_run: bool,
        #[prost(message, repeated, tag = "7")]
        pub extensions: ::prost::alloc::vec::Vec<super::workload::Extension>,
    }

    impl ::prost::Name for Authorization {
        const NAME: &'static str = "Authorization";
        const PACKAGE: &'static str = "istio.security";
        fn full_name() -> ::prost::alloc::string::String {
            "istio.security.Authorization".into()
        }
        fn type_url() -> ::prost::alloc::string::String {
            super::AUTHORIZATION_TYPE_URL.into()
        }
    }

    /// A rule matches when all its clauses match (the policy's from, to and when parts).
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct Rule {
        #[prost(message, repeated, tag = "1")]
        pub clauses: ::prost::alloc::vec::Vec<Clause>,
    }

    /// A clause matches when any of its matches matches.
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct Clause {
        // Tag 1 is unused upstream.
        #[prost(message, repeated, tag = "2")]
        pub matches: ::prost::alloc::vec::Vec<Match>,
    }

    /// Conditions on a connection. Within one list any entry may match; every non-empty list
    /// must hold; a `not_` list holds when none of its entries matches.
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct Match {
        /// The source identity's namespace.
        #[prost(message, repeated, tag = "1")]
        pub namespaces: ::prost::alloc::vec::Vec<StringMatch>,
        #[prost(message, repeated, tag = "2")]
        pub not_namespaces: ::prost::alloc::vec::Vec<StringMatch>,
        /// The source identity's `namespace` and `service_account`, compared exactly.
        #[prost(message, repeated, tag = "11")]
        pub service_accounts: ::prost::alloc::vec::Vec<ServiceAccountMatch>,
        #[prost(message, repeated, tag = "12")]
        pub not_service_accounts: ::prost::alloc::vec::Vec<ServiceAccountMatch>,
        /// The source identity without its `spiffe://` scheme.
        #[prost(message, repeated, tag = "3")]
        pub principals: ::prost::alloc::vec::Vec<StringMatch>,
        #[prost(message, repeated, tag = "4")]
        pub not_principals: ::prost::alloc::vec::Vec<StringMatch>,
        #[prost(message, repeated, tag = "5")]
        pub source_ips: ::prost::alloc::vec::Vec<Address>,
        #[prost(message, repeated, tag = "6")]
        pub not_source_ips: ::prost::alloc::vec::Vec<Address>,
        #[prost(message, repeated, tag = "7")]
        pub destination_ips: ::prost::alloc::vec::Vec<Address>,
        #[prost(message, repeated, tag = "8")]
        pub not_destination_ips: ::prost::alloc::vec::Vec<Address>,
        #[prost(uint32, repeated, tag = "9")]
        pub destination_ports: ::prost::alloc::vec::Vec<u32>,
        #[prost(uint32, repeated, tag = "10")]
        pub not_destination_ports: ::prost::alloc::vec::Vec<u32>,
        #[prost(message, repeated, tag = "13")]
        pub extensions: ::prost::alloc::vec::Vec<super::workload::Extension>,
    }

    /// An IP prefix.
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct Address {
        /// 4 or 16 bytes.
        #[prost(bytes = "vec", tag = "1")]
        pub address: ::prost::alloc::vec::Vec<u8>,
        /// Prefix length in bits.
        #[prost(uint32, tag = "2")]
        pub length: u32,
    }

    /// A Kubernetes service account, by namespace and name.
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct ServiceAccountMatch {
        #[prost(string, tag = "1")]
        pub namespace: ::prost::alloc::string::String,
        /// `serviceAccount` in the `.proto` file.
        #[prost(string, tag = "2")]
        pub service_account: ::prost::alloc::string::String,
    }

    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct StringMatch {
        #[prost(oneof = "string_match::MatchType", tags = "1, 2, 3, 4")]
        pub match_type: ::core::option::Option<string_match::MatchType>,
    }

    /// Nested types of [`StringMatch`].
    pub mod string_match {
        #[derive(Clone, PartialEq, ::prost::Oneof)]
        pub enum MatchType {
            #[prost(string, tag = "1")]
            Exact(::prost::alloc::string::String),
            #[prost(string, tag = "2")]
            Prefix(::prost::alloc::string::String),
            #[prost(string, tag = "3")]
            Suffix(::prost::alloc::string::String),
            /// Any non-empty value (`google.protobuf.Empty` on the wire).
            #[prost(message, tag = "4")]
            Presence(()),
        }
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, ::prost::Enumeration)]
    #[repr(i32)]
    pub enum Scope {
        /// Every workload in the mesh.
        Global = 0,
        /// Every workload in the policy's namespace.
        Namespace = 1,
        /// The workloads that list the policy in `Workload::authorization_policies`.
        WorkloadSelector = 2,
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, ::prost::Enumeration)]
    #[repr(i32)]
    pub enum Action {
        Allow = 0,
        Deny = 1,
    }
}

/// `istio.v1.auth`: `IstioCertificateService`, which signs the node proxy's CSRs for the
/// workloads it serves.
pub mod ca {
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct IstioCertificateRequest {
        /// PEM-encoded CSR; the CA may override anything but the public key.
        #[prost(string, tag = "1")]
        pub csr: ::prost::alloc::string::String,
        /// Requested lifetime, in seconds.
        #[prost(int64, tag = "3")]
        pub validity_duration: i64,
        /// Node metadata; a node proxy asking for another workload's certificate names it here
        /// (`ImpersonatedIdentity`).
        #[prost(message, optional, tag = "4")]
        pub metadata: ::core::option::Option<::prost_types::Struct>,
        // Tag 2 (`subject_id`) was removed upstream.
    }

    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct IstioCertificateResponse {
        /// PEM certificates, leaf first. Without `root_cert`, the last entry holds the root(s).
        #[prost(string, repeated, tag = "1")]
        pub cert_chain: ::prost::alloc::vec::Vec<::prost::alloc::string::String>,
        /// If set, the trusted roots, and `cert_chain` holds only leaf and intermediates.
        #[prost(message, optional, tag = "2")]
        pub root_cert: ::core::option::Option<Roots>,
    }

    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct Roots {
        /// PEM root certificates.
        #[prost(string, repeated, tag = "1")]
        pub ca_cert: ::prost::alloc::vec::Vec<::prost::alloc::string::String>,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use prost::Message;

    use super::ca::{IstioCertificateRequest, IstioCertificateResponse, Roots};
    use super::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node, Resource};
    use super::security::{
        string_match::MatchType, Action, Authorization, Clause, Match, Rule, Scope,
        ServiceAccountMatch, StringMatch,
    };
    use super::workload::{
        address, gateway_address, Address, GatewayAddress, Locality, NetworkAddress, Port,
        PortList, Service, TunnelProtocol, Workload, WorkloadType,
    };
    use super::*;

    fn workload() -> Workload {
        Workload {
            uid: "Kubernetes//Pod/demo/web-0".into(),
            name: "web-0".into(),
            namespace: "demo".into(),
            addresses: vec![
                vec![10, 244, 1, 7],
                "fd00::7"
                    .parse::<std::net::Ipv6Addr>()
                    .unwrap()
                    .octets()
                    .to_vec(),
            ],
            network: "net1".into(),
            tunnel_protocol: TunnelProtocol::Hbone.into(),
            trust_domain: "cluster.local".into(),
            service_account: "web".into(),
            waypoint: Some(GatewayAddress {
                destination: Some(gateway_address::Destination::Address(NetworkAddress {
                    network: "net1".into(),
                    address: vec![10, 96, 0, 20],
                })),
                hbone_mtls_port: 15008,
            }),
            node: "node-a".into(),
            workload_type: WorkloadType::Pod.into(),
            services: HashMap::from([(
                "demo/web.demo.svc.cluster.local".into(),
                PortList {
                    ports: vec![Port {
                        service_port: 80,
                        target_port: 8080,
                    }],
                },
            )]),
            authorization_policies: vec!["demo/allow-web".into()],
            locality: Some(Locality {
                region: "r".into(),
                zone: "z".into(),
                subzone: String::new(),
            }),
            capacity: Some(3),
            ..Default::default()
        }
    }

    #[test]
    fn workload_round_trips_inside_an_any_inside_a_delta_response() {
        let addr = Address {
            r#type: Some(address::Type::Workload(workload())),
        };
        let response = DeltaDiscoveryResponse {
            system_version_info: "v1".into(),
            type_url: ADDRESS_TYPE_URL.into(),
            resources: vec![Resource {
                name: "Kubernetes//Pod/demo/web-0".into(),
                version: "7".into(),
                aliases: vec!["net1/10.244.1.7".into()],
                resource: Some(prost_types::Any::from_msg(&addr).unwrap()),
                ttl: Some(prost_types::Duration {
                    seconds: 30,
                    nanos: 0,
                }),
                cache_control: None,
            }],
            removed_resources: vec!["Kubernetes//Pod/demo/old".into()],
            nonce: "n-1".into(),
        };

        let bytes = response.encode_to_vec();
        let decoded = DeltaDiscoveryResponse::decode(bytes.as_slice()).unwrap();
        assert_eq!(decoded, response);

        let any = decoded.resources[0].resource.as_ref().unwrap();
        assert_eq!(any.type_url, ADDRESS_TYPE_URL);
        let inner: Address = any.to_msg().unwrap();
        let Some(address::Type::Workload(w)) = inner.r#type else {
            panic!("not a workload: {inner:?}");
        };
        assert_eq!(w, workload());
        assert_eq!(w.tunnel_protocol(), TunnelProtocol::Hbone);
        assert_eq!(
            w.services["demo/web.demo.svc.cluster.local"].ports[0].target_port,
            8080
        );
        // The packed resource really is an istio.workload.Address for a decoder that only
        // knows the type URL.
        assert_eq!(any.value, addr.encode_to_vec());
    }

    #[test]
    fn type_urls_and_method_paths() {
        assert_eq!(<Address as prost::Name>::type_url(), ADDRESS_TYPE_URL);
        assert_eq!(
            <Authorization as prost::Name>::type_url(),
            AUTHORIZATION_TYPE_URL
        );
        let any = prost_types::Any::from_msg(&Authorization::default()).unwrap();
        assert_eq!(
            any.type_url,
            "type.googleapis.com/istio.security.Authorization"
        );
        assert_eq!(
            DELTA_ADS_PATH,
            "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
        );
        assert_eq!(
            CREATE_CERTIFICATE_PATH,
            "/istio.v1.auth.IstioCertificateService/CreateCertificate"
        );
    }

    // The expected bytes below are written from the upstream field numbers: a key is
    // (field_number << 3) | wire_type, with wire type 0 = varint and 2 = length-delimited.

    #[test]
    fn workload_tags_match_upstream() {
        // name = 1, string.
        let w = Workload {
            name: "a".into(),
            ..Default::default()
        };
        assert_eq!(w.encode_to_vec(), [0x0a, 0x01, b'a']);
        // uid = 20, string: key 162 is the two-byte varint a2 01.
        let w = Workload {
            uid: "u".into(),
            ..Default::default()
        };
        assert_eq!(w.encode_to_vec(), [0xa2, 0x01, 0x01, b'u']);
        // addresses = 3, repeated bytes.
        let w = Workload {
            addresses: vec![vec![10, 0, 0, 1]],
            ..Default::default()
        };
        assert_eq!(w.encode_to_vec(), [0x1a, 0x04, 10, 0, 0, 1]);
        // tunnel_protocol = 5, enum (HBONE = 1).
        let w = Workload {
            tunnel_protocol: TunnelProtocol::Hbone.into(),
            ..Default::default()
        };
        assert_eq!(w.encode_to_vec(), [0x28, 0x01]);
        // capacity = 27, google.protobuf.UInt32Value { value = 1 }: key 218 = da 01.
        let w = Workload {
            capacity: Some(3),
            ..Default::default()
        };
        assert_eq!(w.encode_to_vec(), [0xda, 0x01, 0x02, 0x08, 0x03]);
        // services = 22, map<string, PortList>: an entry message { key = 1, value = 2 }.
        let w = Workload {
            services: HashMap::from([(
                "s".into(),
                PortList {
                    ports: vec![Port {
                        service_port: 1,
                        target_port: 2,
                    }],
                },
            )]),
            ..Default::default()
        };
        assert_eq!(
            w.encode_to_vec(),
            [0xb2, 0x01, 0x0b, 0x0a, 0x01, b's', 0x12, 0x06, 0x0a, 0x04, 0x08, 0x01, 0x10, 0x02]
        );
    }

    #[test]
    fn service_and_gateway_tags_match_upstream() {
        // Address.service = 2 wrapping Service { canonical = 11, bool }.
        let a = Address {
            r#type: Some(address::Type::Service(Service {
                canonical: true,
                ..Default::default()
            })),
        };
        assert_eq!(a.encode_to_vec(), [0x12, 0x02, 0x58, 0x01]);
        // GatewayAddress { hostname = 1 (NamespacedHostname { hostname = 2 }),
        // hbone_mtls_port = 3 }: 15008 is the varint a0 75.
        let g = GatewayAddress {
            destination: Some(gateway_address::Destination::Hostname(
                workload::NamespacedHostname {
                    namespace: String::new(),
                    hostname: "w".into(),
                },
            )),
            hbone_mtls_port: 15008,
        };
        assert_eq!(
            g.encode_to_vec(),
            [0x0a, 0x03, 0x12, 0x01, b'w', 0x18, 0xa0, 0x75]
        );
        // NetworkAddress is { network = 1, address = 2 }, decoded from upstream bytes.
        let n = NetworkAddress::decode(&[0x0a, 0x01, b'n', 0x12, 0x04, 10, 0, 0, 1][..]).unwrap();
        assert_eq!(n.network, "n");
        assert_eq!(n.address, [10, 0, 0, 1]);
    }

    #[test]
    fn authorization_tags_match_upstream() {
        // action = 4, enum (DENY = 1).
        let a = Authorization {
            action: Action::Deny.into(),
            ..Default::default()
        };
        assert_eq!(a.encode_to_vec(), [0x20, 0x01]);
        // scope = 3 (NAMESPACE = 1), dry_run = 6.
        let a = Authorization {
            scope: Scope::Namespace.into(),
            dry_run: true,
            ..Default::default()
        };
        assert_eq!(a.encode_to_vec(), [0x18, 0x01, 0x30, 0x01]);
        // rules = 5 > clauses = 1 > matches = 2 > destination_ports = 9, packed:
        // 80 and 443 (bb 03) in one length-delimited field.
        let a = Authorization {
            rules: vec![Rule {
                clauses: vec![Clause {
                    matches: vec![Match {
                        destination_ports: vec![80, 443],
                        ..Default::default()
                    }],
                }],
            }],
            ..Default::default()
        };
        assert_eq!(
            a.encode_to_vec(),
            [0x2a, 0x09, 0x0a, 0x07, 0x12, 0x05, 0x4a, 0x03, 0x50, 0xbb, 0x03]
        );
        // service_accounts = 11 { namespace = 1, serviceAccount = 2 };
        // principals = 3 { presence = 4, empty message }.
        let m = Match {
            service_accounts: vec![ServiceAccountMatch {
                namespace: "n".into(),
                service_account: "s".into(),
            }],
            principals: vec![StringMatch {
                match_type: Some(MatchType::Presence(())),
            }],
            ..Default::default()
        };
        assert_eq!(
            m.encode_to_vec(),
            [0x1a, 0x02, 0x22, 0x00, 0x5a, 0x06, 0x0a, 0x01, b'n', 0x12, 0x01, b's']
        );
        let back = Match::decode(m.encode_to_vec().as_slice()).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn certificate_and_discovery_tags_match_upstream() {
        // csr = 1, string; validity_duration = 3, int64: 3600 is the varint 90 1c.
        let r = IstioCertificateRequest {
            csr: "x".into(),
            validity_duration: 3600,
            metadata: None,
        };
        assert_eq!(r.encode_to_vec(), [0x0a, 0x01, b'x', 0x18, 0x90, 0x1c]);
        // cert_chain = 1, repeated string; root_cert = 2 { ca_cert = 1 }.
        let resp = IstioCertificateResponse::decode(
            &[
                0x0a, 0x01, b'l', 0x0a, 0x01, b'i', 0x12, 0x03, 0x0a, 0x01, b'r',
            ][..],
        )
        .unwrap();
        assert_eq!(resp.cert_chain, ["l", "i"]);
        assert_eq!(
            resp.root_cert,
            Some(Roots {
                ca_cert: vec!["r".into()]
            })
        );
        // DeltaDiscoveryRequest: node = 1 { id = 1 }, type_url = 2, response_nonce = 6.
        let req = DeltaDiscoveryRequest {
            node: Some(Node {
                id: "i".into(),
                ..Default::default()
            }),
            type_url: "t".into(),
            response_nonce: "n".into(),
            ..Default::default()
        };
        assert_eq!(
            req.encode_to_vec(),
            [0x0a, 0x03, 0x0a, 0x01, b'i', 0x12, 0x01, b't', 0x32, 0x01, b'n']
        );
        // Resource: version = 1, name = 3.
        let res = Resource {
            name: "r".into(),
            version: "v".into(),
            ..Default::default()
        };
        assert_eq!(res.encode_to_vec(), [0x0a, 0x01, b'v', 0x1a, 0x01, b'r']);
        // DeltaDiscoveryResponse: type_url = 4, nonce = 5, removed_resources = 6.
        let resp = DeltaDiscoveryResponse {
            type_url: "t".into(),
            nonce: "n".into(),
            removed_resources: vec!["x".into()],
            ..Default::default()
        };
        assert_eq!(
            resp.encode_to_vec(),
            [0x22, 0x01, b't', 0x2a, 0x01, b'n', 0x32, 0x01, b'x']
        );
    }
}
