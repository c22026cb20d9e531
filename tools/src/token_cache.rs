//! The token cache: a data set tokenized once into a memory-mapped file, as the official
//! `main_cache.py` does, so transformer training reads token rows, not images.
//!
//! File layout (little endian), `<tokenizer>/cache/<split>-<key>.tokens`:
//! - `MVARTOK2` (8 bytes), header length `h` (u64), header JSON (`h` bytes, see [`Header`]),
//!   zero padding to a multiple of 8;
//! - labels: i64 [n];
//! - targets: i32 [n, seq_len] (the token index of every scale, coarse to fine).
//!
//! Rows 0..N are the centre crops of the images, rows N..2N (with flips) their mirrors. The key
//! hashes the tokenizer's weights and config, the data set's fingerprint and the flip setting:
//! any change makes a new file. The teacher-forcing inputs are not stored: a batch makes them
//! from its tokens with the tokenizer (`VqVae::idx_to_var_input`, as the official trainer does
//! every step), so a row takes 4 bytes a token instead of 4 (1 + Cvae) (ImageNet at 256 px with
//! flips: 7 GB instead of 230 GB). The file is written while the images are tokenized, a batch
//! at a time, so neither the images nor the tokens of the whole data set are held in memory,
//! to a temporary name and renamed, so an interrupted build never leaves a cache that looks
//! complete; a cache whose size does not match its header, or of the earlier format, is rebuilt.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::common::io;
use memmap2::Mmap;
use mvar_engine::{Device, Error, Result, Tensor};
use mvar_models::data::{Fnv64, ImageDataset};
use mvar_models::VqVae;
use mvar_ops as ops;
use serde::{Deserialize, Serialize};

const MAGIC: &[u8; 8] = b"MVARTOK2";
/// The first format's magic (targets and f32 teacher-forcing inputs): read as stale.
const MAGIC_V1: &[u8; 8] = b"MVARTOK1";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Header {
    key: String,
    rows: usize,
    seq_len: usize,
}

pub struct TokenCache {
    path: PathBuf,
    map: Mmap,
    header: Header,
    labels: Vec<i64>,
    targets_at: usize,
    /// The teacher-forcing inputs of every row, made once, when they fit the memory budget.
    inputs: Option<HeldInputs>,
}

/// Teacher-forcing inputs of all rows, f32 [rows, len, cvae] row-major on the host.
struct HeldInputs {
    values: Vec<f32>,
    len: usize,
    cvae: usize,
}

fn read_or_empty(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_default()
}

/// Where the targets start after a header of `hlen` bytes and `rows` labels.
fn targets_offset(hlen: usize, rows: usize) -> usize {
    (16 + hlen).div_ceil(8) * 8 + 8 * rows
}

impl TokenCache {
    /// Opens the cache of (`tokenizer_dir`, `data`, `flips`), building it first when it is
    /// missing, stale or damaged. Returns the cache and whether it was built now. When the
    /// teacher-forcing inputs of all rows fit the memory budget of the data
    /// (`MVAR_DATA_MEMORY_MB`), they are made now and held, else each batch makes its own.
    pub fn open_or_build(
        tokenizer_dir: &Path,
        split: &str,
        vae: &VqVae,
        data: &ImageDataset,
        flips: bool,
        device: &Device,
    ) -> Result<(TokenCache, bool)> {
        let budget = mvar_models::data::Loading::from_env()?.budget_bytes();
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
        let opened = match path.is_file().then(|| Self::open(&path, &key)) {
            Some(Ok(c)) => Some(c),
            Some(Err(e)) => {
                eprintln!("rebuilding the token cache: {e}");
                None
            }
            None => None,
        };
        let (mut cache, built) = match opened {
            Some(c) => (c, false),
            None => {
                std::fs::create_dir_all(&dir).map_err(io(&dir))?;
                Self::build(&path, &key, vae, data, flips, device)?;
                (Self::open(&path, &key)?, true)
            }
        };
        cache.hold_inputs_within(budget, vae, device)?;
        Ok((cache, built))
    }

