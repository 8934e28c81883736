//! Parsing QEMU's `info registers` (HMP, with FPU state) into a [`CpuState`].
//!
//! QEMU 7.2 prints 64-bit registers (`RAX=`, `R8 =`, 16-digit segment bases) only while CS is a
//! 64-bit segment; otherwise it prints `EAX=`… and 8-digit bases, so the upper halves of the
//! GPRs and R8–R15 read as zero here (the run then reads them through the gdbstub). CR8, the
//! MSRs and FOP/FIP/FDP are not printed at all: CR8 and the MSRs come from the gdbstub too,
//! FOP/FIP/FDP stay zero.

use std::collections::BTreeMap;

use duet_core::{CpuState, DescriptorTable, FxArea, Segment};

use crate::QemuError;

/// One parsed register dump.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dump {
    /// The state (MSRs empty, CR8 zero, APIC base zero).
    pub state: CpuState,
    /// QEMU's `HLT=1`: the vCPU is halted.
    pub halted: bool,
}

/// Splits the dump into `KEY -> values` (`ES =0010 0 ffffffff 00cf9300` gives `ES` with four).
fn fields(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines() {
        let line = line.replace(" =", "=");
        let mut key: Option<String> = None;
        for tok in line.split_whitespace() {
            if tok.starts_with('[') {
                key = None;
                continue;
            }
            if let Some((k, v)) = tok.split_once('=') {
                let vals = map.entry(k.to_string()).or_default();
                vals.clear();
                if !v.is_empty() {
                    vals.push(v.to_string());
                }
                key = Some(k.to_string());
            } else if let Some(k) = &key {
                map.entry(k.clone()).or_default().push(tok.to_string());
            }
        }
    }
    map
}

struct Fields {
    map: BTreeMap<String, Vec<String>>,
    text: String,
}

impl Fields {
    fn err(&self, what: String) -> QemuError {
        let line = self.text.lines().take(3).collect::<Vec<_>>().join(" | ");
        QemuError::Registers { what, line }
    }

    fn hex(&self, key: &str, i: usize) -> Result<u64, QemuError> {
        let v = self.map.get(key).and_then(|v| v.get(i)).ok_or_else(|| self.err(format!("no {key}[{i}]")))?;
        u64::from_str_radix(v, 16).map_err(|_| self.err(format!("{key}[{i}] = {v:?} is not hex")))
    }

    fn opt(&self, key: &str, i: usize) -> Option<u64> {
        self.hex(key, i).ok()
    }

    fn segment(&self, key: &str) -> Result<Segment, QemuError> {
        let (sel, base, limit, flags) =
            (self.hex(key, 0)?, self.hex(key, 1)?, self.hex(key, 2)?, self.hex(key, 3)?);
        Ok(segment_from_qemu(sel as u16, base, limit as u32, flags as u32))
    }
}

/// QEMU's segment cache (`flags` = descriptor bits 8–23 of the high dword) as a [`Segment`].
pub fn segment_from_qemu(selector: u16, base: u64, limit: u32, flags: u32) -> Segment {
    let bit = |n: u32| flags & (1 << n) != 0;
    Segment {
        base,
        limit,
        selector,
        type_: ((flags >> 8) & 0xf) as u8,
        s: bit(12),
        dpl: ((flags >> 13) & 3) as u8,
        present: bit(15),
        avl: bit(20),
        l: bit(21),
        db: bit(22),
        g: bit(23),
        // QEMU loads a null selector as base 0, limit 0, flags 0: not present, hence unusable.
        unusable: !bit(15),
    }
}

/// Parses the output of `info registers` (as the HMP prints it with FPU state).
pub fn parse(text: &str) -> Result<Dump, QemuError> {
    let f = Fields { map: fields(text), text: text.to_string() };
    let mut s = CpuState::default();
    let wide = f.map.contains_key("RAX");
    let r = &mut s.regs;
    if wide {
        let names = [
            "RAX", "RCX", "RDX", "RBX", "RSP", "RBP", "RSI", "RDI", "R8", "R9", "R10", "R11", "R12", "R13",
            "R14", "R15",
        ];
        let mut g = [0u64; 16];
        for (slot, name) in g.iter_mut().zip(names) {
            *slot = f.hex(name, 0)?;
        }
        r.set_gprs(&g);
        r.rip = f.hex("RIP", 0)?;
        r.rflags = f.hex("RFL", 0)?;
    } else {
        let names = ["EAX", "ECX", "EDX", "EBX", "ESP", "EBP", "ESI", "EDI"];
        let mut g = [0u64; 16];
        for (slot, name) in g.iter_mut().zip(names) {
            *slot = f.hex(name, 0)?;
        }
        r.set_gprs(&g);
        r.rip = f.hex("EIP", 0)?;
        r.rflags = f.hex("EFL", 0)?;
    }
    let sr = &mut s.sregs;
    (sr.es, sr.cs, sr.ss, sr.ds, sr.fs, sr.gs) = (
        f.segment("ES")?,
        f.segment("CS")?,
        f.segment("SS")?,
        f.segment("DS")?,
        f.segment("FS")?,
        f.segment("GS")?,
    );
    sr.ldt = f.segment("LDT")?;
    // LLDT with a null selector makes LDTR invalid (SDM Vol. 2A LLDT); QEMU then zeroes its base
    // and limit but keeps the flags, so "present" alone does not tell. The RESET LDTR, also
    // selector 0, has limit 0xFFFF (SDM Vol. 3A Table 10-1) and stays usable.
    if sr.ldt.selector & !3 == 0 && sr.ldt.limit == 0 {
        sr.ldt.unusable = true;
    }
    sr.tr = f.segment("TR")?;
    sr.gdt = DescriptorTable { base: f.hex("GDT", 0)?, limit: f.hex("GDT", 1)? as u16 };
    sr.idt = DescriptorTable { base: f.hex("IDT", 0)?, limit: f.hex("IDT", 1)? as u16 };
    (sr.cr0, sr.cr2, sr.cr3, sr.cr4) =
        (f.hex("CR0", 0)?, f.hex("CR2", 0)?, f.hex("CR3", 0)?, f.hex("CR4", 0)?);
    sr.efer = f.hex("EFER", 0)?;
    s.fpu = fx_area(&f);
    let halted = f.opt("HLT", 0).ok_or_else(|| f.err("no HLT flag".into()))? == 1;
    Ok(Dump { state: s, halted })
}

