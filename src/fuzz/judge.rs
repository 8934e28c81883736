//! Comparing two outcomes, the one list of known host limits, and the third-opinion seam.

use std::collections::BTreeSet;

use duet_core::diff::DiffRow;
use duet_core::state::rflags;
use duet_core::StateDiff;
use iced_x86::{Decoder, DecoderOptions, Instruction};

use super::case::{parse_hex, Case, FuzzMode, Outcome};
use super::layout::STACK_TOPS;

/// Compares two outcomes; only RFLAGS bits either side reports undefined are masked, in RFLAGS
/// and in pushed FLAGS images on the stacks (an exception frame or PUSHF of undefined flags).
///
/// `initial` reads the 8-byte word at an address of the case's initial image (a word missing
/// from one side's memory map is unchanged there).
pub fn compare(left: (&str, &Outcome), right: (&str, &Outcome), initial: &dyn Fn(u64) -> u64) -> StateDiff {
    compare_with(left, right, initial, 0)
}

/// [`compare`], with `images_undef` — status flags some instruction of the program may leave
/// undefined ([`static_undefined`]) — also masked in pushed FLAGS images: an exception frame
/// taken mid-program holds the flags of that moment, and the fixtures' handler stub redefines
/// flags before the run ends, so the final undefined mask no longer covers them.
pub fn compare_with(
    left: (&str, &Outcome),
    right: (&str, &Outcome),
    initial: &dyn Fn(u64) -> u64,
    images_undef: u64,
) -> StateDiff {
    let (a, b) = (left.1, right.1);
    let mut d = StateDiff { sides: (left.0.into(), right.0.into()), rows: Vec::new() };
    let row =
        |field: &str, l: &str, r: &str| DiffRow { field: field.into(), left: l.into(), right: r.into() };
    if a.stop != b.stop {
        d.rows.push(row("stop", &a.stop, &b.stop));
    }
    // MMIO reads are left out: their number and size are not architectural (see HOST_SPECIFIC).
    let visible = |o: &Outcome| -> Vec<String> {
        o.exits.iter().filter(|e| !e.starts_with("mmio-read")).cloned().collect()
    };
    if a.stop == "shutdown" && b.stop == "shutdown" {
        // See HOST_SPECIFIC: after a triple fault only the stop and the exits are compared.
        if visible(a) != visible(b) {
            d.rows.push(row("exits", &visible(a).join("; "), &visible(b).join("; ")));
        }
        return d;
    }
    let undef = parse_hex(&a.rflags_undefined).unwrap_or(0) | parse_hex(&b.rflags_undefined).unwrap_or(0);
    let keys: BTreeSet<&String> = a.state.keys().chain(b.state.keys()).collect();
    for k in keys {
        let (x, y) = (a.state.get(k), b.state.get(k));
        // An MSR one backend cannot read is a host limit, not a CPU difference.
        if k.starts_with("msr[") && (x.is_none() || y.is_none()) {
            continue;
        }
        let differs = if k == "rflags" {
            let f = |v: Option<&String>| v.and_then(|s| parse_hex(s)).unwrap_or(0) & !undef;
            f(x) != f(y)
        } else {
            x != y
        };
        if differs {
            let show = |v: Option<&String>| v.cloned().unwrap_or_else(|| "absent".into());
            d.rows.push(row(k, &show(x), &show(y)));
        }
    }
    let words: BTreeSet<&String> = a.memory.keys().chain(b.memory.keys()).collect();
    for w in words {
        let Some(addr) = parse_hex(w) else { continue };
        let val = |o: &Outcome| o.memory.get(w).and_then(|v| parse_hex(v)).unwrap_or_else(|| initial(addr));
        let (x, y) = (val(a), val(b));
        let iu = undef | images_undef;
        if x != y && !undefined_flags_image(addr, x ^ y, iu) && !frame_flags(a, addr, x ^ y, iu) {
            d.rows.push(row(&format!("mem[{addr:#x}]"), &format!("{x:016x}"), &format!("{y:016x}")));
        }
    }
    let (ea, eb) = (visible(a), visible(b));
    if ea != eb {
        let n = ea.iter().zip(&eb).take_while(|(x, y)| x == y).count();
        let at = |v: &Vec<String>| v.get(n).cloned().unwrap_or_else(|| "(no more exits)".into());
        d.rows.push(row(&format!("exit #{n}"), &at(&ea), &at(&eb)));
    }
    d
}

