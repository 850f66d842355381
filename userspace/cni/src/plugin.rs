//! `ambit-cni`: Ambit's chained CNI plugin (CNI spec 1.0 and 1.1), run by the container runtime
//! after the plugin that gives the pod its interface and addresses (bridge, Calico, ...).
//!
//! On ADD of a Kubernetes pod it hands the pod (names and UID from `CNI_ARGS`, netns from
//! `CNI_NETNS`, addresses from `prevResult`) to the node agent and returns only once the agent
//! has captured it, or has found it is not a mesh pod. If the agent cannot be reached or cannot
//! capture the pod, ADD fails: the runtime does not start the sandbox and kubelet retries, so a
//! mesh pod never runs a single instruction uncaptured. DEL releases the pod (and succeeds even
//! when the agent is away: the agent drops pods whose netns is gone). CHECK asks the agent;
//! STATUS fails while the agent is away; VERSION and GC as the spec says. Pods of the
//! namespaces in the config's `excludeNamespaces` are let through without asking the agent.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::IpAddr,
    os::unix::net::UnixStream,
    process::ExitCode,
    time::Duration,
};

use crate::{Answer, PodSandbox, Request, DEFAULT_AGENT_SOCKET};
use serde_json::{json, Value};

const SUPPORTED_VERSIONS: [&str; 6] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0", "1.1.1"];
/// How long ADD waits for the agent: it attaches programs and opens listeners (milliseconds)
/// once it knows the pod, which may take a watch event from the API server.
const AGENT_TIMEOUT: Duration = Duration::from_secs(45);

/// A CNI error: the spec's code, a message, details.
struct CniError {
    code: u32,
    msg: String,
    details: String,
}

// The spec's well-known error codes used here.
const INVALID_ENV: u32 = 4;
const DECODE_FAILURE: u32 = 6;
const INVALID_CONFIG: u32 = 7;
const TRY_AGAIN_LATER: u32 = 11;
const NOT_AVAILABLE: u32 = 50;

fn error(code: u32, msg: &str, details: impl Into<String>) -> CniError {
    CniError {
        code,
        msg: msg.to_owned(),
        details: details.into(),
    }
}

