//! `duet coverage`: which general-purpose and system instructions the software CPU implements.
//!
//! The instruction set measured is defined here, explicitly: the general-purpose instructions of
//! SDM Vol. 1 §5.1 (with the GPR-only extensions §5.x lists beside them: BMI1/BMI2, ADX, MOVBE,
//! POPCNT, LZCNT, CRC32, RDRAND/RDSEED), the system instructions of §5.20, and the undocumented
//! instructions Intel and AMD silicon executes (SALC, INT1), by iced-x86 mnemonic. Left out on purpose: x87, MMX, SSE*, AVX*, AVX-512, AMX, XSAVE state management,
//! VMX, SVM, SGX, TSX, MPX, CET shadow-stack management, PCONFIG/ENCLS-style enclave and
//! platform-configuration instructions, and 3DNow!. Implemented mnemonics outside the set are
//! listed at the end so nothing is hidden.

use std::process::ExitCode;

use iced_x86::Mnemonic;
use Mnemonic::*;

/// The measured instruction set, grouped as SDM Vol. 1 §5.1/§5.20 group them.
pub const GROUPS: &[(&str, &[Mnemonic])] = &[
    (
        "Data transfer (§5.1.1)",
        &[
            Mov, Cmove, Cmovne, Cmova, Cmovae, Cmovb, Cmovbe, Cmovg, Cmovge, Cmovl, Cmovle, Cmovo, Cmovno,
            Cmovs, Cmovns, Cmovp, Cmovnp, Xchg, Bswap, Xadd, Cmpxchg, Cmpxchg8b, Cmpxchg16b, Push, Pop,
            Pusha, Pushad, Popa, Popad, Cwd, Cdq, Cqo, Cbw, Cwde, Cdqe, Movsx, Movsxd, Movzx, Movbe,
        ],
    ),
    (
        "Binary arithmetic (§5.1.2)",
        &[Add, Adc, Sub, Sbb, Imul, Mul, Idiv, Div, Inc, Dec, Neg, Cmp, Adcx, Adox],
    ),
    ("Decimal arithmetic (§5.1.3)", &[Daa, Das, Aaa, Aas, Aam, Aad]),
    ("Logical (§5.1.4)", &[And, Or, Xor, Not]),
    ("Shift and rotate (§5.1.5)", &[Sar, Shr, Sal, Shl, Shrd, Shld, Ror, Rol, Rcr, Rcl]),
    (
        "Bit and byte (§5.1.6)",
        &[
            Bt, Bts, Btr, Btc, Bsf, Bsr, Sete, Setne, Seta, Setae, Setb, Setbe, Setg, Setge, Setl, Setle,
            Sets, Setns, Seto, Setno, Setp, Setnp, Test, Crc32, Popcnt, Lzcnt, Tzcnt,
        ],
    ),
    (
        "BMI1/BMI2 (§5.22, §5.23)",
        &[Andn, Bextr, Blsi, Blsmsk, Blsr, Bzhi, Mulx, Pdep, Pext, Rorx, Sarx, Shlx, Shrx],
    ),
    (
        "Control transfer (§5.1.7)",
        &[
            Jmp, Je, Jne, Ja, Jae, Jb, Jbe, Jg, Jge, Jl, Jle, Js, Jns, Jo, Jno, Jp, Jnp, Jcxz, Jecxz, Jrcxz,
            Loop, Loope, Loopne, Call, Ret, Retf, Iret, Iretd, Iretq, Int, Int3, Into, Bound, Enter, Leave,
        ],
    ),
    (
        "String (§5.1.8)",
        &[
            Movsb, Movsw, Movsd, Movsq, Cmpsb, Cmpsw, Cmpsd, Cmpsq, Scasb, Scasw, Scasd, Scasq, Lodsb, Lodsw,
            Lodsd, Lodsq, Stosb, Stosw, Stosd, Stosq,
        ],
    ),
    ("I/O (§5.1.9)", &[In, Out, Insb, Insw, Insd, Outsb, Outsw, Outsd]),
    (
        "Flag control (§5.1.11)",
        &[Stc, Clc, Cmc, Cld, Std, Lahf, Sahf, Pushf, Pushfd, Pushfq, Popf, Popfd, Popfq, Sti, Cli],
    ),
    ("Segment register (§5.1.12)", &[Lds, Les, Lfs, Lgs, Lss]),
    (
        "Miscellaneous (§5.1.13, §5.6.4 fences, §5.1.15–16)",
        &[
            Lea,
            Nop,
            Reservednop,
            Ud0,
            Ud1,
            Ud2,
            Xlatb,
            Cpuid,
            Pause,
            Endbr32,
            Endbr64,
            Prefetcht0,
            Prefetcht1,
            Prefetcht2,
            Prefetchnta,
            Prefetchw,
            Prefetch,
            Clflush,
            Clflushopt,
            Clwb,
            Lfence,
            Mfence,
            Sfence,
            Rdrand,
            Rdseed,
            Rdpid,
        ],
    ),
    // Executed by Intel and AMD silicon though the manuals give them no page (SALC) or gave
    // them one only lately (INT1, beside INT3 in SDM Vol. 2A "INT n/INTO/INT3/INT1").
    ("Undocumented, executed by Intel and AMD parts", &[Salc, Int1]),
    (
        "System (§5.20)",
        &[
            Lgdt, Sgdt, Lldt, Sldt, Ltr, Str, Lidt, Sidt, Lmsw, Smsw, Clts, Arpl, Lar, Lsl, Verr, Verw, Invd,
            Wbinvd, Wbnoinvd, Invlpg, Invpcid, Hlt, Rsm, Rdmsr, Wrmsr, Rdpmc, Rdtsc, Rdtscp, Syscall, Sysret,
            Sysretq, Sysenter, Sysexit, Sysexitq, Swapgs, Monitor, Mwait, Clac, Stac, Xgetbv, Xsetbv,
            Rdfsbase, Rdgsbase, Wrfsbase, Wrgsbase,
        ],
    ),
];

