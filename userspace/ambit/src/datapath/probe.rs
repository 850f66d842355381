//! Kernel feature probes, run before anything is loaded: Ambit either has every feature its
//! data path needs, or refuses to start with the missing one and the first kernel that has it
//! — it never half-works. Probes ask the kernel itself (loading tiny test programs and maps),
//! so backports in distribution kernels count; the kernel version is only reported.

use std::fmt;

use anyhow::{bail, Result};
use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{is_helper_supported, is_map_supported, is_program_supported, BpfHelper},
    util::KernelVersion,
};
use tracing::info;

/// One feature and where it comes from.
struct Feature {
    name: &'static str,
    since: &'static str,
    required: bool,
    present: bool,
}

pub struct KernelFeatures {
    pub version: Option<KernelVersion>,
    features: Vec<Feature>,
    /// The kernel's BTF, parsed once: probed here, and what the iter/tcp programs are loaded
    /// against (parsing it takes tens of milliseconds and megabytes).
    pub btf: Option<aya::Btf>,
}

impl KernelFeatures {
    pub fn probe() -> Self {
        let prog = |t| is_program_supported(t).unwrap_or(false);
        let map = |t| is_map_supported(t).unwrap_or(false);
        let helper = |t, h| is_helper_supported(t, h).unwrap_or(false);
        let version = KernelVersion::current().ok();
        let at_least =
            |major, minor| version.is_some_and(|v| v >= KernelVersion::new(major, minor, 0));
        let btf = aya::Btf::from_sys_fs().ok();
        let features = vec![
            Feature {
                name: "cgroup sock_addr programs (connect4/connect6)",
                since: "4.17",
                required: true,
                present: prog(ProgramType::CgroupSockAddr),
            },
            Feature {
                name: "sock_ops programs",
                since: "4.13",
                required: true,
                present: prog(ProgramType::SockOps),
            },
            Feature {
                name: "sk_lookup programs",
                since: "5.9",
                required: true,
                present: prog(ProgramType::SkLookup),
            },
            Feature {
                name: "bpf_sk_assign in sk_lookup",
                since: "5.9",
                required: true,
                present: helper(ProgramType::SkLookup, BpfHelper::BPF_FUNC_sk_assign),
            },
            Feature {
                name: "bpf_get_netns_cookie in cgroup sock_addr",
                since: "5.7",
                required: true,
                present: helper(
                    ProgramType::CgroupSockAddr,
                    BpfHelper::BPF_FUNC_get_netns_cookie,
                ),
            },
            Feature {
                name: "bpf_get_netns_cookie in sock_ops",
                since: "5.15",
                required: true,
                present: helper(ProgramType::SockOps, BpfHelper::BPF_FUNC_get_netns_cookie),
            },
            Feature {
                name: "SOCKHASH maps",
                since: "4.18",
                required: true,
                present: map(MapType::SockHash),
            },
            Feature {
                name: "LRU hash maps",
                since: "4.10",
                required: true,
                present: map(MapType::LruHash),
            },
            Feature {
                name: "per-CPU arrays",
                since: "4.6",
                required: true,
                present: map(MapType::PerCpuArray),
            },
            Feature {
                name: "ring buffers (eBPF-side logging)",
                since: "5.8",
                required: false,
                present: map(MapType::RingBuf),
            },
            // Delivery from the client's address: the listeners' mark is put on (and taken
            // off) by iter/tcp programs, typed against the kernel's BTF; they may call
            // bpf_setsockopt since 5.15 (not probed: loading them fails naming the program).
            Feature {
                name: "kernel BTF (/sys/kernel/btf/vmlinux)",
                since: "5.4 with CONFIG_DEBUG_INFO_BTF",
                required: true,
                present: btf.is_some(),
            },
            Feature {
                name: "TCP socket iterator (iter/tcp)",
                since: "5.9",
                required: true,
                present: btf.as_ref().is_some_and(|btf| {
                    btf.id_by_type_name_kind("bpf_iter_tcp", aya_obj::btf::BtfKind::Func)
                        .is_ok()
                }),
            },
            Feature {
                name: "bpf_setsockopt in iter/tcp",
                since: "5.15",
                required: true,
                present: version.is_none() || at_least(5, 15),
            },
            // Not probed by loading: bpf_link for cgroups (5.7) is what pinned, adoptable
            // capture needs; attach fails clearly without it. SO_NETNS_COOKIE (5.14) is checked
            // when the first netns is opened.
            Feature {
                name: "bpf_link for cgroup programs",
                since: "5.7",
                required: true,
                present: version.is_none() || at_least(5, 7),
            },
            // The fast path (`--fast-path`): optional, off where any of these is missing.
            Feature {
                name: "sk_msg programs (fast path)",
                since: "4.17",
                required: false,
                present: prog(ProgramType::SkMsg),
            },
            Feature {
                name: "socket-local storage in sock_ops and sk_msg (fast path)",
                since: "5.10",
                required: false,
                present: map(MapType::SkStorage)
                    && helper(ProgramType::SockOps, BpfHelper::BPF_FUNC_sk_storage_get)
                    && helper(ProgramType::SkMsg, BpfHelper::BPF_FUNC_sk_storage_get),
            },
            Feature {
                name: FAST_PATH_BUGS_FIXED,
                since: FAST_PATH_SAFE_SINCE_TEXT,
                required: false,
                present: version.is_some_and(fast_path_safe_kernel),
            },
            Feature {
                name:
                    "TCX (link-based tc; not used by Ambit, which attaches nothing to interfaces)",
                since: "6.6",
                required: false,
                present: at_least(6, 6),
            },
        ];
        Self {
            version,
            features,
            btf,
        }
    }

