//! POPCNT, LZCNT, TZCNT, BMI1, BMI2, ADX and MOVBE on KVM and on the interpreter over edge
//! operands, in 64-bit mode (where this host's KVM runs the ALU right, DEVELOPERS.md): every
//! result, and every flag the SDM defines for the instruction, must match. Both run with the
//! baseline profile restricted to what KVM supports; an instruction KVM does not advertise is
//! checked to be #UD on the interpreter instead. Skips out loud without KVM.
//!
//! This development host's KVM (`kvm_pvm`) advertises none of these and cannot run them (POPCNT
//! is a KVM_EXIT_INTERNAL_ERROR emulation failure there), so here the test checks the #UD side
//! only; `bitmanip.rs` holds the SDM-derived checks. On bare metal it compares every form.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use duet_core::cpuid::{ext_leaf1, leaf1_ecx, leaf7_ebx};
use duet_core::state::rflags::{CF, OF, SF, STATUS, ZF};
use duet_core::vm_memory::{Bytes, GuestAddress};
use duet_core::{CpuidProfile, GuestMemory, Machine, RunOptions, StopReason, Vcpu};
use duet_interp::InterpVcpu;
use iced_x86::code_asm::*;

/// Where each case stores RAX, RSI and the defined flags.
const OUT: u64 = 0x20_0000;
/// Operands: zero, one, sign bits, all ones, patterns, small counts and BEXTR/BZHI controls.
const VALUES: [u64; 8] = [
    0,
    1,
    0x8000_0000,
    0x8000_0000_0000_0000,
    u64::MAX,
    0x1234_5678_9abc_def0,
    0x0000_0000_0000_0d05,
    0x0000_0000_0000_2a1f,
];

/// One instruction form under test: its feature, the flags the SDM defines after it, and the
/// code that runs it on RBX/RCX (RDX = the second operand too, for MULX), writing RAX (and RSI).
struct Form {
    name: &'static str,
    feature: fn(&CpuidProfile) -> bool,
    defined: u64,
    emit: fn(&mut CodeAssembler),
}

fn popcnt(p: &CpuidProfile) -> bool {
    p.has_leaf1_ecx(leaf1_ecx::POPCNT)
}
fn lzcnt(p: &CpuidProfile) -> bool {
    p.has_ext_ecx(ext_leaf1::ECX_ABM)
}
fn bmi1(p: &CpuidProfile) -> bool {
    p.has_leaf7_ebx(leaf7_ebx::BMI1)
}
fn bmi2(p: &CpuidProfile) -> bool {
    p.has_leaf7_ebx(leaf7_ebx::BMI2)
}
fn adx(p: &CpuidProfile) -> bool {
    p.has_leaf7_ebx(leaf7_ebx::ADX)
}
fn movbe(p: &CpuidProfile) -> bool {
    p.has_leaf1_ecx(leaf1_ecx::MOVBE)
}

macro_rules! form {
    ($name:literal, $feat:ident, $defined:expr, |$a:ident| $body:expr) => {
        Form { name: $name, feature: $feat, defined: $defined, emit: |$a| $body.unwrap() }
    };
}

