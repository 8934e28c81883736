//! Status-flag computation shared by every instruction group (SDM Vol. 1 §3.4.3.1, Appendix A,
//! and the "Flags Affected" section of each instruction in Vol. 2).
//!
//! Every function takes operands already truncated to `bytes` (1, 2, 4 or 8) and returns the
//! result and the six status flags in RFLAGS layout.

use duet_core::state::rflags::{AF, CF, OF, PF, SF, ZF};

use crate::cpu::mask;

/// Sign-bit mask of a `bytes`-wide value (1, 2, 4 or 8; anything else is treated as 8).
fn sign_bit(bytes: u32) -> u64 {
    match bytes {
        1 => 0x80,
        2 => 0x8000,
        4 => 0x8000_0000,
        _ => 1 << 63,
    }
}

/// Most significant bit of a `bytes`-wide value.
pub(crate) fn msb(v: u64, bytes: u32) -> bool {
    v & sign_bit(bytes) != 0
}

/// Even parity of each byte value (PF), worked out at compile time.
const PARITY: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = (i as u8).count_ones() % 2 == 0;
        i += 1;
    }
    t
};

/// SF, ZF and PF of a result (PF: even parity of the low byte).
#[inline]
pub(crate) fn szp(res: u64, bytes: u32) -> u64 {
    let r = res & mask(bytes);
    let mut f = 0;
    if r == 0 {
        f |= ZF;
    }
    if msb(r, bytes) {
        f |= SF;
    }
    if PARITY[(r & 0xff) as usize] {
        f |= PF;
    }
    f
}

/// ADD/ADC: `a + b + carry`.
#[inline]
pub(crate) fn add(a: u64, b: u64, carry: bool, bytes: u32) -> (u64, u64) {
    let m = mask(bytes);
    let (a, b) = (a & m, b & m);
    let (s1, c1) = a.overflowing_add(b);
    let (sum, c2) = s1.overflowing_add(u64::from(carry));
    let res = sum & m;
    let mut f = szp(res, bytes);
    // Below 64 bits the carry out is the bit above the operand; at 64 bits, the u64 overflow.
    if if m == u64::MAX { c1 || c2 } else { sum > m } {
        f |= CF;
    }
    if (a ^ res) & (b ^ res) & sign_bit(bytes) != 0 {
        f |= OF;
    }
    if (a ^ b ^ res) & 0x10 != 0 {
        f |= AF;
    }
    (res, f)
}

/// SUB/SBB/CMP/NEG: `a - b - borrow`.
#[inline]
pub(crate) fn sub(a: u64, b: u64, borrow: bool, bytes: u32) -> (u64, u64) {
    let m = mask(bytes);
    let (a, b) = (a & m, b & m);
    let res = a.wrapping_sub(b).wrapping_sub(u64::from(borrow)) & m;
    let mut f = szp(res, bytes);
    // a < b + borrow, without overflowing b + borrow.
    if a < b || (borrow && a == b) {
        f |= CF;
    }
    if (a ^ b) & (a ^ res) & sign_bit(bytes) != 0 {
        f |= OF;
    }
    if (a ^ b ^ res) & 0x10 != 0 {
        f |= AF;
    }
    (res, f)
}

/// AND/OR/XOR/TEST: CF = OF = 0, SF/ZF/PF from the result; AF is undefined and left 0.
pub(crate) fn logic(res: u64, bytes: u32) -> u64 {
    szp(res, bytes)
}

/// The value and flags of a shift or rotate; `flags` is `None` when the masked count is 0
/// (then no flag changes), else the status flags to store with `keep` the bits to preserve.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ShiftOut {
    /// Result.
    pub res: u64,
    /// New status flags, or `None` when flags are unaffected.
    pub flags: Option<u64>,
    /// Status flags the operation leaves unchanged (rotates keep SF, ZF, AF, PF).
    pub keep: u64,
}

/// Which shift or rotate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ShiftOp {
    /// SHL/SAL.
    Shl,
    /// SHR.
    Shr,
    /// SAR.
    Sar,
    /// ROL.
    Rol,
    /// ROR.
    Ror,
    /// RCL.
    Rcl,
    /// RCR.
    Rcr,
}

