//! Paging: 32-bit (4 MiB pages with CR4.PSE), PAE and 4-level, with a direct-mapped TLB
//! (SDM Vol. 3A Chapter 4).

use duet_core::state::ctrl;

use super::Kind;
use crate::cpu::{vector, Abort, Cpu, Exception, Flow};

const TLB_SIZE: usize = 256;

/// CPUID.80000001H:EDX bit 26: 1-GByte pages (SDM Vol. 2A CPUID, Table 3-8).
const PAGE1GB: u32 = 1 << 26;

/// The TLB slot of a page: the page number folded so that pages 1 MiB apart (code and data
/// often sit at such round addresses) do not evict each other.
#[inline]
fn tlb_index(vpn: u64) -> usize {
    ((vpn ^ (vpn >> 8) ^ (vpn >> 16)) as usize) % TLB_SIZE
}

/// A cached translation of one 4 KiB linear page with the combined rights of its walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    vpn: u64,
    pfn: u64,
    user: bool,
    writable: bool,
    nx: bool,
    dirty: bool,
    /// Mapped by a global entry with CR4.PGE on: kept across CR3 writes (SDM Vol. 3A §4.10.2.4).
    global: bool,
}

/// A small direct-mapped TLB: flushed on CR0/CR4 paging-bit changes, all but global entries on
/// CR3 writes, one page on INVLPG (SDM Vol. 3A §4.10.4.1).
#[derive(Debug)]
pub(crate) struct Tlb {
    entries: Vec<Option<Entry>>,
}

impl Default for Tlb {
    fn default() -> Self {
        Tlb { entries: vec![None; TLB_SIZE] }
    }
}

impl Tlb {
    /// Drops every translation.
    pub fn flush(&mut self) {
        self.entries.fill(None);
    }

    /// Drops every translation not marked global (MOV to CR3, task switch).
    pub fn flush_nonglobal(&mut self) {
        for e in self.entries.iter_mut() {
            if e.is_some_and(|x| !x.global) {
                *e = None;
            }
        }
    }

    /// Drops the translation of the page holding `lin`, global or not (INVLPG).
    pub fn invlpg(&mut self, lin: u64) {
        let vpn = lin >> 12;
        if let Some(e) = self.entries.get_mut(tlb_index(vpn)) {
            *e = None;
        }
    }

    #[inline]
    fn get(&self, vpn: u64) -> Option<Entry> {
        self.entries.get(tlb_index(vpn)).copied().flatten().filter(|e| e.vpn == vpn)
    }

    fn put(&mut self, e: Entry) {
        if let Some(slot) = self.entries.get_mut(tlb_index(e.vpn)) {
            *slot = Some(e);
        }
    }
}

/// Page-fault error-code bits (SDM Vol. 3A §4.7, Figure 4-12).
pub(crate) mod pf {
    /// The page was present (protection violation).
    pub const P: u32 = 1;
    /// The access was a write.
    pub const W: u32 = 2;
    /// The access was a user-mode access.
    pub const U: u32 = 4;
    /// A reserved bit was set in a paging-structure entry.
    pub const RSVD: u32 = 8;
    /// The access was an instruction fetch.
    pub const ID: u32 = 16;
}

/// One level of a page walk: where the index comes from and whether a large page may end it.
struct Level {
    shift: u32,
    large: bool,
}

impl Cpu {
    /// Whether paging is on (CR0.PG with CR0.PE).
    pub fn paging(&self) -> bool {
        self.sregs.cr0 & ctrl::CR0_PG != 0 && self.protected()
    }

    /// Whether PAE paging is in use (CR0.PG, CR4.PAE, not IA-32e mode).
    pub fn pae_paging(&self) -> bool {
        self.paging() && self.sregs.cr4 & ctrl::CR4_PAE != 0 && !self.long_mode()
    }

