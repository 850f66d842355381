//! Talking to istiod: the protobuf messages of the delta xDS stream (workloads, services and
//! authorization policies) and of the certificate service, as hand-written prost structs whose
//! field numbers are the wire contract with istiod.

pub mod proto;
