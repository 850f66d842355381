//! iptables capture inside a pod's netns, as Istio's dedicated mode and Ambit's
//! `--capture iptables` expect it: the pod's outbound TCP is redirected to the tunnel's outbound
//! listener 15001, except the tunnel's own sockets.

use anyhow::Result;

use crate::{system::run, Lab};

/// The mark on the tunnel's own sockets: ztunnel's `PACKET_MARK` (1337), which Ambit's tunnel
/// sets too. Rules match its low 12 bits, as istio-cni's do.
pub(crate) const TUNNEL_MARK: u32 = 0x539;

impl Lab {
    /// The capture Ambit's `--capture iptables` mode expects (the baseline the benchmark compares
    /// eBPF capture with), in `pod`'s netns only: TCP to `destination` (an address or CIDR) goes
    /// to the tunnel. Undone by `remove_redirect` or the pod's end.
    pub fn redirect_to_tunnel(&self, pod: &str, destination: &str) -> Result<()> {
        self.redirect_outbound(pod, &format!("-d {destination}"))
    }

    /// Adds the rule that redirects `pod`'s outbound TCP matching `matching` (iptables match
    /// arguments, e.g. `-d 10.0.0.1`) to port 15001, unless it carries the tunnel's mark.
    pub(crate) fn redirect_outbound(&self, pod: &str, matching: &str) -> Result<()> {
        let rule = format!(
            "-t nat -A OUTPUT -p tcp {matching} -m mark ! --mark {TUNNEL_MARK:#x}/0xfff \
             -j REDIRECT --to-ports 15001"
        );
        self.iptables(pod, &rule.split_whitespace().collect::<Vec<_>>())
    }

    /// Removes every redirect of `pod` (its nat OUTPUT chain).
    pub fn remove_redirect(&self, pod: &str) -> Result<()> {
        self.iptables(pod, &["-t", "nat", "-F", "OUTPUT"])
    }

    fn iptables(&self, pod: &str, args: &[&str]) -> Result<()> {
        let what = format!("iptables {} in pod {pod}", args.join(" "));
        run(self.pod_command(pod, "iptables").args(args), &what).map(drop)
    }
}