/// The FXSAVE image of what QEMU prints: FCW, FSW, abridged FTW, MXCSR, ST(i), XMMi.
fn fx_area(f: &Fields) -> FxArea {
    let mut fx = FxArea::default();
    let b = &mut fx.0;
    let fcw = f.opt("FCW", 0).unwrap_or(0x37f) as u16;
    let fsw = f.opt("FSW", 0).unwrap_or(0) as u16;
    b[0..2].copy_from_slice(&fcw.to_le_bytes());
    b[2..4].copy_from_slice(&fsw.to_le_bytes());
    b[4] = f.opt("FTW", 0).unwrap_or(0) as u8;
    b[24..28].copy_from_slice(&(f.opt("MXCSR", 0).unwrap_or(0x1f80) as u32).to_le_bytes());
    // QEMU prints physical registers; FXSAVE stores ST(i) = R[(TOP + i) mod 8].
    let top = usize::from((fsw >> 11) & 7);
    for i in 0..8 {
        let key = format!("FPR{}", (top + i) & 7);
        let (mant, exp) = (f.opt(&key, 0).unwrap_or(0), f.opt(&key, 1).unwrap_or(0) as u16);
        let off = 32 + 16 * i;
        b[off..off + 8].copy_from_slice(&mant.to_le_bytes());
        b[off + 8..off + 10].copy_from_slice(&exp.to_le_bytes());
    }
    for i in 0..16 {
        let key = format!("XMM{i:02}");
        let (hi, lo) = (f.opt(&key, 0).unwrap_or(0), f.opt(&key, 1).unwrap_or(0));
        let off = 160 + 16 * i;
        b[off..off + 8].copy_from_slice(&lo.to_le_bytes());
        b[off + 8..off + 16].copy_from_slice(&hi.to_le_bytes());
    }
    fx
}

#[cfg(test)]
mod tests {
    use duet_core::CpuMode;

    use super::*;

    /// Verbatim `info registers` of QEMU 7.2 right after RESET (from a run on the dev host).
    const RESET: &str = "CPU#0\r\nEAX=00000000 EBX=00000000 ECX=00000000 EDX=00060fb1\r\n\
ESI=00000000 EDI=00000000 EBP=00000000 ESP=00000000\r\n\
EIP=0000fff2 EFL=00000002 [-------] CPL=0 II=0 A20=1 SMM=0 HLT=1\r\n\
ES =0000 00000000 0000ffff 00009300\r\nCS =f000 ffff0000 0000ffff 00009b00\r\n\
SS =0000 00000000 0000ffff 00009300\r\nDS =0000 00000000 0000ffff 00009300\r\n\
FS =0000 00000000 0000ffff 00009300\r\nGS =0000 00000000 0000ffff 00009300\r\n\
LDT=0000 00000000 0000ffff 00008200\r\nTR =0000 00000000 0000ffff 00008b00\r\n\
GDT=     00000000 0000ffff\r\nIDT=     00000000 0000ffff\r\n\
CR0=60000010 CR2=00000000 CR3=00000000 CR4=00000000\r\n\
DR6=00000000ffff0ff0 DR7=0000000000000400\r\nEFER=0000000000000000\r\n\
FCW=037f FSW=0000 [ST=0] FTW=00 MXCSR=00001f80\r\n\
FPR0=0000000000000000 0000 FPR1=0000000000000000 0000\r\n\
XMM00=0000000000000000 0000000000000000 XMM01=0000000000000000 0000000000000000\r\n";

