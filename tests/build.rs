//! Builds the freestanding test guests (tests/guest/blkdrv: the virtio-blk driver test, and
//! with -DTICKER the ticker, which writes a counter to its disk until the power button is
//! pressed; tests/guest/netdrv: the virtio-net driver test) into flat binaries with the host's gcc and objcopy, using the flags the PVM ring-0
//! emulator needs (no SSE, no popcnt, no BMI), and refuses a build whose code uses an
//! instruction that emulator cannot run.

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
    for f in [
        "blkdrv/blkdrv.c",
        "blkdrv/entry.S",
        "blkdrv/link.ld",
        "netdrv/netdrv.c",
    ] {
        println!("cargo:rerun-if-changed=guest/{f}");
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let blkdrv = build(&out, "blkdrv", "blkdrv/blkdrv.c", &[]);
    println!("cargo:rustc-env=STRATA_BLKDRV_BIN={}", blkdrv.display());
    let ticker = build(
        &out,
        "ticker",
        "blkdrv/blkdrv.c",
        &["-DTICKER", "-Wno-unused-function", "-Wno-unused-variable"],
    );
    println!("cargo:rustc-env=STRATA_TICKER_BIN={}", ticker.display());
    // The virtio-net driver, with the ticker's interrupt stubs (LAPIC timer) from entry.S.
    let netdrv = build(&out, "netdrv", "netdrv/netdrv.c", &["-DTICKER"]);
    println!("cargo:rustc-env=STRATA_NETDRV_BIN={}", netdrv.display());
}

/// Builds guest `name` from `source` (under guest/) with blkdrv's entry and linker script and
/// `defines`; returns the flat binary's path.
fn build(out: &std::path::Path, name: &str, source: &str, defines: &[&str]) -> PathBuf {
    let src = PathBuf::from("guest/blkdrv");
    let elf = out.join(format!("{name}.elf"));
    let bin = out.join(format!("{name}.bin"));
    let status = Command::new("gcc")
        .args(FLAGS)
        .args(defines)
        .arg("-T")
        .arg(src.join("link.ld"))
        .arg("-o")
        .arg(&elf)
        .arg(src.join("entry.S"))
        .arg(PathBuf::from("guest").join(source))
        .status()
        .expect("running gcc to build the test guest (is gcc installed?)");
    assert!(
        status.success(),
        "gcc failed to build the test guest {name}"
    );
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
            "the test guest {name} uses '{bad}', which the PVM ring-0 emulator cannot run"
        );
    }
    let status = Command::new("objcopy")
        .args(["-O", "binary"])
        .arg(&elf)
        .arg(&bin)
        .status()
        .expect("running objcopy");
    assert!(status.success(), "objcopy failed");
    bin
}
