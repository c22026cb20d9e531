//! Labelled image data sets: held in memory, or streamed from their files.
//!
//! An ImageFolder (`root/<class>/<image>`, PNG or JPEG; classes in sorted folder order) is
//! preprocessed the way the official VAR trainer does it: the shorter side is resized to 1.125 x
//! the target side with a Lanczos filter, then batches take a random crop (training) or the
//! centre crop (validation) of the target side, optionally flipped horizontally, scaled to
//! [-1, 1]. A folder whose decoded pixels fit the memory budget ([`Loading`]) is decoded once on
//! a rayon pool and held; a larger one (ImageNet: about 400 GB decoded at 256 px) keeps only its
//! file list and decodes the images of each batch when the batch is cut, with the same
//! functions, so both give the same batches bit for bit.

use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use mvar_engine::{Device, Error, Generator, Result, Tensor};
use rayon::prelude::*;

/// How a batch is cut from the stored images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crop {
    /// A random crop per image (training).
    Random,
    /// The centre crop (validation, evaluation).
    Center,
}

/// How stored images are brought to the crop side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preprocess {
    /// The official VAR preprocessing: the shorter side resized to 1.125 x the crop side
    /// (Lanczos), then a random or centre crop. Images of any size and aspect ratio mix.
    #[default]
    Official,
    /// No resampling: every image must already be exactly side x side (pre-cropped data sets,
    /// where a resize would blur); mixed sizes are an error naming the first image that differs.
    Exact,
}

/// One stored image: (height, width, RGB bytes row-major HWC).
type Pixels = (usize, usize, Vec<u8>);

/// Whether an image folder is decoded into memory or streamed from its files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loading {
    /// Decode every image once and hold the pixels.
    Memory,
    /// Keep the file list; decode the images of each batch when it is cut.
    Stream,
    /// Memory when the estimated decoded pixels take at most this many bytes, else Stream.
    WithinBudget(u64),
}

/// The environment variable that sets the memory budget of [`Loading::from_env`], in MiB.
pub const DATA_MEMORY_ENV: &str = "MVAR_DATA_MEMORY_MB";

/// The budget when [`DATA_MEMORY_ENV`] is not set: 4 GiB of decoded pixels (ImageNet's 50 000
/// validation images at 256 px take about 16 GB, a 32 px CIFAR-10 about 0.2 GB).
const DEFAULT_DATA_MEMORY_MB: u64 = 4096;

impl Loading {
    /// [`Loading::WithinBudget`] of `MVAR_DATA_MEMORY_MB` MiB (default 4096; 0 streams every
    /// folder). A value that is not a whole number is an error naming the variable.
    pub fn from_env() -> Result<Loading> {
        Self::from_budget_var(std::env::var(DATA_MEMORY_ENV).ok().as_deref())
    }

    /// The most decoded bytes held in memory: all for Memory, none for Stream.
    pub fn budget_bytes(self) -> u64 {
        match self {
            Loading::Memory => u64::MAX,
            Loading::Stream => 0,
            Loading::WithinBudget(bytes) => bytes,
        }
    }

    /// [`Loading::from_env`] of the variable's value (None: not set).
    fn from_budget_var(value: Option<&str>) -> Result<Loading> {
        match value {
            None => Ok(Loading::WithinBudget(DEFAULT_DATA_MEMORY_MB << 20)),
            Some(v) => v
                .trim()
                .parse::<u64>()
                .map(|mb| Loading::WithinBudget(mb.saturating_mul(1 << 20)))
                .map_err(|_| {
                    Error::invalid(
                        DATA_MEMORY_ENV,
                        format!(
                            "{v:?}: expected a whole number of MiB (0 streams every image folder)"
                        ),
                    )
                }),
        }
    }
}

/// Where a batch's pixels come from, and what the data set's fingerprint digests of them.
enum Store {
    /// Decoded and resized once: RGB, row-major HWC, each at least `side` on both axes.
    /// `files_digest`: for an image folder, the digest of its file list (relative paths, sizes,
    /// modification times) and preprocessing, so that its fingerprint needs no pixels and is
    /// the one it has streamed; None: the fingerprint digests the pixels.
    Decoded {
        images: Vec<Pixels>,
        files_digest: Option<u64>,
    },
    /// Decoded from `paths` (with this preprocessing) each time a batch reads them; an image
    /// folder's, so there is always a file digest.
    Files {
        preprocess: Preprocess,
        files_digest: u64,
    },
}

/// Resized RGB images with class labels.
pub struct ImageDataset {
    store: Store,
    labels: Vec<usize>,
    classes: Vec<String>,
    paths: Vec<PathBuf>,
    side: usize,
}

/// The images of one batch as stored, before cropping ([`ImageDataset::decode`]).
pub struct DecodedImages<'a> {
    indices: Vec<usize>,
    images: Vec<std::borrow::Cow<'a, Pixels>>,
}

impl DecodedImages<'_> {
    /// The data set's indices of these images, in batch order.
    pub fn indices(&self) -> &[usize] {
        &self.indices
    }
}

fn io_err(path: &Path, e: std::io::Error) -> Error {
    Error::Io {
        path: path.display().to_string(),
        source: e,
    }
}

fn is_image(p: &Path) -> bool {
    matches!(
        p.extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase())
            .as_deref(),
        Some("png" | "jpg" | "jpeg")
    )
}

impl std::fmt::Debug for ImageDataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ImageDataset({} images, {} classes, side {})",
            self.len(),
            self.classes.len(),
            self.side
        )
    }
}

impl ImageDataset {
    /// Loads `root/<class>/<image>` and prepares it for crops of `side` x `side` with the
    /// official preprocessing.
    pub fn load_folder(root: &Path, side: usize) -> Result<Self> {
        Self::load_folder_with(root, side, Preprocess::Official)
    }

    /// Loads `root/<class>/<image>` for crops of `side` x `side`, preprocessed as `preprocess`
    /// says, held in memory or streamed as `MVAR_DATA_MEMORY_MB` decides ([`Loading::from_env`]).
    pub fn load_folder_with(root: &Path, side: usize, preprocess: Preprocess) -> Result<Self> {
        Self::load_folder_as(root, side, preprocess, Loading::from_env()?)
    }

