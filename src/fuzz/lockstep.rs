//! Lockstep rerun: single-step both backends and name the first instruction after which they differ.

use std::fmt::Write;

use duet_core::vm_memory::{Bytes, GuestAddress};
use duet_core::{CpuMode, CpuState, RunOptions, StopReason};
use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};

use super::case::{hex_bytes, Case};
use super::check::compare_runs;
use super::exec::{memory_changes, outcome, Executor};
use super::layout::{self, RAM_SIZE};
use super::FuzzError;

/// Most steps a lockstep rerun takes before giving up.
pub const MAX_STEPS: usize = 300;

/// The instruction at `s`'s CS:RIP in `ram`: address, bytes and Intel disassembly.
fn instruction_at(s: &CpuState, ram: &[u8]) -> String {
    let bits = match s.mode() {
        CpuMode::Long64 => 64,
        CpuMode::Protected32 | CpuMode::Compatibility if s.sregs.cs.db => 32,
        CpuMode::Real | CpuMode::Virtual8086 | CpuMode::Protected16 => 16,
        _ => 32,
    };
    let linear = s.sregs.cs.base.wrapping_add(s.regs.rip);
    let start = usize::try_from(linear).unwrap_or(usize::MAX);
    let Some(bytes) = ram.get(start..start.saturating_add(15).min(ram.len())) else {
        return format!("{linear:#x}: (outside RAM)");
    };
    let ins = Decoder::with_ip(bits, bytes, s.regs.rip, DecoderOptions::NONE).decode();
    let mut text = String::new();
    IntelFormatter::new().format(&ins, &mut text);
    format!(
        "{:04x}:{:x} (linear {linear:#x}): {}  {text}",
        s.sregs.cs.selector,
        s.regs.rip,
        hex_bytes(bytes.get(..ins.len()).unwrap_or(bytes))
    )
}

/// One single step on `exec`'s machine for `case`'s mode: the stop and the state after it.
fn step(exec: &mut Executor, case: &Case) -> Result<(StopReason, CpuState, u64, Vec<u8>), FuzzError> {
    let timeout = exec.timeout;
    let name = exec.kind().name();
    let backend = |e: String| FuzzError::Backend { backend: name, why: e };
    let m = exec.machine(case.mode)?;
    m.vcpu().set_single_step(true).map_err(|e| backend(e.to_string()))?;
    let out = m.run(&RunOptions { timeout }).map_err(|e| backend(e.to_string()))?;
    let mut ram = vec![0u8; RAM_SIZE as usize];
    m.memory().read_slice(&mut ram, GuestAddress(0)).map_err(|e| backend(e.to_string()))?;
    Ok((out.stop, out.state, out.undefined_rflags, ram))
}

/// Single-steps `case` on both executors and reports the first step after which they differ.
pub fn lockstep(
    kvm: &mut Executor,
    interp: &mut Executor,
    case: &Case,
    file: &str,
) -> Result<String, FuzzError> {
    let (p, state) = layout::prepare(case, file)?;
    let initial = layout::initial_image(&layout::base_image(case.mode)?, &p);
    kvm.load(case, &p, &state)?;
    interp.load(case, &p, &state)?;
    let mut report = String::new();
    let mut before = (state.clone(), initial.clone());
    for n in 0..MAX_STEPS {
        let (ks, kstate, ku, kram) = step(kvm, case)?;
        let (is, istate, iu, iram) = step(interp, case)?;
        let ko = outcome(&ks, &kstate, ku, memory_changes(&initial, &kram), vec![]);
        let io = outcome(&is, &istate, iu, memory_changes(&initial, &iram), vec![]);
        let diff = compare_runs(&p, ("kvm", &ko), ("interp", &io));
        let terminal = |s: &StopReason| !matches!(s, StopReason::Debug(_));
        if !diff.is_empty() {
            let _ =
                writeln!(report, "first difference after step {n}: {}", instruction_at(&before.0, &before.1));
            let _ = write!(report, "{diff}");
            break;
        }
        if terminal(&ks) || terminal(&is) {
            let _ = writeln!(
                report,
                "lockstep ran {} steps without a difference (kvm: {ks}, interp: {is}); the divergence \
                 shows only when running freely (exits, interrupts or timing)",
                n + 1
            );
            break;
        }
        before = (istate, iram);
    }
    kvm.forget(case.mode);
    interp.forget(case.mode);
    if report.is_empty() {
        let _ = writeln!(report, "no difference within {MAX_STEPS} steps");
    }
    Ok(report)
}
