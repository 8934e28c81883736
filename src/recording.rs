//! Recorded hardware results and the rules for replaying them on another host.
//!
//! A result recorded on KVM (a corpus case's `expected` block, an insta snapshot) holds for the
//! host it was recorded on — vendor and KVM kind — and for the CPUID profile it ran under.
//! Replaying it:
//! - KVM is compared with the recording only on a host of the same vendor and KVM kind whose
//!   shared profile is the recording's ([`Recording::kvm_comparable`]); elsewhere the KVM half
//!   says why it was not compared.
//! - The software CPU is checked against every recording under the recording's own profile,
//!   whatever the host ([`Recording::profile`]).
//! - KVM against the software CPU on this host still runs differentially under the host's shared
//!   profile: that comparison needs no recording.
//!
//! Every rule takes the host as an argument, so tests can ask what an Intel host would do.

use duet_core::{CpuidProfile, Vendor};

use crate::fuzz::case::{Case, Source};
use crate::fuzz::profile::{host_vendor_name, host_vendor_of_name, CaseCpuid};
use crate::host::{Host, KvmKind};

/// Where a result was recorded and the CPUID profile it ran under.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recording {
    /// The host (vendor and KVM kind) whose KVM produced the result; KVM kind `none` for a
    /// result the software CPU recorded alone.
    pub on: Host,
    /// The profile the recorded run saw.
    pub profile: CaseCpuid,
}

impl Recording {
    /// A recording made now on `host`, by KVM when `kvm_ran` (else by the software CPU alone),
    /// under the host's shared profile `shared`.
    pub fn made_on(host: Host, kvm_ran: bool, shared: &CpuidProfile) -> Recording {
        let kvm = if kvm_ran { host.kvm } else { KvmKind::None };
        Recording { on: Host { vendor: host.vendor, kvm }, profile: CaseCpuid::of(shared) }
    }

    /// The recording a corpus case carries: its KVM result's host and the case's profile; `None`
    /// for a result that holds on every host (QEMU, SDM) or whose host is unknown (format 1).
    pub fn of_case(case: &Case) -> Option<Recording> {
        let e = case.expected.as_ref().filter(|e| e.source == Source::Kvm)?;
        Some(Recording { on: e.recorded_on?, profile: case.cpuid.clone()? })
    }

    /// Whether this host's KVM may be compared with the recording: the same vendor and KVM kind,
    /// and a shared profile equal to the recording's. `Err` says why not, in words.
    pub fn kvm_comparable(&self, host: Host, shared: &CaseCpuid) -> Result<(), String> {
        if self.on.kvm == KvmKind::None {
            return Err(format!(
                "recorded by the software CPU alone on {}",
                host_vendor_name(self.on.vendor)
            ));
        }
        if self.on != host {
            return Err(format!("recorded on {}, this host is {host}", self.on));
        }
        if &self.profile != shared {
            return Err(format!(
                "recorded under the CPUID profile `{}`, this host's KVM runs under `{shared}`",
                self.profile
            ));
        }
        Ok(())
    }

    /// The profile the software CPU runs under to be checked against this recording.
    pub fn profile(&self) -> CpuidProfile {
        self.profile.profile()
    }

    /// The snapshot metadata (`info`) that names this recording.
    pub fn info(&self) -> SnapshotInfo {
        SnapshotInfo {
            recorded_on: format!("{} {}", host_vendor_name(self.on.vendor), self.on.kvm),
            cpuid: self.profile.to_string(),
        }
    }

    /// Reads the recording from a snapshot file's text (its `info` block); `Ok(None)` when the
    /// snapshot names none.
    pub fn from_snapshot(text: &str) -> Result<Option<Recording>, String> {
        let mut lines = text.lines();
        if lines.next().map(str::trim_end) != Some("---") {
            return Ok(None);
        }
        let header: Vec<&str> = lines.take_while(|l| l.trim_end() != "---").collect();
        let Some(start) = header.iter().position(|l| l.trim_end() == "info:") else { return Ok(None) };
        let mut on = None;
        let mut profile = None;
        for line in header[start + 1..].iter().take_while(|l| l.starts_with("  ")) {
            let Some((key, value)) = line.trim().split_once(':') else { continue };
            let value = value.trim().trim_matches(|c| c == '"' || c == '\'');
            match key {
                "recorded_on" => on = Some(parse_host(value)?),
                "cpuid" => {
                    profile = Some(value.parse::<CaseCpuid>().map_err(|e| format!("info.cpuid: {e}"))?)
                }
                _ => {}
            }
        }
        match (on, profile) {
            (Some(on), Some(profile)) => Ok(Some(Recording { on, profile })),
            _ => Err("the snapshot's info names no `recorded_on` and `cpuid`".into()),
        }
    }
}

