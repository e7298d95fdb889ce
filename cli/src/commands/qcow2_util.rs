//! Opening images for the qcow2-specific commands.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use strata_storage::format::qcow2::{self, Qcow2Image, Qcow2Options};
use strata_storage::format::{open_host_file, probe, ImageFormat, OpenOptions, Probed};

/// Opens `path` as a qcow2 image, refusing other formats with a clear message.
pub fn open_qcow2(path: &Path, writable: bool) -> anyhow::Result<Arc<Qcow2Image>> {
    open_qcow2_with(path, writable, Qcow2Options::default())
}

/// As [`open_qcow2`] with options.
pub fn open_qcow2_with(
    path: &Path,
    writable: bool,
    opts: Qcow2Options,
) -> anyhow::Result<Arc<Qcow2Image>> {
    let file = open_host_file(
        path,
        &OpenOptions {
            read_only: !writable,
            ..OpenOptions::default()
        },
    )
    .with_context(|| format!("Could not open {}", path.display()))?;
    match probe(file.as_ref())? {
        Probed::Known(ImageFormat::Qcow2) => {}
        Probed::Known(f) => bail!(
            "{} is a {f} image; this command works on qcow2 images",
            path.display()
        ),
        Probed::Foreign(f) => bail!(
            "{} is a {f} image; this command works on qcow2 images",
            path.display()
        ),
    }
    qcow2::open(file, &opts).with_context(|| format!("Could not open {}", path.display()))
}
