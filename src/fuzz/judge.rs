//! Comparing two outcomes, the host limits' seam, and the third-opinion seam.

use std::collections::BTreeSet;

use duet_core::state::{ctrl, rflags};
use duet_core::StopReason;
use iced_x86::{Decoder, Instruction};

use super::case::{Case, Outcome, Parsed};
use super::diff::{Diff, Row};
use super::layout::STACK_TOPS;
use super::outcome::{stop_text, ExitKind, Field, SegPart, SegReg};

/// RFLAGS bits a comparison masks: those the architecture leaves undefined.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Undefined {
    /// Undefined at the end of the run (the software CPU's per-instruction facts from iced-x86,
    /// tracked through the run): masked in RFLAGS and in FLAGS images pushed near a stack.
    pub at_end: u64,
    /// Status flags some instruction of the program may leave undefined ([`static_undefined`]),
    /// masked in pushed FLAGS images only: an exception frame taken mid-program holds the flags
    /// of that moment, and the fixtures' handler stub redefines flags before the run ends.
    pub in_images: u64,
}

/// Compares two outcomes; only RFLAGS bits either side reports undefined are masked, in RFLAGS
/// and in pushed FLAGS images on the stacks (an exception frame or PUSHF of undefined flags).
///
/// `initial` reads the 8-byte word at an address of the case's initial image (a word missing
/// from one side's memory map is unchanged there).
pub fn compare(left: (&str, &Outcome), right: (&str, &Outcome), initial: &dyn Fn(u64) -> u64) -> Diff {
    let at_end = left.1.rflags_undefined | right.1.rflags_undefined;
    compare_masked(left, right, initial, Undefined { at_end, in_images: 0 })
}

/// Compares two outcomes masking exactly `undefined` (neither side's own mask is added: a
/// caller comparing two hardware results passes the software CPU's mask for the same case).
pub fn compare_masked(
    left: (&str, &Outcome),
    right: (&str, &Outcome),
    initial: &dyn Fn(u64) -> u64,
    undefined: Undefined,
) -> Diff {
    let (a, b) = (left.1, right.1);
    let mut d = Diff { sides: (left.0.into(), right.0.into()), rows: Vec::new() };
    if a.stop != b.stop {
        d.rows.push(Row::Stop { left: a.stop.clone(), right: b.stop.clone() });
    }
    // MMIO reads are left out: their number and size are not architectural (see HOST_SPECIFIC).
    let visible =
        |o: &Outcome| o.exits.iter().filter(|e| e.kind != ExitKind::MmioRead).cloned().collect::<Vec<_>>();
    let (ea, eb) = (visible(a), visible(b));
    let exits_row = |d: &mut Diff| {
        if ea != eb {
            let n = ea.iter().zip(&eb).take_while(|(x, y)| x == y).count();
            d.rows.push(Row::Exit { index: n, left: ea.get(n).cloned(), right: eb.get(n).cloned() });
        }
    };
    if a.shut_down() && b.shut_down() {
        // See HOST_SPECIFIC: after a triple fault only the stop and the exits are compared.
        exits_row(&mut d);
        return d;
    }
    let undef = undefined.at_end;
    let keys: BTreeSet<Field> = a.state.keys().chain(b.state.keys()).copied().collect();
    for k in keys {
        let (x, y) = (a.state.get(&k).copied(), b.state.get(&k).copied());
        // An MSR one backend cannot read is a host limit, not a CPU difference.
        if matches!(k, Field::Msr(_)) && (x.is_none() || y.is_none()) {
            continue;
        }
        let differs =
            if k == Field::Rflags { x.unwrap_or(0) & !undef != y.unwrap_or(0) & !undef } else { x != y };
        if differs {
            d.rows.push(Row::Register { field: k, left: x, right: y });
        }
    }
    let words: BTreeSet<u64> = a.memory.keys().chain(b.memory.keys()).copied().collect();
    let iu = undef | undefined.in_images;
    for addr in words {
        let val = |o: &Outcome| o.memory.get(&addr).copied().unwrap_or_else(|| initial(addr));
        let (x, y) = (val(a), val(b));
        if x != y && !undefined_flags_image(addr, x ^ y, iu) && !frame_flags(a, addr, x ^ y, iu) {
            d.rows.push(Row::Memory { addr, left: x, right: y });
        }
    }
    exits_row(&mut d);
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
    if o.exception().is_none() {
        return false;
    }
    let get = |f: Field| o.state.get(&f).copied();
    let (Some(rsp), Some(cr0), Some(efer)) = (get(Field::RSP), get(Field::CR0), get(Field::Efer)) else {
        return false;
    };
    let ss = get(Field::Seg(SegReg::Ss, SegPart::Base)).unwrap_or(0);
    let width = if efer & ctrl::EFER_LMA != 0 {
        8
    } else if cr0 & ctrl::CR0_PE != 0 {
        4
    } else {
        2
    };
    let sp = if cr0 & ctrl::CR0_PE == 0 { rsp & 0xffff } else { rsp };
    let slot = ss.wrapping_add(sp).wrapping_add(width);
    let m = undef & rflags::STATUS;
    if m == 0 || slot >= addr.saturating_add(8) || slot.saturating_add(8) <= addr {
        return false;
    }
    // The slot may straddle two 8-byte words when the stack pointer is misaligned.
    let mask = if slot >= addr { m << ((slot - addr) * 8) } else { m >> ((addr - slot) * 8) };
    diff & !mask == 0
}