    /// The four PDPTEs of the PAE table at `cr3`, #GP(0) when a present one sets a reserved bit:
    /// bits 2:1, 8:5 or MAXPHYADDR and up (SDM Vol. 3A §4.4.1, Table 4-8).
    pub fn read_pdptes(&self, cr3: u64) -> Flow<[u64; 4]> {
        let mut out = [0u64; 4];
        let rsvd = 0x1e6 | !((1u64 << self.maxphyaddr) - 1);
        for (i, e) in out.iter_mut().enumerate() {
            *e = self.phys_read_u64((cr3 & 0xffff_ffe0) + 8 * i as u64);
            if *e & 1 != 0 && *e & rsvd != 0 {
                return Err(crate::cpu::gp(0));
            }
        }
        Ok(out)
    }

    /// Translates linear `lin` for an access of `kind`; `sup` marks implicit supervisor accesses.
    #[inline]
    pub fn translate(&mut self, lin: u64, kind: Kind, sup: bool) -> Flow<u64> {
        if !self.paging() {
            return Ok(lin & 0xffff_ffff);
        }
        let user = !sup && self.cpl() == 3;
        // The TLB hit that needs no walk and raises nothing: the common case, kept inline.
        if let Some(e) = self.tlb.get(lin >> 12) {
            if (kind != Kind::Write || e.dirty) && self.denied(&e, kind, user).is_none() {
                return Ok((e.pfn << 12) | (lin & 0xfff));
            }
        }
        self.translate_slow(lin, kind, user)
    }

    /// `translate` past the fast path: a miss (walk), a write to a clean page, or a fault.
    #[inline(never)]
    fn translate_slow(&mut self, lin: u64, kind: Kind, user: bool) -> Flow<u64> {
        let vpn = lin >> 12;
        let hit = self.tlb.get(vpn).filter(|e| kind != Kind::Write || e.dirty);
        let e = match hit {
            Some(e) => e,
            None => {
                let e = self.walk(lin, kind, user)?;
                self.tlb.put(e);
                e
            }
        };
        if let Some(code) = self.denied(&e, kind, user) {
            return Err(self.page_fault(lin, code | pf::P, kind, user));
        }
        Ok((e.pfn << 12) | (lin & 0xfff))
    }

    /// The physical address of linear `lin` as the current paging structures map it, for
    /// reports: no accessed or dirty bit is set and the TLB is not filled; `None` where the
    /// walk would fault.
    pub fn peek_translate(&mut self, lin: u64) -> Option<u64> {
        if !self.paging() {
            return Some(lin & 0xffff_ffff);
        }
        if let Some(e) = self.tlb.get(lin >> 12) {
            return Some((e.pfn << 12) | (lin & 0xfff));
        }
        let e = self.walk_as(lin, Kind::Read, false, false).ok()?;
        Some((e.pfn << 12) | (lin & 0xfff))
    }

    /// The page-fault error code bits for `kind`/`user`, plus I/D where the SDM reports it.
    fn pf_bits(&self, kind: Kind, user: bool) -> u32 {
        let mut code = 0;
        if kind == Kind::Write {
            code |= pf::W;
        }
        if user {
            code |= pf::U;
        }
        // SDM Vol. 3A §4.7: I/D is reported for fetches when NX is in force (PAE/4-level with NXE).
        let nx_paging = self.sregs.cr4 & ctrl::CR4_PAE != 0 && self.sregs.efer & ctrl::EFER_NXE != 0;
        if kind == Kind::Exec && nx_paging {
            code |= pf::ID;
        }
        code
    }

    fn page_fault(&self, lin: u64, code: u32, kind: Kind, user: bool) -> Abort {
        Abort::Exception(Exception {
            vector: vector::PF,
            error: Some(code | self.pf_bits(kind, user)),
            cr2: Some(lin),
        })
    }

    /// The protection violation of an access to a present page, if any (SDM Vol. 3A §4.6.1).
    #[inline]
    fn denied(&self, e: &Entry, kind: Kind, user: bool) -> Option<u32> {
        let wp = self.sregs.cr0 & ctrl::CR0_WP != 0;
        let bad = (user && !e.user)
            || (kind == Kind::Write && !e.writable && (user || wp))
            || (kind == Kind::Exec && e.nx);
        bad.then_some(0)
    }

    /// Walks the paging structures for `lin`, setting accessed (and, for writes, dirty) bits.
    fn walk(&mut self, lin: u64, kind: Kind, user: bool) -> Flow<Entry> {
        self.walk_as(lin, kind, user, true)
    }

