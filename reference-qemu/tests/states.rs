//! Final states under QEMU compared with `StateDiff` against the reviewed snapshots recorded on
//! KVM (`tests/snapshots/*.snap` of the root package) for fixtures where this host's KVM is
//! trustworthy (real mode, protected mode without paging, long mode: DEVELOPERS.md).

mod common;

use duet_core::{CpuState, DescriptorTable, DiffMask, Segment, StateDiff};

/// A segment from the VMX access-rights word `attr` that the snapshots print.
fn segment(selector: u16, base: u64, limit: u32, attr: u32) -> Segment {
    let bit = |n: u32| attr & (1 << n) != 0;
    Segment {
        base,
        limit,
        selector,
        type_: (attr & 0xf) as u8,
        s: bit(4),
        dpl: ((attr >> 5) & 3) as u8,
        present: bit(7),
        avl: bit(12),
        l: bit(13),
        db: bit(14),
        g: bit(15),
        unusable: bit(16),
    }
}

/// Parses the register block of a snapshot (`name=hex` pairs, segments, tables, CRs).
fn parse_snapshot(text: &str, start: &CpuState) -> CpuState {
    let mut s = CpuState { fpu: start.fpu, ..CpuState::default() };
    // The snapshots do not print TR and LDTR; these fixtures never change them.
    (s.sregs.tr, s.sregs.ldt) = (start.sregs.tr, start.sregs.ldt);
    let hex = |v: &str| u64::from_str_radix(v, 16).unwrap_or_else(|_| panic!("bad hex {v:?}"));
    let mut gprs = [0u64; 16];
    for line in text.lines().filter(|l| !l.starts_with("stop:") && !l.starts_with("console:")) {
        let pairs: Vec<(&str, &str)> = line.split_whitespace().filter_map(|t| t.split_once('=')).collect();
        let get = |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| *v);
        if let (Some(sel), Some(base), Some(limit), Some(attr)) =
            (pairs.first(), get("base"), get("limit"), get("attr"))
        {
            let seg = segment(hex(sel.1) as u16, hex(base), hex(limit) as u32, hex(attr) as u32);
            let r = &mut s.sregs;
            match sel.0 {
                "es" => r.es = seg,
                "cs" => r.cs = seg,
                "ss" => r.ss = seg,
                "ds" => r.ds = seg,
                "fs" => r.fs = seg,
                _ => r.gs = seg,
            }
            continue;
        }
        for (k, v) in &pairs {
            if let Some(i) = duet_core::Regs::GPR_NAMES.iter().position(|n| n == k) {
                gprs[i] = hex(v);
            }
            let table = |v: &str| {
                let (b, l) = v.split_once('/').unwrap_or((v, "0"));
                DescriptorTable { base: hex(b), limit: hex(l) as u16 }
            };
            match *k {
                "rip" => s.regs.rip = hex(v),
                "rflags" => s.regs.rflags = hex(v),
                "gdtr" => s.sregs.gdt = table(v),
                "idtr" => s.sregs.idt = table(v),
                "cr0" => s.sregs.cr0 = hex(v),
                "cr2" => s.sregs.cr2 = hex(v),
                "cr3" => s.sregs.cr3 = hex(v),
                "cr4" => s.sregs.cr4 = hex(v),
                "efer" => s.sregs.efer = hex(v),
                _ => {}
            }
        }
    }
    s.regs.set_gprs(&gprs);
    s
}

/// Runs fixture `name` under QEMU and diffs its final state against the KVM snapshot,
/// masking `undefined` RFLAGS bits (named per fixture below, from the SDM); the rows of
/// `known` are QEMU's documented deviations from the SDM and must be exactly those.
fn check(name: &str, undefined: u64, known: &[&str]) {
    let f = duet_fixtures::find(name).unwrap_or_else(|| panic!("no fixture {name}"));
    let guest = f.guest().unwrap_or_else(|e| panic!("{name}: {e}"));
    let path = format!("{}/../tests/snapshots/{name}.snap", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let want = parse_snapshot(&text, &guest.state);
    let r = common::run(&guest).unwrap_or_else(|e| panic!("{name}: {e}"));
    let stop_line = text.lines().find_map(|l| l.strip_prefix("stop: ")).unwrap_or("");
    assert_eq!(r.outcome.stop.to_string(), stop_line, "{name}: stop");
    let mask = DiffMask { rflags_undefined: undefined, ignore_fpu: true };
    // The snapshots record neither MSRs nor FPU state.
    let got = CpuState { msrs: Default::default(), ..r.outcome.state.clone() };
    let diff = StateDiff::states(("kvm snapshot", &want), ("qemu", &got), &mask);
    let fields: Vec<&str> = diff.rows.iter().map(|r| r.field.as_str()).collect();
    assert_eq!(fields, known, "{name} ({:?}):\n{diff}", r.notes);
}

#[test]
fn final_states_match_the_kvm_snapshots() {
    if !common::qemu_available() {
        return;
    }
    use duet_core::state::rflags::AF;
    // hello ends `test bl, bl; jz done; cli; hlt`: TEST leaves AF undefined (SDM Vol. 2B TEST).
    check("hello", AF, &[]);
    // hlt ends in the puts routine's `test al, al`: AF undefined.
    check("hlt", AF, &[]);
    // The fault fixtures' last flag writers are the faulting instructions' predecessors.
    check("fault-real", AF, &[]);
    check("fault-protected", AF, &[]);
    // QEMU deviates from the SDM here: an exception through an IST gate without a privilege
    // change loads a null SS in QEMU (target/i386 do_interrupt64 treats IST like a stack
    // switch on privilege change), while the SDM's INT pseudo-code (Vol. 2A, INT n, IA-32e
    // mode, INTRA-PRIVILEGE-LEVEL-INTERRUPT) only reloads RSP from the IST and leaves SS
    // alone, as KVM does. The SDM wins; the deviation is pinned here.
    check("fault-long", AF, &["ss.selector", "ss.limit", "ss.attributes"]);
    check("sieve", AF, &[]);
    check("strings", AF, &[]);
    check("real-segments", AF, &[]);
    check("paging", AF, &[]);
    check("alu", AF, &[]);
    check("stack", AF, &[]);
    check("mode-switch", AF, &[]);
    check("exceptions", AF, &[]);
}
