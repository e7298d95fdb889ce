//! `strata image check` for every format that has metadata to check: qcow2, vmdk, VHD and VHDX.
//! One entry point, so the command line and the tests run the same code.

use std::path::Path;

use crate::error::{Result, StorageError};
use crate::format::qcow2::check::{CheckReport, Repair};
use crate::format::qcow2::{self, Qcow2Options};
use crate::format::{open_host_file, probe, vhd, vhdx, vmdk, ImageFormat, OpenOptions, Probed};

/// Checks the image at `path` and repairs what `repair` asks for. The format is probed when
/// `format` is `None` (the caller names it for images whose bytes an untrusted party wrote).
/// A qcow2 image's backing file is not opened (one layer is checked); a vmdk's extent files and
/// parent are, as for reading it. An image that cannot be opened at all is an error (qemu-img:
/// "Check not completed").
pub fn check_file(path: &Path, format: Option<ImageFormat>, repair: Repair) -> Result<CheckReport> {
    let opts = OpenOptions {
        format,
        read_only: repair == Repair::None,
        ..OpenOptions::default()
    };
    let format = match format {
        Some(f) => f,
        None => match probe(open_host_file(path, &opts)?.as_ref())? {
            Probed::Known(f) => f,
            Probed::Foreign(name) => {
                return Err(StorageError::Unsupported(format!("checking {name} images")))
            }
        },
    };
    match format {
        ImageFormat::Qcow2 => {
            let q = Qcow2Options {
                allow_corrupt: repair == Repair::All,
                no_backing: true,
                for_check: true,
                ..Qcow2Options::default()
            };
            qcow2::open(open_host_file(path, &opts)?, &q)?.check(repair)
        }
        ImageFormat::Vmdk => {
            let img = vmdk::open(open_host_file(path, &opts)?, Some(path), &opts)?;
            vmdk::check::check(&img, repair)
        }
        ImageFormat::Vhd => {
            let opts = OpenOptions {
                read_only: repair != Repair::All,
                ..opts
            };
            vhd::open(open_host_file(path, &opts)?, Some(path), &opts)?.check(repair)
        }
        ImageFormat::Vhdx => vhdx::check::check_file(path, repair),
        ImageFormat::Raw => Err(StorageError::Unsupported(
            "checking raw images: a raw image has no metadata to check".into(),
        )),
    }
}
