//! The instruction a vCPU is stuck at: its bytes from guest memory and their disassembly.

use duet_core::state::{ctrl, Regs, SystemRegs};
use duet_core::vm_memory::{Bytes, GuestAddress};
use duet_core::{GuestMemory, InstructionInfo};
use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};
use kvm_ioctls::VcpuFd;

/// Longest x86 instruction (SDM Vol. 2A §2.3.11).
const MAX_INSTRUCTION_LEN: usize = 15;
const PAGE: u64 = 4096;

/// Code size the CPU decodes with: 64 in 64-bit mode, else CS.D selects 32 or 16
/// (SDM Vol. 3A §3.4.5 "D/B flag"); real and virtual-8086 mode are 16-bit.
pub fn code_bitness(s: &SystemRegs, rflags: u64) -> u32 {
    let protected = s.cr0 & ctrl::CR0_PE != 0 && rflags & duet_core::state::rflags::VM == 0;
    if !protected {
        16
    } else if s.efer & ctrl::EFER_LMA != 0 && s.cs.l {
        64
    } else if s.cs.db {
        32
    } else {
        16
    }
}

/// Reads up to 15 bytes at CS.base + RIP, translating each page with KVM_TRANSLATE; stops
/// at the first byte that is not in RAM or not mapped.
pub fn fetch(vcpu: &VcpuFd, mem: &GuestMemory, regs: &Regs, sregs: &SystemRegs) -> Vec<u8> {
    let bitness = code_bitness(sregs, regs.rflags);
    let mask = if bitness == 64 { u64::MAX } else { u64::from(u32::MAX) };
    let mut linear = sregs.cs.base.wrapping_add(regs.rip) & mask;
    let mut bytes = Vec::with_capacity(MAX_INSTRUCTION_LEN);
    while bytes.len() < MAX_INSTRUCTION_LEN {
        let phys = match vcpu.translate_gva(linear) {
            Ok(t) if t.valid != 0 => t.physical_address,
            // Without paging a linear address is the physical address (SDM Vol. 3A §4.1.1).
            _ if sregs.cr0 & ctrl::CR0_PG == 0 => linear,
            _ => break,
        };
        let in_page = (PAGE - (linear % PAGE)) as usize;
        let want = in_page.min(MAX_INSTRUCTION_LEN - bytes.len());
        for i in 0..want as u64 {
            match mem.read_obj::<u8>(GuestAddress(phys.wrapping_add(i))) {
                Ok(b) => bytes.push(b),
                Err(_) => return bytes,
            }
        }
        linear = linear.wrapping_add(want as u64) & mask;
    }
    bytes
}

/// Intel-syntax disassembly of the first instruction in `bytes`, or why there is none.
pub fn disassemble(bitness: u32, rip: u64, bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return "(instruction bytes not readable)".to_string();
    }
    let mut decoder = Decoder::with_ip(bitness, bytes, rip, DecoderOptions::NONE);
    let instr = decoder.decode();
    if instr.is_invalid() {
        return "(bad)".to_string();
    }
    let mut out = String::new();
    IntelFormatter::new().format(&instr, &mut out);
    out
}

/// The instruction at RIP: address, bytes (trimmed to its length when it decodes) and disassembly.
pub fn describe(vcpu: &VcpuFd, mem: &GuestMemory, regs: &Regs, sregs: &SystemRegs) -> InstructionInfo {
    let bitness = code_bitness(sregs, regs.rflags);
    let mut bytes = fetch(vcpu, mem, regs, sregs);
    let mnemonic = disassemble(bitness, regs.rip, &bytes);
    let mut decoder = Decoder::with_ip(bitness, &bytes, regs.rip, DecoderOptions::NONE);
    let instr = decoder.decode();
    if !instr.is_invalid() {
        bytes.truncate(instr.len());
    }
    InstructionInfo { rip: regs.rip, bytes, mnemonic }
}

/// Whether the instruction at RIP is a near jump, Jcc or LOOP whose target is itself
/// (`jmp $`): it retires without changing any register.
pub fn branches_to_itself(vcpu: &VcpuFd, mem: &GuestMemory, regs: &Regs, sregs: &SystemRegs) -> bool {
    let bytes = fetch(vcpu, mem, regs, sregs);
    let mut decoder =
        Decoder::with_ip(code_bitness(sregs, regs.rflags), &bytes, regs.rip, DecoderOptions::NONE);
    let i = decoder.decode();
    !i.is_invalid()
        && i.is_jcc_short_or_near() | i.is_jmp_short_or_near() | i.is_loop() | i.is_loopcc()
        && i.near_branch_target() == i.ip()
}

#[cfg(test)]
mod tests {
    use duet_core::state::Segment;

    use super::*;

    #[test]
    fn bitness_follows_mode_and_cs() {
        let mut s = SystemRegs::reset();
        assert_eq!(code_bitness(&s, 0x2), 16);
        s.cr0 |= ctrl::CR0_PE;
        s.cs = Segment::from_descriptor(8, 0x00cf_9b00_0000_ffff);
        assert_eq!(code_bitness(&s, 0x2), 32);
        // EFLAGS.VM = 1 is virtual-8086 mode, 16-bit whatever CS says (SDM Vol. 3A §20.2).
        assert_eq!(code_bitness(&s, 0x2 | (1 << 17)), 16);
        s.efer |= ctrl::EFER_LMA | ctrl::EFER_LME;
        s.cs = Segment::from_descriptor(8, 0x00af_9b00_0000_ffff);
        assert_eq!(code_bitness(&s, 0x2), 64);
    }

    #[test]
    fn disassembly_names_the_instruction() {
        // 27 = DAA (SDM Vol. 2A, DAA opcode table).
        assert_eq!(disassemble(16, 0x7c00, &[0x27, 0xf4]), "daa");
        // E6 E9 = OUT imm8, AL.
        assert_eq!(disassemble(16, 0, &[0xe6, 0xe9]), "out 0E9h,al");
        assert_eq!(disassemble(64, 0, &[]), "(instruction bytes not readable)");
        // 0F 0B is UD2, valid; 0F FF is UD0 which needs a ModRM byte: truncated → invalid.
        assert_eq!(disassemble(64, 0, &[0x0f]), "(bad)");
    }
}
