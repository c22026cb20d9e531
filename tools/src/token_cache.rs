//! The token cache: a data set tokenized once into a memory-mapped file, as the official
//! `main_cache.py` does, so transformer training reads token rows, not images.
//!
//! File layout (little endian), `<tokenizer>/cache/<split>-<key>.tokens`:
//! - `MVARTOK2` (8 bytes), header length `h` (u64), header JSON (`h` bytes, see [`Header`]),
//!   zero padding to a multiple of 8;
//! - labels: i64, one per image;
//! - targets: i32 [n, seq_len] (the token index of every scale, coarse to fine).
//!
//! Rows 0..N are the centre crops of the images, rows N..2N (with flips) their mirrors. The key
//! hashes the tokenizer's weights and config, the data set's fingerprint and the flip setting:
//! any change makes a new file. The teacher-forcing inputs are not stored: a batch makes them
//! from its tokens with the tokenizer (`VqVae::idx_to_var_input`, as the official trainer does
//! every step), so a row takes 4 bytes a token instead of 4 (1 + Cvae) (ImageNet at 256 px with
//! flips: 7 GB instead of 230 GB). The file is written while the images are tokenized, a batch
//! at a time, so neither the images nor the tokens of the whole data set are held in memory,
//! under a partial name (`.<name>.partial`) that is renamed when every row is in, so a cache
//! never looks complete before it is; a cache whose size does not match its header, or of the
//! earlier format, is rebuilt.
//!
//! Building it can take hours (ImageNet's 2.56 M rows with mirrors), so an interrupted build
//! (Ctrl-C, which stops it after the batch in hand; a crash; `kill -9`) is continued by the next
//! one instead of begun again: the partial file is the cache's own layout, its rows in order,
//! and a build that finds one with the same header and labels keeps its whole rows, back to the
//! last batch boundary of its pass (so the batches, and the bytes, are those of an
//! uninterrupted build), and tokenizes from there. The partial file is locked while it is
//! written: a second process building the same cache waits for the first and then reads its
//! cache (or continues its partial file, when the first was interrupted). A build names the
//! partial files of the split's other keys (another tokenizer, changed data) with their sizes,
//! and leaves them.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
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

/// Where a build keeps its rows until every one is in: `.<name>.partial` beside the cache.
fn partial_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.partial"))
}

/// The row a build continues from: 0 unless the partial `file` starts with this build's
/// `prefix` (header and labels); then its whole rows (at most `rows`), back to the start of the
/// batch of `batch` images (in its pass of `images` rows) that the last of them belongs to,
/// unless every row is in.
fn resume_row(
    file: &File,
    prefix: &[u8],
    row_bytes: usize,
    rows: usize,
    images: usize,
    batch: usize,
) -> std::io::Result<usize> {
    let len = file.metadata()?.len() as usize;
    if len < prefix.len() || row_bytes == 0 || images == 0 {
        return Ok(0);
    }
    let mut head = vec![0u8; prefix.len()];
    let mut reader = file;
    reader.seek(SeekFrom::Start(0))?;
    reader.read_exact(&mut head)?;
    if head != prefix {
        return Ok(0);
    }
    let whole = ((len - prefix.len()) / row_bytes).min(rows);
    if whole == rows {
        return Ok(rows);
    }
    let (pass, within) = (whole / images, whole % images);
    Ok(pass * images + within / batch.max(1) * batch.max(1))
}

