//! The known-defect probes (instructions this host's KVM gets wrong) under QEMU: each must give
//! the result the SDM prescribes (worked out in duet-fixtures' probes). This is where QEMU
//! decides when KVM cannot.

mod common;

#[test]
fn probes_give_the_sdm_result_under_qemu() {
    if !common::qemu_available() {
        return;
    }
    let mut failures = Vec::new();
    for p in duet_fixtures::probes::probes() {
        let f = &p.fixture;
        let guest = f.guest().unwrap_or_else(|e| panic!("{}: {e}", f.name));
        match common::run(&guest) {
            Ok(r) => {
                if let Err(why) = f.expected.check(&r.outcome.stop, &r.console_text()) {
                    failures.push(format!("{}: {why}", f.name));
                }
            }
            Err(e) => failures.push(format!("{}: {e}", f.name)),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
