//! The token cache: a data set tokenized once into a memory-mapped file, as the official
//! `main_cache.py` does, so transformer training reads token rows, not images.
//!
//! File layout (little endian), `<tokenizer>/cache/<split>-<key>.tokens`:
//! - `MVARTOK1` (8 bytes), header length `h` (u64), header JSON (`h` bytes, see [`Header`]),
//!   zero padding to a multiple of 8;
//! - labels: i64 [n];
//! - targets: i32 [n, seq_len] (the token index of every scale, coarse to fine);
//! - teacher-forcing inputs: f32 [n, xin_len, cvae] (what `VqVae::idx_to_var_input` makes).
//!
//! Rows 0..N are the centre crops of the images, rows N..2N (with flips) their mirrors. The key
//! hashes the tokenizer's weights and config, the data set's pixels and labels and the flip
//! setting: any change makes a new file. The file is written to a temporary name and renamed,
//! so an interrupted build never leaves a cache that looks complete; a cache whose size does not
//! match its header is rebuilt.

use std::path::{Path, PathBuf};

use crate::common::io;
use memmap2::Mmap;
use mvar_engine::{Device, Error, Result, Tensor};
use mvar_models::data::{Fnv64, ImageDataset};
use mvar_models::VqVae;
use serde::{Deserialize, Serialize};

const MAGIC: &[u8; 8] = b"MVARTOK1";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Header {
    key: String,
    rows: usize,
    seq_len: usize,
    xin_len: usize,
    cvae: usize,
}

pub struct TokenCache {
    path: PathBuf,
    map: Mmap,
    header: Header,
    labels: Vec<i64>,
    targets_at: usize,
    inputs_at: usize,
}

fn read_or_empty(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_default()
}

impl TokenCache {
    /// Opens the cache of (`tokenizer_dir`, `data`, `flips`), building it first when it is
    /// missing, stale or damaged. Returns the cache and whether it was built now.
    pub fn open_or_build(
        tokenizer_dir: &Path,
        split: &str,
        vae: &VqVae,
        data: &ImageDataset,
        flips: bool,
        device: &Device,
    ) -> Result<(TokenCache, bool)> {
        let mut h = Fnv64::new();
        h.write(&read_or_empty(&tokenizer_dir.join("tokenizer.json")));
        h.write(&read_or_empty(&tokenizer_dir.join("tokenizer.safetensors")));
        h.write_u64(data.fingerprint());
        h.write_u64(flips as u64);
        let key = format!("{:016x}", h.finish());
        let dir = tokenizer_dir.join("cache");
        let safe_split: String = split
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let path = dir.join(format!("{safe_split}-{key}.tokens"));
        if path.is_file() {
            match Self::open(&path, &key) {
                Ok(c) => return Ok((c, false)),
                Err(e) => eprintln!("rebuilding the token cache: {e}"),
            }
        }
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        Self::build(&path, &key, vae, data, flips, device)?;
        Ok((Self::open(&path, &key)?, true))
    }