/// Caveats that a per-mnemonic view cannot show, and where the tests of each group live.
const NOTES: &str = "\
Notes:
- A mnemonic counts as implemented when the software CPU executes some form of it
  (`duet_interp::is_implemented`); a form it does not handle still ends the run with an
  `Unsupported` stop naming the instruction.
- iced-x86 gives the SSE instructions MOVSD and CMPSD the same mnemonics as the string
  instructions; only the string forms are implemented. MOV to/from CR and DR registers is MOV.

Tests (tests/isa_*.rs; KVM against the software CPU, or the SDM where this host's KVM is wrong):
- data transfer: isa_data (MOV, MOVSX/MOVZX/MOVSXD, CBW family, BSWAP, XCHG, XADD, CMPXCHG,
  CMPXCHG8B), isa_cond (CMOVcc), isa_stack (PUSH/POP, PUSHA/POPA), isa_system (CMPXCHG16B);
- binary arithmetic, logical: isa_alu, isa_muldiv (with #DE), isa_bmi (ADCX/ADOX);
- decimal: isa_bcd; shift and rotate: isa_shift; bit and byte: isa_bits, isa_cond (SETcc), isa_bmi;
- control transfer: isa_cond (Jcc, LOOPcc, JrCXZ), isa_stack (CALL/RET near and far, ENTER/LEAVE),
  isa_control (INT n, INT3, INTO, IRET, BOUND), isa_exceptions (faults, call gates, SYSCALL,
  SYSRET, SYSENTER/SYSEXIT); string: isa_string (with INS/OUTS);
- flag control: isa_control (CLC STC CMC CLD STD CLI STI), isa_data (LAHF/SAHF), isa_stack
  (PUSHF/POPF); segment register: isa_control (LDS LES LFS LGS LSS); misc: isa_data (LEA, XLAT),
  isa_misc (NOP forms, PAUSE, ENDBR64, fences, prefetches, CLFLUSH, UD0/UD1/UD2);
- system: isa_system (descriptor tables, LAR/LSL/VERR/VERW, CR, MSRs, SWAPGS, CPUID, RDTSC),
  isa_control (ARPL, HLT), isa_misc (MOV DR);
- every mode: isa_modes; random bytes never crash or hang the software CPU: isa_random;
- undocumented: SALC and INT1 in backend-interp/tests/third_party.rs; vendor differences
  (docs/VENDORS.md) in backend-interp/tests/vendors_*.rs.
- No test of their own yet: IN/OUT beyond the harness, LTR/LLDT, INVD, RDRAND/RDTSCP, the
  FSGSBASE instructions, CRC32 (not implemented), PREFETCHW/CLFLUSHOPT/CLWB.";

/// The report as Markdown.
pub fn report() -> String {
    let mut out = String::new();
    out +=
        "<!-- Generated by `duet coverage` (cargo run -q -- coverage > docs/COVERAGE.md); do not edit. -->\n";
    out += "# Software CPU coverage: general-purpose and system instructions\n\n";
    out += "The set is the general-purpose instructions of SDM Vol. 1 §5.1 (with the GPR-only\n";
    out += "extensions BMI1/BMI2, ADX, MOVBE, POPCNT, LZCNT, CRC32, RDRAND/RDSEED), the system\n";
    out += "instructions of §5.20 and the undocumented ones the silicon runs (SALC, INT1), by iced-x86\n";
    out += "mnemonic. Not in the set: x87, MMX, SSE, AVX, AVX-512, AMX, XSAVE, VMX, SVM, SGX, TSX,\n";
    out += "MPX, CET, 3DNow!.\n\n";
    let (mut total, mut done) = (0, 0);
    for (name, list) in GROUPS {
        let (yes, no): (Vec<Mnemonic>, Vec<Mnemonic>) =
            list.iter().copied().partition(|&m| duet::interp::is_implemented(m));
        total += list.len();
        done += yes.len();
        out += &format!("## {name}: {}/{}\n\n", yes.len(), list.len());
        out += &format!("- implemented: {}\n", names(&yes));
        out += &format!("- missing: {}\n\n", names(&no));
    }
    out += &format!("## Total: {done}/{total} implemented\n\n");
    let in_set: Vec<Mnemonic> = GROUPS.iter().flat_map(|(_, l)| l.iter().copied()).collect();
    let outside: Vec<Mnemonic> =
        duet::interp::implemented_mnemonics().into_iter().filter(|m| !in_set.contains(m)).collect();
    out += &format!("Implemented outside the set: {}\n\n", names(&outside));
    out += NOTES;
    out += "\n";
    out
}

fn names(list: &[Mnemonic]) -> String {
    if list.is_empty() {
        return "(none)".into();
    }
    list.iter().map(|m| format!("{m:?}").to_uppercase()).collect::<Vec<_>>().join(" ")
}

/// Prints the report.
pub fn coverage() -> anyhow::Result<ExitCode> {
    print!("{}", report());
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coverage_set_has_no_duplicates_and_counts_add_up() {
        let all: Vec<Mnemonic> = GROUPS.iter().flat_map(|(_, l)| l.iter().copied()).collect();
        for (i, m) in all.iter().enumerate() {
            assert!(!all[i + 1..].contains(m), "{m:?} is listed twice");
        }
        let r = report();
        assert!(r.starts_with("<!-- Generated by `duet coverage`"));
        assert!(r.contains(&format!("/{} implemented", all.len())));
        // ADD is implemented; an SSE instruction is neither in the set nor implemented.
        assert!(r.contains("implemented: ADD"));
        // The undocumented instructions the silicon runs are counted, and implemented.
        assert!(r.contains("## Undocumented, executed by Intel and AMD parts: 2/2"));
        assert!(!all.contains(&Mnemonic::Addps));
    }
}
