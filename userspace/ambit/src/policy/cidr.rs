//! IP ranges as policies write them: `10.0.0.0/8`, `fd00::/64`, or a bare address.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An IPv4 or IPv6 address range: an address and a prefix length.
///
/// Written `<address>/<prefix length>` (e.g. `10.1.0.0/16`, `fd00::/8`); a bare address means
/// that one address (`/32` or `/128`). As in ztunnel, host bits after the prefix are allowed and
/// ignored: `10.1.2.3/16` is the range `10.1.0.0/16`. A range can only be built valid (prefix
/// length at most 32 for IPv4 and 128 for IPv6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix_len: u8,
}

impl Cidr {
    /// The range of `prefix_len` leading bits of `addr`; an error if the length is too long for
    /// the address family.
    pub fn new(addr: IpAddr, prefix_len: u8) -> Result<Cidr> {
        let max = max_prefix_len(addr);
        if prefix_len > max {
            bail!("prefix length {prefix_len} is longer than {max}, the maximum for {addr}");
        }
        Ok(Cidr { addr, prefix_len })
    }

    /// The range holding exactly `addr`.
    pub fn host(addr: IpAddr) -> Cidr {
        Cidr {
            addr,
            prefix_len: max_prefix_len(addr),
        }
    }

    /// The address as written (host bits included).
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The number of leading bits that must match.
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// Whether `ip` is in the range. An IPv4 range also holds the IPv4-mapped IPv6 form of its
    /// addresses (`::ffff:a.b.c.d`), the way dual-stack sockets report IPv4 peers; otherwise
    /// the families must agree.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => same_prefix_v4(net, ip, self.prefix_len),
            (IpAddr::V4(net), IpAddr::V6(ip)) => ip
                .to_ipv4_mapped()
                .is_some_and(|ip| same_prefix_v4(net, ip, self.prefix_len)),
            (IpAddr::V6(net), IpAddr::V6(ip)) => same_prefix_v6(net, ip, self.prefix_len),
            (IpAddr::V6(_), IpAddr::V4(_)) => false,
        }
    }
}