/// Status flags (RFLAGS bit positions) that some instruction of `code` may leave undefined:
/// iced-x86's per-instruction masks, plus OF of every shift or rotate (defined only for a count of
/// 1, SDM Vol. 2B SAL/SAR/SHL/SHR, RCL/RCR/ROL/ROR).
pub fn static_undefined(p: &Parsed) -> u64 {
    let (mode, code) = (p.mode, &p.code[..]);
    let ip = super::gen::code_ip(mode);
    let mut m = 0u32;
    for i in p.decodings().into_iter().flat_map(|o| Decoder::with_ip(mode.bitness(), code, ip, o)) {
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
    instruction_limit, outcome_limit, HostLimit, Hosts, Matched, OutcomeLimit, Standing, HOST_SPECIFIC,
    HOST_SPECIFIC_LIMITS, KVM_PVM_LIMITS, KVM_PVM_OUTCOME_LIMITS,
};

/// A short name for the kind of a divergence: KVM's stop and the classes of fields that differ
/// (`exception #GP: mem,rflags`).
pub fn signature(kvm_stop: &StopReason, diff: &Diff) -> String {
    let stop = match kvm_stop {
        StopReason::Exception(r) => format!("exception {}", r.name()),
        StopReason::Debug(_) => "debug".into(),
        StopReason::Unsupported(_) => "unsupported".into(),
        StopReason::CannotRun(_) => "cannot-run".into(),
        other => stop_text(other),
    };
    let classes: BTreeSet<String> = diff.rows.iter().map(Row::class).collect();
    format!("{stop}: {}", classes.into_iter().collect::<Vec<_>>().join(","))
}

/// Whether KVM ignores unknown MSRs on this host (`/sys/module/kvm/parameters/ignore_msrs`).
pub fn ignore_msrs() -> bool {
    std::fs::read_to_string("/sys/module/kvm/parameters/ignore_msrs").is_ok_and(|v| v.trim() == "Y")
}

/// The first of `limits` the program of `p` runs into, if any (the whole code is decoded).
///
/// The code is decoded from its start and from every target of a relative branch in it, so an
/// instruction reached by jumping into the middle of another (a 16-bit branch in 64-bit code
/// on an AMD part, say) is seen too; and it is decoded each way a backend may decode it
/// ([`Parsed::decodings`]: the profile's vendor, and Intel's as KVM's emulator does).
pub fn host_limit(p: &Parsed, limits: &[HostLimit]) -> Option<HostLimit> {
    if limits.is_empty() {
        return None;
    }
    p.decodings().into_iter().find_map(|options| host_limit_decoded(p, limits, options))
}

/// [`host_limit`] for one way of decoding the code (iced-x86 `DecoderOptions`).
fn host_limit_decoded(p: &Parsed, limits: &[HostLimit], options: u32) -> Option<HostLimit> {
    let code = &p.code;
    let ip = super::gen::code_ip(p.mode);
    let mut starts = vec![ip];
    let mut seen = BTreeSet::new();
    while let Some(start) = starts.pop() {
        if !seen.insert(start) || start < ip || start - ip >= code.len() as u64 {
            continue;
        }
        let off = (start - ip) as usize;
        let mut dec = Decoder::with_ip(p.mode.bitness(), &code[off..], start, options);
        let mut prev: Option<Instruction> = None;
        for ins in &mut dec {
            if let Some(l) = limits.iter().find(|l| (l.applies)(p.mode, &ins, prev.as_ref())) {
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
    /// Whether this is an opinion at all (the default [`NoReference`] is not): on a host without
    /// KVM a real reference is the only one asked.
    fn asks(&self) -> bool {
        true
    }
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
    fn asks(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use duet_core::layout::ExceptionReport;

    use super::*;
    use crate::fuzz::outcome::{vector, Exit};
    use crate::fuzz::FuzzMode;

    fn exception(vector: u8, rip: u64) -> StopReason {
        StopReason::Exception(ExceptionReport { vector, error_code: 0, rip })
    }

    #[test]
    fn undefined_flags_of_a_frame_straddling_two_words_are_masked_in_both() {
        // A 32-bit frame at ESP = 0x6fffb: EFLAGS at 0x6ffff..0x70002, split over two words.
        let mut o = Outcome::stopped(exception(vector::GP, 0x8003));
        for (k, v) in [(Field::RSP, 0x6fffb_u64), (Field::CR0, 0x11), (Field::Efer, 0)] {
            o.state.insert(k, v);
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

    fn parsed(mode: FuzzMode, code: &[u8]) -> Parsed {
        Parsed::of_code(mode, code)
    }

    #[test]
    fn host_limits_decode_as_the_case_profile_s_vendor_does() {
        use super::super::limits::HOST_SPECIFIC_LIMITS;
        // 66 0F 84 rel16 in 64-bit mode: AMD honours the operand-size prefix (a 5-byte Jcc, then
        // RDTSC); Intel ignores it and reads a rel32 that swallows the RDTSC (iced-x86
        // DecoderOptions::AMD; docs/VENDORS.md).
        let code = [0x66, 0x0f, 0x84, 0, 0, 0x0f, 0x31, 0x90, 0x90, 0xe6, 0xf4];
        let intel = parsed(FuzzMode::Long64, &code);
        assert!(host_limit(&intel, HOST_SPECIFIC_LIMITS).is_none());
        let amd = Parsed { vendor: duet_core::Vendor::Amd, ..intel };
        assert_eq!(host_limit(&amd, HOST_SPECIFIC_LIMITS).map(|l| l.name), Some("time-stamp-counter"));
    }

    #[test]
    fn host_limits_see_instructions_reached_by_a_branch_into_another() {
        // jmp +1 lands on 0F A2 (CPUID), which a linear decode sees as part of MOV EAX, imm32.
        let hidden = parsed(FuzzMode::Long64, &[0xeb, 0x01, 0xb8, 0x0f, 0xa2, 0x90, 0x90, 0xe6, 0xf4]);
        assert_eq!(host_limit(&hidden, KVM_PVM_LIMITS).map(|l| l.name), Some("cpuid-host-leaves"));
        let plain = parsed(FuzzMode::Long64, &[0xb8, 0x0f, 0xa2, 0x90, 0x90, 0xe6, 0xf4]);
        assert!(host_limit(&plain, KVM_PVM_LIMITS).is_none());
        assert!(host_limit(&hidden, &[]).is_none(), "no limits given");
    }

    #[test]
    fn rflags_compare_masks_undefined_bits_and_exits_show_first_difference() {
        let mut a = Outcome::stopped(StopReason::Halted);
        a.rflags_undefined = rflags::AF;
        a.state.insert(Field::Rflags, 0x2);
        let mut b = a.clone();
        b.state.insert(Field::Rflags, 0x12);
        let zero = |_| 0;
        assert!(compare(("kvm", &a), ("interp", &b), &zero).is_empty());
        b.exits.push("out 0x80 1 00".parse::<Exit>().unwrap());
        let d = compare(("kvm", &a), ("interp", &b), &zero);
        assert_eq!(d.rows, vec![Row::Exit { index: 0, left: None, right: b.exits.first().cloned() }]);
        assert_eq!(signature(&a.stop, &d), "halted: exit");
    }

    #[test]
    fn a_mask_passed_in_covers_two_results_that_carry_none() {
        // Two hardware results carry no undefined mask; the software CPU's is passed in.
        let mut recorded = Outcome::stopped(exception(vector::GP, 0x8000));
        recorded.state.insert(Field::Rflags, 0x56);
        let mut kvm = recorded.clone();
        kvm.state.insert(Field::Rflags, 0x46);
        let zero = |_| 0;
        assert_eq!(compare(("recorded", &recorded), ("kvm", &kvm), &zero).rows.len(), 1);
        let af = Undefined { at_end: rflags::AF, in_images: 0 };
        assert!(compare_masked(("recorded", &recorded), ("kvm", &kvm), &zero, af).is_empty());
        kvm.state.insert(Field::Rflags, 0x57);
        let d = compare_masked(("recorded", &recorded), ("kvm", &kvm), &zero, af);
        assert_eq!(d.rows, vec![Row::Register { field: Field::Rflags, left: Some(0x56), right: Some(0x57) }]);
        assert_eq!(signature(&kvm.stop, &d), "exception #GP: rflags");
    }
}