/// SAL/SAR/SHL/SHR and RCL/RCR/ROL/ROR (SDM Vol. 2B), with the count masked to 5 bits (6 for
/// 64-bit operands). OF is defined only for a masked count of 1; for larger counts this returns
/// the same formula, which is what current Intel parts produce.
#[inline]
pub(crate) fn shift(op: ShiftOp, a: u64, count: u32, cf_in: bool, bytes: u32) -> ShiftOut {
    let bytes = crate::cpu::width(bytes);
    let bits = bytes * 8;
    let m = mask(bytes);
    let a = a & m;
    let cnt = count & if bytes == 8 { 0x3f } else { 0x1f };
    let unchanged = ShiftOut { res: a, flags: None, keep: 0 };
    if cnt == 0 {
        return unchanged;
    }
    let top = |v: u64| msb(v, bytes);
    match op {
        ShiftOp::Shl => {
            let wide = u128::from(a) << cnt;
            let res = (wide as u64) & m;
            let cf = (wide >> bits) & 1 != 0;
            let mut f = szp(res, bytes) | if cf { CF } else { 0 };
            if top(res) != cf {
                f |= OF;
            }
            ShiftOut { res, flags: Some(f), keep: 0 }
        }
        ShiftOp::Shr => {
            let res = if cnt >= bits { 0 } else { a >> cnt };
            let cf = cnt <= bits && (a >> (cnt - 1)) & 1 != 0;
            let mut f = szp(res, bytes) | if cf { CF } else { 0 };
            if top(a) {
                f |= OF;
            }
            ShiftOut { res, flags: Some(f), keep: 0 }
        }
        ShiftOp::Sar => {
            let s = crate::cpu::sext(a, bytes) as i64;
            let res = (s >> cnt.min(63)) as u64 & m;
            let cf = (s >> (cnt - 1).min(63)) & 1 != 0;
            let f = szp(res, bytes) | if cf { CF } else { 0 };
            ShiftOut { res, flags: Some(f), keep: 0 }
        }
        ShiftOp::Rol | ShiftOp::Ror => {
            let r = cnt % bits;
            let res = if r == 0 {
                a
            } else if op == ShiftOp::Rol {
                ((a << r) | (a >> (bits - r))) & m
            } else {
                ((a >> r) | (a << (bits - r))) & m
            };
            // ROL: CF = LSB(result), OF = MSB(result) XOR CF; ROR: CF = MSB(result),
            // OF = MSB(result) XOR next-to-MSB(result).
            let (cf, of) = if op == ShiftOp::Rol {
                let cf = res & 1 != 0;
                (cf, top(res) != cf)
            } else {
                (top(res), top(res) != ((res >> (bits - 2)) & 1 != 0))
            };
            let f = if cf { CF } else { 0 } | if of { OF } else { 0 };
            ShiftOut { res, flags: Some(f), keep: SF | ZF | AF | PF }
        }
        ShiftOp::Rcl | ShiftOp::Rcr => {
            // tempCOUNT = (COUNT & mask) MOD (size + 1) for 8/16-bit operands.
            let r = if bytes < 4 { cnt % (bits + 1) } else { cnt };
            if r == 0 {
                // The rotate loop runs zero times: value and flags stay (iced-x86 agrees).
                return unchanged;
            }
            let wide = (u128::from(cf_in) << bits) | u128::from(a);
            let n = bits + 1;
            let full = (1u128 << n) - 1;
            let rot = if r == 0 {
                wide
            } else if op == ShiftOp::Rcl {
                ((wide << r) | (wide >> (n - r))) & full
            } else {
                ((wide >> r) | (wide << (n - r))) & full
            };
            let res = (rot as u64) & m;
            let cf = (rot >> bits) & 1 != 0;
            let of = if op == ShiftOp::Rcl { top(res) != cf } else { top(a) != cf_in };
            let f = if cf { CF } else { 0 } | if of { OF } else { 0 };
            ShiftOut { res, flags: Some(f), keep: SF | ZF | AF | PF }
        }
    }
}

/// SHLD (`left`) / SHRD: shift `dest` by `count` (masked to 5 or 6 bits), filling from `src`
/// (SDM Vol. 2B SHLD/SHRD). A count beyond the operand size (16-bit operands) is undefined; this
/// shifts through `dest:src:dest`, which is what current Intel parts do.
pub(crate) fn double_shift(left: bool, dest: u64, src: u64, count: u32, bytes: u32) -> ShiftOut {
    // SHLD/SHRD have no 8-bit form; treat one as 16-bit rather than shift out of range.
    let bytes = crate::cpu::width(bytes).max(2);
    let bits = bytes * 8;
    let m = mask(bytes);
    let (dest, src) = (dest & m, src & m);
    let cnt = count & if bytes == 8 { 0x3f } else { 0x1f };
    if cnt == 0 {
        return ShiftOut { res: dest, flags: None, keep: 0 };
    }
    let (res, cf) = if bytes == 2 {
        let wide = (u64::from(dest as u16) << 32) | (u64::from(src as u16) << 16) | dest;
        if left {
            (((wide << cnt) >> 32) & m, (wide >> (48 - cnt)) & 1 != 0)
        } else {
            ((wide >> cnt) & m, (wide >> (cnt - 1)) & 1 != 0)
        }
    } else if left {
        // cnt < bits here: the defined case of SDM Vol. 2B SHLD.
        (((dest << cnt) | (src >> (bits - cnt))) & m, (dest >> (bits - cnt)) & 1 != 0)
    } else {
        (((dest >> cnt) | (src << (bits - cnt))) & m, (dest >> (cnt - 1)) & 1 != 0)
    };
    let mut f = szp(res, bytes) | if cf { CF } else { 0 };
    // OF (count 1): set when the sign bit changed.
    if msb(res, bytes) != msb(dest, bytes) {
        f |= OF;
    }
    ShiftOut { res, flags: Some(f), keep: 0 }
}

