//! The CPUID profile: one table applied to every backend, so a guest sees the same machine.

/// One CPUID leaf/subleaf and the four registers it returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CpuidEntry {
    /// EAX input (leaf).
    pub function: u32,
    /// ECX input (subleaf); 0 for leaves that ignore it.
    pub index: u32,
    /// Whether the leaf depends on ECX (KVM_CPUID_FLAG_SIGNIFCANT_INDEX).
    pub indexed: bool,
    /// EAX output.
    pub eax: u32,
    /// EBX output.
    pub ebx: u32,
    /// ECX output.
    pub ecx: u32,
    /// EDX output.
    pub edx: u32,
}

impl CpuidEntry {
    const fn leaf(function: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> Self {
        CpuidEntry { function, index: 0, indexed: false, eax, ebx, ecx, edx }
    }
}

/// Feature bits of leaf 1 EDX (SDM Vol. 2A, CPUID, Table 3-11).
pub mod leaf1_edx {
    /// 4 MiB pages (CR4.PSE).
    pub const PSE: u32 = 1 << 3;
    /// RDTSC and CR4.TSD.
    pub const TSC: u32 = 1 << 4;
    /// RDMSR/WRMSR.
    pub const MSR: u32 = 1 << 5;
    /// Physical address extension.
    pub const PAE: u32 = 1 << 6;
    /// CMPXCHG8B.
    pub const CX8: u32 = 1 << 8;
    /// Global pages (CR4.PGE).
    pub const PGE: u32 = 1 << 13;
    /// CMOVcc.
    pub const CMOV: u32 = 1 << 15;
}

/// Feature bits of leaf 1 ECX (SDM Vol. 2A, CPUID, Table 3-10).
pub mod leaf1_ecx {
    /// CMPXCHG16B.
    pub const CX16: u32 = 1 << 13;
    /// MOVBE.
    pub const MOVBE: u32 = 1 << 22;
    /// POPCNT.
    pub const POPCNT: u32 = 1 << 23;
    /// XSAVE/XRSTOR/XSETBV/XGETBV and XCR0.
    pub const XSAVE: u32 = 1 << 26;
    /// RDRAND.
    pub const RDRAND: u32 = 1 << 30;
}

/// Feature bits of leaf 7 subleaf 0 EBX (SDM Vol. 2A, CPUID, Table 3-8).
pub mod leaf7_ebx {
    /// RDFSBASE/RDGSBASE/WRFSBASE/WRGSBASE (with CR4.FSGSBASE).
    pub const FSGSBASE: u32 = 1 << 0;
    /// BMI1: ANDN, BEXTR, BLSI, BLSMSK, BLSR, TZCNT.
    pub const BMI1: u32 = 1 << 3;
    /// BMI2: BZHI, MULX, PDEP, PEXT, RORX, SARX, SHLX, SHRX.
    pub const BMI2: u32 = 1 << 8;
    /// ADX: ADCX, ADOX.
    pub const ADX: u32 = 1 << 19;
}

/// Feature bits of leaf 0x8000_0001 EDX/ECX (SDM Vol. 2A, CPUID, Table 3-8).
pub mod ext_leaf1 {
    /// EDX: SYSCALL/SYSRET in 64-bit mode.
    pub const EDX_SYSCALL: u32 = 1 << 11;
    /// EDX: execute-disable bit.
    pub const EDX_NX: u32 = 1 << 20;
    /// EDX: RDTSCP and IA32_TSC_AUX.
    pub const EDX_RDTSCP: u32 = 1 << 27;
    /// EDX: Intel 64 (long mode).
    pub const EDX_LM: u32 = 1 << 29;
    /// ECX: LAHF/SAHF in 64-bit mode.
    pub const ECX_LAHF_LM: u32 = 1 << 0;
    /// ECX: LZCNT (ABM).
    pub const ECX_ABM: u32 = 1 << 5;
    /// ECX: AMD's AltMovCr8, LOCK MOV CR0 as MOV CR8 outside 64-bit mode (AMD64 APM Vol. 3,
    /// CPUID Fn8000_0001 ECX bit 4); duet's profiles never advertise it.
    pub const ECX_CR8_LEGACY: u32 = 1 << 4;
}

/// AMD's extended feature leaf 0x8000_0021 (AMD64 APM Vol. 3, CPUID Fn8000_0021).
pub mod ext_leaf21 {
    /// The leaf number.
    pub const LEAF: u32 = 0x8000_0021;
    /// EAX: NullSelectorClearsBase, a null selector load clears the segment base.
    pub const EAX_NULL_SEL_CLR_BASE: u32 = 1 << 6;
}

/// The CPU vendor a profile presents (leaf 0), which decides every behaviour where Intel and AMD
/// silicon differ (docs/VENDORS.md lists them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Vendor {
    /// `GenuineIntel`: the Intel SDM decides.
    Intel,
    /// `AuthenticAMD` (or Hygon's `HygonGenuine`, an AMD design): the AMD64 APM decides.
    Amd,
    /// Any other vendor string: treated as Intel by the software CPU.
    Other,
}