fn max_prefix_len(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

fn same_prefix_v4(a: Ipv4Addr, b: Ipv4Addr, prefix_len: u8) -> bool {
    // A shift by the full width (prefix 0) yields no mask bits at all.
    let mask = u32::MAX
        .checked_shl(32 - u32::from(prefix_len))
        .unwrap_or(0);
    u32::from(a) & mask == u32::from(b) & mask
}

fn same_prefix_v6(a: Ipv6Addr, b: Ipv6Addr, prefix_len: u8) -> bool {
    let mask = u128::MAX
        .checked_shl(128 - u32::from(prefix_len))
        .unwrap_or(0);
    u128::from(a) & mask == u128::from(b) & mask
}

impl FromStr for Cidr {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Cidr> {
        let shape = "expected <address>/<prefix length>, e.g. 10.0.0.0/8 or fd00::/64";
        let Some((addr, len)) = s.split_once('/') else {
            let addr = s
                .parse::<IpAddr>()
                .with_context(|| format!("invalid IP range {s:?}: {shape}"))?;
            return Ok(Cidr::host(addr));
        };
        let addr = addr
            .parse::<IpAddr>()
            .with_context(|| format!("invalid IP range {s:?}: bad address; {shape}"))?;
        let len = len
            .parse::<u8>()
            .with_context(|| format!("invalid IP range {s:?}: bad prefix length; {shape}"))?;
        Cidr::new(addr, len).with_context(|| format!("invalid IP range {s:?}"))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Cidr, D::Error> {
        let text = String::deserialize(deserializer)?;
        // `{:#}` keeps the cause ("invalid IP address syntax", ...) in the one-line message.
        text.parse()
            .map_err(|e: anyhow::Error| serde::de::Error::custom(format!("{e:#}")))
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_ranges_and_bare_addresses() {
        assert_eq!(cidr("10.0.0.0/8"), Cidr::new(ip("10.0.0.0"), 8).unwrap());
        assert_eq!(cidr("fd00::/64"), Cidr::new(ip("fd00::"), 64).unwrap());
        assert_eq!(cidr("10.1.2.3"), Cidr::new(ip("10.1.2.3"), 32).unwrap());
        assert_eq!(cidr("fd00::1"), Cidr::new(ip("fd00::1"), 128).unwrap());
        assert_eq!(cidr("0.0.0.0/0").prefix_len(), 0);
        assert_eq!(cidr("10.1.2.3/16").to_string(), "10.1.2.3/16");
        assert_eq!(cidr("fd00::1").to_string(), "fd00::1/128");
    }

    #[test]
    fn rejects_malformed_ranges_showing_the_input() {
        for bad in [
            "10.0.0.0/33",
            "fd00::/129",
            "10.0.0/8",
            "10.0.0.0/",
            "10.0.0.0/-1",
            "10.0.0.0/8/8",
            "/8",
            "example.com",
            "",
        ] {
            let err = format!("{:#}", bad.parse::<Cidr>().expect_err(bad));
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
        let err = format!("{:#}", "10.0.0.0/33".parse::<Cidr>().unwrap_err());
        assert!(err.contains("maximum"), "{err}");
        assert!(Cidr::new(ip("10.0.0.0"), 33).is_err());
        assert!(Cidr::new(ip("::"), 128).is_ok());
    }

    #[test]
    fn ipv4_containment() {
        let net = cidr("10.1.0.0/16");
        assert!(net.contains(ip("10.1.0.0")));
        assert!(net.contains(ip("10.1.255.255")));
        assert!(!net.contains(ip("10.2.0.1")));
        assert!(!net.contains(ip("9.1.0.1")));
        // Host bits in the written address are ignored.
        assert!(cidr("10.1.2.3/16").contains(ip("10.1.200.1")));
        assert!(cidr("10.1.2.3").contains(ip("10.1.2.3")));
        assert!(!cidr("10.1.2.3").contains(ip("10.1.2.4")));
        assert!(cidr("0.0.0.0/0").contains(ip("255.255.255.255")));
        assert!(cidr("10.1.2.3/31").contains(ip("10.1.2.2")));
        assert!(!cidr("10.1.2.3/31").contains(ip("10.1.2.4")));
    }

    #[test]
    fn ipv6_containment() {
        let net = cidr("fd00:1::/32");
        assert!(net.contains(ip("fd00:1::1")));
        assert!(net.contains(ip("fd00:1:ffff::1")));
        assert!(!net.contains(ip("fd00:2::1")));
        assert!(cidr("::/0").contains(ip("2001:db8::1")));
        assert!(cidr("fd00::1").contains(ip("fd00::1")));
        assert!(!cidr("fd00::1").contains(ip("fd00::2")));
        assert!(cidr("fd00::/127").contains(ip("fd00::1")));
        assert!(!cidr("fd00::/127").contains(ip("fd00::2")));
    }

    #[test]
    fn families_do_not_mix_except_for_mapped_ipv4() {
        assert!(!cidr("::/0").contains(ip("10.0.0.1")));
        assert!(!cidr("0.0.0.0/0").contains(ip("fd00::1")));
        assert!(cidr("10.0.0.0/8").contains(ip("::ffff:10.1.2.3")));
        assert!(!cidr("10.0.0.0/8").contains(ip("::ffff:11.1.2.3")));
        // An IPv4-compatible (not mapped) address is not an IPv4 peer.
        assert!(!cidr("0.0.0.0/0").contains(ip("::10.1.2.3")));
    }

    #[test]
    fn serde_uses_the_written_form() {
        let parsed: Vec<Cidr> = serde_yaml::from_str("[10.0.0.0/8, 'fd00::/64', 1.2.3.4]").unwrap();
        assert_eq!(
            parsed,
            vec![cidr("10.0.0.0/8"), cidr("fd00::/64"), cidr("1.2.3.4/32")]
        );
        let text = serde_yaml::to_string(&parsed).unwrap();
        assert_eq!(text, "- 10.0.0.0/8\n- fd00::/64\n- 1.2.3.4/32\n");
        let err = serde_yaml::from_str::<Vec<Cidr>>("[10.0.0.0/40]")
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"10.0.0.0/40\""), "{err}");
    }
}