    /// `walk`; with `commit` false it only reads (no accessed or dirty bit is written).
    fn walk_as(&mut self, lin: u64, kind: Kind, user: bool, commit: bool) -> Flow<Entry> {
        let cr4 = self.sregs.cr4;
        let nxe = self.sregs.efer & ctrl::EFER_NXE != 0;
        let m = self.maxphyaddr;
        let addr_mask = ((1u64 << m) - 1) & !0xfff;
        // Bits M..51 of an 8-byte entry, and bit 63 without NXE, are reserved (SDM Vol. 3A §4.5, Table 4-20).
        let rsvd8 = (((1u64 << 52) - 1) & !((1u64 << m) - 1)) | if nxe { 0 } else { 1 << 63 };
        let (mut writable, mut usr, mut nx) = (true, true, false);
        let mut touched: [(u64, u64, bool); 5] = [(0, 0, false); 5];
        let mut n = 0usize;
        let fault = |s: &Self, code: u32| s.page_fault(lin, code, kind, user);
        let (mut table, levels, wide): (u64, &[Level], bool) = if self.long_mode() {
            const L4: [Level; 4] = [
                Level { shift: 39, large: false },
                Level { shift: 30, large: true },
                Level { shift: 21, large: true },
                Level { shift: 12, large: false },
            ];
            (self.sregs.cr3 & addr_mask, &L4, true)
        } else if cr4 & ctrl::CR4_PAE != 0 {
            // PAE: the walk starts at the PDPTE register, loaded when CR3 was (SDM Vol. 3A §4.4.1).
            let pdpte = self.pdpte.get(((lin >> 30) & 3) as usize).copied().unwrap_or(0);
            if pdpte & 1 == 0 {
                return Err(fault(self, 0));
            }
            if pdpte & (0x1e6 | !((1u64 << m) - 1)) != 0 {
                return Err(fault(self, pf::P | pf::RSVD));
            }
            const L2: [Level; 2] = [Level { shift: 21, large: true }, Level { shift: 12, large: false }];
            (pdpte & addr_mask, &L2, true)
        } else {
            const L2: [Level; 2] = [Level { shift: 22, large: true }, Level { shift: 12, large: false }];
            (self.sregs.cr3 & 0xffff_f000, &L2, false)
        };
        for (i, lvl) in levels.iter().enumerate() {
            let last = i + 1 == levels.len();
            let (pa, entry) = if wide {
                let pa = table + ((lin >> lvl.shift) & 0x1ff) * 8;
                (pa, self.phys_read_u64(pa))
            } else {
                let pa = table + ((lin >> lvl.shift) & 0x3ff) * 4;
                (pa, u64::from(self.phys_read_u32(pa)))
            };
            if entry & 1 == 0 {
                return Err(fault(self, 0));
            }
            let ps = entry & 0x80 != 0;
            let large = !last && ps && lvl.large && (wide || cr4 & ctrl::CR4_PSE != 0);
            let mut rsvd = if wide { rsvd8 } else { 0 };
            if wide && i == 0 && levels.len() == 4 {
                if ps {
                    rsvd |= 0x80; // PS is reserved in a PML4E.
                }
                // Bit 8 of a PML4E is ignored on Intel (SDM Vol. 3A §4.5, the PML4E format) but reserved on
                // AMD (AMD64 APM Vol. 2 §5.3.3; KVM commit 5ecad245de2a: "Intel ignores it; AMD
                // ignores it in PDEs and PDPEs, but reserves it in PML4Es").
                if self.amd() {
                    rsvd |= 0x100;
                }
            }
            // PS in a PDPTE (a 1-GByte page) is reserved unless CPUID.80000001H:EDX.Page1GB
            // [bit 26] = 1 (SDM Vol. 3A §4.5.4, Table 4-16 and §4.1.4).
            if wide
                && i == 1
                && levels.len() == 4
                && ps
                && self.cpuid.lookup(0x8000_0001, 0)[3] & PAGE1GB == 0
            {
                return Err(fault(self, pf::P | pf::RSVD));
            }
            if large {
                // Bits 20:13 (2 MiB) or 29:13 (1 GiB) below the page base are reserved; bit 12 is PAT.
                rsvd |= if wide { ((1u64 << lvl.shift) - 1) & !0x1fff } else { pse36_reserved(m) };
            }
            if entry & rsvd != 0 {
                return Err(fault(self, pf::P | pf::RSVD));
            }
            writable &= entry & 2 != 0;
            usr &= entry & 4 != 0;
            nx |= nxe && entry & (1 << 63) != 0;
            if let Some(t) = touched.get_mut(n) {
                *t = (pa, entry, wide);
                n += 1;
            }
            if last || large {
                let pfn = if large && !wide {
                    // 4 MiB page: bits 31:22 and PSE-36 bits 20:13 → 39:32 (SDM Vol. 3A §4.3).
                    (((entry & 0xffc0_0000) | (((entry >> 13) & 0xff) << 32)) + (lin & 0x3f_ffff)) >> 12
                } else if large {
                    ((entry & addr_mask & !((1u64 << lvl.shift) - 1)) + (lin & ((1u64 << lvl.shift) - 1)))
                        >> 12
                } else {
                    (entry & if wide { addr_mask } else { 0xffff_f000 }) >> 12
                };
                // G (bit 8) of the entry that maps the page counts only with CR4.PGE (§4.10.2.4).
                let global = cr4 & ctrl::CR4_PGE != 0 && entry & 0x100 != 0;
                let e = Entry {
                    vpn: lin >> 12,
                    pfn,
                    user: usr,
                    writable,
                    nx,
                    dirty: kind == Kind::Write,
                    global,
                };
                if let Some(code) = self.denied(&e, kind, user) {
                    return Err(fault(self, code | pf::P));
                }
                // SDM Vol. 3A §4.8: set A in every entry used, D in the one that maps the page on a write.
                for (k, &(pa, val, w)) in touched.iter().take(if commit { n } else { 0 }).enumerate() {
                    let mut nv = val | 0x20;
                    if k + 1 == n && kind == Kind::Write {
                        nv |= 0x40;
                    }
                    if nv != val {
                        if w {
                            self.phys_write_entry(pa, &nv.to_le_bytes());
                        } else {
                            self.phys_write_entry(pa, &(nv as u32).to_le_bytes());
                        }
                    }
                }
                return Ok(e);
            }
            table = if wide { entry & addr_mask } else { entry & 0xffff_f000 };
        }
        Err(fault(self, 0))
    }
}