    /// Loads `root/<class>/<image>` for crops of `side` x `side`, preprocessed as `preprocess`
    /// says and held or streamed as `loading` says. Held, every image is decoded now and the
    /// first unreadable one (in file order) is an error naming it; streamed, an image is read
    /// when a batch first needs it, and the error names it then.
    pub fn load_folder_as(
        root: &Path,
        side: usize,
        preprocess: Preprocess,
        loading: Loading,
    ) -> Result<Self> {
        if side == 0 {
            return Err(Error::invalid("ImageDataset", "image side 0"));
        }
        let meta = std::fs::metadata(root).map_err(|e| io_err(root, e))?;
        if !meta.is_dir() {
            return Err(Error::Format {
                what: root.display().to_string(),
                msg: "not a folder; expected root/<class>/<image>".into(),
            });
        }
        let mut class_dirs: Vec<PathBuf> = std::fs::read_dir(root)
            .map_err(|e| io_err(root, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        class_dirs.sort();
        let mut files = Vec::new();
        let mut classes = Vec::new();
        for dir in &class_dirs {
            let mut imgs: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| io_err(dir, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && is_image(p))
                .collect();
            if imgs.is_empty() {
                continue;
            }
            imgs.sort();
            let label = classes.len();
            classes.push(
                dir.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            );
            files.extend(imgs.into_iter().map(|p| (p, label)));
        }
        if files.is_empty() {
            return Err(Error::Format {
                what: root.display().to_string(),
                msg: "no images found; expected root/<class>/<image>.png|jpg".into(),
            });
        }
        let files_digest = folder_digest(root, &files, preprocess, side)?;
        let stream =
            estimated_decoded_bytes(files.len(), side, preprocess) > loading.budget_bytes();
        let store = if stream {
            Store::Files {
                preprocess,
                files_digest,
            }
        } else {
            Store::Decoded {
                images: files
                    .par_iter()
                    .map(|(p, _)| decode_file(p, preprocess, side))
                    .collect::<Vec<Result<Pixels>>>()
                    .into_iter()
                    // In file order, so that the error names the first bad image, whichever
                    // thread saw it.
                    .collect::<Result<_>>()?,
                files_digest: Some(files_digest),
            }
        };
        Ok(ImageDataset {
            store,
            labels: files.iter().map(|(_, l)| *l).collect(),
            paths: files.into_iter().map(|(p, _)| p).collect(),
            classes,
            side,
        })
    }

    /// Reads a split of a CIFAR-style binary data set: `dir/<split>.bin` holds records of one
    /// label byte and 3 x 32 x 32 pixel bytes (red plane, green, blue, each row-major) and
    /// `dir/batches.meta.txt` the class names, one per line. Images get the same preprocessing
    /// as an image folder.
    pub fn load_cifar_binary(dir: &Path, split: &str, side: usize) -> Result<Self> {
        Self::load_cifar_binary_with(dir, split, side, Preprocess::Official)
    }

    /// [`ImageDataset::load_cifar_binary`] with a choice of preprocessing; `Exact` needs
    /// `side` = 32, the records' size.
    pub fn load_cifar_binary_with(
        dir: &Path,
        split: &str,
        side: usize,
        preprocess: Preprocess,
    ) -> Result<Self> {
        const REC: usize = 1 + 3 * 32 * 32;
        let bin = dir.join(format!("{split}.bin"));
        let meta = dir.join("batches.meta.txt");
        let bytes = std::fs::read(&bin).map_err(|e| io_err(&bin, e))?;
        let classes: Vec<String> = std::fs::read_to_string(&meta)
            .map_err(|e| io_err(&meta, e))?
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect();
        if bytes.is_empty() || bytes.len() % REC != 0 {
            return Err(Error::Format {
                what: bin.display().to_string(),
                msg: format!("{} bytes: expected a non-empty multiple of {REC} (1 label + 3072 pixels per image); truncated?", bytes.len()),
            });
        }
        if preprocess == Preprocess::Exact && side != 32 {
            return Err(Error::Format {
                what: bin.display().to_string(),
                msg: format!(
                    "images are 32x32 but the model needs {side}x{side}; exact preprocessing \
                     does not resize (use the official preprocessing, which does)"
                ),
            });
        }
        let target = match preprocess {
            Preprocess::Official => (side as f64 * 1.125).round() as u32,
            Preprocess::Exact => 32,
        };
        let records: Vec<&[u8]> = bytes.chunks_exact(REC).collect();
        let decoded: Vec<(usize, Pixels)> = records
            .par_iter()
            .enumerate()
            .map(|(i, r)| {
                let label = r[0] as usize;
                if label >= classes.len() {
                    return Err(Error::Format {
                        what: format!("{} image {i}", bin.display()),
                        msg: format!(
                            "label {label}; {} has {} classes",
                            meta.display(),
                            classes.len()
                        ),
                    });
                }
                let mut hwc = vec![0u8; 32 * 32 * 3];
                for p in 0..1024 {
                    for c in 0..3 {
                        hwc[p * 3 + c] = r[1 + c * 1024 + p];
                    }
                }
                let img = image::RgbImage::from_raw(32, 32, hwc)
                    .ok_or_else(|| Error::invalid("load_cifar_binary", "32x32 image buffer"))?;
                Ok((label, resize_shorter(img, target)))
            })
            .collect::<Result<_>>()?;
        let n = decoded.len();
        let (labels, images): (Vec<usize>, Vec<_>) = decoded.into_iter().unzip();
        Ok(ImageDataset {
            store: Store::Decoded {
                images,
                files_digest: None,
            },
            labels,
            classes,
            paths: (0..n)
                .map(|i| PathBuf::from(format!("{}[{i}]", bin.display())))
                .collect(),
            side,
        })
    }

    /// A data set from images already at `side` x `side` (HWC u8), e.g. raw array batches.
    pub fn from_arrays(
        images: Vec<Vec<u8>>,
        labels: Vec<usize>,
        classes: Vec<String>,
        side: usize,
    ) -> Result<Self> {
        if images.len() != labels.len() || images.iter().any(|i| i.len() != side * side * 3) {
            return Err(Error::invalid(
                "ImageDataset::from_arrays",
                format!(
                    "{} images of {side}x{side}x3 bytes with one label each",
                    images.len()
                ),
            ));
        }
        if let Some(&bad) = labels.iter().find(|&&l| l >= classes.len()) {
            return Err(Error::IndexOutOfRange {
                op: "ImageDataset::from_arrays",
                what: "label",
                index: bad as i64,
                size: classes.len(),
            });
        }
        let n = images.len();
        Ok(ImageDataset {
            store: Store::Decoded {
                images: images.into_iter().map(|v| (side, side, v)).collect(),
                files_digest: None,
            },
            labels,
            classes,
            paths: (0..n)
                .map(|i| PathBuf::from(format!("array[{i}]")))
                .collect(),
            side,
        })
    }

    /// A 64-bit FNV-1a digest of what the batches are made of, with the labels, class names and
    /// crop side: what a token cache is keyed by, so a changed data set never reuses stale
    /// tokens. An image folder digests its file list (relative paths, sizes, modification times)
    /// and preprocessing, held or streamed alike; other data sets their pixels.
    pub fn fingerprint(&self) -> u64 {
        let mut h = Fnv64::new();
        h.write_u64(self.side as u64);
        for c in &self.classes {
            h.write(c.as_bytes());
            h.write_u64(c.len() as u64);
        }
        h.write_u64(self.labels.len() as u64);
        for &label in &self.labels {
            h.write_u64(label as u64);
        }
        match &self.store {
            Store::Decoded {
                files_digest: Some(files),
                ..
            }
            | Store::Files {
                files_digest: files,
                ..
            } => h.write_u64(*files),
            Store::Decoded {
                images,
                files_digest: None,
            } => {
                for (hgt, wid, px) in images {
                    h.write_u64(*hgt as u64);
                    h.write_u64(*wid as u64);
                    h.write(px);
                }
            }
        }
        h.finish()
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Whether batches decode their images from the files (see [`Loading`]).
    pub fn is_streamed(&self) -> bool {
        matches!(self.store, Store::Files { .. })
    }

    /// For a streamed folder, the estimate of its decoded pixels that the memory budget was
    /// held against, in bytes; None for a held data set.
    pub fn streamed_size_estimate(&self) -> Option<u64> {
        match self.store {
            Store::Files { preprocess, .. } => {
                Some(estimated_decoded_bytes(self.len(), self.side, preprocess))
            }
            Store::Decoded { .. } => None,
        }
    }

    /// Image `i` as stored or as a batch would decode it: (height, width, HWC bytes).
    fn pixels(&self, i: usize) -> Result<std::borrow::Cow<'_, Pixels>> {
        use std::borrow::Cow;
        match &self.store {
            Store::Decoded { images, .. } => Ok(Cow::Borrowed(&images[i])),
            Store::Files { preprocess, .. } => Ok(Cow::Owned(decode_file(
                &self.paths[i],
                *preprocess,
                self.side,
            )?)),
        }
    }

    pub fn side(&self) -> usize {
        self.side
    }

    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    pub fn label(&self, i: usize) -> usize {
        self.labels[i]
    }

    pub fn path(&self, i: usize) -> &Path {
        &self.paths[i]
    }

    /// Images `indices` as [B, 3, side, side] in [-1, 1] on `device`, and their labels (i64 \[B\]).
    /// `rng` picks crop offsets and flips (one draw per image, in order) when `crop` is Random
    /// or `flip` is set. [`ImageDataset::decode`] then [`ImageDataset::batch_from`].
    pub fn batch(
        &self,
        indices: &[usize],
        crop: Crop,
        flip: bool,
        rng: &mut Generator,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        self.batch_from(&self.decode(indices)?, crop, flip, rng, device)
    }

    /// The stored images `indices`, before cropping: borrowed from a held data set, decoded from
    /// the files of a streamed one (in parallel, the work of a batch that needs no random draw,
    /// so that it can run ahead of the step that uses it). An index out of range, or an
    /// unreadable image (streamed), is an error naming the first such of the batch.
    pub fn decode(&self, indices: &[usize]) -> Result<DecodedImages<'_>> {
        if let Some(&bad) = indices.iter().find(|&&i| i >= self.len()) {
            return Err(Error::IndexOutOfRange {
                op: "ImageDataset::batch",
                what: "image index",
                index: bad as i64,
                size: self.len(),
            });
        }
        // In index order, so that an error names the first unreadable image of the batch.
        let images = indices
            .par_iter()
            .map(|&i| self.pixels(i))
            .collect::<Vec<_>>()
            .into_iter()
            .collect::<Result<Vec<_>>>()?;
        Ok(DecodedImages {
            indices: indices.to_vec(),
            images,
        })
    }

    /// [`ImageDataset::batch`] of images this data set decoded ([`ImageDataset::decode`]).
    pub fn batch_from(
        &self,
        decoded: &DecodedImages<'_>,
        crop: Crop,
        flip: bool,
        rng: &mut Generator,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let s = self.side;
        let indices = &decoded.indices[..];
        let stored = &decoded.images;
        // Images another data set decoded could be out of range or smaller than the crop.
        let fits =
            indices.iter().all(|&i| i < self.len()) && stored.iter().all(|p| p.0 >= s && p.1 >= s);
        if !fits {
            return Err(Error::invalid(
                "ImageDataset::batch_from",
                format!("images decoded by another data set: expected this one's (its {} images of at least {s} x {s})", self.len()),
            ));
        }
        let draws = rng.uniform(indices.len() * 3, 0.0, 1.0);
        let mut out = vec![0f32; indices.len() * 3 * s * s];
        out.par_chunks_mut(3 * s * s)
            .zip(stored.par_iter().enumerate())
            .for_each(|(dst, (k, stored))| {
                let (h, w, px) = &**stored;
                let (oy, ox) = match crop {
                    Crop::Center => ((h - s) / 2, (w - s) / 2),
                    Crop::Random => {
                        let pick =
                            |u: f64, room: usize| ((u * (room + 1) as f64) as usize).min(room);
                        (pick(draws[3 * k], h - s), pick(draws[3 * k + 1], w - s))
                    }
                };
                let mirror = flip && draws[3 * k + 2] < 0.5;
                for y in 0..s {
                    for x in 0..s {
                        let sx = if mirror { s - 1 - x } else { x };
                        let at = ((oy + y) * w + ox + sx) * 3;
                        for c in 0..3 {
                            // x/255 then x + x - 1: the official normalisation, op for op.
                            let v = px[at + c] as f32 / 255.0;
                            dst[(c * s + y) * s + x] = v + v - 1.0;
                        }
                    }
                }
            });
        let imgs = Tensor::from_vec(out, [indices.len(), 3, s, s], device)?;
        let labels = Tensor::from_vec(
            indices
                .iter()
                .map(|&i| self.labels[i] as i64)
                .collect::<Vec<_>>(),
            [indices.len()],
            device,
        )?;
        Ok((imgs, labels))
    }
}

/// Decodes the next batch's images of a streamed data set on another thread while a step runs,
/// so that the step after finds them decoded: on a GPU the CPU mostly waits for a step's kernels,
/// and reading, decoding and resizing the next batch's files fits in that wait. Only the
/// decoding runs ahead; the random draws (crops, flips) stay in the order of the steps, so the
/// batches are the same bit for bit. A held data set has nothing to decode: its images are
/// borrowed, and `while_running` just runs the step.
pub struct DecodeAhead<'d> {
    data: &'d ImageDataset,
    /// The indices decoded ahead, and what decoding them gave.
    ahead: Option<(Vec<usize>, Result<DecodedImages<'d>>)>,
}

impl<'d> DecodeAhead<'d> {
    pub fn new(data: &'d ImageDataset) -> Self {
        DecodeAhead { data, ahead: None }
    }

