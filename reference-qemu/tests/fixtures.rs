//! Every fixture of the catalogue under QEMU TCG meets its expected outcome.

mod common;

#[test]
fn every_fixture_meets_its_expected_outcome() {
    if !common::qemu_available() {
        return;
    }
    let mut failures = Vec::new();
    for f in duet_fixtures::catalogue() {
        let guest = f.guest().unwrap_or_else(|e| panic!("{}: {e}", f.name));
        match common::run(&guest) {
            Ok(r) => {
                println!("{}: {} {:?}", f.name, r.outcome.stop, r.notes);
                if let Err(why) = f.expected.check(&r.outcome.stop, &r.console_text()) {
                    failures.push(format!("{}: {why}", f.name));
                }
            }
            Err(e) => failures.push(format!("{}: {e}", f.name)),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