impl Vendor {
    /// Both vendors whose behaviour the software CPU models, Intel first.
    pub const MODELLED: [Vendor; 2] = [Vendor::Intel, Vendor::Amd];

    /// The vendor a leaf-0 string names.
    pub fn from_id(id: &str) -> Vendor {
        match id {
            "GenuineIntel" => Vendor::Intel,
            "AuthenticAMD" | "HygonGenuine" => Vendor::Amd,
            _ => Vendor::Other,
        }
    }

    /// The leaf-0 string of this vendor (`Other` has none of its own: Intel's is used).
    pub fn id(self) -> &'static str {
        match self {
            Vendor::Intel | Vendor::Other => "GenuineIntel",
            Vendor::Amd => "AuthenticAMD",
        }
    }

    /// A short lower-case name for reports and file names (`intel`, `amd`, `other`).
    pub fn name(self) -> &'static str {
        match self {
            Vendor::Intel => "intel",
            Vendor::Amd => "amd",
            Vendor::Other => "other",
        }
    }
}

impl std::fmt::Display for Vendor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Vendor::Intel => "Intel",
            Vendor::Amd => "AMD",
            Vendor::Other => "other vendor",
        })
    }
}

/// The CPUID table a guest sees.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuidProfile {
    /// The leaves, looked up by (function, index).
    pub entries: Vec<CpuidEntry>,
}

/// Packs 12 ASCII bytes into (ebx, edx, ecx) as CPUID leaf 0 returns the vendor.
fn vendor_regs(v: &[u8; 12]) -> (u32, u32, u32) {
    let w = |i: usize| u32::from_le_bytes([v[i], v[i + 1], v[i + 2], v[i + 3]]);
    (w(0), w(4), w(8))
}

/// Packs 16 ASCII bytes into (eax, ebx, ecx, edx) for a brand-string leaf.
fn brand_regs(v: &[u8]) -> (u32, u32, u32, u32) {
    let mut b = [0u8; 16];
    b[..v.len().min(16)].copy_from_slice(&v[..v.len().min(16)]);
    let w = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    (w(0), w(4), w(8), w(12))
}

impl CpuidProfile {
    /// duet's baseline: only features the software CPU implements (no x87/SSE yet). RDRAND is
    /// implemented but not advertised: its values can never match hardware's.
    pub fn baseline() -> Self {
        use ext_leaf1::*;
        use leaf1_ecx::*;
        use leaf1_edx::*;
        use leaf7_ebx::*;
        let (vb, vd, vc) = vendor_regs(b"GenuineIntel");
        let mut entries = vec![
            CpuidEntry::leaf(0, 7, vb, vc, vd),
            // Family 6, model 0x3a, stepping 9; CLFLUSH line 8 × 8 bytes, one logical CPU.
            CpuidEntry::leaf(
                1,
                0x0003_06a9,
                0x0001_0800,
                CX16 | MOVBE | POPCNT,
                PSE | TSC | MSR | PAE | CX8 | PGE | CMOV,
            ),
            CpuidEntry {
                function: 7,
                index: 0,
                indexed: true,
                eax: 0,
                ebx: FSGSBASE | BMI1 | BMI2 | ADX,
                ecx: 0,
                edx: 0,
            },
            CpuidEntry::leaf(0x8000_0000, 0x8000_0008, 0, 0, 0),
            CpuidEntry::leaf(
                0x8000_0001,
                0,
                0,
                ECX_LAHF_LM | ECX_ABM,
                EDX_SYSCALL | EDX_NX | EDX_RDTSCP | EDX_LM,
            ),
        ];
        // The brand string: 48 bytes over leaves 0x8000_0002..4, NUL-padded.
        let mut brand = [0u8; 48];
        brand[..16].copy_from_slice(b"duet virtual CPU");
        for (i, chunk) in brand.chunks(16).enumerate() {
            let (a, b, c, d) = brand_regs(chunk);
            entries.push(CpuidEntry::leaf(0x8000_0002 + i as u32, a, b, c, d));
        }
        // 36 physical and 48 linear address bits: fits every x86-64 host.
        entries.push(CpuidEntry::leaf(0x8000_0008, 0x3024, 0, 0, 0));
        CpuidProfile { entries }
    }

