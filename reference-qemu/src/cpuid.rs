//! The CPUID profile as QEMU `-cpu` options, so a guest sees the same features on all three CPUs.
//!
//! The mapping starts from QEMU's featureless `base` model and names every feature bit the
//! profile sets; a bit QEMU has no name for is an error rather than silently dropped, and
//! `enforce` makes QEMU refuse to start when TCG cannot provide a named feature. What
//! QEMU computes itself and cannot be told (checked by the `cpuid` test guest):
//! - leaf 1 EBX bits 23:16 (logical processors): QEMU reports 0 with one vCPU, the profile 1;
//! - leaf 1 EBX bits 31:24 (initial APIC ID) are QEMU's APIC ID (0, as in the profile);
//! - leaf 0x8000_0001 EAX: QEMU repeats the leaf 1 signature there, the profile has 0;
//! - leaf 0x8000_0008 EAX bits 15:8 (linear address bits) are 48 (57 with LA57);
//! - the brand string (leaves 0x8000_0002–4) is QEMU's `model-id`, text up to the first NUL,
//!   so a brand with a NUL inside could not be reproduced (the baseline's, "duet virtual CPU",
//!   has none).

use duet_core::CpuidProfile;

use crate::QemuError;

/// QEMU's feature names for each bit of a CPUID register (None where QEMU has no name).
type Names = [Option<&'static str>; 32];

macro_rules! names {
    ($($bit:literal => $name:literal),* $(,)?) => {{
        let mut n: Names = [None; 32];
        $( n[$bit] = Some($name); )*
        n
    }};
}

fn leaf1_edx() -> Names {
    names! { 0 => "fpu", 1 => "vme", 2 => "de", 3 => "pse", 4 => "tsc", 5 => "msr", 6 => "pae", 7 => "mce",
    8 => "cx8", 9 => "apic", 11 => "sep", 12 => "mtrr", 13 => "pge", 14 => "mca", 15 => "cmov", 16 => "pat",
    17 => "pse36", 18 => "pn", 19 => "clflush", 21 => "ds", 22 => "acpi", 23 => "mmx", 24 => "fxsr",
    25 => "sse", 26 => "sse2", 27 => "ss", 28 => "ht", 29 => "tm", 30 => "ia64", 31 => "pbe" }
}

fn leaf1_ecx() -> Names {
    names! { 0 => "pni", 1 => "pclmulqdq", 2 => "dtes64", 3 => "monitor", 4 => "ds-cpl", 5 => "vmx", 6 => "smx",
    7 => "est", 8 => "tm2", 9 => "ssse3", 10 => "cid", 12 => "fma", 13 => "cx16", 14 => "xtpr", 15 => "pdcm",
    17 => "pcid", 18 => "dca", 19 => "sse4.1", 20 => "sse4.2", 21 => "x2apic", 22 => "movbe", 23 => "popcnt",
    24 => "tsc-deadline", 25 => "aes", 26 => "xsave", 28 => "avx", 29 => "f16c", 30 => "rdrand", 31 => "hypervisor" }
}

fn leaf7_ebx() -> Names {
    names! { 0 => "fsgsbase", 1 => "tsc-adjust", 3 => "bmi1", 4 => "hle", 5 => "avx2", 7 => "smep", 8 => "bmi2",
    9 => "erms", 10 => "invpcid", 11 => "rtm", 14 => "mpx", 16 => "avx512f", 17 => "avx512dq", 18 => "rdseed",
    19 => "adx", 20 => "smap", 21 => "avx512ifma", 23 => "clflushopt", 24 => "clwb", 26 => "avx512pf",
    27 => "avx512er", 28 => "avx512cd", 29 => "sha-ni", 30 => "avx512bw", 31 => "avx512vl" }
}

fn leaf7_ecx() -> Names {
    names! { 1 => "avx512vbmi", 2 => "umip", 3 => "pku", 6 => "avx512vbmi2", 8 => "gfni", 9 => "vaes",
    10 => "vpclmulqdq", 11 => "avx512vnni", 12 => "avx512bitalg", 14 => "avx512-vpopcntdq", 16 => "la57",
    22 => "rdpid", 25 => "cldemote", 27 => "movdiri", 28 => "movdir64b" }
}

fn leaf7_edx() -> Names {
    names! { 4 => "fsrm", 10 => "md-clear", 14 => "serialize", 26 => "spec-ctrl", 27 => "stibp", 31 => "ssbd" }
}

fn ext1_edx() -> Names {
    names! { 11 => "syscall", 19 => "mp", 20 => "nx", 22 => "mmxext", 25 => "fxsr-opt", 26 => "pdpe1gb",
    27 => "rdtscp", 29 => "lm", 30 => "3dnowext", 31 => "3dnow" }
}

fn ext1_ecx() -> Names {
    names! { 0 => "lahf-lm", 1 => "cmp-legacy", 2 => "svm", 3 => "extapic", 4 => "cr8legacy", 5 => "abm",
    6 => "sse4a", 7 => "misalignsse", 8 => "3dnowprefetch", 9 => "osvw", 10 => "ibs", 11 => "xop",
    12 => "skinit", 13 => "wdt", 15 => "lwp", 16 => "fma4", 17 => "tce", 19 => "nodeid-msr", 21 => "tbm",
    22 => "topoext", 23 => "perfctr-core", 24 => "perfctr-nb" }
}

/// QEMU's `cpuid_version` encoding of a family/model/stepping (target/i386/cpu.c).
fn qemu_version(family: u32, model: u32, stepping: u32) -> u32 {
    let fam = if family > 0xf { 0xf00 | ((family - 0xf) << 20) } else { family << 8 };
    fam | ((model & 0xf) << 4) | ((model >> 4) << 16) | stepping
}

/// Text of 12 or 16-byte register strings, up to the first NUL.
fn text(words: &[u32]) -> String {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).take_while(|&b| b != 0).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The `-cpu` argument that gives the guest `profile`'s CPUID.
pub fn cpu_option(profile: &CpuidProfile) -> Result<String, QemuError> {
    let bad = |m: String| QemuError::Cpuid(m);
    let l0 = profile.lookup(0, 0);
    let vendor = text(&[l0[1], l0[3], l0[2]]);
    if vendor.len() != 12 || !vendor.bytes().all(|b| b.is_ascii_graphic() && b != b',') {
        return Err(bad(format!("vendor {vendor:?} is not 12 printable characters")));
    }
    let sig = profile.lookup(1, 0)[0];
    let base_family = (sig >> 8) & 0xf;
    let family = if base_family == 0xf { base_family + ((sig >> 20) & 0xff) } else { base_family };
    let model = if base_family == 6 || base_family == 0xf {
        (((sig >> 16) & 0xf) << 4) | ((sig >> 4) & 0xf)
    } else {
        (sig >> 4) & 0xf
    };
    let stepping = sig & 0xf;
    if qemu_version(family, model, stepping) != sig {
        return Err(bad(format!(
            "leaf 1 signature {sig:#x} has bits QEMU's family/model/stepping cannot encode"
        )));
    }
    let mut opt =
        format!("base,vendor={vendor},family={family},model={model},stepping={stepping},level={:#x}", l0[0]);
    let max_ext = profile.entries.iter().find(|e| e.function == 0x8000_0000).map(|e| e.eax);
    if let Some(x) = max_ext {
        opt += &format!(",xlevel={x:#x}");
    }
    let l1 = profile.lookup(1, 0);
    let l7 = profile.lookup(7, 0);
    let e1 = if max_ext.is_some_and(|x| x >= 0x8000_0001) { profile.lookup(0x8000_0001, 0) } else { [0; 4] };
    let regs = [
        ("leaf 1 EDX", l1[3], leaf1_edx()),
        ("leaf 1 ECX", l1[2], leaf1_ecx()),
        ("leaf 7 EBX", if l0[0] >= 7 { l7[1] } else { 0 }, leaf7_ebx()),
        ("leaf 7 ECX", if l0[0] >= 7 { l7[2] } else { 0 }, leaf7_ecx()),
        ("leaf 7 EDX", if l0[0] >= 7 { l7[3] } else { 0 }, leaf7_edx()),
        ("leaf 0x8000_0001 EDX", e1[3], ext1_edx()),
        ("leaf 0x8000_0001 ECX", e1[2], ext1_ecx()),
    ];
    for (what, value, names) in regs {
        for bit in (0..32).filter(|b| value & (1 << b) != 0) {
            let name = names[bit].ok_or_else(|| bad(format!("{what} bit {bit} has no QEMU feature name")))?;
            opt += &format!(",+{name}");
        }
    }
    if max_ext.is_some_and(|x| x >= 0x8000_0004) {
        let mut words = Vec::new();
        for leaf in 0x8000_0002..=0x8000_0004 {
            words.extend(profile.lookup(leaf, 0));
        }
        let brand = text(&words);
        if !brand.is_empty() {
            opt += &format!(",model-id={}", brand.replace(',', ",,"));
        }
    }
    if max_ext.is_some_and(|x| x >= 0x8000_0008) {
        let phys = profile.lookup(0x8000_0008, 0)[0] & 0xff;
        if phys != 0 {
            opt += &format!(",phys-bits={phys}");
        }
    }
    // A feature TCG cannot provide makes QEMU refuse to start (naming it on stderr) instead
    // of silently running a guest that sees less than the profile.
    opt += ",enforce";
    Ok(opt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn baseline_maps_to_named_features() {
        let o = cpu_option(&CpuidProfile::baseline()).unwrap();
        assert!(
            o.starts_with(
                "base,vendor=GenuineIntel,family=6,model=58,stepping=9,level=0x7,xlevel=0x80000008"
            ),
            "{o}"
        );
        for f in
            ["+pse", "+tsc", "+msr", "+pae", "+cx8", "+pge", "+cmov", "+syscall", "+nx", "+lm", "+lahf-lm"]
        {
            assert!(o.contains(&format!("{f},")) || o.contains(&format!("{f},model-id")), "{f} in {o}");
        }
        assert!(o.ends_with(",model-id=duet virtual CPU,phys-bits=36,enforce"), "{o}");
        assert!(!o.contains("+fpu") && !o.contains("+sse"), "{o}");
    }

    #[test]
    fn unnamed_bits_and_odd_signatures_are_refused() {
        let mut p = CpuidProfile::baseline();
        if let Some(e) = p.entries.iter_mut().find(|e| e.function == 1) {
            e.edx |= 1 << 10; // reserved
        }
        assert!(matches!(cpu_option(&p), Err(QemuError::Cpuid(m)) if m.contains("leaf 1 EDX bit 10")));
        // SDM Vol. 2A CPUID, Figure 3-6: family 0xf + extended family 1 = 0x10, model 0x21.
        assert_eq!(qemu_version(0x10, 0x21, 2), 0x0012_0f12);
        assert_eq!(qemu_version(6, 0x3a, 9), 0x0003_06a9);
    }
}
