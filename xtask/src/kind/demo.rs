//! `cargo xtask kind demo`: the sample apps' traffic captured, tunnelled and seen on the wire.

use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader},
    process::{Child, Stdio},
    thread,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};

use super::{
    cluster::{kubectl, shell_line, words, Shell, Tool},
    KindCommand, AGENT, AGENT_NAMESPACE, AGENT_SELECTOR, CONTEXT, DEMO_CLIENT, DEMO_NAMESPACE,
    DEMO_SERVER, DEMO_SERVER_POD_PORT, DEMO_SERVER_SERVICE_PORT,
};
use crate::util::{has_command, is_root};

const DEMO_PATH: &str = "/get";
const HBONE_PORT: u16 = 15008;
/// The agent's access-log line for each captured outbound connection, written when it ends
/// (userspace/ambit/src/observability/connection.rs; at the DaemonSet's `RUST_LOG=info`).
const CAPTURE_LOG: &str = "connection complete";
const OUTBOUND: &str = "direction=\"outbound\"";

pub(super) fn demo(sh: &Shell) -> Result<()> {
    sh.require(KindCommand::Demo, &[Tool::Docker, Tool::Kubectl])?;

    sh.say("== the sample apps: sleep and web in the ambient namespace demo");
    sh.run(&kubectl("apply -k deploy/samples/"))?;
    sh.run(&kubectl(&format!(
        "-n {DEMO_NAMESPACE} wait --for=condition=Available deployment {DEMO_CLIENT} {DEMO_SERVER} --timeout=180s"
    )))?;
    let pod_field = |var: &str, app: &str, field: &str| {
        sh.output(
            var,
            &kubectl(&format!(
                "-n {DEMO_NAMESPACE} get pod -l app={app} --field-selector=status.phase=Running -o jsonpath={{.items[0].{field}}}"
            )),
        )
    };
    let sleep_pod = pod_field("SLEEP_POD", DEMO_CLIENT, "metadata.name")?;
    let sleep_node = pod_field("SLEEP_NODE", DEMO_CLIENT, "spec.nodeName")?;
    let sleep_ip = pod_field("SLEEP_IP", DEMO_CLIENT, "status.podIP")?;
    let web_pod = pod_field("WEB_POD", DEMO_SERVER, "metadata.name")?;
    let web_node = pod_field("WEB_NODE", DEMO_SERVER, "spec.nodeName")?;
    let web_ip = pod_field("WEB_IP", DEMO_SERVER, "status.podIP")?;
    let agent_on = |var: &str, node: &str| {
        sh.output(
            var,
            &kubectl(&format!(
                "-n {AGENT_NAMESPACE} get pod -l {AGENT_SELECTOR} --field-selector=spec.nodeName={node} -o jsonpath={{.items[0].metadata.name}}"
            )),
        )
    };
    let sleep_agent = agent_on("SLEEP_AGENT", &sleep_node)?;
    let web_agent = agent_on("WEB_AGENT", &web_node)?;
    sh.say(&format!(
        "sleep {sleep_pod} ({sleep_ip}) on {sleep_node}, web {web_pod} ({web_ip}) on {web_node}"
    ));

    sh.say("== waiting until Ambit has enrolled both pods (ambit inspect on their nodes)");
    let inspect = |agent: &str, node: &str| {
        kubectl(&format!(
            "-n {AGENT_NAMESPACE} exec {agent} -- ambit inspect --node {node}"
        ))
    };
    let inspect_sleep = inspect(&sleep_agent, &sleep_node);
    let inspect_web = inspect(&web_agent, &web_node);
    let sleep_key = format!("{DEMO_NAMESPACE}/{sleep_pod}:");
    sh.poll(&inspect_sleep, Duration::from_secs(120), |out| {
        out.lines().any(|l| l.trim_start().starts_with(&sleep_key))
    })
    .with_context(|| format!("{sleep_pod} was not enrolled on {sleep_node}; see the agent's log: kubectl --context {CONTEXT} -n {AGENT_NAMESPACE} logs {sleep_agent}"))?;
    sh.poll(&inspect_web, Duration::from_secs(120), |out| {
        out.lines().any(|l| l.trim() == web_ip)
    })
    .with_context(|| format!("{web_pod} ({web_ip}) has no inbound capture on {web_node}; see kubectl --context {CONTEXT} -n {AGENT_NAMESPACE} logs {web_agent}"))?;

    let wire = sh.start_wire_capture(&web_node, &sleep_ip, &web_ip)?;

    let by_service = match DEMO_SERVER_SERVICE_PORT {
        "80" => format!("http://{DEMO_SERVER}.{DEMO_NAMESPACE}.svc.cluster.local{DEMO_PATH}"),
        port => {
            format!("http://{DEMO_SERVER}.{DEMO_NAMESPACE}.svc.cluster.local:{port}{DEMO_PATH}")
        }
    };
    let by_pod_ip = format!("http://{web_ip}:{DEMO_SERVER_POD_PORT}{DEMO_PATH}");
    for (what, url) in [("by service name", &by_service), ("by pod IP", &by_pod_ip)] {
        sh.say(&format!("== sleep → web {what}"));
        sh.run(&kubectl(&format!(
            "-n {DEMO_NAMESPACE} exec {sleep_pod} -c {DEMO_CLIENT} -- curl -sS --max-time 10 {url}"
        )))?;
    }

    sh.say(&format!(
        "== the agent on {sleep_node}: \"{CAPTURE_LOG}\" lines of outbound connections"
    ));
    let logs = sh.output(
        "AGENT_LOG",
        &kubectl(&format!(
            "-n {AGENT_NAMESPACE} logs {sleep_agent} -c {AGENT} --tail=2000"
        )),
    )?;
    if !sh.dry_run {
        let captured: Vec<&str> = logs
            .lines()
            .filter(|l| l.contains(CAPTURE_LOG) && l.contains(OUTBOUND))
            .collect();
        if captured.is_empty() {
            bail!(
                "the agent on {sleep_node} logged no \"{CAPTURE_LOG}\" with {OUTBOUND}: the \
                 requests were not captured"
            );
        }
        for line in captured.iter().rev().take(4).rev() {
            println!("  {line}");
        }
    }

    if let Some(wire) = wire {
        wire.finish(&sleep_ip, &web_ip, &web_node)?;
    }

    sh.say(&format!(
        "== inside {sleep_node}: what Ambit pinned and attached"
    ));
    sh.run(&inspect_sleep)?;
    let install_bpftool = "command -v bpftool >/dev/null || { apt-get update -qq && apt-get install -y -qq bpftool >/dev/null; }";
    let in_node = |line: &str| words(&format!("docker exec {sleep_node} {line}"));
    let mut install = in_node("sh -c");
    install.push(install_bpftool.to_owned());
    for cmd in [
        install,
        in_node("bpftool prog show name ambit_connect4"),
        in_node(&format!(
            "bpftool map dump pinned /sys/fs/bpf/ambit/{sleep_node}/ENROLLED_NETNS"
        )),
    ] {
        if let Err(e) = sh.run(&cmd) {
            eprintln!("  (bpftool inside the node failed: {e:#}; ambit inspect above shows the same pins)");
            break;
        }
    }

    sh.say("== metrics of the agent on the client's node (through the API server's pod proxy)");
    let metrics_path =
        format!("/api/v1/namespaces/{AGENT_NAMESPACE}/pods/{sleep_agent}:15020/proxy/metrics");
    let metrics = sh.output("METRICS", &kubectl(&format!("get --raw {metrics_path}")))?;
    if !sh.dry_run {
        for line in metrics
            .lines()
            .filter(|l| l.starts_with("istio_tcp_connections_opened_total"))
        {
            println!("  {line}");
        }
    }

    sh.say(&format!(
        "\n== where to look (docs/kubernetes.md)
  logs:      kubectl --context {CONTEXT} -n {AGENT_NAMESPACE} logs -f -l {AGENT_SELECTOR} --prefix
  a request: kubectl --context {CONTEXT} -n {DEMO_NAMESPACE} exec deploy/{DEMO_CLIENT} -- curl -sS {by_service}
  pins:      kubectl --context {CONTEXT} -n {AGENT_NAMESPACE} exec {sleep_agent} -- ambit inspect --node {sleep_node}
  bpftool:   docker exec {sleep_node} bpftool cgroup tree
  metrics:   kubectl --context {CONTEXT} -n {AGENT_NAMESPACE} port-forward {sleep_agent} 15020 & curl -s localhost:15020/metrics
  the wire:  sudo nsenter -t $(docker inspect -f '{{{{.State.Pid}}}}' {web_node}) -n tcpdump -i any -nn -A \"tcp and host {web_ip}\"
  tear down: cargo xtask kind down"
    ));
    Ok(())
}