/// Whether `diff` (two values of the word at `addr`) lies only in undefined flag bits of a
/// 16-bit-aligned FLAGS image within 512 bytes below one of the stacks' tops.
fn undefined_flags_image(addr: u64, diff: u64, undef: u64) -> bool {
    let m = undef & rflags::STATUS;
    // Also the bottom of memory: a real-mode stack at SS = 0 whose SP wrapped through 0.
    let near_stack = STACK_TOPS.iter().chain(&[0x200]).any(|&top| addr < top && top - addr <= 512);
    near_stack && m != 0 && (0..4).any(|k| diff & !(m << (16 * k)) == 0)
}

/// Whether `diff` at `addr` lies only in undefined flag bits of the EFLAGS image of the
/// exception frame the fixtures' stub left on the stack (RFLAGS slot just above CS).
fn frame_flags(o: &Outcome, addr: u64, diff: u64, undef: u64) -> bool {
    if !o.stop.starts_with("exception") {
        return false;
    }
    let get = |k: &str| o.state.get(k).and_then(|v| parse_hex(v));
    let (Some(rsp), Some(cr0), Some(efer)) = (get("rsp"), get("cr0"), get("efer")) else { return false };
    let ss = get("ss.base").unwrap_or(0);
    let width = if efer & (1 << 10) != 0 {
        8
    } else if cr0 & 1 != 0 {
        4
    } else {
        2
    };
    let sp = if cr0 & 1 == 0 { rsp & 0xffff } else { rsp };
    let slot = ss.wrapping_add(sp).wrapping_add(width);
    let m = undef & rflags::STATUS;
    if m == 0 || slot >= addr + 8 || slot + 8 <= addr {
        return false;
    }
    // The slot may straddle two 8-byte words when the stack pointer is misaligned.
    let mask = if slot >= addr { m << ((slot - addr) * 8) } else { m >> ((addr - slot) * 8) };
    diff & !mask == 0
}

/// Status flags (RFLAGS bit positions) that some instruction of `code` may leave undefined:
/// iced-x86's per-instruction masks, plus OF of every shift or rotate (defined only for a count of
/// 1, SDM Vol. 2B SAL/SAR/SHL/SHR, RCL/RCR/ROL/ROR).
pub fn static_undefined(mode: FuzzMode, code: &[u8]) -> u64 {
    let ip = super::gen::code_ip(mode);
    let mut m = 0u32;
    for i in Decoder::with_ip(mode.bitness(), code, ip, DecoderOptions::NONE) {
        m |= i.rflags_undefined();
        if super::gen::is_shift_or_rotate(i.mnemonic()) {
            m |= iced_x86::RflagsBits::OF;
        }
    }
    let bit = |b: u32, f: u64| if m & b != 0 { f } else { 0 };
    use iced_x86::RflagsBits as R;
    bit(R::OF, rflags::OF)
        | bit(R::SF, rflags::SF)
        | bit(R::ZF, rflags::ZF)
        | bit(R::AF, rflags::AF)
        | bit(R::CF, rflags::CF)
        | bit(R::PF, rflags::PF)
}

pub use super::limits::{
    outcome_limit, HostLimit, OutcomeLimit, HOST_SPECIFIC, HOST_SPECIFIC_LIMITS, KVM_PVM_LIMITS,
    KVM_PVM_OUTCOME_LIMITS,
};