    /// The images `indices`: those decoded ahead when they are these (or the error decoding
    /// them gave), else decoded now.
    pub fn take(&mut self, indices: &[usize]) -> Result<DecodedImages<'d>> {
        match self.ahead.take() {
            Some((ahead, decoded)) if ahead == indices => decoded,
            _ => self.data.decode(indices),
        }
    }

    /// Runs `work`, decoding `next` (the next batch's indices, if there is one) on another
    /// thread meanwhile when the data set is streamed. The decoding runs on the rayon pool, as
    /// it would in the step.
    pub fn while_running<R>(&mut self, next: Option<Vec<usize>>, work: impl FnOnce() -> R) -> R {
        let data = self.data;
        match next.filter(|_| data.is_streamed()) {
            None => work(),
            Some(next) => std::thread::scope(|scope| {
                let decoding = scope.spawn(move || {
                    let decoded = data.decode(&next);
                    (next, decoded)
                });
                let out = work();
                let ahead = decoding
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                self.ahead = Some(ahead);
                out
            }),
        }
    }
}

impl ImageDataset {
    /// The images `rows` in order, centre-cropped and unflipped, `batch` at a time: `each` gets
    /// the images [b, 3, side, side] and their rows. Only one batch is held at a
    /// time, and for a streamed data set the next one is decoded while `each` works on this one
    /// ([`DecodeAhead`]), so a set of any size is read once, at the pace of `each`.
    pub fn each_centre_batch(
        &self,
        rows: &[usize],
        batch: usize,
        device: &Device,
        mut each: impl FnMut(&Tensor, &[usize]) -> Result<()>,
    ) -> Result<()> {
        self.each_centre_batch_while(rows, batch, device, |x, chunk| {
            each(x, chunk).map(|()| true)
        })
        .map(|_| ())
    }