/// What a test does with a snapshot of hardware results on a host ([`snapshot_replay`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotReplay {
    /// The metadata the snapshot is (re)written with.
    pub info: SnapshotInfo,
    /// Whether KVM's result is checked against the snapshot; `Err` says why not.
    pub kvm: Result<(), String>,
    /// The profile the software CPU is checked against the snapshot under: `None` when it is the
    /// shared profile the differential run used (that run's result is checked), else a rerun.
    pub interp_profile: Option<CpuidProfile>,
}

/// The replay rules for a snapshot: `snapshot` is the committed file's text (`None`: there is
/// none yet), `host` this host, `kvm_ran` whether KVM ran the test here, `shared` this host's
/// shared profile. A new snapshot is recorded by this host (by KVM when it ran). A committed one
/// is checked against KVM only where [`Recording::kvm_comparable`] allows, and against the
/// software CPU under its own profile; if it is rewritten (`INSTA_UPDATE`), it keeps naming where
/// it was recorded unless this host's KVM ran and may be compared with it.
pub fn snapshot_replay(
    snapshot: Option<&str>,
    host: Host,
    kvm_ran: bool,
    shared: &CpuidProfile,
) -> Result<SnapshotReplay, String> {
    let here = Recording::made_on(host, kvm_ran, shared);
    let committed = match snapshot {
        Some(text) => Recording::from_snapshot(text)?,
        None => None,
    };
    let recording = committed.unwrap_or_else(|| here.clone());
    let shared_case = CaseCpuid::of(shared);
    let kvm = recording.kvm_comparable(host, &shared_case);
    let info = if kvm_ran && kvm.is_ok() { here.info() } else { recording.info() };
    let interp_profile = (recording.profile != shared_case).then(|| recording.profile());
    Ok(SnapshotReplay { info, kvm, interp_profile })
}

/// Whether this host's KVM replays the corpus case `case` against its recording: only a KVM
/// recording made on this host (vendor and KVM kind) under the profile this host's KVM runs
/// (`shared`), and only where no limit known on this host says KVM cannot decide the case.
/// `Err` says why not.
pub fn corpus_kvm_replay(case: &Case, host: Host, shared: &CaseCpuid) -> Result<(), String> {
    let e = case.expected.as_ref().ok_or("no expected result")?;
    if e.source != Source::Kvm {
        return Err(format!("the expected result comes from the {}, not from KVM", e.source));
    }
    if e.recorded_on.is_none() {
        return Err("recorded on an unknown host (a format-1 case)".into());
    }
    let rec = Recording::of_case(case).ok_or("recorded under an unnamed CPUID profile")?;
    rec.kvm_comparable(host, shared)?;
    let p = case.parse("case").map_err(|e| e.to_string())?;
    match crate::fuzz::judge::instruction_limit(host, &p) {
        Some(m) if m.standing == crate::fuzz::judge::Standing::Known => Err(m.why(host)),
        _ => Ok(()),
    }
}

/// `AuthenticAMD kvm_pvm` → the host.
fn parse_host(s: &str) -> Result<Host, String> {
    let (vendor, kvm) =
        s.split_once(' ').ok_or_else(|| format!("info.recorded_on: `{s}` is not `VENDOR KVM`"))?;
    let vendor: Vendor = host_vendor_of_name(vendor).map_err(|e| format!("info.recorded_on: {e}"))?;
    let kvm: KvmKind = kvm.trim().parse().map_err(|e| format!("info.recorded_on: {e}"))?;
    Ok(Host { vendor, kvm })
}

