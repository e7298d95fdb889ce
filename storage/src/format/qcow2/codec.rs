//! Compressed cluster codecs: raw deflate with a 4 KiB window (what QEMU writes and reads, so
//! that QEMU can read what we write) and zstd frames. Decompression stops once a cluster is
//! produced, since compressed data is followed by the rest of its last sector.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use crate::error::{Result, StorageError};

use super::header::CompressionType;

fn bad(detail: impl Into<String>) -> StorageError {
    StorageError::corrupt("qcow2 compressed cluster", detail)
}

/// Decompresses `data` into exactly `out.len()` bytes.
pub fn decompress(codec: CompressionType, data: &[u8], out: &mut [u8]) -> Result<()> {
    match codec {
        CompressionType::Deflate => {
            let mut d = Decompress::new_with_window_bits(false, 15);
            let status = d
                .decompress(data, out, FlushDecompress::Finish)
                .map_err(|e| bad(format!("deflate: {e}")))?;
            if (d.total_out() as usize) < out.len() {
                return Err(bad(format!(
                    "deflate produced {} of {} bytes ({status:?})",
                    d.total_out(),
                    out.len()
                )));
            }
            Ok(())
        }
        CompressionType::Zstd => {
            use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
            let mut dec = Decoder::new().map_err(|e| bad(format!("zstd: {e}")))?;
            let mut input = InBuffer::around(data);
            let mut output = OutBuffer::around(out);
            loop {
                let hint = dec
                    .run(&mut input, &mut output)
                    .map_err(|e| bad(format!("zstd: {e}")))?;
                if output.pos() == output.capacity() {
                    return Ok(());
                }
                if hint == 0 || input.pos == input.src.len() {
                    return Err(bad(format!(
                        "zstd produced {} of {} bytes",
                        output.pos(),
                        output.capacity()
                    )));
                }
            }
        }
    }
}

/// Compresses `data`; `None` when the result would not be smaller than `limit` bytes.
pub fn compress(codec: CompressionType, data: &[u8], limit: usize) -> Result<Option<Vec<u8>>> {
    match codec {
        CompressionType::Deflate => {
            let mut c = Compress::new_with_window_bits(Compression::default(), false, 12);
            let mut out = vec![0u8; limit];
            match c.compress(data, &mut out, FlushCompress::Finish) {
                Ok(Status::StreamEnd) => {
                    out.truncate(c.total_out() as usize);
                    Ok(Some(out))
                }
                Ok(_) => Ok(None),
                Err(e) => Err(StorageError::InvalidInput(format!("deflate failed: {e}"))),
            }
        }
        CompressionType::Zstd => {
            let out = zstd::bulk::compress(data, 0)
                .map_err(|e| StorageError::InvalidInput(format!("zstd failed: {e}")))?;
            Ok((out.len() < limit).then_some(out))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_codecs_round_trip_with_trailing_padding() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 300) as u8).collect();
        for codec in [CompressionType::Deflate, CompressionType::Zstd] {
            let mut c = compress(codec, &data, data.len()).unwrap().unwrap();
            c.extend_from_slice(&[0xAA; 300]);
            let mut out = vec![0u8; data.len()];
            decompress(codec, &c, &mut out).unwrap();
            assert_eq!(out, data, "{codec:?}");
            assert!(decompress(codec, &c[..c.len() / 3], &mut out).is_err());
        }
    }

    #[test]
    fn incompressible_data_is_refused() {
        let mut rng = fastrand::Rng::with_seed(1);
        let data: Vec<u8> = (0..4096).map(|_| rng.u8(..)).collect();
        for codec in [CompressionType::Deflate, CompressionType::Zstd] {
            assert!(compress(codec, &data, data.len() - 512).unwrap().is_none());
        }
    }
}