    /// What CPUID returns for (`function`, `index`): out-of-range leaves return the highest
    /// basic leaf's values, and absent leaves in range return zeros (SDM Vol. 2A, CPUID).
    pub fn lookup(&self, function: u32, index: u32) -> [u32; 4] {
        let find = |f: u32, i: u32| {
            self.entries
                .iter()
                .find(|e| e.function == f && (!e.indexed || e.index == i))
                .map(|e| [e.eax, e.ebx, e.ecx, e.edx])
        };
        let max_basic = find(0, 0).map_or(0, |r| r[0]);
        let max_ext = find(0x8000_0000, 0).map_or(0, |r| r[0]);
        let in_range = if function >= 0x8000_0000 { function <= max_ext } else { function <= max_basic };
        if in_range {
            find(function, index).unwrap_or([0; 4])
        } else {
            find(max_basic, index).unwrap_or([0; 4])
        }
    }

    /// This profile restricted to what `host` supports: feature registers ANDed, the host's
    /// vendor string kept (KVM emulates some instructions by vendor), address sizes capped.
    pub fn restricted_to(&self, host: &CpuidProfile) -> CpuidProfile {
        let mut out = self.clone();
        for e in &mut out.entries {
            let h = host.lookup(e.function, e.index);
            match e.function {
                0 => {
                    e.ebx = h[1];
                    e.ecx = h[2];
                    e.edx = h[3];
                }
                1 => {
                    e.ecx &= h[2];
                    e.edx &= h[3];
                }
                7 => {
                    e.ebx &= h[1];
                    e.ecx &= h[2];
                    e.edx &= h[3];
                }
                0x8000_0001 => {
                    e.ecx &= h[2];
                    e.edx &= h[3];
                }
                0x8000_0008 => {
                    let phys = (e.eax & 0xff).min(h[0] & 0xff);
                    let lin = ((e.eax >> 8) & 0xff).min((h[0] >> 8) & 0xff);
                    e.eax = phys | (lin << 8);
                }
                _ => {}
            }
        }
        out
    }

    /// Whether leaf 1 EDX advertises `bit`.
    pub fn has_leaf1_edx(&self, bit: u32) -> bool {
        self.lookup(1, 0)[3] & bit != 0
    }

    /// Whether leaf 1 ECX advertises `bit`.
    pub fn has_leaf1_ecx(&self, bit: u32) -> bool {
        self.lookup(1, 0)[2] & bit != 0
    }

    /// Whether leaf 7 subleaf 0 EBX advertises `bit`.
    pub fn has_leaf7_ebx(&self, bit: u32) -> bool {
        self.lookup(7, 0)[1] & bit != 0
    }

    /// Whether leaf 0x8000_0001 ECX advertises `bit`.
    pub fn has_ext_ecx(&self, bit: u32) -> bool {
        self.lookup(0x8000_0001, 0)[2] & bit != 0
    }

    /// Whether leaf 0x8000_0001 EDX advertises `bit`.
    pub fn has_ext_edx(&self, bit: u32) -> bool {
        self.lookup(0x8000_0001, 0)[3] & bit != 0
    }

