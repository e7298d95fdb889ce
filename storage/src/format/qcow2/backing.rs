//! Opening backing chains: names resolved against the image's folder, formats from the header
//! extension (else probed), every backing image read-only, loops and chains deeper than
//! [`MAX_CHAIN_DEPTH`] refused.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::device::SharedFile;
use crate::error::{Result, StorageError};
use crate::format::{self, Image, ImageFormat, Probed};
use crate::io::engine::FileDevice;
use crate::io::file::FileOptions;

use super::{Qcow2Image, Qcow2Options};

/// Deepest backing chain we open (images below the top one).
pub const MAX_CHAIN_DEPTH: usize = 16;

/// An open backing image; qcow2 ones are kept typed so that `map` can look into them.
#[derive(Clone, Debug)]
pub struct Backing {
    /// The image.
    pub image: Arc<dyn Image>,
    /// The same image when it is qcow2.
    pub qcow2: Option<Arc<Qcow2Image>>,
    /// Its path.
    pub path: PathBuf,
    /// Its format.
    pub format: ImageFormat,
}

/// The path a backing file name refers to, relative names resolved against the folder of the
/// image that names it.
pub fn resolve(image_name: &str, backing: &str) -> Result<PathBuf> {
    if let Some((proto, _)) = backing.split_once(':') {
        if !proto.contains('/') && proto.len() > 1 {
            return Err(StorageError::Unsupported(format!(
                "backing file protocol '{proto}:' in '{backing}'"
            )));
        }
    }
    let p = Path::new(backing);
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    let dir = Path::new(image_name)
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    Ok(dir.join(p))
}

/// The canonical path of an image name, when it names a file.
pub fn canonical(name: &str) -> Option<PathBuf> {
    std::fs::canonicalize(name).ok()
}

/// Opens the backing image `name` of the image called `image_name`, with `format` if the
/// header names one. `chain` holds the canonical paths of the images above it.
pub fn open(
    image_name: &str,
    name: &str,
    format: Option<&str>,
    opts: &Qcow2Options,
    chain: &[PathBuf],
) -> Result<Backing> {
    if chain.len() > MAX_CHAIN_DEPTH {
        return Err(StorageError::InvalidInput(format!(
            "The backing chain of {image_name} is deeper than {MAX_CHAIN_DEPTH} images"
        )));
    }
    let path = resolve(image_name, name)?;
    let canon = std::fs::canonicalize(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => StorageError::NotFound(path.clone()),
        _ => StorageError::io(format!("Resolving backing file {}", path.display()), e),
    })?;
    if chain.contains(&canon) {
        return Err(StorageError::InvalidInput(format!(
            "The backing chain of {image_name} loops: {} is its own backing file",
            canon.display()
        )));
    }
    let file: SharedFile = FileDevice::open(
        &path,
        FileOptions {
            read_only: true,
            cache: opts.cache,
        },
        opts.engine,
    )?;
    let fmt = match format {
        Some(f) => f.parse::<ImageFormat>().map_err(|_| {
            StorageError::Unsupported(format!("backing file format '{f}' of {image_name}"))
        })?,
        None => match format::probe(file.as_ref())? {
            Probed::Known(f) => f,
            Probed::Foreign(what) => {
                return Err(StorageError::Unsupported(format!(
                    "{what} backing file {}",
                    path.display()
                )))
            }
        },
    };
    let mut below = chain.to_vec();
    below.push(canon);
    let (image, qcow2): (Arc<dyn Image>, _) = if fmt == ImageFormat::Qcow2 {
        let img = super::open_in_chain(file, opts, &below)?;
        (img.clone(), Some(img))
    } else {
        (format::open_image_on(file, Some(fmt))?, None)
    };
    Ok(Backing {
        image,
        qcow2,
        path,
        format: fmt,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_names_resolve_against_the_image_folder() {
        assert_eq!(
            resolve("/srv/images/top.qcow2", "base.qcow2").unwrap(),
            PathBuf::from("/srv/images/base.qcow2")
        );
        assert_eq!(
            resolve("/srv/images/top.qcow2", "/abs/base.raw").unwrap(),
            PathBuf::from("/abs/base.raw")
        );
        assert_eq!(resolve("top.qcow2", "b").unwrap(), PathBuf::from("./b"));
        assert!(resolve("/x/top", "nbd://host/export").is_err());
        assert!(resolve("/x/top", "json:{}").is_err());
    }
}
