//! Builds the freestanding test guest (tests/guest/blkdrv) into a flat binary with the host's
//! gcc and objcopy, using the flags the PVM ring-0 emulator needs (no SSE, no popcnt, no BMI),
//! and refuses a build whose code uses an instruction that emulator cannot run.

use std::path::PathBuf;
use std::process::Command;

const FLAGS: &[&str] = &[
    "-O2",
    "-mgeneral-regs-only",
    "-mno-sse",
    "-mno-popcnt",
    "-mno-bmi",
    "-mno-bmi2",
    "-ffreestanding",
    "-nostdlib",
    "-fno-pic",
    "-no-pie",
    "-static",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-mno-red-zone",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-Wl,--build-id=none",
];

/// Mnemonics the PVM ring-0 emulator fails on (ENVIRONMENT.md), checked in the disassembly.
const FORBIDDEN: &[&str] = &[
    "xmm",
    "ymm",
    "popcnt",
    "xsave",
    "xrstor",
    "rdtscp",
    "int3",
    "fwait",
    "clwb",
    "verw",
    "stac",
    "clac",
    "cmpxchg16b",
    "mfence",
    "lfence",
];

fn main() {
    let src = PathBuf::from("guest/blkdrv");
    for f in ["blkdrv.c", "entry.S", "link.ld"] {
        println!("cargo:rerun-if-changed=guest/blkdrv/{f}");
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let elf = out.join("blkdrv.elf");
    let bin = out.join("blkdrv.bin");
    let status = Command::new("gcc")
        .args(FLAGS)
        .arg("-T")
        .arg(src.join("link.ld"))
        .arg("-o")
        .arg(&elf)
        .arg(src.join("entry.S"))
        .arg(src.join("blkdrv.c"))
        .status()
        .expect("running gcc to build the test guest (is gcc installed?)");
    assert!(status.success(), "gcc failed to build the test guest");
    let dis = Command::new("objdump")
        .arg("-d")
        .arg(&elf)
        .output()
        .expect("running objdump (binutils) on the test guest");
    let text = String::from_utf8_lossy(&dis.stdout);
    for bad in FORBIDDEN {
        assert!(
            !text
                .lines()
                .any(|l| l.split('\t').nth(2).is_some_and(|m| m.contains(bad))),
            "the test guest uses '{bad}', which the PVM ring-0 emulator cannot run"
        );
    }
    let status = Command::new("objcopy")
        .args(["-O", "binary"])
        .arg(&elf)
        .arg(&bin)
        .status()
        .expect("running objcopy");
    assert!(status.success(), "objcopy failed");
    println!("cargo:rustc-env=STRATA_BLKDRV_BIN={}", bin.display());
}