    /// The vendor string (leaf 0).
    pub fn vendor(&self) -> String {
        let r = self.lookup(0, 0);
        let bytes: Vec<u8> = [r[1], r[3], r[2]].iter().flat_map(|w| w.to_le_bytes()).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The vendor whose behaviour this profile asks for.
    pub fn vendor_kind(&self) -> Vendor {
        Vendor::from_id(&self.vendor())
    }

    /// This profile with leaf 0 naming `vendor` instead (every feature leaf unchanged).
    pub fn with_vendor(&self, vendor: Vendor) -> CpuidProfile {
        let mut out = self.clone();
        let id: &[u8; 12] = vendor.id().as_bytes().try_into().unwrap_or(b"GenuineIntel");
        let (b, d, c) = vendor_regs(id);
        for e in out.entries.iter_mut().filter(|e| e.function == 0) {
            (e.ebx, e.edx, e.ecx) = (b, d, c);
        }
        out
    }
}

impl Default for CpuidProfile {
    fn default() -> Self {
        CpuidProfile::baseline()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn baseline_advertises_long_mode_and_no_sse() {
        let p = CpuidProfile::baseline();
        assert_eq!(p.vendor(), "GenuineIntel");
        assert!(p.has_ext_edx(ext_leaf1::EDX_LM));
        // SDM Table 3-11: EDX bit 25 is SSE, bit 0 is FPU; the interpreter has neither yet.
        assert_eq!(p.lookup(1, 0)[3] & ((1 << 25) | 1), 0);
    }

    #[test]
    fn baseline_advertises_the_implemented_extensions_but_not_rdrand_or_xsave() {
        let p = CpuidProfile::baseline();
        use leaf1_ecx::*;
        assert!([CX16, MOVBE, POPCNT].iter().all(|&b| p.has_leaf1_ecx(b)));
        assert!(!p.has_leaf1_ecx(RDRAND) && !p.has_leaf1_ecx(XSAVE));
        use leaf7_ebx::*;
        assert!([FSGSBASE, BMI1, BMI2, ADX].iter().all(|&b| p.has_leaf7_ebx(b)));
        assert!(p.has_ext_ecx(ext_leaf1::ECX_ABM) && p.has_ext_edx(ext_leaf1::EDX_RDTSCP));
    }

    #[test]
    fn vendor_is_read_from_leaf_0_and_can_be_replaced() {
        let p = CpuidProfile::baseline();
        assert_eq!(p.vendor_kind(), Vendor::Intel);
        let amd = p.with_vendor(Vendor::Amd);
        assert_eq!(amd.vendor(), "AuthenticAMD");
        assert_eq!(amd.vendor_kind(), Vendor::Amd);
        assert_eq!(amd.lookup(1, 0), p.lookup(1, 0), "feature leaves are untouched");
        assert_eq!(amd.with_vendor(Vendor::Intel), p);
        assert_eq!(Vendor::from_id("HygonGenuine"), Vendor::Amd);
        assert_eq!(Vendor::from_id("CentaurHauls"), Vendor::Other);
    }

    #[test]
    fn brand_string_reads_back_whole() {
        let p = CpuidProfile::baseline();
        let bytes: Vec<u8> = (0x8000_0002..=0x8000_0004u32)
            .flat_map(|l| p.lookup(l, 0).into_iter().flat_map(u32::to_le_bytes))
            .collect();
        assert_eq!(&bytes[..17], b"duet virtual CPU\0");
        assert!(bytes[16..].iter().all(|&b| b == 0));
    }

    #[test]
    fn lookup_out_of_range_returns_highest_basic_leaf() {
        let p = CpuidProfile::baseline();
        assert_eq!(p.lookup(0x40, 0), p.lookup(7, 0));
        assert_eq!(p.lookup(5, 0), [0; 4]);
        assert_eq!(p.lookup(0x8000_0009, 0), p.lookup(7, 0));
    }

    #[test]
    fn restriction_ands_features_and_takes_host_vendor() {
        let p = CpuidProfile::baseline();
        let (b, d, c) = vendor_regs(b"AuthenticAMD");
        let host = CpuidProfile {
            entries: vec![
                CpuidEntry::leaf(0, 0xd, b, c, d),
                CpuidEntry::leaf(1, 0, 0, 0, leaf1_edx::TSC | (1 << 25)),
                CpuidEntry::leaf(0x8000_0000, 0x8000_0008, 0, 0, 0),
                CpuidEntry::leaf(0x8000_0008, 0x3020, 0, 0, 0),
            ],
        };
        let r = p.restricted_to(&host);
        assert_eq!(r.vendor(), "AuthenticAMD");
        assert_eq!(r.lookup(1, 0)[3], leaf1_edx::TSC);
        assert_eq!(r.lookup(0x8000_0008, 0)[0], 0x3020);
        assert!(!r.has_ext_edx(ext_leaf1::EDX_LM));
    }
}