impl Shell {
    /// Starts tcpdump in the network namespace of web's kind node, on all its interfaces (the
    /// pods' veths and the node's eth0), for the packets between the two pods. Needs root and
    /// tcpdump and nsenter here; without them the demo says so and goes on.
    fn start_wire_capture(
        &self,
        node: &str,
        sleep_ip: &str,
        web_ip: &str,
    ) -> Result<Option<WireCapture>> {
        self.say(&format!(
            "== watching the wire between the pods, in {node}'s network namespace"
        ));
        let filter = format!("tcp and host {sleep_ip} and host {web_ip}");
        let can_capture = is_root() && has_command("tcpdump") && has_command("nsenter");
        if !self.dry_run && !can_capture {
            println!("  skipped: needs root, tcpdump and nsenter on this machine (sudo cargo xtask kind demo; docs/kubernetes.md shows it by hand)");
            return Ok(None);
        }
        let pid = self.output(
            "NODE_PID",
            &["docker", "inspect", "-f", "{{.State.Pid}}", node],
        )?;
        let args = [
            "nsenter", "-t", &pid, "-n", "tcpdump", "-i", "any", "-nn", "-l", "-A", "-s", "512",
            &filter,
        ];
        println!("+ {} &    # stopped after the requests", shell_line(&args));
        if self.dry_run {
            return Ok(None);
        }
        let mut child = self
            .command(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting tcpdump")?;
        let stdout = child.stdout.take().expect("piped");
        let reader = thread::spawn(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(|l| l.ok())
                .collect::<Vec<String>>()
        });
        thread::sleep(Duration::from_secs(2));
        if let Ok(Some(status)) = child.try_wait() {
            println!("  skipped: tcpdump stopped at once ({status})");
            return Ok(None);
        }
        Ok(Some(WireCapture {
            child,
            reader: Some(reader),
        }))
    }
}