    #[test]
    fn reset_dump_is_the_sdm_reset_state() {
        let d = parse(RESET).unwrap();
        assert!(d.halted);
        let want = CpuState::reset();
        assert_eq!(d.state.sregs.cs, want.sregs.cs);
        assert_eq!(
            (d.state.sregs.ds, d.state.sregs.tr, d.state.sregs.ldt),
            (want.sregs.ds, want.sregs.tr, want.sregs.ldt)
        );
        assert_eq!((d.state.sregs.gdt, d.state.sregs.idt), (want.sregs.gdt, want.sregs.idt));
        assert_eq!(d.state.sregs.cr0, 0x6000_0010);
        assert_eq!((d.state.regs.rip, d.state.regs.rdx, d.state.regs.rflags), (0xfff2, 0x60fb1, 2));
        assert_eq!(d.state.fpu, FxArea::default());
        assert_eq!(d.state.mode(), CpuMode::Real);
    }

    #[test]
    fn long_mode_dump_reads_wide_registers_and_descriptor_flags() {
        let text = "RAX=0000000100000000 RBX=0000000000000002 RCX=0000000000000003 RDX=0000000000000004\n\
RSI=0000000000000005 RDI=0000000000000006 RBP=0000000000000007 RSP=0000000000080000\n\
R8 =0000000000000008 R9 =0000000000000009 R10=000000000000000a R11=000000000000000b\n\
R12=000000000000000c R13=000000000000000d R14=000000000000000e R15=ffffffffffffffff\n\
RIP=0000000000100005 RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=0\n\
ES =0010 0000000000000000 ffffffff 00cf9300 DPL=0 DS   [-WA]\n\
CS =0018 0000000000000000 ffffffff 00af9b00 DPL=0 CS64 [-RA]\n\
SS =0010 0000000000000000 ffffffff 00cf9300 DPL=0 DS   [-WA]\n\
DS =0010 0000000000000000 ffffffff 00cf9300 DPL=0 DS   [-WA]\n\
FS =0000 0000000000000000 00000000 00000000\n\
GS =0010 0000000012340000 ffffffff 00cf9300 DPL=0 DS   [-WA]\n\
LDT=0000 0000000000000000 0000ffff 00008200 DPL=0 LDT\n\
TR =0050 0000000000000600 00000067 00008b00 DPL=0 TSS64-busy\n\
GDT=     0000000000001000 0000005f\nIDT=     0000000000002000 00000fff\n\
CR0=80000031 CR2=0000000100000000 CR3=0000000000010000 CR4=00000020\n\
EFER=0000000000000500\nFCW=037f FSW=3800 [ST=7] FTW=80 MXCSR=00001f80\n\
FPR0=8000000000000000 3fff FPR1=0000000000000000 0000\n\
XMM00=1111111111111111 2222222222222222 XMM01=0000000000000000 0000000000000000\n";
        let d = parse(text).unwrap();
        let s = &d.state;
        assert!(!d.halted);
        assert_eq!((s.regs.rax, s.regs.r8, s.regs.r15, s.regs.rsp), (1 << 32, 8, u64::MAX, 0x8_0000));
        assert_eq!(s.mode(), CpuMode::Long64);
        assert!(s.sregs.cs.l && !s.sregs.cs.db && s.sregs.cs.type_ == 0xb);
        assert_eq!(s.sregs.cs.to_descriptor(), 0x00af_9b00_0000_ffff);
        assert!(s.sregs.fs.unusable && !s.sregs.ds.unusable);
        assert_eq!(s.sregs.gs.base, 0x1234_0000);
        assert_eq!(
            (s.sregs.tr.base, s.sregs.tr.limit, s.sregs.tr.type_, s.sregs.tr.s),
            (0x600, 0x67, 0xb, false)
        );
        assert_eq!((s.sregs.cr2, s.sregs.efer, s.sregs.idt.limit), (1 << 32, 0x500, 0xfff));
        // TOP = 7: ST(1) is physical register 0 (1.0 = mantissa 8000…, exponent 3fff).
        assert_eq!(s.fpu.0[4], 0x80);
        assert_eq!(&s.fpu.0[48..58], &[0, 0, 0, 0, 0, 0, 0, 0x80, 0xff, 0x3f]);
        assert_eq!(s.fpu.xmm(0), 0x1111_1111_1111_1111_2222_2222_2222_2222);
    }
    #[test]
    fn a_null_ldtr_loaded_by_lldt_is_unusable_but_the_reset_one_is_not() {
        // QEMU's LLDT of a null selector leaves base 0, limit 0 and the old flags (0x8200); the
        // SDM makes LDTR invalid then (Vol. 2A LLDT). RESET's LDTR has limit 0xFFFF and is valid.
        let after_lldt0 =
            RESET.replace("LDT=0000 00000000 0000ffff 00008200", "LDT=0000 00000000 00000000 00008200");
        assert_ne!(after_lldt0, RESET, "the sample holds the RESET LDT line");
        assert!(parse(&after_lldt0).unwrap().state.sregs.ldt.unusable);
        assert!(!parse(RESET).unwrap().state.sregs.ldt.unusable);
    }
}