/// The plugin: reads the CNI environment and stdin, prints the result or the error, and
/// returns the exit code. `ambit` runs this too when it is invoked as `ambit-cni`.
pub fn main() -> ExitCode {
    let command = std::env::var("CNI_COMMAND").unwrap_or_default();
    let mut stdin = String::new();
    if command != "VERSION" {
        let _ = std::io::stdin().read_to_string(&mut stdin);
    }
    let config: Value = serde_json::from_str(&stdin).unwrap_or(Value::Null);
    let version = config["cniVersion"].as_str().unwrap_or("1.0.0").to_owned();
    match run(&command, &config) {
        Ok(Some(out)) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            let out =
                json!({"cniVersion": version, "code": e.code, "msg": e.msg, "details": e.details});
            println!("{out}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: &str, config: &Value) -> Result<Option<Value>, CniError> {
    let socket = config["agentSocket"]
        .as_str()
        .unwrap_or(DEFAULT_AGENT_SOCKET)
        .to_owned();
    // Pods of these namespaces start without asking the agent: the agent's own pod (which
    // could not start while no agent answers) and the cluster's system pods, as istio-cni's
    // `excludeNamespaces`.
    let excluded = |pod: &PodSandbox| {
        let namespaces = config["excludeNamespaces"].as_array();
        namespaces.is_some_and(|n| n.iter().any(|n| n.as_str() == Some(&pod.namespace)))
    };
    let pod_sandbox = |prev| Ok(pod_sandbox(prev)?.filter(|pod| !excluded(pod)));
    match command {
        "VERSION" => Ok(Some(
            json!({"cniVersion": "1.1.0", "supportedVersions": SUPPORTED_VERSIONS}),
        )),
        "ADD" => {
            let prev = config
                .get("prevResult")
                .filter(|p| !p.is_null())
                .ok_or_else(|| {
                    error(
                        INVALID_CONFIG,
                        "ambit-cni must be chained after a plugin that sets up the pod's interface",
                        "no prevResult",
                    )
                })?;
            let mut result = prev.clone();
            result["cniVersion"] = config["cniVersion"].clone();
            let Some(pod) = pod_sandbox(Some(prev))? else {
                return Ok(Some(result)); // not a Kubernetes pod, or excluded: nothing to do
            };
            match ask(&socket, &Request::Add(pod))? {
                Answer::Ok { .. } => Ok(Some(result)),
                Answer::Error { error: e } => Err(error(
                    TRY_AGAIN_LATER,
                    "the Ambit agent did not capture the pod",
                    e,
                )),
            }
        }
        "DEL" => {
            if let Some(pod) = pod_sandbox(None)? {
                // Best effort: a DEL must succeed when there is nothing left to release, and
                // the agent releases pods whose netns is gone on its own.
                let _ = ask(&socket, &Request::Del(pod));
            }
            Ok(None)
        }
        "CHECK" => {
            let Some(pod) = pod_sandbox(config.get("prevResult"))? else {
                return Ok(None);
            };
            match ask(&socket, &Request::Check(pod))? {
                Answer::Ok { .. } => Ok(None),
                Answer::Error { error: e } => Err(error(
                    TRY_AGAIN_LATER,
                    "the pod is not captured as it should be",
                    e,
                )),
            }
        }
        "STATUS" => match ask(&socket, &Request::Status) {
            Ok(Answer::Ok { .. }) => Ok(None),
            Ok(Answer::Error { error: e }) => {
                Err(error(NOT_AVAILABLE, "the Ambit agent is not ready", e))
            }
            Err(e) => Err(error(NOT_AVAILABLE, &e.msg, e.details)),
        },
        "GC" => Ok(None),
        other => Err(error(
            INVALID_ENV,
            "unknown CNI_COMMAND",
            format!("{other:?}"),
        )),
    }
}

/// The pod of this sandbox, from `CNI_ARGS` (None when the runtime is not Kubernetes'), with
/// its addresses from `prev` (ADD and CHECK).
fn pod_sandbox(prev: Option<&Value>) -> Result<Option<PodSandbox>, CniError> {
    let args = std::env::var("CNI_ARGS").unwrap_or_default();
    let arg = |key: &str| {
        args.split(';')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.to_owned())
    };
    let (Some(namespace), Some(name)) = (arg("K8S_POD_NAMESPACE"), arg("K8S_POD_NAME")) else {
        return Ok(None);
    };
    let uid = arg("K8S_POD_UID").unwrap_or_default();
    let netns = std::env::var("CNI_NETNS").unwrap_or_default();
    let ips = match prev {
        Some(prev) => result_ips(prev)?,
        None => Vec::new(),
    };
    Ok(Some(PodSandbox {
        namespace,
        name,
        uid,
        netns,
        ips,
    }))
}

/// The addresses of a CNI result (`ips[].address`, `10.244.1.7/24`).
fn result_ips(result: &Value) -> Result<Vec<IpAddr>, CniError> {
    let mut ips = Vec::new();
    for ip in result["ips"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
        let address = ip["address"].as_str().unwrap_or_default();
        let addr = address.split('/').next().unwrap_or_default();
        ips.push(addr.parse().map_err(|_| {
            error(
                DECODE_FAILURE,
                "prevResult has an address that is not an IP",
                address,
            )
        })?);
    }
    Ok(ips)
}

/// One request to the agent, one answer.
fn ask(socket: &str, request: &Request) -> Result<Answer, CniError> {
    let unreachable = |e: std::io::Error| {
        error(
            TRY_AGAIN_LATER,
            "the Ambit node agent cannot be reached",
            format!("{socket}: {e}"),
        )
    };
    let mut stream = UnixStream::connect(socket).map_err(unreachable)?;
    stream
        .set_read_timeout(Some(AGENT_TIMEOUT))
        .map_err(unreachable)?;
    let mut line = serde_json::to_string(request).expect("a request serializes");
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(unreachable)?;
    let mut answer = String::new();
    BufReader::new(&stream)
        .read_line(&mut answer)
        .map_err(unreachable)?;
    if answer.is_empty() {
        return Err(unreachable(std::io::Error::other(
            "the agent closed the connection without answering",
        )));
    }
    serde_json::from_str(&answer).map_err(|e| {
        error(
            DECODE_FAILURE,
            "the Ambit node agent's answer is not understood",
            format!("{e}: {answer}"),
        )
    })
}
