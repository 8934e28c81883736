//! The CPUID profile a case runs under, written into the case file so a replay is the same run
//! on every host.
//!
//! A campaign runs under [`crate::backends::shared_cpuid_profile`]: duet's baseline restricted to
//! what this host's KVM supports. That profile differs between hosts (here it keeps only CX16 of
//! the optional extensions), and the result of an instruction such as TZCNT depends on it (run
//! as BSF without BMI1, SDM Vol. 2B TZCNT). So each saved case names its vendor and the optional
//! features it saw ([`CaseCpuid`]); a replay builds exactly that profile from the baseline.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use duet_core::cpuid::{ext_leaf1, leaf1_ecx, leaf7_ebx, CpuidProfile};
use duet_core::Vendor;
use serde::{Deserialize, Serialize};

/// An optional CPUID feature of duet's baseline: each may be absent from a host's shared profile.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Feature {
    /// POPCNT (leaf 1 ECX).
    Popcnt,
    /// MOVBE (leaf 1 ECX).
    Movbe,
    /// CMPXCHG16B (leaf 1 ECX).
    Cx16,
    /// RD/WR FS/GS BASE (leaf 7 EBX).
    Fsgsbase,
    /// BMI1: ANDN, BEXTR, BLSI, BLSMSK, BLSR, TZCNT (leaf 7 EBX).
    Bmi1,
    /// BMI2: BZHI, MULX, PDEP, PEXT, RORX, SARX, SHLX, SHRX (leaf 7 EBX).
    Bmi2,
    /// ADCX, ADOX (leaf 7 EBX).
    Adx,
    /// LZCNT (leaf 0x8000_0001 ECX, AMD's name).
    Abm,
    /// RDTSCP (leaf 0x8000_0001 EDX).
    Rdtscp,
}

/// Where a feature's bit lives: (leaf, register index EAX=0 … EDX=3, bit).
type Place = (u32, usize, u32);

impl Feature {
    /// Every optional feature, in the order case files list them.
    pub const ALL: [Feature; 9] = [
        Feature::Popcnt,
        Feature::Movbe,
        Feature::Cx16,
        Feature::Fsgsbase,
        Feature::Bmi1,
        Feature::Bmi2,
        Feature::Adx,
        Feature::Abm,
        Feature::Rdtscp,
    ];

    /// The name case files use.
    pub fn name(self) -> &'static str {
        match self {
            Feature::Popcnt => "popcnt",
            Feature::Movbe => "movbe",
            Feature::Cx16 => "cx16",
            Feature::Fsgsbase => "fsgsbase",
            Feature::Bmi1 => "bmi1",
            Feature::Bmi2 => "bmi2",
            Feature::Adx => "adx",
            Feature::Abm => "abm",
            Feature::Rdtscp => "rdtscp",
        }
    }

    fn place(self) -> Place {
        match self {
            Feature::Popcnt => (1, 2, leaf1_ecx::POPCNT),
            Feature::Movbe => (1, 2, leaf1_ecx::MOVBE),
            Feature::Cx16 => (1, 2, leaf1_ecx::CX16),
            Feature::Fsgsbase => (7, 1, leaf7_ebx::FSGSBASE),
            Feature::Bmi1 => (7, 1, leaf7_ebx::BMI1),
            Feature::Bmi2 => (7, 1, leaf7_ebx::BMI2),
            Feature::Adx => (7, 1, leaf7_ebx::ADX),
            Feature::Abm => (0x8000_0001, 2, ext_leaf1::ECX_ABM),
            Feature::Rdtscp => (0x8000_0001, 3, ext_leaf1::EDX_RDTSCP),
        }
    }
}

impl fmt::Display for Feature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Feature {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Feature::ALL.into_iter().find(|f| f.name() == s).ok_or_else(|| {
            let names: Vec<&str> = Feature::ALL.iter().map(|f| f.name()).collect();
            format!("unknown feature `{s}` (known: {})", names.join(", "))
        })
    }
}

/// Whether `p` enumerates the optional feature `f`.
pub fn has(p: &CpuidProfile, f: Feature) -> bool {
    let (leaf, reg, bit) = f.place();
    p.lookup(leaf, 0)[reg] & bit != 0
}

/// The vendor and the optional CPUID features of a case's profile.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "CaseCpuidFile", into = "CaseCpuidFile")]
pub struct CaseCpuid {
    /// The vendor of leaf 0 (Intel or AMD: the two the software CPU models).
    pub vendor: Vendor,
    /// The optional features enumerated.
    pub features: BTreeSet<Feature>,
}

/// [`CaseCpuid`] as a case file spells it.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct CaseCpuidFile {
    /// The vendor string of leaf 0 (`GenuineIntel`, `AuthenticAMD`).
    vendor: String,
    /// The optional features enumerated, by [`Feature::name`].
    features: Vec<String>,
}

impl TryFrom<CaseCpuidFile> for CaseCpuid {
    type Error = String;
    fn try_from(f: CaseCpuidFile) -> Result<Self, Self::Error> {
        let vendor = vendor_of_id(&f.vendor)?;
        let features = f.features.iter().map(|n| n.parse()).collect::<Result<_, _>>()?;
        Ok(CaseCpuid { vendor, features })
    }
}