/// A recording as snapshot metadata: two readable strings insta writes in the `info` block.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SnapshotInfo {
    /// `VENDOR KVM`, e.g. `AuthenticAMD kvm_pvm`.
    pub recorded_on: String,
    /// The profile, e.g. `AuthenticAMD cx16`.
    pub cpuid: String,
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::fuzz::profile::Feature;

    const AMD_PVM: Host = Host { vendor: Vendor::Amd, kvm: KvmKind::Pvm };
    const INTEL_PVM: Host = Host { vendor: Vendor::Intel, kvm: KvmKind::Pvm };

    fn amd_cx16() -> CaseCpuid {
        CaseCpuid { vendor: Vendor::Amd, features: BTreeSet::from([Feature::Cx16]) }
    }

    #[test]
    fn kvm_is_compared_with_a_recording_only_on_the_host_it_was_recorded_on() {
        let rec = Recording { on: AMD_PVM, profile: amd_cx16() };
        assert_eq!(rec.kvm_comparable(AMD_PVM, &amd_cx16()), Ok(()));
        let intel = CaseCpuid { vendor: Vendor::Intel, ..amd_cx16() };
        let why = rec.kvm_comparable(INTEL_PVM, &intel).unwrap_err();
        assert_eq!(why, "recorded on AuthenticAMD with kvm_pvm, this host is GenuineIntel with kvm_pvm");
        // The same vendor on bare metal is another KVM: the silicon, not kvm_pvm's emulator.
        let amd_svm = Host { vendor: Vendor::Amd, kvm: KvmKind::Svm };
        assert!(rec.kvm_comparable(amd_svm, &amd_cx16()).is_err());
        // The same host with more features (another CPU model) ran under another profile.
        let more = CaseCpuid { features: BTreeSet::from([Feature::Cx16, Feature::Popcnt]), ..amd_cx16() };
        assert!(rec
            .kvm_comparable(AMD_PVM, &more)
            .unwrap_err()
            .contains("runs under `AuthenticAMD popcnt cx16`"));
        // A software-CPU recording is never compared with KVM.
        let soft = Recording::made_on(AMD_PVM, false, &amd_cx16().profile());
        assert!(soft.kvm_comparable(AMD_PVM, &amd_cx16()).is_err());
        // Whatever the host, the software CPU runs under the recording's own profile.
        assert_eq!(CaseCpuid::of(&rec.profile()), amd_cx16());
    }

    #[test]
    fn an_amd_snapshot_on_an_intel_host_checks_the_software_cpu_under_the_amd_profile_only() {
        let amd = Recording { on: AMD_PVM, profile: amd_cx16() };
        let text = format!(
            "---\nsource: tests/common/mod.rs\ninfo:\n  recorded_on: {}\n  cpuid: {}\n---\nbody\n",
            amd.info().recorded_on,
            amd.info().cpuid
        );
        // On the AMD kvm_pvm host it was recorded on: KVM and the software CPU (same run) are checked.
        let here = snapshot_replay(Some(&text), AMD_PVM, true, &amd_cx16().profile()).unwrap();
        assert_eq!(here, SnapshotReplay { info: amd.info(), kvm: Ok(()), interp_profile: None });
        // On an Intel kvm_pvm host: KVM is not compared with it, the software CPU reruns under AMD.
        let intel_shared = CaseCpuid { vendor: Vendor::Intel, ..amd_cx16() }.profile();
        let intel = snapshot_replay(Some(&text), INTEL_PVM, true, &intel_shared).unwrap();
        assert!(intel.kvm.unwrap_err().contains("this host is GenuineIntel with kvm_pvm"));
        assert_eq!(intel.interp_profile, Some(amd.profile()));
        assert_eq!(intel.info, amd.info(), "a rewrite keeps naming the AMD host");
        // No snapshot yet: this host records it, by KVM when KVM ran, else by the software CPU.
        let new = snapshot_replay(None, INTEL_PVM, true, &intel_shared).unwrap();
        assert_eq!(
            (new.info.recorded_on.as_str(), new.kvm, new.interp_profile),
            ("GenuineIntel kvm_pvm", Ok(()), None)
        );
        let soft = snapshot_replay(None, INTEL_PVM, false, &intel_shared).unwrap();
        assert_eq!(soft.info.recorded_on, "GenuineIntel none");
    }

    #[test]
    fn snapshot_info_reads_back() {
        let rec = Recording { on: AMD_PVM, profile: amd_cx16() };
        let info = rec.info();
        assert_eq!(info.recorded_on, "AuthenticAMD kvm_pvm");
        let text = format!(
            "---\nsource: tests/common/mod.rs\ndescription: \"x\"\nexpression: y\ninfo:\n  recorded_on: {}\n  cpuid: \"{}\"\n---\nrax=1\n",
            info.recorded_on, info.cpuid
        );
        assert_eq!(Recording::from_snapshot(&text), Ok(Some(rec)));
        assert_eq!(Recording::from_snapshot("---\nsource: a\n---\nbody\n"), Ok(None));
        let bad = text.replace("kvm_pvm", "kvm_arm");
        assert!(Recording::from_snapshot(&bad).unwrap_err().contains("kvm_arm"));
    }
}