/// A short name for the kind of a divergence: KVM's stop and the classes of fields that differ.
pub fn signature(kvm_stop: &str, diff: &StateDiff) -> String {
    let stop: Vec<&str> = kvm_stop.split_whitespace().take(2).collect();
    let mut classes: Vec<String> = diff
        .rows
        .iter()
        .map(|r| {
            let f = r.field.split(['[', '.', ' ']).next().unwrap_or("");
            f.to_string()
        })
        .collect();
    classes.sort();
    classes.dedup();
    format!("{}: {}", stop.join(" "), classes.join(","))
}

/// Whether KVM ignores unknown MSRs on this host (`/sys/module/kvm/parameters/ignore_msrs`).
pub fn ignore_msrs() -> bool {
    std::fs::read_to_string("/sys/module/kvm/parameters/ignore_msrs").is_ok_and(|v| v.trim() == "Y")
}

/// Whether this host's KVM is `kvm_pvm` (DEVELOPERS.md), whose limits then apply.
pub fn kvm_is_pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

/// The first known host limit `case`'s code runs into, if any (the whole code is decoded).
///
/// The code is decoded from its start and from every target of a relative branch in it, so an
/// instruction reached by jumping into the middle of another (a 16-bit branch in 64-bit code
/// on an AMD part, say) is seen too.
pub fn host_limit(case: &Case, code: &[u8], limits: &[HostLimit]) -> Option<HostLimit> {
    if limits.is_empty() {
        return None;
    }
    let ip = super::gen::code_ip(case.mode);
    let mut starts = vec![ip];
    let mut seen = BTreeSet::new();
    while let Some(start) = starts.pop() {
        if !seen.insert(start) || start < ip || start - ip >= code.len() as u64 {
            continue;
        }
        let off = (start - ip) as usize;
        let mut dec = Decoder::with_ip(case.mode.bitness(), &code[off..], start, DecoderOptions::NONE);
        let mut prev: Option<Instruction> = None;
        for ins in &mut dec {
            if let Some(l) = limits.iter().find(|l| (l.applies)(case.mode, &ins, prev.as_ref())) {
                return Some(*l);
            }
            if ins.is_jcc_short_or_near()
                || ins.is_jmp_short_or_near()
                || ins.is_call_near()
                || ins.is_loop()
                || ins.is_loopcc()
                || ins.is_jcx_short()
            {
                // The target, and its 16-bit truncation (an operand-size prefix on the branch).
                let t = ins.near_branch_target();
                starts.push(t);
                starts.push(t & 0xffff);
            }
            prev = Some(ins);
        }
    }
    None
}

/// A third opinion: runs a case from its start state and returns its outcome.
pub trait Reference: Send + Sync {
    /// Name shown in reports ("qemu").
    fn name(&self) -> &'static str;
    /// The outcome of `case`, or why this reference cannot run it.
    fn run(&self, case: &Case) -> Result<Outcome, String>;
}

/// No third opinion: the default of a campaign (QEMU costs a process per case).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoReference;

