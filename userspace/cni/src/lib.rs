//! The exchange between `ambit-cni` (a chained CNI plugin the container runtime runs as each
//! pod's sandbox is set up) and the node agent (`ambit node --cni-socket`): one JSON request,
//! one JSON answer, per line, over a unix socket.
//!
//! The plugin stays small and has no dependency on the agent: it is copied onto every node's
//! CNI bin directory and run by the runtime for every pod, mesh or not.

pub mod plugin;

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// Where the agent listens, unless the plugin's network config says otherwise (`agentSocket`).
pub const DEFAULT_AGENT_SOCKET: &str = "/var/run/ambit/cni.sock";

/// What the plugin asks the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "lowercase")]
pub enum Request {
    /// A pod's sandbox is being set up: answer once the pod is captured (or is not a mesh
    /// pod), or with an error that makes the runtime fail the sandbox and retry.
    Add(PodSandbox),
    /// The sandbox is being torn down: release it.
    Del(PodSandbox),
    /// Is the pod (still) captured as it should be?
    Check(PodSandbox),
    /// Is the agent there to take pods? (CNI STATUS)
    Status,
}

/// A pod's sandbox as the runtime describes it to CNI.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodSandbox {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The sandbox's network namespace (`CNI_NETNS`), e.g. `/var/run/netns/cni-<id>`.
    pub netns: String,
    /// The pod's addresses, from the previous plugin's result.
    pub ips: Vec<IpAddr>,
}

/// The agent's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "lowercase")]
pub enum Answer {
    /// Done: for Add/Check, `captured` says whether the pod is a mesh pod the agent captures.
    Ok { captured: bool },
    /// Not done; `error` says why (the runtime logs it with the failed sandbox).
    Error { error: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_answers_are_one_json_line_each() {
        let add = Request::Add(PodSandbox {
            namespace: "demo".into(),
            name: "sleep".into(),
            uid: "u-1".into(),
            netns: "/var/run/netns/cni-1".into(),
            ips: vec!["10.244.1.7".parse().unwrap()],
        });
        let line = serde_json::to_string(&add).unwrap();
        assert!(!line.contains('\n'));
        assert!(
            line.starts_with(r#"{"command":"add","namespace":"demo""#),
            "{line}"
        );
        assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), add);
        let answer: Answer = serde_json::from_str(r#"{"result":"error","error":"no"}"#).unwrap();
        assert_eq!(answer, Answer::Error { error: "no".into() });
        assert_eq!(
            serde_json::to_string(&Request::Status).unwrap(),
            r#"{"command":"status"}"#
        );
    }
}