    fn build(
        path: &Path,
        key: &str,
        vae: &VqVae,
        data: &ImageDataset,
        flips: bool,
        device: &Device,
    ) -> Result<()> {
        let seq_len: usize = vae.config.v_patch_nums.iter().map(|p| p * p).sum();
        let passes = if flips { 2 } else { 1 };
        let rows = passes * data.len();
        let header = Header {
            key: key.to_string(),
            rows,
            seq_len,
        };
        let json = serde_json::to_vec(&header).map_err(|e| Error::Format {
            what: path.display().to_string(),
            msg: e.to_string(),
        })?;
        println!(
            "token cache: tokenizing {rows} rows ({} images{}) into {}",
            data.len(),
            if flips { " and their mirrors" } else { "" },
            path.display()
        );
        let started = Instant::now();
        let mut reported = Instant::now();
        // A per-process temporary name and a rename: concurrent builders of the same cache
        // each publish a complete file.
        mvar_models::checkpoint::write_atomic_with(path, |w| {
            let put = |w: &mut dyn Write, bytes: &[u8]| w.write_all(bytes).map_err(io(path));
            put(w, MAGIC)?;
            put(w, &(json.len() as u64).to_le_bytes())?;
            put(w, &json)?;
            put(
                w,
                &vec![0u8; targets_offset(json.len(), 0) - 16 - json.len()],
            )?;
            for _ in 0..passes {
                for i in 0..data.len() {
                    put(w, &(data.label(i) as i64).to_le_bytes())?;
                }
            }
            let mut written = 0usize;
            crate::common::tokenize_each(vae, data, flips, device, |gt| {
                if gt.dims() != [gt.dims()[0], seq_len] {
                    return Err(Error::shape(
                        "token cache",
                        gt.shape().to_string(),
                        format!("[B, {seq_len}]"),
                    ));
                }
                let mut bytes = Vec::with_capacity(gt.elem_count() * 4);
                for t in gt.to_vec::<i64>()? {
                    let t = i32::try_from(t).map_err(|_| {
                        Error::invalid("token cache", format!("token {t} does not fit in i32"))
                    })?;
                    bytes.extend_from_slice(&t.to_le_bytes());
                }
                put(w, &bytes)?;
                written += gt.dims()[0];
                if reported.elapsed().as_secs_f64() >= 10.0 {
                    reported = Instant::now();
                    let rate = written as f64 / started.elapsed().as_secs_f64();
                    eprintln!(
                        "token cache {}: {written} of {rows} rows ({rate:.0} images/s, about {:.0} s left)",
                        path.display(),
                        (rows - written) as f64 / rate.max(1e-9)
                    );
                }
                Ok(())
            })?;
            if written != rows {
                return Err(Error::invalid(
                    "token cache",
                    format!("tokenized {written} rows; expected {rows}"),
                ));
            }
            Ok(())
        })
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
        if map.len() >= 8 && &map[..8] == MAGIC_V1 {
            return Err(bad(
                "a token cache of the earlier format (with teacher-forcing inputs)".into(),
            ));
        }
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
        let targets_at = targets_offset(hlen, header.rows);
        let labels_at = targets_at - 8 * header.rows;
        let end = header
            .rows
            .checked_mul(header.seq_len)
            .and_then(|n| n.checked_mul(4))
            .and_then(|n| n.checked_add(targets_at));
        if end != Some(map.len()) {
            return Err(bad(format!(
                "{} bytes, expected {} for {} rows of {} tokens (truncated?)",
                map.len(),
                end.map_or("more than fit".into(), |e| e.to_string()),
                header.rows,
                header.seq_len
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
            inputs: None,
        })
    }

    /// Makes and holds the teacher-forcing inputs of every row when they take at most
    /// `budget` bytes (a batch then copies its rows instead of running the tokenizer's
    /// accumulation: 5 % of the demo transformer's step on the CPU). The values are the ones a
    /// batch would make (the per-image ops of `idx_to_var_input`, in batches of 64 rows).
    fn hold_inputs_within(&mut self, budget: u64, vae: &VqVae, device: &Device) -> Result<()> {
        let first = vae.config.v_patch_nums.first().map_or(0, |p| p * p);
        let (rows, len, cvae) = (
            self.header.rows,
            self.header.seq_len.saturating_sub(first),
            vae.config.z_channels,
        );
        let bytes = (rows as u64)
            .saturating_mul(len as u64)
            .saturating_mul(cvae as u64)
            .saturating_mul(4);
        if bytes > budget || rows == 0 {
            self.inputs = None;
            return Ok(());
        }
        let mut values = Vec::with_capacity(rows * len * cvae);
        let all: Vec<usize> = (0..rows).collect();
        for chunk in all.chunks(64) {
            let (_, x, _) = self.batch(chunk, vae, device)?;
            values.extend(x.to_vec::<f32>()?);
        }
        self.inputs = Some(HeldInputs { values, len, cvae });
        Ok(())
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

    /// Rows `rows`: (targets i64 [B, seq_len], teacher-forcing inputs f32 [B, seq_len - first
    /// scale, cvae], labels): the targets read from the mapped file, the inputs made from them
    /// by `vae` (the cache's tokenizer) on `device`, in f32 and without gradients whatever
    /// scope the caller is in.
    pub fn batch(
        &self,
        rows: &[usize],
        vae: &VqVae,
        device: &Device,
    ) -> Result<(Tensor, Tensor, Vec<i64>)> {
        let h = &self.header;
        if let Some(&bad) = rows.iter().find(|&&r| r >= h.rows) {
            return Err(Error::IndexOutOfRange {
                op: "TokenCache::batch",
                what: "row",
                index: bad as i64,
                size: h.rows,
            });
        }
        let pns = &vae.config.v_patch_nums;
        if pns.iter().map(|p| p * p).sum::<usize>() != h.seq_len {
            return Err(Error::invalid(
                "TokenCache::batch",
                format!(
                    "{} holds rows of {} tokens; the tokenizer's pyramid {pns:?} has {}",
                    self.path.display(),
                    h.seq_len,
                    pns.iter().map(|p| p * p).sum::<usize>()
                ),
            ));
        }
        let mut targets = Vec::with_capacity(rows.len() * h.seq_len);
        for &r in rows {
            let t0 = self.targets_at + 4 * r * h.seq_len;
            targets.extend(
                self.map[t0..t0 + 4 * h.seq_len]
                    .chunks_exact(4)
                    .map(|c| i32::from_le_bytes(c.try_into().unwrap_or_default()) as i64),
            );
        }
        let labels = rows.iter().map(|&r| self.labels[r]).collect();
        let targets = Tensor::from_vec(targets, [rows.len(), h.seq_len], device)?;
        let inputs = match &self.inputs {
            Some(held) => {
                let row = held.len * held.cvae;
                let mut values = Vec::with_capacity(rows.len() * row);
                for &r in rows {
                    values.extend_from_slice(&held.values[r * row..(r + 1) * row]);
                }
                Tensor::from_vec(values, [rows.len(), held.len, held.cvae], device)?
            }
            None => teacher_forcing_inputs(vae, &targets)?,
        };
        Ok((targets, inputs, labels))
    }
}

/// The teacher-forcing inputs of token rows [B, L] (all scales, coarse to fine), in f32.
pub fn teacher_forcing_inputs(vae: &VqVae, targets: &Tensor) -> Result<Tensor> {
    let _no_grad = mvar_engine::no_grad();
    let _f32 = mvar_engine::autocast(None)?;
    let mut maps = Vec::with_capacity(vae.config.v_patch_nums.len());
    let mut at = 0;
    for &pn in &vae.config.v_patch_nums {
        maps.push(ops::narrow(targets, 1, at, pn * pn)?);
        at += pn * pn;
    }
    vae.idx_to_var_input(&maps)
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
        let mut parts = Vec::new();
        crate::common::tokenize_each(&vae, &data, true, &dev, |gt| {
            parts.push(gt.clone());
            Ok(())
        })
        .unwrap();
        let refs: Vec<&Tensor> = parts.iter().collect();
        let gt = ops::concat(&refs, 0).unwrap();
        // The inputs straight from the images' token maps, not through the cache's rows.
        let (images, _) = data
            .batch(
                &(0..6).collect::<Vec<_>>(),
                mvar_models::data::Crop::Center,
                false,
                &mut mvar_engine::Generator::new(0),
                &dev,
            )
            .unwrap();
        let x_in = vae
            .idx_to_var_input(&vae.img_to_idx(&images).unwrap())
            .unwrap();
        let labels: Vec<i64> = (0..12).map(|r| data.label(r % 6) as i64).collect();
        let (cache, built) =
            TokenCache::open_or_build(&dir, "train", &vae, &data, true, &dev).unwrap();
        assert!(built);
        assert_eq!(cache.len(), 12);
        let (g, x, l) = cache
            .batch(&(0..12).collect::<Vec<_>>(), &vae, &dev)
            .unwrap();
        assert_eq!(g.to_vec::<i64>().unwrap(), gt.to_vec::<i64>().unwrap());
        assert_eq!(x.dims(), &[12, 4, 4]);
        assert_eq!(
            ops::narrow(&x, 0, 0, 6).unwrap().to_vec::<f32>().unwrap(),
            x_in.to_vec::<f32>().unwrap()
        );
        assert_eq!(l, labels);
        // Rows in any order, and the inputs made in f32 inside a bf16 autocast scope.
        let (g2, x2, l2) = {
            let _bf16 = mvar_engine::autocast(Some(mvar_engine::DType::BF16)).unwrap();
            cache.batch(&[7, 2], &vae, &dev).unwrap()
        };
        assert_eq!(l2, vec![labels[7], labels[2]]);
        assert_eq!(g2.dims(), &[2, cache.seq_len()]);
        assert_eq!(x2.dtype(), mvar_engine::DType::F32);
        assert_eq!(
            ops::narrow(&x2, 0, 1, 1).unwrap().to_vec::<f32>().unwrap(),
            ops::narrow(&x_in, 0, 2, 1)
                .unwrap()
                .to_vec::<f32>()
                .unwrap()
        );
        assert!(cache.batch(&[12], &vae, &dev).is_err());
        // Inputs held (they fit the default budget) or made per batch: the same values.
        assert!(cache.inputs.is_some());
        let (mut per_batch, built) =
            TokenCache::open_or_build(&dir, "train", &vae, &data, true, &dev).unwrap();
        per_batch.hold_inputs_within(0, &vae, &dev).unwrap();
        assert!(!built && per_batch.inputs.is_none());
        let some = [7, 2, 0, 11, 7];
        let held = cache.batch(&some, &vae, &dev).unwrap();
        let made = per_batch.batch(&some, &vae, &dev).unwrap();
        assert_eq!(held.1.dims(), made.1.dims());
        assert_eq!(
            held.1.to_vec::<f32>().unwrap(),
            made.1.to_vec::<f32>().unwrap()
        );
        assert_eq!(
            held.0.to_vec::<i64>().unwrap(),
            made.0.to_vec::<i64>().unwrap()
        );
        // 12 rows of 4 x 4 f32 inputs: 768 bytes.
        per_batch.hold_inputs_within(767, &vae, &dev).unwrap();
        assert!(per_batch.inputs.is_none());
        per_batch.hold_inputs_within(768, &vae, &dev).unwrap();
        assert!(per_batch.inputs.is_some());
        // A tokenizer of another pyramid cannot read these rows.
        let mut other = vae.config.clone();
        other.v_patch_nums = vec![1, 3];
        let other = VqVae::new(other, &dev, 1).unwrap();
        let e = cache.batch(&[0], &other, &dev).unwrap_err().to_string();
        assert!(e.contains("rows of 5 tokens"), "{e}");
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
        drop(again);
        // A cache of the first format (same name) is rebuilt.
        let mut v1 = std::fs::read(&path).unwrap();
        v1[..8].copy_from_slice(MAGIC_V1);
        std::fs::write(&path, v1).unwrap();
        let err = TokenCache::open(&path, "x").err().unwrap().to_string();
        assert!(err.contains("earlier format"), "{err}");
        let (again, built) =
            TokenCache::open_or_build(&dir, "train", &vae, &data, true, &dev).unwrap();
        assert!(built, "a first-format cache is rebuilt");
        assert_eq!(again.batch(&[3], &vae, &dev).unwrap().2, vec![labels[3]]);
        let (_, built) =
            TokenCache::open_or_build(&dir, "train", &vae, &data, false, &dev).unwrap();
        assert!(built, "another flip setting is another cache");
        // No temporary files left beside the caches.
        let names: Vec<String> = std::fs::read_dir(dir.join("cache"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| n.ends_with(".tokens")), "{names:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
