//! The DSDT as ACPICA's disassembler reads it (the real tool, `iasl` from acpica-tools): the
//! power button, the GED with its interrupt, and an `_EVT` that notifies the button. Without
//! iasl the test fails under `CI` (which installs it) and shows as ignored elsewhere.

fn the_dsdt_disassembles_with_the_power_button_and_its_ged() {
    strata_testkit::require_tool("iasl", "acpica-tools");
    let dir = tempfile::tempdir().unwrap();
    let aml = strata_vmm::boot::acpi::dsdt_aml(&[(0xd000_0000, 5)]);
    let mut dsdt = acpi_tables::sdt::Sdt::new(*b"DSDT", 36, 6, *b"STRATA", *b"STRATATB", 1);
    dsdt.append_slice(&aml);
    let file = dir.path().join("dsdt.aml");
    std::fs::write(&file, dsdt.as_slice()).unwrap();
    let out = std::process::Command::new("iasl")
        .arg("-d")
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dsl = std::fs::read_to_string(dir.path().join("dsdt.dsl")).unwrap();
    for want in [
        "Device (PWRB)",
        "EisaId (\"PNP0C0C\")",
        "Device (GED0)",
        "\"ACPI0013\"",
        "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )",
        "0x00000003",
        "OperationRegion (GDST, SystemIO, 0x03C4, One)",
        "Method (_EVT, 1, Serialized)",
        "Notify (\\_SB.PWRB, 0x80)",
        "\"LNRO0005\"",
    ] {
        assert!(dsl.contains(want), "{want} is missing from:\n{dsl}");
    }
}

strata_testkit::main!(the_dsdt_disassembles_with_the_power_button_and_its_ged);
