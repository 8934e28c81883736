//! The CPUID profile a case runs under, written into the case file so a replay is the same run
//! on every host.
//!
//! A campaign runs under [`crate::backends::shared_cpuid_profile`]: duet's baseline restricted to
//! what this host's KVM supports. That profile differs between hosts (here it keeps only CX16 of
//! the optional extensions), and the result of an instruction such as TZCNT depends on it (run
//! as BSF without BMI1, SDM Vol. 2B TZCNT). So each saved case names its vendor and the optional
//! features it saw ([`CaseCpuid`]); a replay builds exactly that profile from the baseline.

use duet_core::cpuid::{ext_leaf1, leaf1_ecx, leaf7_ebx, CpuidProfile};
use serde::{Deserialize, Serialize};

/// The vendor and the optional CPUID features of a case's profile.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CaseCpuid {
    /// The vendor string of leaf 0 (`GenuineIntel`, `AuthenticAMD`).
    pub vendor: String,
    /// The optional features enumerated, by the names of [`OPTIONAL_FEATURES`].
    pub features: Vec<String>,
}

/// Where an optional feature's bit lives: (leaf, register index EAX=0 … EDX=3, bit).
type Place = (u32, usize, u32);

/// The baseline's optional features, by name: each may be absent from a host's shared profile.
pub const OPTIONAL_FEATURES: &[(&str, Place)] = &[
    ("popcnt", (1, 2, leaf1_ecx::POPCNT)),
    ("movbe", (1, 2, leaf1_ecx::MOVBE)),
    ("cx16", (1, 2, leaf1_ecx::CX16)),
    ("fsgsbase", (7, 1, leaf7_ebx::FSGSBASE)),
    ("bmi1", (7, 1, leaf7_ebx::BMI1)),
    ("bmi2", (7, 1, leaf7_ebx::BMI2)),
    ("adx", (7, 1, leaf7_ebx::ADX)),
    ("abm", (0x8000_0001, 2, ext_leaf1::ECX_ABM)),
    ("rdtscp", (0x8000_0001, 3, ext_leaf1::EDX_RDTSCP)),
];

/// Whether `p` enumerates the optional feature `name` (false for an unknown name).
pub fn has(p: &CpuidProfile, name: &str) -> bool {
    OPTIONAL_FEATURES
        .iter()
        .find(|(n, _)| *n == name)
        .is_some_and(|&(_, (leaf, reg, bit))| p.lookup(leaf, 0)[reg] & bit != 0)
}

impl CaseCpuid {
    /// The vendor and optional features of `p`.
    pub fn of(p: &CpuidProfile) -> CaseCpuid {
        CaseCpuid {
            vendor: p.vendor(),
            features: OPTIONAL_FEATURES
                .iter()
                .filter(|(n, _)| has(p, n))
                .map(|(n, _)| n.to_string())
                .collect(),
        }
    }

    /// The baseline with this vendor and only these optional features; `None` names the first
    /// unknown feature or a vendor that is not 12 bytes.
    pub fn profile(&self) -> Result<CpuidProfile, String> {
        if let Some(f) = self.features.iter().find(|f| !OPTIONAL_FEATURES.iter().any(|(n, _)| n == f)) {
            let names: Vec<&str> = OPTIONAL_FEATURES.iter().map(|(n, _)| *n).collect();
            return Err(format!("unknown feature `{f}` (known: {})", names.join(", ")));
        }
        let v: [u8; 12] = self
            .vendor
            .as_bytes()
            .try_into()
            .map_err(|_| format!("vendor `{}` is not 12 bytes", self.vendor))?;
        let mut p = CpuidProfile::baseline();
        for e in &mut p.entries {
            if e.function == 0 {
                let w = |i: usize| u32::from_le_bytes([v[i], v[i + 1], v[i + 2], v[i + 3]]);
                (e.ebx, e.edx, e.ecx) = (w(0), w(4), w(8));
            }
            for &(name, (leaf, reg, bit)) in OPTIONAL_FEATURES {
                if e.function != leaf
                    || (leaf == 7 && e.index != 0)
                    || self.features.iter().any(|f| f == name)
                {
                    continue;
                }
                match reg {
                    0 => e.eax &= !bit,
                    1 => e.ebx &= !bit,
                    2 => e.ecx &= !bit,
                    _ => e.edx &= !bit,
                }
            }
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_case_profile_round_trips_and_drops_only_the_features_not_named() {
        let base = CpuidProfile::baseline();
        let all = CaseCpuid::of(&base);
        assert_eq!(all.features.len(), OPTIONAL_FEATURES.len(), "the baseline has every optional feature");
        assert_eq!(all.profile(), Ok(base.clone()));
        let only = CaseCpuid { vendor: "AuthenticAMD".into(), features: vec!["cx16".into()] };
        let p = only.profile().unwrap();
        assert_eq!(p.vendor(), "AuthenticAMD");
        assert!(has(&p, "cx16") && !has(&p, "bmi1") && !has(&p, "abm") && !has(&p, "rdtscp"));
        // Everything that is not an optional feature stays as in the baseline.
        assert!(p.has_ext_edx(ext_leaf1::EDX_LM) && p.has_ext_ecx(ext_leaf1::ECX_LAHF_LM));
        assert_eq!(CaseCpuid::of(&p), only);
        assert!(CaseCpuid { vendor: "x".into(), features: vec![] }.profile().is_err());
        let bad = CaseCpuid { vendor: "GenuineIntel".into(), features: vec!["sse9".into()] };
        assert!(bad.profile().unwrap_err().contains("sse9"));
    }
}