/// Flags an instruction leaves alone are defined (unchanged); `CZ` etc. name the ones the SDM
/// defines for the instructions that write some and leave others undefined.
fn forms() -> Vec<Form> {
    const CZ: u64 = CF | ZF;
    const SZOC: u64 = SF | ZF | OF | CF;
    vec![
        form!("popcnt r64", popcnt, STATUS, |a| a.popcnt(rax, rbx)),
        form!("popcnt r32", popcnt, STATUS, |a| a.popcnt(eax, ebx)),
        form!("popcnt r16", popcnt, STATUS, |a| a.popcnt(ax, bx)),
        form!("lzcnt r64", lzcnt, CZ, |a| a.lzcnt(rax, rbx)),
        form!("lzcnt r32", lzcnt, CZ, |a| a.lzcnt(eax, ebx)),
        form!("lzcnt r16", lzcnt, CZ, |a| a.lzcnt(ax, bx)),
        form!("tzcnt r64", bmi1, CZ, |a| a.tzcnt(rax, rbx)),
        form!("tzcnt r32", bmi1, CZ, |a| a.tzcnt(eax, ebx)),
        form!("tzcnt r16", bmi1, CZ, |a| a.tzcnt(ax, bx)),
        form!("andn r64", bmi1, SZOC, |a| a.andn(rax, rbx, rcx)),
        form!("andn r32", bmi1, SZOC, |a| a.andn(eax, ebx, ecx)),
        form!("bextr r64", bmi1, ZF | CF | OF, |a| a.bextr(rax, rbx, rcx)),
        form!("bextr r32", bmi1, ZF | CF | OF, |a| a.bextr(eax, ebx, ecx)),
        form!("blsi r64", bmi1, SZOC, |a| a.blsi(rax, rbx)),
        form!("blsi r32", bmi1, SZOC, |a| a.blsi(eax, ebx)),
        form!("blsmsk r64", bmi1, SZOC, |a| a.blsmsk(rax, rbx)),
        form!("blsmsk r32", bmi1, SZOC, |a| a.blsmsk(eax, ebx)),
        form!("blsr r64", bmi1, SZOC, |a| a.blsr(rax, rbx)),
        form!("blsr r32", bmi1, SZOC, |a| a.blsr(eax, ebx)),
        form!("bzhi r64", bmi2, SZOC, |a| a.bzhi(rax, rbx, rcx)),
        form!("bzhi r32", bmi2, SZOC, |a| a.bzhi(eax, ebx, ecx)),
        form!("mulx r64", bmi2, STATUS, |a| a.mulx(rax, rsi, rbx)),
        form!("mulx r32", bmi2, STATUS, |a| a.mulx(eax, esi, ebx)),
        form!("pdep r64", bmi2, STATUS, |a| a.pdep(rax, rbx, rcx)),
        form!("pdep r32", bmi2, STATUS, |a| a.pdep(eax, ebx, ecx)),
        form!("pext r64", bmi2, STATUS, |a| a.pext(rax, rbx, rcx)),
        form!("pext r32", bmi2, STATUS, |a| a.pext(eax, ebx, ecx)),
        form!("rorx r64", bmi2, STATUS, |a| a.rorx(rax, rbx, 45)),
        form!("rorx r32", bmi2, STATUS, |a| a.rorx(eax, ebx, 13)),
        form!("sarx r64", bmi2, STATUS, |a| a.sarx(rax, rbx, rcx)),
        form!("sarx r32", bmi2, STATUS, |a| a.sarx(eax, ebx, ecx)),
        form!("shlx r64", bmi2, STATUS, |a| a.shlx(rax, rbx, rcx)),
        form!("shrx r32", bmi2, STATUS, |a| a.shrx(eax, ebx, ecx)),
        form!("adcx r64", adx, STATUS, |a| a.adcx(rax, rbx)),
        form!("adcx r32", adx, STATUS, |a| a.adcx(eax, ebx)),
        form!("adox r64", adx, STATUS, |a| a.adox(rax, rbx)),
        form!("adox r32", adx, STATUS, |a| a.adox(eax, ebx)),
        form!("movbe r64, m64", movbe, STATUS, |a| a.movbe(rax, qword_ptr(rsp - 8))),
        form!("movbe r16, m16", movbe, STATUS, |a| a.movbe(ax, word_ptr(rsp - 8))),
    ]
}

/// The guest for `form`: every (x, y) pair of [`VALUES`], starting with all status flags clear
/// or all set in turn; RAX starts as y (the ADCX/ADOX accumulator), RSI as a marker.
fn guest(form: &Form) -> Vec<u8> {
    asm(64, |a| {
        let mut i = 0u64;
        for &x in &VALUES {
            for &y in &VALUES {
                a.mov(rbx, x).unwrap();
                a.mov(rcx, y).unwrap();
                a.mov(rdx, y).unwrap();
                a.mov(rax, y).unwrap();
                a.mov(rsi, 0x5a5a_5a5a_5a5a_5a5au64).unwrap();
                a.mov(qword_ptr(rsp - 8), rbx).unwrap(); // MOVBE's source
                a.push(if i % 2 == 0 { 0x2 } else { (STATUS | 2) as i32 }).unwrap();
                a.popfq().unwrap();
                (form.emit)(a);
                a.pushfq().unwrap();
                a.pop(r8).unwrap();
                a.and(r8, form.defined as i32).unwrap();
                let slot = OUT + 24 * i;
                a.mov(qword_ptr(slot), rax).unwrap();
                a.mov(qword_ptr(slot + 8), rsi).unwrap();
                a.mov(qword_ptr(slot + 16), r8).unwrap();
                i += 1;
            }
        }
        a.hlt().unwrap();
    })
}

/// Runs `code` in 64-bit mode on `vcpu`; returns how it stopped, the vector of the exception
/// stub it stopped in (if any) and the result slots.
fn run_on<V: Vcpu>(
    mem: Arc<GuestMemory>,
    mut vcpu: V,
    code_len: usize,
) -> (StopReason, Option<u64>, Vec<u8>) {
    let s = long64(&mem);
    vcpu.set_state(&s).unwrap();
    let mut m = Machine::with_vcpu(mem.clone(), vcpu);
    let out = m.run(&RunOptions { timeout: Duration::from_secs(30) }).unwrap();
    let mut slots = vec![0u8; 24 * VALUES.len() * VALUES.len()];
    mem.read_slice(&mut slots, GuestAddress(OUT)).unwrap();
    assert!(code_len < 0x8000, "the guest must stay below the page tables");
    (out.stop, stub_vector(&out.state), slots)
}