    fn build(
        path: &Path,
        key: &str,
        vae: &VqVae,
        data: &ImageDataset,
        flips: bool,
        device: &Device,
    ) -> Result<()> {
        let (gt, x_in, labels) = crate::common::tokenize(vae, data, flips, device)?;
        let (rows, seq_len) = (gt.dims()[0], gt.dims()[1]);
        let (xin_len, cvae) = (x_in.dims()[1], x_in.dims()[2]);
        let header = Header {
            key: key.to_string(),
            rows,
            seq_len,
            xin_len,
            cvae,
        };
        let json = serde_json::to_vec(&header).map_err(|e| Error::Format {
            what: path.display().to_string(),
            msg: e.to_string(),
        })?;
        let mut bytes =
            Vec::with_capacity(32 + json.len() + rows * (8 + 4 * seq_len + 4 * xin_len * cvae));
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&(json.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&json);
        while bytes.len() % 8 != 0 {
            bytes.push(0);
        }
        for l in &labels {
            bytes.extend_from_slice(&l.to_le_bytes());
        }
        for t in gt.to_vec::<i64>()? {
            let t = i32::try_from(t).map_err(|_| {
                Error::invalid("token cache", format!("token {t} does not fit in i32"))
            })?;
            bytes.extend_from_slice(&t.to_le_bytes());
        }
        for v in x_in.to_dtype(mvar_engine::DType::F32)?.to_vec::<f32>()? {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        // A per-process temporary name and a rename: concurrent builders of the same cache
        // each publish a complete file.
        mvar_models::checkpoint::write_atomic(path, &bytes)
    }

    fn open(path: &Path, key: &str) -> Result<TokenCache> {
        let bad = |msg: String| Error::Format {
            what: path.display().to_string(),
            msg,
        };
        let file = std::fs::File::open(path).map_err(io(path))?;
        // SAFETY: the cache is only ever replaced by rename, never written in place, so the
        // mapped bytes do not change under us; the size is checked against the header before
        // any row is read.
        let map = unsafe { Mmap::map(&file) }.map_err(io(path))?;
        if map.len() < 16 || &map[..8] != MAGIC {
            return Err(bad("not an mvar token cache (bad magic)".into()));
        }
        let hlen = u64::from_le_bytes(map[8..16].try_into().unwrap_or_default()) as usize;
        let json = map
            .get(16..16usize.saturating_add(hlen))
            .ok_or_else(|| bad(format!("truncated header ({hlen} bytes announced)")))?;
        let header: Header =
            serde_json::from_slice(json).map_err(|e| bad(format!("header: {e}")))?;
        if header.key != key {
            return Err(bad(format!("made for key {}, expected {key}", header.key)));
        }
        let labels_at = (16 + hlen).div_ceil(8) * 8;
        let targets_at = labels_at + 8 * header.rows;
        let inputs_at = targets_at + 4 * header.rows * header.seq_len;
        let end = inputs_at + 4 * header.rows * header.xin_len * header.cvae;
        if map.len() != end {
            return Err(bad(format!(
                "{} bytes, expected {end} for {} rows (truncated?)",
                map.len(),
                header.rows
            )));
        }
        let labels = map[labels_at..targets_at]
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect();
        Ok(TokenCache {
            path: path.to_path_buf(),
            map,
            header,
            labels,
            targets_at,
            inputs_at,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Rows: images, and their mirrors when built with flips.
    pub fn len(&self) -> usize {
        self.header.rows
    }

    /// Tokens per row (all scales).
    pub fn seq_len(&self) -> usize {
        self.header.seq_len
    }

    /// Rows `rows`: (targets i64 [B, seq_len], teacher-forcing inputs f32 [B, xin_len, cvae],
    /// labels), read from the mapped file.
    pub fn batch(&self, rows: &[usize], device: &Device) -> Result<(Tensor, Tensor, Vec<i64>)> {
        let h = &self.header;
        if let Some(&bad) = rows.iter().find(|&&r| r >= h.rows) {
            return Err(Error::IndexOutOfRange {
                op: "TokenCache::batch",
                what: "row",
                index: bad as i64,
                size: h.rows,
            });
        }
        let mut targets = Vec::with_capacity(rows.len() * h.seq_len);
        let mut inputs = Vec::with_capacity(rows.len() * h.xin_len * h.cvae);
        let in_row = h.xin_len * h.cvae;
        for &r in rows {
            let t0 = self.targets_at + 4 * r * h.seq_len;
            targets.extend(
                self.map[t0..t0 + 4 * h.seq_len]
                    .chunks_exact(4)
                    .map(|c| i32::from_le_bytes(c.try_into().unwrap_or_default()) as i64),
            );
            let x0 = self.inputs_at + 4 * r * in_row;
            inputs.extend(
                self.map[x0..x0 + 4 * in_row]
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap_or_default())),
            );
        }
        let labels = rows.iter().map(|&r| self.labels[r]).collect();
        Ok((
            Tensor::from_vec(targets, [rows.len(), h.seq_len], device)?,
            Tensor::from_vec(inputs, [rows.len(), h.xin_len, h.cvae], device)?,
            labels,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mvar_engine::Device;
    use mvar_models::VqVaeConfig;

    fn tiny() -> (VqVae, ImageDataset) {
        let cfg = VqVaeConfig {
            vocab_size: 16,
            z_channels: 4,
            ch: 32,
            ch_mult: vec![1, 1],
            num_res_blocks: 1,
            v_patch_nums: vec![1, 2],
            using_sa: false,
            using_mid_sa: false,
            ..VqVaeConfig::default()
        };
        let vae = VqVae::new(cfg, &Device::Cpu, 1).unwrap();
        let images = (0..6u8)
            .map(|k| {
                (0..4 * 4 * 3)
                    .map(|i| (i as u8).wrapping_mul(17 + k))
                    .collect()
            })
            .collect();
        let data = ImageDataset::from_arrays(
            images,
            vec![0, 1, 0, 1, 0, 1],
            vec!["a".into(), "b".into()],
            4,
        )
        .unwrap();
        (vae, data)
    }

    #[test]
    fn cache_round_trips_and_rebuilds_when_damaged() {
        let (vae, data) = tiny();
        let dir = std::env::temp_dir().join(format!("mvar-tokcache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        vae.save(&dir.join("tokenizer.safetensors")).unwrap();
        let dev = Device::Cpu;
        let (gt, x_in, labels) = crate::common::tokenize(&vae, &data, true, &dev).unwrap();
        let (cache, built) =
            TokenCache::open_or_build(&dir, "train", &vae, &data, true, &dev).unwrap();
        assert!(built);
        assert_eq!(cache.len(), 12);
        let (g, x, l) = cache.batch(&(0..12).collect::<Vec<_>>(), &dev).unwrap();
        assert_eq!(g.to_vec::<i64>().unwrap(), gt.to_vec::<i64>().unwrap());
        assert_eq!(x.to_vec::<f32>().unwrap(), x_in.to_vec::<f32>().unwrap());
        assert_eq!(l, labels);
        let (g2, _, l2) = cache.batch(&[7, 2], &dev).unwrap();
        assert_eq!(l2, vec![labels[7], labels[2]]);
        assert_eq!(g2.dims(), &[2, cache.seq_len()]);
        assert!(cache.batch(&[12], &dev).is_err());
        let path = cache.path().to_path_buf();
        drop(cache);
        let (_, built) = TokenCache::open_or_build(&dir, "train", &vae, &data, true, &dev).unwrap();
        assert!(!built, "an intact cache is reused");
        let len = std::fs::metadata(&path).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - 4).unwrap();
        drop(f);
        let err = TokenCache::open(&path, "x").err().unwrap().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        let (again, built) =
            TokenCache::open_or_build(&dir, "train", &vae, &data, true, &dev).unwrap();
        assert!(built, "a truncated cache is rebuilt");
        assert_eq!(again.len(), 12);
        let (_, built) =
            TokenCache::open_or_build(&dir, "train", &vae, &data, false, &dev).unwrap();
        assert!(built, "another flip setting is another cache");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
