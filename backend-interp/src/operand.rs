//! Operand access keyed on iced-x86's `OpKind`: registers, immediates and memory of 8/16/32/64 bits.

use iced_x86::{Instruction, OpKind, Register};

use crate::cpu::{mask, Cpu, Flow};

/// Address size in bytes of a memory operand, as iced-x86 derives it (base/index width, else
/// displacement size, else code size).
pub(crate) fn addr_bytes(ins: &Instruction, bitness: u32) -> u32 {
    let reg_size = |r: Register| match r {
        Register::None => 0,
        Register::RIP => 8,
        Register::EIP => 4,
        r => r.size() as u32,
    };
    let s = reg_size(ins.memory_base()).max(reg_size(ins.memory_index()));
    if s != 0 {
        s
    } else if ins.memory_displ_size() >= 2 {
        ins.memory_displ_size()
    } else {
        bitness / 8
    }
}

/// `MemRef` register field: no register.
pub(crate) const NO_REG: u8 = 0xff;
/// `MemRef` base field: RIP/EIP-relative.
pub(crate) const RIP_REG: u8 = 16;

/// An explicit memory operand resolved at decode time: base and index as GPR numbers, the scale
/// as a shift, the address-size mask and the effective segment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct MemRef {
    /// Base GPR, `RIP_REG` or `NO_REG`.
    pub base: u8,
    /// Index GPR or `NO_REG`.
    pub index: u8,
    /// log2 of the scale.
    pub scale: u8,
    /// Segment register.
    pub seg: Register,
    /// Displacement (sign-extended).
    pub disp: u64,
    /// Mask of the address size.
    pub amask: u64,
}

impl MemRef {
    /// The memory operand `op` of `ins` when it is an `OpKind::Memory` with GPR (or RIP) base and
    /// GPR index.
    pub fn of(ins: &Instruction, op: u32) -> Option<MemRef> {
        if ins.op_kind(op) != OpKind::Memory {
            return None;
        }
        let gpr = |r: Register| match r {
            Register::None => Some(NO_REG),
            r => crate::cpu::gpr_slot(r).filter(|s| s.bytes >= 2).map(|s| s.index as u8),
        };
        let base = match ins.memory_base() {
            Register::RIP | Register::EIP => RIP_REG,
            r => gpr(r)?,
        };
        let bitness = match ins.code_size() {
            iced_x86::CodeSize::Code16 => 16,
            iced_x86::CodeSize::Code32 => 32,
            iced_x86::CodeSize::Code64 => 64,
            _ => return None,
        };
        Some(MemRef {
            base,
            index: gpr(ins.memory_index())?,
            scale: ins.memory_index_scale().trailing_zeros() as u8,
            seg: memory_segment(ins),
            disp: ins.memory_displacement64(),
            amask: mask(addr_bytes(ins, bitness)),
        })
    }
}

/// The segment register a memory operand of `ins` goes through. In 64-bit mode the ES, CS and
/// DS override prefixes are ignored (SDM Vol. 1 §3.3.7.1), so the default segment stands: SS
/// for an RSP or RBP base, else DS (SDM Vol. 1 §3.7.4). Their bases are all 0 there, but the
/// segment decides the fault of a non-canonical address: #SS(0) for "a memory reference that
/// uses SS", else #GP(0) (SDM Vol. 3A §6.15). An SS override still makes the reference use SS:
/// the silicon raises #SS for `ss: adc al, [r9+1Dh]` with a non-canonical R9 (this AMD host,
/// ring-3 code run natively; fixtures/corpus/regressions/ss-prefix-noncanonical-is-ss-fault.json).
pub(crate) fn memory_segment(ins: &Instruction) -> Register {
    let seg = ins.memory_segment();
    if ins.code_size() != iced_x86::CodeSize::Code64
        || matches!(seg, Register::FS | Register::GS | Register::SS)
    {
        return seg;
    }
    match ins.memory_base() {
        Register::RSP | Register::RBP | Register::ESP | Register::EBP => Register::SS,
        _ => Register::DS,
    }
}

impl Cpu {
    /// Effective address of a resolved memory operand: the same sum as `ea`, taken modulo the
    /// address size (register widths need no masking before the final one).
    #[inline]
    pub fn ea_of(&self, m: &MemRef) -> u64 {
        let reg = |i: u8| self.gpr.get(usize::from(i)).copied().unwrap_or(0);
        let mut off = m.disp;
        if m.base == RIP_REG {
            off = off.wrapping_add(self.rip);
        } else if m.base != NO_REG {
            off = off.wrapping_add(reg(m.base));
        }
        if m.index != NO_REG {
            off = off.wrapping_add(reg(m.index) << m.scale);
        }
        off & m.amask
    }