    /// Logs every probe result; fails naming each missing required feature.
    pub fn require(&self) -> Result<()> {
        info!(kernel = %self, "kernel features probed");
        let missing: Vec<String> = self
            .features
            .iter()
            .filter(|f| f.required && !f.present)
            .map(|f| format!("{} (Linux {})", f.name, f.since))
            .collect();
        if !missing.is_empty() {
            bail!(
                "this kernel ({}) lacks what Ambit's data path needs: {}. Ambit needs Linux 5.15 \
                 or newer.",
                self.version
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| "unknown version".into()),
                missing.join("; ")
            );
        }
        Ok(())
    }

    /// Why the fast path cannot run on this kernel, if it cannot.
    pub fn fast_path_unsafe(&self) -> Option<String> {
        let missing: Vec<String> = self
            .features
            .iter()
            .filter(|f| f.name.contains("fast path") && !f.present)
            .map(|f| format!("{} (Linux {})", f.name, f.since))
            .collect();
        (!missing.is_empty()).then(|| missing.join("; "))
    }

    pub fn has_ring_buffers(&self) -> bool {
        self.features
            .iter()
            .any(|f| f.name.starts_with("ring buffers") && f.present)
    }
}

impl fmt::Display for KernelFeatures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.version {
            Some(v) => write!(f, "Linux {v}:")?,
            None => write!(f, "Linux (unknown version):")?,
        }
        for feature in &self.features {
            write!(
                f,
                " {}={}",
                short(feature.name),
                if feature.present { "yes" } else { "no" }
            )?;
        }
        Ok(())
    }
}

fn short(name: &str) -> String {
    name.split(" (").next().unwrap_or(name).replace(' ', "_")
}

/// The fast path's kernel gate (docs/fast-path.md lists the bugs behind it).
const FAST_PATH_BUGS_FIXED: &str =
    "the sockmap fix for sk_msg ingress redirect, \"skmsg: Fix wrong last sg check in sk_msg_recvmsg()\" (fast path)";
const FAST_PATH_SAFE_SINCE_TEXT: &str = "5.15.66 or 6.0";

/// Whether kernel `v` has the sockmap fixes the fast path relies on. Stable branches get a fix
/// at their own patch level: the NULL dereference in `sk_msg_recvmsg` that exactly this setup
/// (sk_msg redirect to ingress, no verdict program) hits came with 5.16 (and into 5.15.y) and
/// was fixed in 6.0 and 5.15.66; 5.16–5.19 are out of support with it.
fn fast_path_safe_kernel(v: KernelVersion) -> bool {
    if v >= KernelVersion::new(6, 0, 0) {
        return true;
    }
    v >= KernelVersion::new(5, 15, 66) && v < KernelVersion::new(5, 16, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fast_path_gate_follows_each_branchs_fix() {
        let v = KernelVersion::new;
        for (kernel, safe) in [
            (v(5, 10, 200), false),
            (v(5, 15, 65), false),
            (v(5, 15, 66), true),
            (v(5, 15, 180), true),
            (v(5, 19, 17), false),
            (v(6, 0, 0), true),
            (v(6, 1, 158), true),
            (v(6, 18, 44), true),
        ] {
            assert_eq!(fast_path_safe_kernel(kernel), safe, "{kernel:?}");
        }
    }

    #[test]
    fn the_fast_path_is_off_where_a_piece_is_missing_and_says_which() {
        let features = |present: bool| KernelFeatures {
            version: Some(KernelVersion::new(6, 1, 0)),
            features: vec![Feature {
                name: "sk_msg programs (fast path)",
                since: "4.17",
                required: false,
                present,
            }],
            btf: None,
        };
        assert_eq!(features(true).fast_path_unsafe(), None);
        let why = features(false).fast_path_unsafe().unwrap();
        assert!(
            why.contains("sk_msg programs (fast path) (Linux 4.17)"),
            "{why}"
        );
        features(false).require().unwrap();
    }

    #[test]
    fn a_missing_required_feature_is_named_with_its_kernel() {
        let features = KernelFeatures {
            version: Some(KernelVersion::new(5, 4, 0)),
            features: vec![
                Feature {
                    name: "sk_lookup programs",
                    since: "5.9",
                    required: true,
                    present: false,
                },
                Feature {
                    name: "TCX",
                    since: "6.6",
                    required: false,
                    present: false,
                },
            ],
            btf: None,
        };
        let err = features.require().unwrap_err().to_string();
        assert!(err.contains("sk_lookup programs (Linux 5.9)"), "{err}");
        assert!(err.contains("5.4.0") && err.contains("Linux 5.15"), "{err}");
        assert!(
            !err.contains("TCX"),
            "optional features are not required: {err}"
        );
    }

    #[test]
    fn this_kernel_has_everything_required() {
        // The machine the tests run on (and each vm-test kernel) must pass the probe.
        if unsafe { libc::geteuid() } != 0 {
            return; // probing loads programs: root only
        }
        KernelFeatures::probe().require().unwrap();
    }
}