impl From<CaseCpuid> for CaseCpuidFile {
    fn from(c: CaseCpuid) -> Self {
        CaseCpuidFile {
            vendor: c.vendor.id().to_string(),
            features: c.features.iter().map(|f| f.name().to_string()).collect(),
        }
    }
}

/// The vendor a case file's leaf-0 string names: only the two vendors the software CPU models
/// are accepted (another string would silently run as Intel).
pub fn vendor_of_id(id: &str) -> Result<Vendor, String> {
    match Vendor::from_id(id) {
        v @ (Vendor::Intel | Vendor::Amd) if v.id() == id => Ok(v),
        _ => Err(format!("vendor `{id}` is not GenuineIntel or AuthenticAMD")),
    }
}

/// How a recording names the vendor of the host it was made on: the leaf-0 string of Intel and
/// AMD, `other` for any other vendor (a label to match hosts by, not a profile).
pub fn host_vendor_name(v: Vendor) -> &'static str {
    match v {
        Vendor::Intel | Vendor::Amd => v.id(),
        Vendor::Other => "other",
    }
}

/// Reads [`host_vendor_name`] back.
pub fn host_vendor_of_name(s: &str) -> Result<Vendor, String> {
    match s {
        "other" => Ok(Vendor::Other),
        _ => vendor_of_id(s).map_err(|_| format!("vendor `{s}` is not GenuineIntel, AuthenticAMD or other")),
    }
}

impl CaseCpuid {
    /// The vendor and optional features of `p` (a vendor other than Intel and AMD reads as Intel,
    /// as the software CPU treats it).
    pub fn of(p: &CpuidProfile) -> CaseCpuid {
        let vendor = match p.vendor_kind() {
            Vendor::Amd => Vendor::Amd,
            Vendor::Intel | Vendor::Other => Vendor::Intel,
        };
        CaseCpuid { vendor, features: Feature::ALL.into_iter().filter(|&f| has(p, f)).collect() }
    }

    /// The baseline with this vendor and only these optional features.
    pub fn profile(&self) -> CpuidProfile {
        let mut p = CpuidProfile::baseline().with_vendor(self.vendor);
        for e in &mut p.entries {
            for f in Feature::ALL {
                let (leaf, reg, bit) = f.place();
                if e.function != leaf || (leaf == 7 && e.index != 0) || self.features.contains(&f) {
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
        p
    }
}

impl fmt::Display for CaseCpuid {
    /// `AuthenticAMD cx16`: the vendor string, then the features (the form snapshots record).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.vendor.id())?;
        for feature in &self.features {
            write!(f, " {feature}")?;
        }
        Ok(())
    }
}

impl FromStr for CaseCpuid {
    type Err = String;
    /// Reads the [`fmt::Display`] form back.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut words = s.split_whitespace();
        let vendor = vendor_of_id(words.next().ok_or("an empty CPUID profile")?)?;
        let features = words.map(str::parse).collect::<Result<_, _>>()?;
        Ok(CaseCpuid { vendor, features })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_case_profile_round_trips_and_drops_only_the_features_not_named() {
        let base = CpuidProfile::baseline();
        let all = CaseCpuid::of(&base);
        assert_eq!(all.features.len(), Feature::ALL.len(), "the baseline has every optional feature");
        assert_eq!(all.profile(), base);
        let only = CaseCpuid { vendor: Vendor::Amd, features: [Feature::Cx16].into() };
        let p = only.profile();
        assert_eq!(p.vendor(), "AuthenticAMD");
        assert!(has(&p, Feature::Cx16) && !has(&p, Feature::Bmi1) && !has(&p, Feature::Abm));
        assert!(!has(&p, Feature::Rdtscp));
        // Everything that is not an optional feature stays as in the baseline.
        assert!(p.has_ext_edx(ext_leaf1::EDX_LM) && p.has_ext_ecx(ext_leaf1::ECX_LAHF_LM));
        assert_eq!(CaseCpuid::of(&p), only);
        assert_eq!(only.to_string(), "AuthenticAMD cx16");
        assert_eq!("AuthenticAMD cx16".parse(), Ok(only));
    }

    #[test]
    fn misspelt_features_and_unknown_vendors_are_refused_not_read_as_absent() {
        assert!("bmi3".parse::<Feature>().unwrap_err().contains("bmi3"));
        for f in Feature::ALL {
            assert_eq!(f.name().parse(), Ok(f));
        }
        let file = |vendor: &str, features: &[&str]| CaseCpuidFile {
            vendor: vendor.into(),
            features: features.iter().map(|s| s.to_string()).collect(),
        };
        assert!(CaseCpuid::try_from(file("GenuineIntel", &["sse9"])).unwrap_err().contains("sse9"));
        // Hygon is an AMD design, but its string is not AMD's: the file would not round-trip.
        assert!(CaseCpuid::try_from(file("HygonGenuine", &[])).is_err());
        assert!(CaseCpuid::try_from(file("x", &[])).is_err());
        let intel = CaseCpuid::try_from(file("GenuineIntel", &["bmi1"])).unwrap();
        assert_eq!(intel.vendor, Vendor::Intel);
        assert!(has(&intel.profile(), Feature::Bmi1) && !has(&intel.profile(), Feature::Bmi2));
    }
}
