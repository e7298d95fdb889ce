//! `strata image map`: where each range of an image is stored, through its backing chain.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use strata_storage::device::ExtentKind;
use strata_storage::format::qcow2::MapEntry;
use strata_storage::format::{self, ImageFormat, OpenOptions};

use super::qcow2_util::open_qcow2;
use super::Output;

#[derive(Debug, Args)]
pub struct MapArgs {
    /// Image format (probed when omitted; a fixed VHD needs `-f vhd`).
    #[arg(short = 'f', long = "format", value_enum)]
    format: Option<super::image::FormatArg>,
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    output: Output,
    /// The image.
    file: PathBuf,
}

pub fn run(a: MapArgs) -> anyhow::Result<ExitCode> {
    let opts = OpenOptions {
        format: a.format.map(Into::into),
        read_only: true,
        ..OpenOptions::default()
    };
    let img = format::open_image(&a.file, &opts)
        .with_context(|| format!("Could not open {}", a.file.display()))?;
    let size = img.size();
    let entries: Vec<MapEntry> = if img.format() == ImageFormat::Qcow2 {
        drop(img);
        open_qcow2(&a.file, false)?.map(0, size)?
    } else {
        let mut v = Vec::new();
        let mut at = 0;
        while at < size {
            let e = img.block_status(at, size - at)?;
            let data = e.kind == ExtentKind::Data;
            v.push(MapEntry {
                start: at,
                length: e.len,
                depth: 0,
                present: true,
                zero: !data,
                data,
                compressed: false,
                offset: data.then_some(at),
                filename: Some(a.file.display().to_string()),
            });
            at += e.len;
        }
        v
    };
    match a.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&entries)?),
        Output::Human => {
            println!("{:<16}{:<16}{:<16}File", "Offset", "Length", "Mapped to");
            for e in entries.iter().filter(|e| e.data) {
                let mapped = e
                    .offset
                    .map_or("compressed".to_string(), |o| format!("{o:#x}"));
                println!(
                    "{:<16}{:<16}{:<16}{}",
                    format!("{:#x}", e.start),
                    format!("{:#x}", e.length),
                    mapped,
                    e.filename.as_deref().unwrap_or("")
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