    /// [`ImageDataset::each_centre_batch`] until `each` returns false (a pass that can be
    /// interrupted between batches): whether every batch was done.
    pub fn each_centre_batch_while(
        &self,
        rows: &[usize],
        batch: usize,
        device: &Device,
        mut each: impl FnMut(&Tensor, &[usize]) -> Result<bool>,
    ) -> Result<bool> {
        let chunks: Vec<&[usize]> = rows.chunks(batch.max(1)).collect();
        let mut ahead = DecodeAhead::new(self);
        // Centre crops without flips use none of this generator's draws.
        let mut unused = Generator::new(0);
        for (k, &chunk) in chunks.iter().enumerate() {
            let decoded = ahead.take(chunk)?;
            let (x, _) = self.batch_from(&decoded, Crop::Center, false, &mut unused, device)?;
            drop(decoded);
            let next = chunks.get(k + 1).map(|c| c.to_vec());
            if !ahead.while_running(next, || each(&x, chunk))? {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// One image file as [1, 3, side, side] in [-1, 1], preprocessed as an evaluation image (shorter
/// side to 1.125 x side with Lanczos, centre crop). An unreadable file is an error naming it.
pub fn load_image(path: &Path, side: usize, device: &Device) -> Result<Tensor> {
    if side == 0 {
        return Err(Error::invalid("load_image", "image side 0"));
    }
    let one = ImageDataset {
        store: Store::Decoded {
            images: vec![decode_resized(path, resize_target(side))?],
            files_digest: None,
        },
        labels: vec![0],
        paths: vec![path.to_path_buf()],
        classes: vec!["image".into()],
        side,
    };
    Ok(one
        .batch(&[0], Crop::Center, false, &mut Generator::new(0), device)?
        .0)
}

/// The shorter side the official preprocessing resizes to: 1.125 x the crop side.
fn resize_target(side: usize) -> u32 {
    (side as f64 * 1.125).round() as u32
}

/// One image file, preprocessed as `preprocess` says for crops of `side`.
fn decode_file(path: &Path, preprocess: Preprocess, side: usize) -> Result<Pixels> {
    match preprocess {
        Preprocess::Official => decode_resized(path, resize_target(side)),
        Preprocess::Exact => decode_exact(path, side),
    }
}

/// What a folder's images take once decoded: `side` x `side` for exact preprocessing, the
/// resized shorter side times 4/3 of it (the typical 4:3 photo) for the official one.
fn estimated_decoded_bytes(images: usize, side: usize, preprocess: Preprocess) -> u64 {
    let per_image = match preprocess {
        Preprocess::Exact => 3 * (side as u64).pow(2),
        Preprocess::Official => 4 * (resize_target(side) as u64).pow(2),
    };
    per_image.saturating_mul(images as u64)
}

/// The digest of an image folder's files: each one's path below `root`, size and modification
/// time, in order, and the preprocessing (cheap for a million files, unlike their pixels).
fn folder_digest(
    root: &Path,
    files: &[(PathBuf, usize)],
    preprocess: Preprocess,
    side: usize,
) -> Result<u64> {
    let stamps = files
        .par_iter()
        .map(|(p, _)| {
            let meta = std::fs::metadata(p).map_err(|e| io_err(p, e))?;
            let modified = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos() as u64);
            Ok((meta.len(), modified))
        })
        .collect::<Vec<Result<(u64, u64)>>>()
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    let mut h = Fnv64::new();
    h.write(format!("{preprocess:?}").as_bytes());
    h.write_u64(side as u64);
    for ((p, _), (len, modified)) in files.iter().zip(stamps) {
        let rel = p.strip_prefix(root).unwrap_or(p);
        let name = rel.to_string_lossy();
        h.write(name.as_bytes());
        h.write_u64(name.len() as u64);
        h.write_u64(len);
        h.write_u64(modified);
    }
    Ok(h.finish())
}

/// Decodes an image file as RGB, naming the file when it cannot.
fn decode_rgb(path: &Path) -> Result<image::RgbImage> {
    Ok(image::open(path)
        .map_err(|e| Error::Format {
            what: path.display().to_string(),
            msg: format!("unreadable image: {e}"),
        })?
        .to_rgb8())
}

/// Decodes an image and resizes it so that its shorter side is `target` (Lanczos3).
fn decode_resized(path: &Path, target: u32) -> Result<Pixels> {
    let img = decode_rgb(path)?;
    if img.width() == 0 || img.height() == 0 {
        return Err(Error::Format {
            what: path.display().to_string(),
            msg: "empty image".into(),
        });
    }
    Ok(resize_shorter(img, target))
}

/// Decodes an image that must already be `side` x `side`.
fn decode_exact(path: &Path, side: usize) -> Result<Pixels> {
    let img = decode_rgb(path)?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    if (w, h) != (side, side) {
        return Err(Error::Format {
            what: path.display().to_string(),
            msg: format!(
                "image is {w}x{h}, expected {side}x{side}: exact preprocessing keeps images as \
                 they are, so every image must already be {side}x{side}; mixed sizes need the \
                 official preprocessing (resize the shorter side, then crop)"
            ),
        });
    }
    Ok((h, w, img.into_raw()))
}

/// Resizes so that the shorter side is `target` (Lanczos3), keeping the aspect ratio.
fn resize_shorter(img: image::RgbImage, target: u32) -> Pixels {
    let (w, h) = img.dimensions();
    let (nw, nh) = if w <= h {
        (
            target,
            ((h as f64 * target as f64 / w as f64).round() as u32).max(target),
        )
    } else {
        (
            ((w as f64 * target as f64 / h as f64).round() as u32).max(target),
            target,
        )
    };
    let resized = if (nw, nh) == (w, h) {
        img
    } else {
        image::imageops::resize(&img, nw, nh, FilterType::Lanczos3)
    };
    (nh as usize, nw as usize, resized.into_raw())
}

/// 8-bit interleaved RGB (HWC) of images [N, 3, h, w] in [-1, 1] given as CHW f32 one after the
/// other: (x + 1) / 2, clamped, times 255, rounded.
pub fn rgb8_from_chw(chw: &[f32], h: usize, w: usize) -> Vec<u8> {
    let plane = h * w;
    let mut buf = vec![0u8; chw.len()];
    for (img, out) in chw.chunks(3 * plane).zip(buf.chunks_mut(3 * plane)) {
        for p in 0..plane.min(img.len() / 3) {
            for c in 0..3 {
                let v = (img[c * plane + p] + 1.0) * 0.5;
                out[p * 3 + c] = (v.clamp(0.0, 1.0) * 255.0).round() as u8;
            }
        }
    }
    buf
}

/// Writes `img` [3, H, W] in [-1, 1] (or a batch laid out as a grid) as a PNG.
pub fn save_png(path: &Path, chw: &[f32], h: usize, w: usize) -> Result<()> {
    save_rgb8_png(path, &rgb8_from_chw(chw, h, w), h, w)
}

/// Writes 8-bit interleaved RGB pixels (HWC) as a PNG, atomically.
pub fn save_rgb8_png(path: &Path, rgb: &[u8], h: usize, w: usize) -> Result<()> {
    let buf = rgb.to_vec();
    let img = image::RgbImage::from_raw(w as u32, h as u32, buf)
        .ok_or_else(|| Error::invalid("save_png", format!("{h}x{w} image buffer")))?;
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .map_err(|e| Error::Format {
        what: path.display().to_string(),
        msg: format!("PNG encoding failed: {e}"),
    })?;
    crate::checkpoint::write_atomic(path, &bytes)
}

/// [`save_rgb8_png`] of `paths.len()` images of h x w held one after the other in `rgb`, encoded
/// and written in parallel (a sampled batch: each PNG's encoding and fsync are its own); an
/// error names the first image, in order, that could not be written.
pub fn save_rgb8_pngs(paths: &[PathBuf], rgb: &[u8], h: usize, w: usize) -> Result<()> {
    let per_image = 3 * h * w;
    if rgb.len() != paths.len() * per_image {
        return Err(Error::invalid(
            "save_png",
            format!(
                "{} bytes for {} images of {h}x{w}: expected {}",
                rgb.len(),
                paths.len(),
                paths.len() * per_image
            ),
        ));
    }
    paths
        .par_iter()
        .enumerate()
        .map(|(j, path)| save_rgb8_png(path, &rgb[j * per_image..(j + 1) * per_image], h, w))
        .collect::<Vec<_>>()
        .into_iter()
        .collect()
}

/// Tiles images [N, 3, S, S] in [-1, 1] into a grid of `cols` columns (1-pixel gaps), as
/// (CHW pixels, height, width), for [`save_png`].
pub fn grid(images: &Tensor, cols: usize) -> Result<(Vec<f32>, usize, usize)> {
    let (n, s) = match images.dims() {
        &[n, 3, h, w] if h == w => (n, h),
        _ => {
            return Err(Error::shape(
                "grid",
                images.shape().to_string(),
                "[N, 3, S, S]",
            ))
        }
    };
    let cols = cols.clamp(1, n.max(1));
    let rows = n.div_ceil(cols);
    let (gh, gw) = (rows * (s + 1) + 1, cols * (s + 1) + 1);
    let src = images.to_vec_f32()?;
    let mut out = vec![1.0f32; 3 * gh * gw];
    for i in 0..n {
        let (r, c) = (i / cols, i % cols);
        for ch in 0..3 {
            for y in 0..s {
                for x in 0..s {
                    out[(ch * gh + r * (s + 1) + 1 + y) * gw + c * (s + 1) + 1 + x] =
                        src[((i * 3 + ch) * s + y) * s + x];
                }
            }
        }
    }
    Ok((out, gh, gw))
}

/// 64-bit FNV-1a: a stable content digest (std's hashers are randomly seeded per process).
pub struct Fnv64(u64);

impl Default for Fnv64 {
    fn default() -> Self {
        Self::new()
    }
}

impl Fnv64 {
    pub fn new() -> Self {
        Fnv64(0xcbf2_9ce4_8422_2325)
    }

    pub fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    pub fn write_u64(&mut self, v: u64) {
        self.write(&v.to_le_bytes());
    }

    pub fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored_size(ds: &ImageDataset, i: usize) -> (usize, usize) {
        let p = ds.pixels(i).unwrap();
        (p.0, p.1)
    }

    fn write_png(path: &Path, w: u32, h: u32, rgb: [u8; 3]) {
        let img = image::RgbImage::from_fn(w, h, |x, _| {
            image::Rgb([rgb[0], rgb[1], (x % 256) as u8 ^ rgb[2]])
        });
        img.save(path).unwrap();
    }

    #[test]
    fn folder_loading_preprocessing_and_errors() {
        let root = std::env::temp_dir().join(format!("mvar-data-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("b_dogs")).unwrap();
        std::fs::create_dir_all(root.join("a_cats")).unwrap();
        std::fs::create_dir_all(root.join("empty")).unwrap();
        write_png(&root.join("a_cats/1.png"), 40, 32, [255, 0, 0]);
        write_png(&root.join("a_cats/2.png"), 32, 48, [255, 0, 0]);
        write_png(&root.join("b_dogs/1.png"), 64, 64, [0, 255, 0]);
        let ds = ImageDataset::load_folder(&root, 16).unwrap();
        assert_eq!(ds.len(), 3);
        assert_eq!(ds.classes(), &["a_cats".to_string(), "b_dogs".to_string()]);
        assert_eq!(
            (0..3).map(|i| ds.label(i)).collect::<Vec<_>>(),
            vec![0, 0, 1]
        );
        // Shorter side resized to round(1.125 * 16) = 18.
        assert_eq!(stored_size(&ds, 0), (18, 23));
        assert_eq!(stored_size(&ds, 1), (27, 18));
        let mut g = Generator::new(0);
        let (x, y) = ds
            .batch(&[0, 2], Crop::Random, true, &mut g, &Device::Cpu)
            .unwrap();
        assert_eq!(x.dims(), &[2, 3, 16, 16]);
        assert_eq!(y.to_vec::<i64>().unwrap(), vec![0, 1]);
        let v = x.to_vec::<f32>().unwrap();
        assert!(v.iter().all(|&p| (-1.0..=1.0).contains(&p)));
        // Red channel of the red class is 1 everywhere.
        assert!(v[..256].iter().all(|&p| (p - 1.0).abs() < 1e-6));
        let (c, _) = ds
            .batch(&[1], Crop::Center, false, &mut g, &Device::Cpu)
            .unwrap();
        assert_eq!(c.dims(), &[1, 3, 16, 16]);
        assert!(ds
            .batch(&[3], Crop::Center, false, &mut g, &Device::Cpu)
            .is_err());

        std::fs::write(
            root.join("b_dogs/broken.png"),
            b"\x89PNG\r\n\x1a\nnot really",
        )
        .unwrap();
        let e = ImageDataset::load_folder(&root, 16)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("broken.png") && e.contains("unreadable image"),
            "{e}"
        );
        let e = ImageDataset::load_folder(&root.join("empty"), 16)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no images found"), "{e}");
        let e = ImageDataset::load_folder(&root.join("missing"), 16)
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing"), "{e}");
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn streamed_folders_give_the_held_batches() {
        let root = std::env::temp_dir().join(format!("mvar-stream-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("a")).unwrap();
        std::fs::create_dir_all(root.join("b")).unwrap();
        write_png(&root.join("a/1.png"), 40, 32, [200, 10, 0]);
        write_png(&root.join("a/2.png"), 32, 48, [10, 200, 0]);
        write_png(&root.join("b/1.png"), 64, 64, [0, 30, 255]);
        write_png(&root.join("b/2.png"), 17, 23, [90, 30, 25]);
        image::RgbImage::from_fn(37, 29, |x, y| {
            image::Rgb([(x * 7) as u8, (y * 9) as u8, 77])
        })
        .save(root.join("b/3.jpg"))
        .unwrap();
        let load = |loading| ImageDataset::load_folder_as(&root, 16, Preprocess::Official, loading);
        let held = load(Loading::Memory).unwrap();
        let streamed = load(Loading::Stream).unwrap();
        assert!(!held.is_streamed() && streamed.is_streamed());
        assert_eq!(held.streamed_size_estimate(), None);
        assert_eq!(streamed.streamed_size_estimate(), Some(5 * 4 * 18 * 18));
        assert_eq!(streamed.len(), 5);
        assert_eq!(held.fingerprint(), streamed.fingerprint());
        // The estimate: 5 images of 4 x 18^2 bytes each.
        assert!(!load(Loading::WithinBudget(5 * 4 * 18 * 18))
            .unwrap()
            .is_streamed());
        assert!(load(Loading::WithinBudget(5 * 4 * 18 * 18 - 1))
            .unwrap()
            .is_streamed());
        for seed in 0..4 {
            let cut = |ds: &ImageDataset, crop| {
                let mut g = Generator::new(seed);
                let (x, y) = ds
                    .batch(&[0, 3, 1, 4, 2, 0], crop, true, &mut g, &Device::Cpu)
                    .unwrap();
                (
                    x.to_vec::<f32>().unwrap(),
                    y.to_vec::<i64>().unwrap(),
                    g.next_u32s(1),
                )
            };
            for crop in [Crop::Random, Crop::Center] {
                assert_eq!(
                    cut(&held, crop),
                    cut(&streamed, crop),
                    "seed {seed}, {crop:?}"
                );
            }
        }
        // Another file list (a changed image) is another fingerprint.
        let before = streamed.fingerprint();
        write_png(&root.join("a/2.png"), 32, 50, [10, 200, 0]);
        assert_ne!(load(Loading::Stream).unwrap().fingerprint(), before);
        // A streamed folder finds an unreadable image (index 5, after b/3.jpg) when a batch
        // reads it, and names it.
        std::fs::write(root.join("b/broken.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
        let e = load(Loading::Memory).unwrap_err().to_string();
        assert!(e.contains("broken.png"), "{e}");
        let streamed = load(Loading::Stream).unwrap();
        let mut g = Generator::new(0);
        assert!(streamed
            .batch(&[0, 4], Crop::Center, false, &mut g, &Device::Cpu)
            .is_ok());
        let e = streamed
            .batch(&[0, 2, 5], Crop::Center, false, &mut g, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("broken.png") && e.contains("unreadable image"),
            "{e}"
        );
        std::fs::remove_file(root.join("b/broken.png")).unwrap();
        // Exact preprocessing checks a streamed image's size when it is read.
        let exact =
            ImageDataset::load_folder_as(&root, 16, Preprocess::Exact, Loading::Stream).unwrap();
        let e = exact
            .batch(&[1], Crop::Center, false, &mut g, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("a/2.png") && e.contains("expected 16x16"), "{e}");
        assert_ne!(
            exact.fingerprint(),
            load(Loading::Stream).unwrap().fingerprint(),
            "the preprocessing is part of the fingerprint"
        );
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn decoding_ahead_gives_the_same_batches() {
        let root = std::env::temp_dir().join(format!("mvar-ahead-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for (k, class) in ["a", "b"].iter().enumerate() {
            std::fs::create_dir_all(root.join(class)).unwrap();
            for i in 0..4u32 {
                let shade = (40 * i + 100 * k as u32) as u8;
                write_png(
                    &root.join(format!("{class}/{i}.png")),
                    20 + 3 * i,
                    18 + 5 * i,
                    [shade, 255 - shade, 7 * i as u8],
                );
            }
        }
        let load = |loading| ImageDataset::load_folder_as(&root, 16, Preprocess::Official, loading);
        let held = load(Loading::Memory).unwrap();
        let streamed = load(Loading::Stream).unwrap();
        let steps: Vec<Vec<usize>> = vec![vec![3, 0, 7], vec![5, 5, 1], vec![2, 6, 4], vec![0]];
        // Batches cut one after the other as a training loop cuts them: the next batch's images
        // decoded while "a step" runs (here, a draw from the same generator, as a step's code
        // restarts would), or each cut whole when it is reached.
        let run = |ds: &ImageDataset, ahead_of_time: bool| {
            let mut g = Generator::new(11);
            let mut ahead = DecodeAhead::new(ds);
            let mut out = Vec::new();
            for (k, idx) in steps.iter().enumerate() {
                let (x, y) = if ahead_of_time {
                    let decoded = ahead.take(idx).unwrap();
                    ds.batch_from(&decoded, Crop::Random, true, &mut g, &Device::Cpu)
                        .unwrap()
                } else {
                    ds.batch(idx, Crop::Random, true, &mut g, &Device::Cpu)
                        .unwrap()
                };
                let next = steps.get(k + 1).cloned().filter(|_| ahead_of_time);
                let step_draw = ahead.while_running(next, || g.next_u32s(1));
                out.push((
                    x.to_vec::<f32>().unwrap(),
                    y.to_vec::<i64>().unwrap(),
                    step_draw,
                ));
            }
            out
        };
        let plain = run(&held, false);
        assert_eq!(run(&held, true), plain);
        assert_eq!(run(&streamed, true), plain);
        assert_eq!(run(&streamed, false), plain);
        // Asked for other images than it decoded ahead, it decodes those.
        let mut ahead = DecodeAhead::new(&streamed);
        ahead.while_running(Some(vec![1, 2]), || ());
        assert_eq!(ahead.take(&[4, 1]).unwrap().indices(), &[4, 1]);
        // The centre batches of a whole pass, next one decoded ahead: those of `batch`.
        let rows = [6, 1, 0, 5, 3, 2, 7];
        for ds in [&held, &streamed] {
            let mut seen = Vec::new();
            ds.each_centre_batch(&rows, 3, &Device::Cpu, |x, chunk| {
                let mut g = Generator::new(0);
                let (want, _) = ds.batch(chunk, Crop::Center, false, &mut g, &Device::Cpu)?;
                assert_eq!(x.to_vec::<f32>()?, want.to_vec::<f32>()?);
                seen.extend_from_slice(chunk);
                Ok(())
            })
            .unwrap();
            assert_eq!(seen, rows);
        }
        // Images decoded by another data set (a smaller side: smaller images) are refused.
        let small =
            ImageDataset::load_folder_as(&root, 8, Preprocess::Official, Loading::Memory).unwrap();
        let e = held
            .batch_from(
                &small.decode(&[0]).unwrap(),
                Crop::Center,
                false,
                &mut Generator::new(0),
                &Device::Cpu,
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("another data set"), "{e}");
        // An unreadable image decoded ahead is an error naming it when its batch is taken,
        // not before; the step that ran meanwhile is unaffected.
        std::fs::write(root.join("b/9.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
        let streamed = load(Loading::Stream).unwrap();
        let broken = (0..streamed.len())
            .find(|&i| streamed.path(i).ends_with("b/9.png"))
            .unwrap();
        let mut ahead = DecodeAhead::new(&streamed);
        assert_eq!(ahead.while_running(Some(vec![0, broken]), || 5), 5);
        let e = ahead.take(&[0, broken]).err().unwrap().to_string();
        assert!(e.contains("9.png") && e.contains("unreadable image"), "{e}");
        let e = streamed
            .each_centre_batch(&[0, 1, broken], 2, &Device::Cpu, |_, _| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("9.png"), "{e}");
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn the_memory_budget_variable() {
        assert_eq!(
            Loading::from_budget_var(None).unwrap(),
            Loading::WithinBudget(4096 << 20)
        );
        assert_eq!(
            Loading::from_budget_var(Some(" 0 ")).unwrap(),
            Loading::WithinBudget(0)
        );
        assert_eq!(
            Loading::from_budget_var(Some("12")).unwrap(),
            Loading::WithinBudget(12 << 20)
        );
        assert_eq!(Loading::Memory.budget_bytes(), u64::MAX);
        assert_eq!(Loading::Stream.budget_bytes(), 0);
        assert_eq!(Loading::WithinBudget(7).budget_bytes(), 7);
        let e = Loading::from_budget_var(Some("4G"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("MVAR_DATA_MEMORY_MB") && e.contains("\"4G\""),
            "{e}"
        );
    }

    #[test]
    fn exact_preprocessing_keeps_pixels_and_refuses_mixed_sizes() {
        let root = std::env::temp_dir().join(format!("mvar-exact-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("a")).unwrap();
        std::fs::create_dir_all(root.join("b")).unwrap();
        write_png(&root.join("a/1.png"), 16, 16, [255, 0, 0]);
        write_png(&root.join("b/1.png"), 16, 16, [0, 0, 255]);
        let ds = ImageDataset::load_folder_with(&root, 16, Preprocess::Exact).unwrap();
        assert_eq!(stored_size(&ds, 0), (16, 16));
        let (x, _) = ds
            .batch(
                &[0],
                Crop::Random,
                false,
                &mut Generator::new(0),
                &Device::Cpu,
            )
            .unwrap();
        let v = x.to_vec::<f32>().unwrap();
        assert!(v[..256].iter().all(|&p| (p - 1.0).abs() < 1e-6), "red kept");
        // Blue is x ^ 0 along each row: no resampling, so column 5 is exactly 5/255 * 2 - 1.
        assert!((v[512 + 5] - (5.0 / 255.0 * 2.0 - 1.0)).abs() < 1e-6);
        write_png(&root.join("b/2.png"), 20, 16, [0, 0, 255]);
        let e = ImageDataset::load_folder_with(&root, 16, Preprocess::Exact)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("b/2.png") && e.contains("20x16") && e.contains("expected 16x16"),
            "{e}"
        );
        // The official preprocessing takes the same folder.
        assert_eq!(ImageDataset::load_folder(&root, 16).unwrap().len(), 3);
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn the_bundled_cifar_subset_loads() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/cifar10-subset");
        let ds = ImageDataset::load_cifar_binary(&dir, "test", 32).unwrap();
        assert_eq!(ds.len(), 200);
        assert_eq!(ds.classes().len(), 10);
        assert_eq!(ds.classes()[3], "cat");
        assert_eq!(
            (0..10)
                .map(|c| (0..200).filter(|&i| ds.label(i) == c).count())
                .collect::<Vec<_>>(),
            vec![20; 10]
        );
        // Exact: the records' own 32x32 pixels, or an error for another side.
        let exact =
            ImageDataset::load_cifar_binary_with(&dir, "test", 32, Preprocess::Exact).unwrap();
        assert_eq!(stored_size(&exact, 0), (32, 32));
        let e = ImageDataset::load_cifar_binary_with(&dir, "test", 16, Preprocess::Exact)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("images are 32x32 but the model needs 16x16"),
            "{e}"
        );
        let tmp = std::env::temp_dir().join(format!("mvar-cifar-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        std::fs::copy(dir.join("batches.meta.txt"), tmp.join("batches.meta.txt")).unwrap();
        let bytes = std::fs::read(dir.join("test.bin")).unwrap();
        std::fs::write(tmp.join("cut.bin"), &bytes[..bytes.len() - 100]).unwrap();
        let e = ImageDataset::load_cifar_binary(&tmp, "cut", 32)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cut.bin") && e.contains("truncated"), "{e}");
        let _ = std::fs::remove_dir_all(tmp);
    }

    #[test]
    fn grid_and_png() {
        let imgs = Tensor::zeros([3, 3, 4, 4], mvar_engine::DType::F32, &Device::Cpu).unwrap();
        let (px, h, w) = grid(&imgs, 2).unwrap();
        assert_eq!((h, w), (11, 11));
        let path = std::env::temp_dir().join(format!("mvar-grid-{}.png", std::process::id()));
        save_png(&path, &px, h, w).unwrap();
        let back = image::open(&path).unwrap().to_rgb8();
        assert_eq!(back.dimensions(), (11, 11));
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn a_batch_of_pngs_is_written_in_parallel_image_by_image() {
        let dir = std::env::temp_dir().join(format!("mvar-pngs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (n, h, w) = (5, 3, 4);
        let rgb: Vec<u8> = (0..n * 3 * h * w).map(|i| (i * 7 % 251) as u8).collect();
        let paths: Vec<PathBuf> = (0..n).map(|j| dir.join(format!("{j}.png"))).collect();
        save_rgb8_pngs(&paths, &rgb, h, w).unwrap();
        for (j, path) in paths.iter().enumerate() {
            let back = image::open(path).unwrap().to_rgb8();
            assert_eq!(back.dimensions(), (w as u32, h as u32));
            assert_eq!(back.as_raw()[..], rgb[j * 3 * h * w..(j + 1) * 3 * h * w]);
        }
        let e = save_rgb8_pngs(&paths[..4], &rgb, h, w)
            .unwrap_err()
            .to_string();
        assert!(e.contains("for 4 images of 3x4"), "{e}");
        // A path that cannot be written (its folder is a file) is an error naming it.
        let blocked: Vec<PathBuf> = (0..n)
            .map(|j| match j {
                2 | 4 => dir.join("0.png").join(format!("{j}.png")),
                _ => dir.join(format!("again-{j}.png")),
            })
            .collect();
        let e = save_rgb8_pngs(&blocked, &rgb, h, w)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&dir.join("0.png").display().to_string()), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
