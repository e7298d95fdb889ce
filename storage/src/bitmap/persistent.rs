//! Dirty bitmaps an image format keeps inside the image (the qcow2 bitmaps extension), as a
//! second home for a [`crate::bitmap::BitmapSet`] next to the sidecar file: the image's
//! enabled bitmaps are the set's bitmaps, tracked in memory while the image is open for writing
//! and written back, with their in-use flag cleared, when the last writer stops (a clean close).

use crate::error::Result;

/// One enabled bitmap as stored in the image.
#[derive(Clone, Debug)]
pub struct StoredBitmap {
    /// Name.
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
    /// Its bits (the layout of `crate::bitmap::bits`), or `None` when the image says they were
    /// not saved consistently (an unclean close of a writer that tracked them).
    pub words: Option<Vec<u64>>,
}

/// A bitmap's bits to write back.
#[derive(Clone, Copy, Debug)]
pub struct BitmapBits<'a> {
    /// Name of a bitmap the image holds.
    pub name: &'a str,
    /// Its bits.
    pub words: &'a [u64],
    /// Whether it stays flagged in use: tracked from now on, or not to be trusted.
    pub in_use: bool,
}

/// An image that keeps dirty bitmaps itself. Every change runs with the image idle (no requests
/// in flight) and is crash-ordered by the format.
pub trait PersistentBitmaps: Send + Sync {
    /// The image's enabled bitmaps. A bitmap this open flagged in use (because it tracks from
    /// now on) counts as consistent; one found flagged at open does not.
    fn load_enabled(&self) -> Result<Vec<StoredBitmap>>;

    /// Adds an empty enabled bitmap, flagged in use when `in_use`.
    fn add_enabled(&self, name: &str, granularity: u64, in_use: bool) -> Result<()>;

    /// Removes a bitmap.
    fn remove(&self, name: &str) -> Result<()>;

    /// Writes the bits of `bitmaps` to new storage and sets each one's in-use flag as it says
    /// (cleared: consistent on disk from now on; set: being tracked, or not to be trusted).
    fn store(&self, bitmaps: &[BitmapBits<'_>]) -> Result<()>;
}
