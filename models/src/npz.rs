//! Images as the `.npz` file that the evaluation suite of the VAR paper reads.
//!
//! The paper's FID, IS, precision and recall come from OpenAI's ADM evaluator, which takes a
//! `.npz` whose `arr_0` is uint8 [N, H, W, 3] (what `np.savez` writes for one array). That is a
//! zip archive holding one NPY file. Sampling 50,000 images at 256 px makes a 9.8 GB array, so
//! the writer streams: the NPY header states the final shape up front, each batch is appended as
//! it is decoded, and the archive is finished (zip64, stored, CRC) only when exactly N images
//! have arrived. It is written under a temporary name and renamed, like every file we write, so
//! an interrupted run leaves no file that looks complete.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use mvar_engine::{Error, Result};
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipWriter};

/// The NPY v1.0 header of a C-order uint8 array of `shape`, padded so that the data starts at a
/// multiple of 64 bytes (as numpy writes it).
pub fn npy_u8_header(shape: &[usize]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    // A one-element tuple needs its trailing comma.
    let tuple = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut dict = format!("{{'descr': '|u1', 'fortran_order': False, 'shape': {tuple}, }}");
    // magic (6) + version (2) + length (2) + dict + '\n' is a multiple of 64.
    let unpadded = 10 + dict.len() + 1;
    dict.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    dict.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out
}

/// Streams uint8 HWC images into `arr_0` of an `.npz`.
pub struct NpzImageWriter {
    zip: Option<ZipWriter<BufWriter<File>>>,
    path: PathBuf,
    tmp: PathBuf,
    image_bytes: usize,
    expected: usize,
    written: usize,
}

impl NpzImageWriter {
    /// Starts `path` for `count` images of `height` x `width` x 3.
    pub fn create(path: &Path, count: usize, height: usize, width: usize) -> Result<Self> {
        let io = |e: std::io::Error| Error::Io {
            path: path.display().to_string(),
            source: e,
        };
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(".tmp");
        let tmp = path.with_file_name(name);
        let file = File::create(&tmp).map_err(io)?;
        let mut zip = ZipWriter::new(BufWriter::new(file));
        let options = SimpleFileOptions::default()
            .compression_method(CompressionMethod::Stored)
            .large_file(true);
        zip.start_file("arr_0.npy", options)
            .map_err(|e| zip_err(path, e))?;
        zip.write_all(&npy_u8_header(&[count, height, width, 3]))
            .map_err(io)?;
        Ok(NpzImageWriter {
            zip: Some(zip),
            path: path.to_path_buf(),
            tmp,
            image_bytes: height * width * 3,
            expected: count,
            written: 0,
        })
    }

    /// Appends whole images (uint8, HWC, one after the other).
    pub fn append(&mut self, hwc: &[u8]) -> Result<()> {
        let n = hwc.len() / self.image_bytes.max(1);
        if !hwc.len().is_multiple_of(self.image_bytes) || self.written + n > self.expected {
            return Err(Error::invalid(
                "NpzImageWriter::append",
                format!(
                    "{} bytes after {} of {} images: expected whole images of {} bytes, {} in all",
                    hwc.len(),
                    self.written,
                    self.expected,
                    self.image_bytes,
                    self.expected
                ),
            ));
        }
        let zip = self.zip.as_mut().expect("open until finished");
        zip.write_all(hwc).map_err(|e| Error::Io {
            path: self.tmp.display().to_string(),
            source: e,
        })?;
        self.written += n;
        Ok(())
    }

    /// Completes the archive and puts it in place; every image must have been appended.
    pub fn finish(mut self) -> Result<()> {
        if self.written != self.expected {
            return Err(Error::invalid(
                "NpzImageWriter::finish",
                format!(
                    "{} of {} images written to {}",
                    self.written,
                    self.expected,
                    self.path.display()
                ),
            ));
        }
        let zip = self.zip.take().expect("open until finished");
        let buf = zip.finish().map_err(|e| zip_err(&self.path, e))?;
        let file = buf.into_inner().map_err(|e| Error::Io {
            path: self.tmp.display().to_string(),
            source: e.into_error(),
        })?;
        let io = |e: std::io::Error| Error::Io {
            path: self.path.display().to_string(),
            source: e,
        };
        file.sync_all().map_err(io)?;
        std::fs::rename(&self.tmp, &self.path).map_err(io)
    }
}

impl Drop for NpzImageWriter {
    /// An unfinished archive is removed, not left beside the results.
    fn drop(&mut self) {
        if self.zip.is_some() {
            self.zip = None;
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

fn zip_err(path: &Path, e: zip::result::ZipError) -> Error {
    Error::Format {
        what: path.display().to_string(),
        msg: format!("writing the zip archive: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn headers_are_what_numpy_writes() {
        // What np.save wrote for a uint8 array of shape (2, 3, 4, 3) (numpy 2.4.6).
        let numpy = [
            &b"\x93NUMPY\x01\x00v\x00{'descr': '|u1', 'fortran_order': False, 'shape': (2, 3, 4, 3), }"[..],
            &[b' '; 52][..],
            b"\n",
        ]
        .concat();
        let h = npy_u8_header(&[2, 3, 4, 3]);
        assert_eq!(h, numpy);
        assert_eq!(h.len() % 64, 0);
        assert_eq!(&h[..8], b"\x93NUMPY\x01\x00");
        let len = u16::from_le_bytes([h[8], h[9]]) as usize;
        assert_eq!(len + 10, h.len());
        let dict = std::str::from_utf8(&h[10..]).unwrap();
        assert!(
            dict.starts_with("{'descr': '|u1', 'fortran_order': False, 'shape': (2, 3, 4, 3), }")
        );
        assert!(dict.ends_with('\n'));
        assert!(std::str::from_utf8(&npy_u8_header(&[7])[10..])
            .unwrap()
            .contains("'shape': (7,), }"));
    }

    #[test]
    fn images_stream_into_arr_0_and_an_unfinished_file_is_removed() {
        let dir = std::env::temp_dir().join(format!("mvar-npz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("samples.npz");
        let images: Vec<u8> = (0..5 * 2 * 3 * 3).map(|i| (i * 7 % 256) as u8).collect();
        let mut w = NpzImageWriter::create(&path, 5, 2, 3).unwrap();
        w.append(&images[..2 * 18]).unwrap();
        assert!(w.append(&images[..17]).is_err(), "a partial image");
        w.append(&images[2 * 18..]).unwrap();
        assert!(w.append(&images[..18]).is_err(), "one image too many");
        w.finish().unwrap();
        let mut z = zip::ZipArchive::new(File::open(&path).unwrap()).unwrap();
        assert_eq!(z.len(), 1);
        let mut f = z.by_name("arr_0.npy").unwrap();
        let mut npy = Vec::new();
        f.read_to_end(&mut npy).unwrap();
        let header = npy_u8_header(&[5, 2, 3, 3]);
        assert_eq!(&npy[..header.len()], &header[..]);
        assert_eq!(&npy[header.len()..], &images[..]);
        assert!(!dir.join("samples.npz.tmp").exists());

        // Stopped early: finish refuses, and nothing is left behind.
        let short = dir.join("short.npz");
        let mut w = NpzImageWriter::create(&short, 3, 2, 3).unwrap();
        w.append(&images[..18]).unwrap();
        let e = w.finish().unwrap_err().to_string();
        assert!(e.contains("1 of 3 images"), "{e}");
        assert!(!short.exists() && !dir.join("short.npz.tmp").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