struct WireCapture {
    child: Child,
    reader: Option<thread::JoinHandle<Vec<String>>>,
}

impl Drop for WireCapture {
    /// tcpdump never outlives the demo, also when a step in between fails.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl WireCapture {
    /// Stops tcpdump and checks what it saw: every packet between the pods to or from port
    /// 15008, and no plaintext HTTP.
    fn finish(mut self, sleep_ip: &str, web_ip: &str, node: &str) -> Result<()> {
        thread::sleep(Duration::from_secs(1));
        let _ = self.child.kill();
        let _ = self.child.wait();
        let lines = self
            .reader
            .take()
            .and_then(|r| r.join().ok())
            .unwrap_or_default();
        let mut packets = 0;
        let mut other_ports = BTreeSet::new();
        let mut plaintext = Vec::new();
        for line in &lines {
            if let Some((src, dst)) = tcpdump_ports(line) {
                packets += 1;
                if src != HBONE_PORT && dst != HBONE_PORT {
                    other_ports.insert(format!("{src} → {dst}"));
                }
            } else if line.contains("HTTP/1.1") || line.contains("User-Agent:") {
                plaintext.push(line.trim().to_owned());
            }
        }
        println!(
            "== on the wire between sleep ({sleep_ip}) and web ({web_ip}), seen in {node}: {packets} packets"
        );
        if !other_ports.is_empty() || !plaintext.is_empty() {
            bail!(
                "traffic between the pods outside HBONE: ports {:?}, plaintext {:?}",
                other_ports,
                plaintext.iter().take(3).collect::<Vec<_>>()
            );
        }
        if packets == 0 {
            println!("  tcpdump saw no packet (see docs/kubernetes.md to look by hand)");
        } else {
            println!("  every one to or from port {HBONE_PORT} (HBONE: TLS), no plaintext HTTP");
        }
        Ok(())
    }
}

/// The TCP ports of a tcpdump -nn header line (`... IP 10.244.1.2.40000 > 10.244.2.3.15008: ...`).
fn tcpdump_ports(line: &str) -> Option<(u16, u16)> {
    let tokens: Vec<&str> = line.split_whitespace().collect();
    let arrow = tokens.iter().position(|t| *t == ">")?;
    if arrow == 0 || !tokens[..arrow].iter().any(|t| *t == "IP" || *t == "IP6") {
        return None;
    }
    let port =
        |t: &str| -> Option<u16> { t.trim_end_matches(':').rsplit('.').next()?.parse().ok() };
    Some((port(tokens[arrow - 1])?, port(tokens.get(arrow + 1)?)?))
}