#[test]
fn bit_manipulation_extensions_match_kvm() {
    let Some(kvm) = duet_kvm::testing::kvm_or_skip() else { return };
    let profile = CpuidProfile::baseline().restricted_to(&kvm.host_cpuid().unwrap());
    let mut compared = 0;
    for form in forms() {
        let code = guest(&form);
        let fallback = form.name.starts_with("lzcnt") || form.name.starts_with("tzcnt");
        if !(form.feature)(&profile) && fallback {
            // Without the feature these encodings are BSR/BSF (SDM Vol. 2A LZCNT, Vol. 2B TZCNT).
            let mem = memory(&code);
            let (stop, vector, _) = run_on(mem.clone(), InterpVcpu::new(mem, &profile), code.len());
            assert_eq!((stop, vector), (StopReason::Halted, None), "{}", form.name);
            println!("{}: not advertised by this host's KVM; the interpreter runs BSR/BSF", form.name);
            continue;
        }
        if !(form.feature)(&profile) {
            // Not advertised on this host: the interpreter must refuse it (#UD).
            let mem = memory(&code);
            let (stop, vector, _) = run_on(mem.clone(), InterpVcpu::new(mem, &profile), code.len());
            assert_eq!((stop, vector), (StopReason::Halted, Some(6)), "{}", form.name);
            println!("{}: not advertised by this host's KVM; the interpreter raises #UD", form.name);
            continue;
        }
        let mem = memory(&code);
        let (istop, ivec, islots) = run_on(mem.clone(), InterpVcpu::new(mem, &profile), code.len());
        let mem = memory(&code);
        let (kstop, kvec, kslots) = run_on(mem.clone(), kvm.create(mem, &profile).unwrap(), code.len());
        if let StopReason::CannotRun(why) = &kstop {
            println!("{}: KVM half skipped: {}", form.name, why.reason);
            assert_eq!((istop, ivec), (StopReason::Halted, None), "{} on the interpreter", form.name);
            continue;
        }
        assert_eq!((kstop, kvec), (StopReason::Halted, None), "{} on KVM", form.name);
        assert_eq!((istop, ivec), (StopReason::Halted, None), "{} on the interpreter", form.name);
        let q = |b: &[u8], k: usize| u64::from_le_bytes(b[8 * k..8 * k + 8].try_into().unwrap());
        for case in 0..VALUES.len() * VALUES.len() {
            let (x, y) = (VALUES[case / VALUES.len()], VALUES[case % VALUES.len()]);
            for (k, what) in ["rax", "rsi", "flags"].iter().enumerate() {
                let (kv, iv) = (q(&kslots, 3 * case + k), q(&islots, 3 * case + k));
                assert_eq!(iv, kv, "{} x={x:#x} y={y:#x}: {what} interp {iv:#x}, kvm {kv:#x}", form.name);
            }
        }
        compared += 1;
    }
    println!("{compared} forms compared with KVM");
}

#[test]
fn cmpxchg16b_matches_kvm() {
    let Some(kvm) = duet_kvm::testing::kvm_or_skip() else { return };
    let profile = CpuidProfile::baseline().restricted_to(&kvm.host_cpuid().unwrap());
    if !profile.has_leaf1_ecx(leaf1_ecx::CX16) {
        println!("skipped: this host's KVM does not advertise CMPXCHG16B");
        return;
    }
    // A successful exchange, a failing one (RDX:RAX loaded), then a misaligned operand (#GP).
    let code = asm(64, |a| {
        a.mov(qword_ptr(OUT), 7).unwrap();
        a.mov(qword_ptr(OUT + 8), 9).unwrap();
        a.mov(eax, 7).unwrap();
        a.mov(edx, 9).unwrap();
        a.mov(rbx, 0x1111_2222_3333_4444u64).unwrap();
        a.mov(rcx, 0x5555_6666_7777_8888u64).unwrap();
        a.cmpxchg16b(xmmword_ptr(OUT)).unwrap();
        a.pushfq().unwrap();
        a.pop(qword_ptr(OUT + 0x10)).unwrap();
        a.cmpxchg16b(xmmword_ptr(OUT)).unwrap();
        a.pushfq().unwrap();
        a.pop(qword_ptr(OUT + 0x18)).unwrap();
        a.mov(qword_ptr(OUT + 0x20), rax).unwrap();
        a.mov(qword_ptr(OUT + 0x28), rdx).unwrap();
        a.cmpxchg16b(xmmword_ptr(OUT + 8)).unwrap();
    });
    let mem = memory(&code);
    let (istop, ivec, islots) = run_on(mem.clone(), InterpVcpu::new(mem, &profile), code.len());
    let mem = memory(&code);
    let (kstop, kvec, kslots) = run_on(mem.clone(), kvm.create(mem, &profile).unwrap(), code.len());
    if let StopReason::CannotRun(why) = &kstop {
        // This host's KVM advertises CX16 but its instruction emulator cannot run CMPXCHG16B
        // (KVM_EXIT_INTERNAL_ERROR); extensions.rs checks the interpreter against the SDM.
        println!("KVM half skipped: {}", why.reason);
        assert_eq!((istop, ivec), (StopReason::Halted, Some(13)));
        return;
    }
    assert_eq!((istop, ivec), (kstop, kvec));
    assert_eq!(kvec, Some(13));
    assert_eq!(islots[..0x30], kslots[..0x30]);
}