/// Reserved bits of a 4 MiB PDE: 21:(min(M, 40) − 19) (SDM Vol. 3A §4.3, Table 4-4).
fn pse36_reserved(m: u32) -> u64 {
    let lo = m.min(40) - 19;
    let mut r = 0u64;
    for b in lo..=21 {
        r |= 1 << b;
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pse36_reserved_covers_bits_above_maxphyaddr() {
        // M = 36: bits 21:17 reserved; M = 40: only bit 21.
        assert_eq!(pse36_reserved(36), 0b11111 << 17);
        assert_eq!(pse36_reserved(40), 1 << 21);
    }

    #[test]
    fn tlb_invlpg_drops_only_that_page() {
        let mut t = Tlb::default();
        let e =
            |vpn| Entry { vpn, pfn: vpn, user: true, writable: true, nx: false, dirty: false, global: false };
        t.put(e(5));
        t.put(e(6));
        t.invlpg(5 << 12);
        assert_eq!(t.get(5), None);
        assert_eq!(t.get(6), Some(e(6)));
        t.flush();
        assert_eq!(t.get(6), None);
    }

    #[test]
    fn tlb_flush_nonglobal_keeps_global_entries() {
        let mut t = Tlb::default();
        let e = |vpn, global| Entry {
            vpn,
            pfn: vpn,
            user: true,
            writable: true,
            nx: false,
            dirty: false,
            global,
        };
        t.put(e(1, true));
        t.put(e(2, false));
        t.flush_nonglobal();
        assert_eq!((t.get(1), t.get(2)), (Some(e(1, true)), None));
        t.invlpg(1 << 12);
        assert_eq!(t.get(1), None);
    }
}