/// The partial files of `split`'s other caches in `dir` (an unfinished build for an earlier
/// state of the tokenizer or the data, or for another data set with this split's name), with
/// their sizes: a build names them, since they can be gigabytes, but leaves them, since only the
/// user knows whether that other build will be continued.
fn other_partials(dir: &Path, split: &str, path: &Path) -> Vec<(PathBuf, u64)> {
    let ours = partial_path(path);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<(PathBuf, u64)> = entries
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with(&format!(".{split}-"))
                && name.ends_with(".tokens.partial")
                && e.path() != ours
        })
        .map(|e| (e.path(), e.metadata().map_or(0, |m| m.len())))
        .collect();
    found.sort();
    found
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
    /// missing, stale or damaged (continuing an interrupted build). Returns the cache and
    /// whether it was built now, or None when Ctrl-C stopped the build (what was tokenized is
    /// kept for the next one, which a line on stderr says). When the teacher-forcing inputs of
    /// all rows fit the memory budget of the data (`MVAR_DATA_MEMORY_MB`), they are made now
    /// and held, else each batch makes its own.
    pub fn open_or_build(
        tokenizer_dir: &Path,
        split: &str,
        vae: &VqVae,
        data: &ImageDataset,
        flips: bool,
        device: &Device,
    ) -> Result<Option<(TokenCache, bool)>> {
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
                for (other, bytes) in other_partials(&dir, &safe_split, &path) {
                    eprintln!(
                        "token cache: {} ({:.1} MB) is an unfinished build of another cache of this split (an earlier tokenizer or data set); delete it if that build will not be continued",
                        other.display(),
                        bytes as f64 / 1e6
                    );
                }
                let complete = Self::build(
                    &path,
                    &key,
                    vae,
                    data,
                    flips,
                    device,
                    crate::common::TOKENIZE_BATCH,
                    |_| crate::progress::interrupted(),
                )?;
                if !complete {
                    return Ok(None);
                }
                (Self::open(&path, &key)?, true)
            }
        };
        cache.hold_inputs_within(budget, vae, device)?;
        Ok(Some((cache, built)))
    }

    /// Tokenizes `data` into the cache file `path` (module docs), `batch` images at a time,
    /// continuing a partial file of an interrupted build. `stop(rows)` is asked after each batch
    /// with the rows now in the file; when it says yes, the file is synced and kept under its
    /// partial name and the result is false. True: the cache is complete at `path` (built now,
    /// or by another process this one waited for).
    #[allow(clippy::too_many_arguments)]
    fn build(
        path: &Path,
        key: &str,
        vae: &VqVae,
        data: &ImageDataset,
        flips: bool,
        device: &Device,
        batch: usize,
        mut stop: impl FnMut(usize) -> bool,
    ) -> Result<bool> {
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
        // Everything before the rows: magic, header, padding, labels.
        let mut prefix = Vec::with_capacity(targets_offset(json.len(), rows));
        prefix.extend_from_slice(MAGIC);
        prefix.extend_from_slice(&(json.len() as u64).to_le_bytes());
        prefix.extend_from_slice(&json);
        prefix.resize(targets_offset(json.len(), 0), 0);
        for _ in 0..passes {
            for i in 0..data.len() {
                prefix.extend_from_slice(&(data.label(i) as i64).to_le_bytes());
            }
        }
        let row_bytes = 4 * seq_len;
        let partial = partial_path(path);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&partial)
            .map_err(io(&partial))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                eprintln!(
                    "token cache: another process is building {}; waiting for it",
                    path.display()
                );
                file.lock().map_err(io(&partial))?;
            }
            // A file system without locks (some network ones): the build goes on unlocked, as
            // builds did before there was a lock.
            Err(TryLockError::Error(e)) => eprintln!(
                "token cache: cannot lock {} ({e}); building it unlocked (do not build this cache from two processes at once)",
                partial.display()
            ),
        }
        // A process this one waited for may have finished the cache.
        if Self::open(path, key).is_ok() {
            let _ = std::fs::remove_file(&partial);
            return Ok(true);
        }
        let kept =
            resume_row(&file, &prefix, row_bytes, rows, data.len(), batch).map_err(io(&partial))?;
        let mut file = file;
        if kept == 0 {
            file.set_len(0).map_err(io(&partial))?;
            file.seek(SeekFrom::Start(0)).map_err(io(&partial))?;
            file.write_all(&prefix).map_err(io(&partial))?;
            println!(
                "token cache: tokenizing {rows} rows ({} images{}) into {}",
                data.len(),
                if flips { " and their mirrors" } else { "" },
                path.display()
            );
        } else {
            let end = (prefix.len() + kept * row_bytes) as u64;
            file.set_len(end).map_err(io(&partial))?;
            file.seek(SeekFrom::Start(end)).map_err(io(&partial))?;
            println!(
                "token cache: continuing {} from row {kept} of {rows}",
                partial.display()
            );
        }
        let started = Instant::now();
        let mut reported = Instant::now();
        let mut written = kept;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, &file);
        let complete = crate::common::tokenize_each(vae, data, flips, kept, batch, device, |gt| {
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
            // Each batch whole in the file (a killed process loses only the batch in hand),
            // and on disk every 10 s (a machine that goes down loses at most those).
            w.write_all(&bytes).map_err(io(&partial))?;
            w.flush().map_err(io(&partial))?;
            written += gt.dims()[0];
            if reported.elapsed().as_secs_f64() >= 10.0 {
                reported = Instant::now();
                w.get_ref().sync_data().map_err(io(&partial))?;
                let rate = (written - kept) as f64 / started.elapsed().as_secs_f64();
                eprintln!(
                    "token cache {}: {written} of {rows} rows ({rate:.0} images/s, about {:.0} s left)",
                    path.display(),
                    (rows - written) as f64 / rate.max(1e-9)
                );
            }
            Ok(!stop(written))
        })?;
        w.flush().map_err(io(&partial))?;
        drop(w);
        file.sync_all().map_err(io(&partial))?;
        if !complete {
            eprintln!(
                "token cache: stopped at row {written} of {rows}; {} keeps them, and the next run continues from there",
                partial.display()
            );
            return Ok(false);
        }
        if written != rows {
            return Err(Error::invalid(
                "token cache",
                format!("tokenized {written} rows; expected {rows}"),
            ));
        }
        // Renamed while still locked: a process waiting for the lock then finds the cache.
        std::fs::rename(&partial, path).map_err(io(path))?;
        if let Some(dir) = path.parent().and_then(|d| File::open(d).ok()) {
            let _ = dir.sync_all();
        }
        Ok(true)
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

    /// An empty folder of this test process's own under the temporary directory.
    fn scratch_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mvar-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn cache_round_trips_and_rebuilds_when_damaged() {
        let (vae, data) = tiny();
        let dir = scratch_dir("tokcache");
        vae.save(&dir.join("tokenizer.safetensors")).unwrap();
        let dev = Device::Cpu;
        let mut parts = Vec::new();
        crate::common::tokenize_each(&vae, &data, true, 0, 64, &dev, |gt| {
            parts.push(gt.clone());
            Ok(true)
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
        let (cache, built) = TokenCache::open_or_build(&dir, "train", &vae, &data, true, &dev)
            .unwrap()
            .unwrap();
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
            TokenCache::open_or_build(&dir, "train", &vae, &data, true, &dev)
                .unwrap()
                .unwrap();
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
        let (_, built) = TokenCache::open_or_build(&dir, "train", &vae, &data, true, &dev)
            .unwrap()
            .unwrap();
        assert!(!built, "an intact cache is reused");
        let len = std::fs::metadata(&path).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - 4).unwrap();
        drop(f);
        let err = TokenCache::open(&path, "x").err().unwrap().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        let (again, built) = TokenCache::open_or_build(&dir, "train", &vae, &data, true, &dev)
            .unwrap()
            .unwrap();
        assert!(built, "a truncated cache is rebuilt");
        assert_eq!(again.len(), 12);
        drop(again);
        // A cache of the first format (same name) is rebuilt.
        let mut v1 = std::fs::read(&path).unwrap();
        v1[..8].copy_from_slice(MAGIC_V1);
        std::fs::write(&path, v1).unwrap();
        let err = TokenCache::open(&path, "x").err().unwrap().to_string();
        assert!(err.contains("earlier format"), "{err}");
        let (again, built) = TokenCache::open_or_build(&dir, "train", &vae, &data, true, &dev)
            .unwrap()
            .unwrap();
        assert!(built, "a first-format cache is rebuilt");
        assert_eq!(again.batch(&[3], &vae, &dev).unwrap().2, vec![labels[3]]);
        let (_, built) = TokenCache::open_or_build(&dir, "train", &vae, &data, false, &dev)
            .unwrap()
            .unwrap();
        assert!(built, "another flip setting is another cache");
        // No temporary files left beside the caches.
        let names: Vec<String> = std::fs::read_dir(dir.join("cache"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| n.ends_with(".tokens")), "{names:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_interrupted_build_is_continued_to_the_same_file() {
        let (vae, data) = tiny();
        let dir = scratch_dir("tokresume");
        let dev = Device::Cpu;
        let build = |path: &Path, key: &str, batch: usize, stop_at: usize| {
            TokenCache::build(path, key, &vae, &data, true, &dev, batch, |rows| {
                rows >= stop_at
            })
            .unwrap()
        };
        // 12 rows (6 images and their mirrors), batches of 4 in each pass: 0-3, 4-5 | 6-9, 10-11.
        let whole = dir.join("whole.tokens");
        assert!(build(&whole, "k", 4, usize::MAX));
        let want = std::fs::read(&whole).unwrap();
        let row_bytes = 4 * 5;
        let rows_at = want.len() - 12 * row_bytes;
        let path = dir.join("train-k.tokens");
        let partial = partial_path(&path);
        // Stopped after the first batch (4 rows), then after the first of the mirrors' (10):
        // each time the partial file holds the rows so far and no cache exists.
        for (stop_at, rows_in) in [(1, 4), (7, 10)] {
            assert!(!build(&path, "k", 4, stop_at));
            assert!(!path.exists());
            let got = std::fs::read(&partial).unwrap();
            assert_eq!(
                got,
                want[..rows_at + rows_in * row_bytes],
                "stopped at {stop_at}"
            );
        }
        // A crash mid-write: a torn row, and rows past a batch boundary, are not trusted.
        let mut torn = std::fs::read(&partial).unwrap();
        torn.extend_from_slice(&[7; 13]);
        std::fs::write(&partial, &torn).unwrap();
        let file = File::open(&partial).unwrap();
        let prefix = &want[..rows_at];
        // 10 whole rows: the mirrors' batch 6-9 is whole, row 10 starts an unfinished batch.
        assert_eq!(resume_row(&file, prefix, row_bytes, 12, 6, 4).unwrap(), 10);
        assert_eq!(resume_row(&file, prefix, row_bytes, 12, 6, 3).unwrap(), 9);
        let mut other_labels = prefix.to_vec();
        other_labels[rows_at - 8] ^= 1;
        assert_eq!(
            resume_row(&file, &other_labels, row_bytes, 12, 6, 4).unwrap(),
            0
        );
        drop(file);
        assert!(build(&path, "k", 4, usize::MAX));
        assert_eq!(
            std::fs::read(&path).unwrap(),
            want,
            "continued = uninterrupted"
        );
        assert!(!partial.exists());
        // A partial file of another header (another key) is begun again, not continued.
        assert!(!build(&path.with_file_name("train-j.tokens"), "j", 4, 1));
        let other = partial_path(&path.with_file_name("train-j.tokens"));
        std::fs::rename(&other, &partial).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(build(&path, "k", 4, usize::MAX));
        assert_eq!(std::fs::read(&path).unwrap(), want);
        // A second builder waits for the one holding the partial file, then reads its cache.
        std::fs::remove_file(&path).unwrap();
        let holder = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&partial)
            .unwrap();
        holder.lock().unwrap();
        std::thread::scope(|scope| {
            let waiting = scope.spawn(|| build(&path, "k", 4, 1));
            std::thread::sleep(std::time::Duration::from_millis(200));
            assert!(
                !waiting.is_finished(),
                "the second builder waits for the lock"
            );
            // The first builder finishes: its cache in place, then the lock released.
            std::fs::write(&path, &want).unwrap();
            holder.unlock().unwrap();
            assert!(
                waiting.join().unwrap(),
                "it found the first builder's cache"
            );
        });
        assert!(!partial.exists());
        assert_eq!(std::fs::read(&path).unwrap(), want);
        // Through open_or_build: a partial file of the split's other key is named, not removed.
        let toks = dir.join("tok");
        std::fs::create_dir_all(toks.join("cache")).unwrap();
        vae.save(&toks.join("tokenizer.safetensors")).unwrap();
        let stale = toks.join("cache/.train-0123456789abcdef.tokens.partial");
        std::fs::write(&stale, b"unfinished").unwrap();
        let keep = toks.join("cache/.test-0123456789abcdef.tokens.partial");
        std::fs::write(&keep, b"another split's").unwrap();
        let (cache, built) = TokenCache::open_or_build(&toks, "train", &vae, &data, true, &dev)
            .unwrap()
            .unwrap();
        assert!(built && stale.exists() && keep.exists());
        assert_eq!(
            other_partials(&toks.join("cache"), "train", cache.path()),
            vec![(stale.clone(), 10)]
        );
        let cached = std::fs::read(cache.path()).unwrap();
        assert_eq!(cached[cached.len() - 12 * row_bytes..], want[rows_at..]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