/// Converts iced-x86 `RflagsBits` (its own bit order) to RFLAGS layout.
pub(crate) fn from_iced(bits: u32) -> u64 {
    use duet_core::state::rflags as R;
    use iced_x86::RflagsBits as I;
    [
        (I::OF, R::OF),
        (I::SF, R::SF),
        (I::ZF, R::ZF),
        (I::AF, R::AF),
        (I::CF, R::CF),
        (I::PF, R::PF),
        (I::DF, R::DF),
        (I::IF, R::IF),
        (I::AC, R::AC),
    ]
    .iter()
    .filter(|(i, _)| bits & i != 0)
    .fold(0, |acc, (_, r)| acc | r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn double_shifts_fill_from_the_source() {
        // SHLD 0x1234, 0xabcd, 4 (16-bit): 0x234a; CF = bit 12 of 0x1234 = 1.
        let r = double_shift(true, 0x1234, 0xabcd, 4, 2);
        assert_eq!((r.res, r.flags.map(|f| f & CF)), (0x234a, Some(CF)));
        // SHRD 0x1234, 0xabcd, 4: 0xd123; CF = bit 3 of 0x1234 = 0; sign changed → OF.
        let r = double_shift(false, 0x1234, 0xabcd, 4, 2);
        assert_eq!((r.res, r.flags.map(|f| f & (CF | OF))), (0xd123, Some(OF)));
        assert_eq!(double_shift(true, 5, 6, 32, 4).flags, None);
        // 64-bit, count 63: SHLD 1, 2^63 → bit 63 of dest comes from bit 0, bit 62..0 from src.
        let r = double_shift(true, 1, 1 << 63, 63, 8);
        assert_eq!(r.res, (1 << 63) | ((1u64 << 63) >> 1));
        let r = double_shift(false, 1 << 63, 1, 63, 8);
        assert_eq!(r.res, 1 | 2);
    }

    #[test]
    fn iced_flag_bits_map_to_rflags_layout() {
        use iced_x86::RflagsBits as I;
        assert_eq!(from_iced(I::OF | I::CF), OF | CF);
        assert_eq!(from_iced(I::AF | I::PF | I::SF | I::ZF), AF | PF | SF | ZF);
        assert_eq!(from_iced(0), 0);
    }

    #[test]
    fn add_and_sub_carry_agree_with_wide_arithmetic() {
        let edge = [0u64, 1, 0x7f, 0x80, 0xff, 0x7fff, 0x8000, 0xffff, 0x7fff_ffff, 0x8000_0000];
        let edge: Vec<u64> =
            edge.iter().copied().chain([u64::MAX, u64::MAX - 1, 1 << 63, 0xffff_ffff]).collect();
        for bytes in [1, 2, 4, 8] {
            let m = u128::from(mask(bytes));
            for &a in &edge {
                for &b in &edge {
                    for c in [false, true] {
                        let (a2, b2) = (u128::from(a) & m, u128::from(b) & m);
                        let wide = a2 + b2 + u128::from(c);
                        assert_eq!(
                            add(a, b, c, bytes).1 & CF != 0,
                            wide > m,
                            "add {a:#x} {b:#x} {c} {bytes}"
                        );
                        assert_eq!(add(a, b, c, bytes).0, (wide & m) as u64);
                        assert_eq!(
                            sub(a, b, c, bytes).1 & CF != 0,
                            a2 < b2 + u128::from(c),
                            "sub {a:#x} {b:#x}"
                        );
                    }
                }
            }
        }
        assert!((0..256u64).all(|v| (szp(v, 1) & PF != 0) == (v.count_ones() % 2 == 0)));
    }

    #[test]
    fn add_flags_at_sign_boundaries() {
        // 0x7f + 1 = 0x80: signed overflow, no carry, AF from bit 3 carry (SDM Vol. 1 §3.4.3.1).
        assert_eq!(add(0x7f, 1, false, 1), (0x80, OF | SF | AF));
        // 0xff + 1 = 0x00 with carry out, ZF, PF (zero has even parity), AF.
        assert_eq!(add(0xff, 1, false, 1), (0, CF | ZF | PF | AF));
        // ADC: 0xffff_ffff + 0 + 1 wraps to 0 with carry.
        assert_eq!(add(0xffff_ffff, 0, true, 4), (0, CF | ZF | PF | AF));
    }

    #[test]
    fn sub_flags_at_sign_boundaries() {
        // 0x80 - 1 = 0x7f: signed overflow (negative minus positive gives positive).
        assert_eq!(sub(0x80, 1, false, 1), (0x7f, OF | AF));
        // 0 - 1 = 0xff: borrow, negative, 0xff has eight ones → PF.
        assert_eq!(sub(0, 1, false, 1), (0xff, CF | SF | PF | AF));
        // SBB 5 - 5 - 1 = -1 in 64 bits.
        assert_eq!(sub(5, 5, true, 8), (u64::MAX, CF | SF | PF | AF));
    }

    #[test]
    fn shift_count_zero_and_masked_count_leave_flags() {
        let r = shift(ShiftOp::Shl, 0x1234, 0, false, 4);
        assert_eq!(r.flags, None);
        // Count 32 on a 32-bit operand masks to 0.
        assert_eq!(shift(ShiftOp::Shl, 0x1234, 32, false, 4).flags, None);
        // Count 33 masks to 1.
        assert_eq!(shift(ShiftOp::Shl, 0x8000_0001, 33, false, 4).res, 2);
    }

    #[test]
    fn shl_shr_sar_flags_for_count_one_and_width_minus_one() {
        // SHL 0x80,1 (8-bit): result 0, CF = old MSB = 1, OF = MSB(result) XOR CF = 1.
        assert_eq!(shift(ShiftOp::Shl, 0x80, 1, false, 1).flags, Some(CF | OF | ZF | PF));
        // SHR 0x81,1: result 0x40, CF = 1, OF = MSB(original) = 1.
        let r = shift(ShiftOp::Shr, 0x81, 1, false, 1);
        assert_eq!((r.res, r.flags), (0x40, Some(CF | OF)));
        // SAR 0x80,7 (8-bit): result 0xff, CF = bit 6 of 0x80 = 0, OF = 0.
        let r = shift(ShiftOp::Sar, 0x80, 7, false, 1);
        assert_eq!((r.res, r.flags), (0xff, Some(SF | PF)));
        // SHL 1,31 (32-bit): result 0x8000_0000, CF = 0, OF = 1 XOR 0.
        let r = shift(ShiftOp::Shl, 1, 31, false, 4);
        assert_eq!((r.res, r.flags), (0x8000_0000, Some(SF | OF | PF)));
        // SHL r8 by 9: every bit shifted out, result 0; last bit out is bit 8-9 < 0 → 0.
        assert_eq!(shift(ShiftOp::Shl, 0xff, 9, false, 1).res, 0);
    }

    #[test]
    fn rotates_keep_szap_and_set_cf_of() {
        // ROL 0x80,1 (8-bit) = 0x01: CF = LSB = 1, OF = MSB(0) XOR 1 = 1.
        let r = shift(ShiftOp::Rol, 0x80, 1, false, 1);
        assert_eq!((r.res, r.flags, r.keep), (1, Some(CF | OF), SF | ZF | AF | PF));
        // ROR 0x01,1 = 0x80: CF = MSB = 1, OF = bit7 XOR bit6 = 1.
        assert_eq!(shift(ShiftOp::Ror, 1, 1, false, 1).flags, Some(CF | OF));
        // RCL 0x80,1 with CF=0: result 0, CF = 1, OF = 0 XOR 1.
        let r = shift(ShiftOp::Rcl, 0x80, 1, false, 1);
        assert_eq!((r.res, r.flags), (0, Some(CF | OF)));
        // RCR 0x01,1 with CF=1: result 0x80, CF = 1, OF = MSB(dest)=0 XOR CF(old)=1.
        let r = shift(ShiftOp::Rcr, 1, 1, true, 1);
        assert_eq!((r.res, r.flags), (0x80, Some(CF | OF)));
        // RCL r8 by 9 rotates through all 9 bits: tempCOUNT = 9 MOD 9 = 0, nothing changes.
        let r = shift(ShiftOp::Rcl, 0x5a, 9, true, 1);
        assert_eq!((r.res, r.flags), (0x5a, None));
    }
}