    /// Width in bytes of operand `op`.
    pub fn op_bytes(&self, ins: &Instruction, op: u32) -> u32 {
        match ins.op_kind(op) {
            OpKind::Register => ins.op_register(op).size() as u32,
            OpKind::Immediate8 | OpKind::Immediate8_2nd => 1,
            OpKind::Immediate16 | OpKind::Immediate8to16 => 2,
            OpKind::Immediate32 | OpKind::Immediate8to32 => 4,
            OpKind::Immediate64 | OpKind::Immediate8to64 | OpKind::Immediate32to64 => 8,
            _ => ins.memory_size().size() as u32,
        }
    }

    /// Segment register and offset of a memory operand (explicit or string-instruction implicit).
    pub fn mem_addr(&self, ins: &Instruction, op: u32) -> (Register, u64) {
        let kind = ins.op_kind(op);
        let (seg, off) = match kind {
            OpKind::MemorySegSI => (memory_segment(ins), self.gpr[6] & 0xffff),
            OpKind::MemorySegESI => (memory_segment(ins), self.gpr[6] & 0xffff_ffff),
            OpKind::MemorySegRSI => (memory_segment(ins), self.gpr[6]),
            OpKind::MemorySegDI => (memory_segment(ins), self.gpr[7] & 0xffff),
            OpKind::MemorySegEDI => (memory_segment(ins), self.gpr[7] & 0xffff_ffff),
            OpKind::MemorySegRDI => (memory_segment(ins), self.gpr[7]),
            OpKind::MemoryESDI => (Register::ES, self.gpr[7] & 0xffff),
            OpKind::MemoryESEDI => (Register::ES, self.gpr[7] & 0xffff_ffff),
            OpKind::MemoryESRDI => (Register::ES, self.gpr[7]),
            _ => (memory_segment(ins), self.ea(ins)),
        };
        (seg, off)
    }

    /// Effective address (offset) of an `OpKind::Memory` operand, masked to the address size.
    /// RIP-relative displacements were decoded at IP 0, so they are relative to this RIP.
    pub fn ea(&self, ins: &Instruction) -> u64 {
        let mut off = ins.memory_displacement64();
        match ins.memory_base() {
            Register::None => {}
            Register::RIP | Register::EIP => off = off.wrapping_add(self.rip),
            r => off = off.wrapping_add(self.reg(r)),
        }
        let idx = ins.memory_index();
        if idx != Register::None {
            off = off.wrapping_add(self.reg(idx) << ins.memory_index_scale().trailing_zeros());
        }
        off & mask(addr_bytes(ins, self.bitness()))
    }

    /// Reads `bytes` at `seg:off` as a data access.
    pub fn read_mem(&mut self, seg: Register, off: u64, bytes: u32) -> Flow<u64> {
        let lin = self.seg_linear(seg, off, bytes, false)?;
        self.read_lin_u(lin, bytes, false)
    }

    /// Writes the low `bytes` of `v` at `seg:off` as a data access.
    pub fn write_mem(&mut self, seg: Register, off: u64, bytes: u32, v: u64) -> Flow {
        let lin = self.seg_linear(seg, off, bytes, true)?;
        self.write_lin_u(lin, bytes, v, false)
    }

    /// Reads operand `op`: registers and memory zero-extended, immediates as iced-x86 extends them.
    pub fn read_op(&mut self, ins: &Instruction, op: u32) -> Flow<u64> {
        match ins.op_kind(op) {
            OpKind::Register => Ok(self.reg(ins.op_register(op))),
            OpKind::Immediate8
            | OpKind::Immediate8_2nd
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate64
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64 => Ok(ins.immediate(op) & mask(self.op_bytes(ins, op))),
            _ => {
                let (seg, off) = self.mem_addr(ins, op);
                let n = self.op_bytes(ins, op);
                self.read_mem(seg, off, n)
            }
        }
    }

    /// Writes operand `op` (a register or memory) with the low bits of `v`.
    pub fn write_op(&mut self, ins: &Instruction, op: u32, v: u64) -> Flow {
        match ins.op_kind(op) {
            OpKind::Register => {
                self.set_reg(ins.op_register(op), v);
                Ok(())
            }
            _ => {
                let (seg, off) = self.mem_addr(ins, op);
                let n = self.op_bytes(ins, op);
                self.write_mem(seg, off, n, v)
            }
        }
    }