impl Reference for NoReference {
    fn name(&self) -> &'static str {
        "qemu"
    }
    fn run(&self, _case: &Case) -> Result<Outcome, String> {
        Err("no third opinion asked (`duet fuzz --reference` asks QEMU)".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn undefined_flags_of_a_frame_straddling_two_words_are_masked_in_both() {
        // A 32-bit frame at ESP = 0x6fffb: EFLAGS at 0x6ffff..0x70002, split over two words.
        let mut o = Outcome { stop: "exception #GP error 0x0 at 0x8003".into(), ..Outcome::default() };
        for (k, v) in [("rsp", 0x6fffb_u64), ("cr0", 0x11), ("efer", 0)] {
            o.state.insert(k.into(), format!("{v:#x}"));
        }
        let undef = rflags::AF | rflags::OF;
        assert!(frame_flags(&o, 0x6fff8, rflags::AF << 56, undef), "AF in the last byte of the lower word");
        assert!(frame_flags(&o, 0x70000, rflags::OF >> 8, undef), "OF in the first byte of the upper word");
        assert!(!frame_flags(&o, 0x70000, rflags::CF << 8, undef), "a defined flag is not masked");
        assert!(!frame_flags(&o, 0x70008, rflags::OF >> 8, undef), "a word the slot does not reach");
    }

    #[test]
    fn pushed_undefined_flags_are_masked_only_near_a_stack() {
        let af = rflags::AF;
        assert!(undefined_flags_image(0x7bf0, af << 32, af));
        assert!(!undefined_flags_image(0x7bf0, rflags::CF << 32, af));
        assert!(!undefined_flags_image(0xa000, af, af));
    }

    fn case(mode: FuzzMode, code: &[u8]) -> Case {
        Case {
            format: super::super::case::CASE_FORMAT,
            mode,
            note: String::new(),
            regs: Default::default(),
            rflags: "0x2".into(),
            segments: Default::default(),
            code: super::super::case::hex_bytes(code),
            disasm: Vec::new(),
            data: String::new(),
            cpuid: None,
            expected: None,
        }
    }

    #[test]
    fn host_limits_see_instructions_reached_by_a_branch_into_another() {
        // jmp +1 lands on 0F A2 (CPUID), which a linear decode sees as part of MOV EAX, imm32.
        let hidden = [0xeb, 0x01, 0xb8, 0x0f, 0xa2, 0x90, 0x90, 0xe6, 0xf4];
        let c = case(FuzzMode::Long64, &hidden);
        assert_eq!(host_limit(&c, &hidden, KVM_PVM_LIMITS).map(|l| l.name), Some("cpuid-host-leaves"));
        let plain = [0xb8, 0x0f, 0xa2, 0x90, 0x90, 0xe6, 0xf4];
        assert!(host_limit(&case(FuzzMode::Long64, &plain), &plain, KVM_PVM_LIMITS).is_none());
        assert!(host_limit(&c, &hidden, &[]).is_none(), "no limits on a bare-metal host");
    }

    #[test]
    fn outcome_limits_match_only_their_own_difference() {
        let mut kvm = Outcome { stop: "debug-exit 0x0".into(), ..Outcome::default() };
        kvm.state.insert("rflags".into(), format!("{:#x}", 0x202));
        let mut interp = kvm.clone();
        interp.state.insert("rflags".into(), format!("{:#x}", 0x202 | rflags::AC));
        let c = case(FuzzMode::Long64, &[0xe6, 0xf4]);
        let zero = |_| 0;
        let d = compare(("kvm", &kvm), ("interp", &interp), &zero);
        let name = |k: &Outcome, i: &Outcome, d: &StateDiff| {
            outcome_limit(&c, k, i, d, KVM_PVM_OUTCOME_LIMITS).map(|l| l.name)
        };
        assert_eq!(name(&kvm, &interp, &d), Some("eflags-ac"));
        // AC plus a defined flag is not explained by the AC limit.
        interp.state.insert("rflags".into(), format!("{:#x}", 0x202 | rflags::AC | rflags::CF));
        let d = compare(("kvm", &kvm), ("interp", &interp), &zero);
        assert_eq!(name(&kvm, &interp, &d), None);
        // Unless that flag is undefined: the difference is then masked away entirely.
        interp.rflags_undefined = format!("{:#x}", rflags::CF);
        assert_eq!(compare(("kvm", &kvm), ("interp", &interp), &zero).rows.len(), 1);
    }

    #[test]
    fn rflags_compare_masks_undefined_bits_and_exits_show_first_difference() {
        let mut a = Outcome { stop: "halted".into(), rflags_undefined: "0x10".into(), ..Outcome::default() };
        a.state.insert("rflags".into(), "0x2".into());
        let mut b = a.clone();
        b.state.insert("rflags".into(), "0x12".into());
        let zero = |_| 0;
        assert!(compare(("kvm", &a), ("interp", &b), &zero).is_empty());
        b.exits.push("out 0x80 1 00".into());
        let d = compare(("kvm", &a), ("interp", &b), &zero);
        assert_eq!(d.rows.len(), 1);
        assert_eq!(d.rows[0].field, "exit #0");
    }
}