    /// Whether operand `op` is in memory.
    pub fn is_mem(ins: &Instruction, op: u32) -> bool {
        !matches!(
            ins.op_kind(op),
            OpKind::Register
                | OpKind::Immediate8
                | OpKind::Immediate8_2nd
                | OpKind::Immediate16
                | OpKind::Immediate32
                | OpKind::Immediate64
                | OpKind::Immediate8to16
                | OpKind::Immediate8to32
                | OpKind::Immediate8to64
                | OpKind::Immediate32to64
                | OpKind::NearBranch16
                | OpKind::NearBranch32
                | OpKind::NearBranch64
                | OpKind::FarBranch16
                | OpKind::FarBranch32
        )
    }
}

#[cfg(test)]
mod tests {
    use iced_x86::{Decoder, DecoderOptions};

    use super::*;
    use crate::cpu::test_cpu;

    fn decode(bitness: u32, bytes: &[u8]) -> Instruction {
        Decoder::with_ip(bitness, bytes, 0, DecoderOptions::NONE).decode()
    }

    #[test]
    fn sixteen_bit_effective_addresses_wrap_at_64k() {
        let mut c = test_cpu();
        c.sregs.cs.db = false;
        c.gpr[3] = 0xfff0; // BX
        c.gpr[6] = 0x0020; // SI
                           // mov ax, [bx+si+4] (8B 40 04): 0xfff0 + 0x20 + 4 wraps to 0x0014.
        assert_eq!(c.ea(&decode(16, &[0x8b, 0x40, 0x04])), 0x14);
    }

    #[test]
    fn rip_relative_is_relative_to_the_next_instruction() {
        let mut c = test_cpu();
        c.rip = 0x1000;
        // mov eax, [rip+0x10] (8B 05 10 00 00 00) is 6 bytes: 0x1000 + 6 + 0x10.
        assert_eq!(c.ea(&decode(64, &[0x8b, 0x05, 0x10, 0, 0, 0])), 0x1016);
        // With an address-size prefix (67), EIP-relative wraps at 4 GiB.
        c.rip = 0xffff_fff0;
        assert_eq!(c.ea(&decode(64, &[0x67, 0x8b, 0x05, 0x10, 0, 0, 0])), 0x7);
    }

    #[test]
    fn scaled_index_and_32bit_wrap() {
        let mut c = test_cpu();
        c.gpr[0] = 0xffff_fff0; // EAX
        c.gpr[1] = 0x8; // ECX
                        // mov edx, [eax+ecx*4+4] (8B 54 88 04) in 32-bit code: 0xfffffff0 + 0x20 + 4 wraps.
        assert_eq!(c.ea(&decode(32, &[0x8b, 0x54, 0x88, 0x04])), 0x14);
    }
    #[test]
    fn segment_overrides_other_than_fs_gs_are_ignored_in_64_bit_mode() {
        // SDM Vol. 1 §3.3.7.1: in 64-bit mode ES/CS/DS prefixes are ignored; the default is SS
        // for an RSP/RBP base and DS otherwise (Vol. 1 §3.7.4). An SS prefix still means SS (the
        // silicon's #SS for a non-canonical address through it; see `memory_segment`).
        let seg = |bits, bytes: &[u8]| memory_segment(&decode(bits, bytes));
        assert_eq!(seg(64, &[0x26, 0xd0, 0x45, 0x0f]), Register::SS); // rol byte [es:rbp+0Fh],1
        assert_eq!(seg(64, &[0x3e, 0x8b, 0x04, 0x24]), Register::SS); // mov eax, [ds:rsp]
        assert_eq!(seg(64, &[0x36, 0x8b, 0x03]), Register::SS); // mov eax, [ss:rbx]
        assert_eq!(seg(64, &[0x2e, 0x8b, 0x03]), Register::DS); // mov eax, [cs:rbx]
        assert_eq!(seg(64, &[0x26, 0xac]), Register::DS); // lodsb with ES prefix
        assert_eq!(seg(64, &[0x64, 0x8b, 0x45, 0x00]), Register::FS); // mov eax, [fs:rbp]
        assert_eq!(seg(64, &[0x65, 0xac]), Register::GS); // lodsb with GS prefix

        // Outside 64-bit mode every override counts.
        assert_eq!(seg(32, &[0x26, 0x8b, 0x45, 0x00]), Register::ES); // mov eax, [es:ebp]
        assert_eq!(seg(16, &[0x36, 0x8b, 0x07]), Register::SS); // mov ax, [ss:bx]
    }
}
