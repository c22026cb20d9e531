//! Checkpoint I/O in safetensors, under the official tensor names.
//!
//! Reading checks everything a corrupt or mismatched file can get wrong and says which tensor and
//! what was expected: a missing or unreadable file, a truncated or corrupt header, a tensor of
//! the wrong shape, a missing tensor. Writing is atomic: the file is written under a temporary
//! name, flushed to disk, then renamed over the destination, so a crash never leaves a partial
//! checkpoint where a good one was.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

use half::{bf16, f16};
#[cfg(test)]
use mvar_engine::DType;
use mvar_engine::{CpuStorage, Device, Error, Result, Tensor};
use safetensors::tensor::Dtype as StDtype;

fn format_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Format {
        what: format!("checkpoint {}", path.display()),
        msg: msg.into(),
    }
}

fn io_err(path: &Path, e: std::io::Error) -> Error {
    Error::Io {
        path: path.display().to_string(),
        source: e,
    }
}

/// Every tensor of a safetensors file, on the CPU, by name. f16/bf16/f32/f64 become f32 or keep
/// bf16/f64; integer tensors become i64 (or u8 for u8).
pub fn read_safetensors(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(|e| io_err(path, e))?;
    parse_safetensors(&bytes).map_err(|msg| format_err(path, msg))
}

/// Parses safetensors bytes (see [`read_safetensors`]); the error says what is wrong.
pub fn parse_safetensors(bytes: &[u8]) -> std::result::Result<BTreeMap<String, Tensor>, String> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| format!("not a valid safetensors file (truncated or corrupt?): {e}"))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let shape = view.shape().to_vec();
        let data = view.data();
        let n: usize = shape.iter().product();
        let want = n * view.dtype().bitsize() / 8;
        if data.len() != want {
            return Err(format!(
                "tensor {name:?}: {} bytes of data for shape {shape:?}, expected {want}",
                data.len()
            ));
        }
        let cpu = match view.dtype() {
            StDtype::F32 => CpuStorage::F32(
                data.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            StDtype::F64 => CpuStorage::F64(
                data.chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                    .collect(),
            ),
            StDtype::BF16 => CpuStorage::BF16(
                data.chunks_exact(2)
                    .map(|c| bf16::from_le_bytes([c[0], c[1]]))
                    .collect(),
            ),
            StDtype::F16 => CpuStorage::F32(
                data.chunks_exact(2)
                    .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
            ),
            StDtype::I64 => CpuStorage::I64(
                data.chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                    .collect(),
            ),
            StDtype::I32 => CpuStorage::I64(
                data.chunks_exact(4)
                    .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                    .collect(),
            ),
            StDtype::U8 => CpuStorage::U8(data.to_vec()),
            StDtype::BOOL => CpuStorage::U8(data.to_vec()),
            other => return Err(format!("tensor {name:?}: unsupported dtype {other:?}")),
        };
        let t = Tensor::from_cpu(cpu, shape, &Device::Cpu)
            .map_err(|e| format!("tensor {name:?}: {e}"))?;
        out.insert(name, t);
    }
    Ok(out)
}

/// A tensor's data as little-endian bytes on the host (its safetensors dtype: [`st_dtype`]).
fn to_bytes(t: &Tensor) -> Result<Vec<u8>> {
    Ok(match t.to_cpu_storage()? {
        CpuStorage::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        CpuStorage::F64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        CpuStorage::BF16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        CpuStorage::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        CpuStorage::U8(v) => v,
    })
}

/// Serialises named tensors (any device) to safetensors bytes, all at once through the crate:
/// the reference the streamed [`write_safetensors`] is tested against.
#[cfg(test)]
fn serialize(
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let owned: Vec<(String, StDtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, t)| to_bytes(t).map(|b| (n.clone(), st_dtype(t.dtype()), t.dims().to_vec(), b)))
        .collect::<Result<_>>()?;
    use safetensors::tensor::TensorView;
    let views: Vec<(String, TensorView<'_>)> = owned
        .iter()
        .map(|(n, d, s, b)| {
            TensorView::new(*d, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::Format {
                    what: format!("tensor {n:?}"),
                    msg: e.to_string(),
                })
        })
        .collect::<Result<_>>()?;
    safetensors::serialize(views, metadata).map_err(|e| Error::Format {
        what: "safetensors serialisation".into(),
        msg: e.to_string(),
    })
}

/// Writes `bytes` to `path` atomically (temporary file, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |w| w.write_all(bytes).map_err(|e| io_err(path, e)))
}

/// [`write_atomic`] of what `fill` writes, through a buffer: for files too large to assemble
/// in memory first. An error of `fill` (its own, or writing) leaves no file and no temporary
/// file behind, and is returned as it is.
pub fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut dyn Write) -> Result<()>,
) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "checkpoint".into());
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let result = (|| {
        let file = std::fs::File::create(&tmp).map_err(|e| io_err(path, e))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
        fill(&mut w)?;
        let file = w.into_inner().map_err(|e| io_err(path, e.into_error()))?;
        file.sync_all().map_err(|e| io_err(path, e))?;
        std::fs::rename(&tmp, path).map_err(|e| io_err(path, e))?;
        // Make the rename itself durable.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes named tensors to a safetensors file atomically, one tensor's bytes at a time: the
/// file is the safetensors crate's serialisation, byte for byte, but only one tensor is copied
/// to the host and converted at once, so a training checkpoint (weights and both AdamW
/// moments: 3.7 GB for VAR-d16) is not assembled in memory, twice, first.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let (header, order) = safetensors_header(tensors, metadata)?;
    write_atomic_with(path, |w| {
        w.write_all(&header).map_err(|e| io_err(path, e))?;
        for i in order {
            let (name, t) = &tensors[i];
            let bytes = to_bytes(t)?;
            if bytes.len() != t.elem_count() * t.dtype().size_in_bytes() {
                return Err(Error::invalid(
                    "write_safetensors",
                    format!("tensor {name:?}: {} bytes for {}", bytes.len(), t.shape()),
                ));
            }
            w.write_all(&bytes).map_err(|e| io_err(path, e))?;
        }
        Ok(())
    })
}

/// The dtype a tensor is stored with.
fn st_dtype(d: mvar_engine::DType) -> StDtype {
    use mvar_engine::DType;
    match d {
        DType::F32 => StDtype::F32,
        DType::F64 => StDtype::F64,
        DType::BF16 => StDtype::BF16,
        DType::I64 => StDtype::I64,
        DType::U8 => StDtype::U8,
    }
}

/// A tensor's dtype, shape and size without its data: what the safetensors crate lays the
/// header out from.
struct SizeOnly {
    dtype: StDtype,
    shape: Vec<usize>,
    len: usize,
}

impl safetensors::View for SizeOnly {
    fn dtype(&self) -> StDtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        // No bytes: serialising these gives the length prefix and the header alone.
        std::borrow::Cow::Borrowed(&[])
    }
    fn data_len(&self) -> usize {
        self.len
    }
}

/// The length prefix and JSON header of the safetensors file of `tensors`, as the crate lays
/// them out (its order, offsets and padding), and the indices of the tensors in the order their
/// data follows (by offset).
fn safetensors_header(
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<(Vec<u8>, Vec<usize>)> {
    let format_err = |msg: String| Error::Format {
        what: "safetensors serialisation".into(),
        msg,
    };
    let views = tensors.iter().map(|(n, t)| {
        (
            n.as_str(),
            SizeOnly {
                dtype: st_dtype(t.dtype()),
                shape: t.dims().to_vec(),
                len: t.elem_count() * t.dtype().size_in_bytes(),
            },
        )
    });
    let header = safetensors::serialize(views, metadata).map_err(|e| format_err(e.to_string()))?;
    let json: serde_json::Value = serde_json::from_slice(header.get(8..).unwrap_or_default())
        .map_err(|e| format_err(format!("header: {e}")))?;
    let mut order = Vec::with_capacity(tensors.len());
    for (i, (name, _)) in tensors.iter().enumerate() {
        let start = json[name.as_str()]["data_offsets"][0]
            .as_u64()
            .ok_or_else(|| format_err(format!("no offsets for tensor {name:?} in the header")))?;
        order.push((start, i));
    }
    order.sort_unstable();
    Ok((header, order.into_iter().map(|(_, i)| i).collect()))
}

/// What [`load_into`] did.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    pub loaded: usize,
    /// Names in the file that matched no target (reported, not an error unless `strict`).
    pub unexpected: Vec<String>,
}

/// Copies tensors from `source` into `targets` (in place, keeping each target's dtype and
/// device), matching by name. Every target must be present with exactly its shape. With
/// `strict`, a tensor of the file that matches no target is an error too.
pub fn load_into(
    what: &str,
    targets: &[(String, Tensor)],
    source: &BTreeMap<String, Tensor>,
    strict: bool,
) -> Result<LoadReport> {
    let mut report = LoadReport::default();
    for (name, target) in targets {
        let src = source.get(name).ok_or_else(|| Error::Format {
            what: what.to_string(),
            msg: format!(
                "tensor {name:?} is missing; expected shape {}",
                target.shape()
            ),
        })?;
        if src.shape() != target.shape() {
            return Err(Error::Format {
                what: what.to_string(),
                msg: format!(
                    "tensor {name:?} has shape {}; expected {}",
                    src.shape(),
                    target.shape()
                ),
            });
        }
        if !src.dtype().is_float() && target.dtype().is_float() {
            return Err(Error::Format {
                what: what.to_string(),
                msg: format!(
                    "tensor {name:?} is {}; expected a float tensor",
                    src.dtype()
                ),
            });
        }
        let value = src.to_dtype(target.dtype())?.to_device(target.device())?;
        target.copy_from(&value)?;
        report.loaded += 1;
    }
    let known: std::collections::HashSet<&str> = targets.iter().map(|(n, _)| n.as_str()).collect();
    report.unexpected = source
        .keys()
        .filter(|k| !known.contains(k.as_str()))
        .cloned()
        .collect();
    if strict && !report.unexpected.is_empty() {
        return Err(Error::Format {
            what: what.to_string(),
            msg: format!(
                "unexpected tensors {:?} (strict loading)",
                report.unexpected
            ),
        });
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!(
            "mvar-ckpt-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn round_trip_and_errors_name_the_tensor() {
        let dir = tmpdir();
        let path = dir.join("a.safetensors");
        let w = Tensor::from_vec(vec![1.0f32, 2.0, 3.0, 4.0], [2, 2], &Device::Cpu).unwrap();
        let ids = Tensor::from_vec(vec![3i64, -1], [2], &Device::Cpu).unwrap();
        write_safetensors(&path, &[("w".into(), w.clone()), ("ids".into(), ids)], None).unwrap();
        let back = read_safetensors(&path).unwrap();
        assert_eq!(back["w"].to_vec::<f32>().unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(back["ids"].to_vec::<i64>().unwrap(), vec![3, -1]);

        let target = Tensor::zeros([2, 2], DType::F32, &Device::Cpu).unwrap();
        let r = load_into("test", &[("w".into(), target.clone())], &back, false).unwrap();
        assert_eq!(r.loaded, 1);
        assert_eq!(r.unexpected, vec!["ids".to_string()]);
        assert_eq!(target.to_vec::<f32>().unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
        let e = load_into("test", &[("w".into(), target.clone())], &back, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("ids"), "{e}");

        let wrong = Tensor::zeros([4], DType::F32, &Device::Cpu).unwrap();
        let e = load_into("ckpt x", &[("w".into(), wrong)], &back, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"w\"") && e.contains("[2, 2]") && e.contains("expected [4]"),
            "{e}"
        );
        let e = load_into("ckpt x", &[("missing".into(), target)], &back, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("missing") && e.contains("expected shape [2, 2]"),
            "{e}"
        );

        // Truncated and corrupt files.
        let bytes = std::fs::read(&path).unwrap();
        let cut = dir.join("cut.safetensors");
        std::fs::write(&cut, &bytes[..bytes.len() - 3]).unwrap();
        let e = read_safetensors(&cut).unwrap_err().to_string();
        assert!(
            e.contains("cut.safetensors") && e.contains("truncated or corrupt"),
            "{e}"
        );
        let junk = dir.join("junk.safetensors");
        std::fs::write(&junk, b"\xff\xff\xff\xff\xff\xff\xff\x7fnot json").unwrap();
        assert!(read_safetensors(&junk)
            .unwrap_err()
            .to_string()
            .contains("junk.safetensors"));
        let e = read_safetensors(&dir.join("nope.safetensors"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope.safetensors"), "{e}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn streamed_files_are_the_serialised_bytes() {
        let dev = Device::Cpu;
        let mut g = mvar_engine::Generator::new(5);
        let tensors: Vec<(String, Tensor)> = vec![
            (
                "zeta.w".into(),
                Tensor::randn([3, 5], 0.0, 1.0, DType::F32, &dev, &mut g).unwrap(),
            ),
            (
                "alpha.b".into(),
                Tensor::randn([7], 0.0, 1.0, DType::BF16, &dev, &mut g).unwrap(),
            ),
            (
                "mid.idx".into(),
                Tensor::from_vec(vec![3i64, -1, 9], [3], &dev).unwrap(),
            ),
            (
                "alpha.a".into(),
                Tensor::randn([2, 2, 2], 0.0, 1.0, DType::F64, &dev, &mut g).unwrap(),
            ),
            (
                "bytes".into(),
                Tensor::from_vec(vec![1u8, 2, 3, 4, 5], [5], &dev).unwrap(),
            ),
            (
                "empty".into(),
                Tensor::zeros([0, 4], DType::F32, &dev).unwrap(),
            ),
        ];
        let meta = HashMap::from([("mvar.step".to_string(), "12".to_string())]);
        let dir = tmpdir().join("streamed");
        let path = dir.join("t.safetensors");
        write_safetensors(&path, &tensors, Some(meta.clone())).unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            serialize(&tensors, Some(meta)).unwrap()
        );
        write_safetensors(&path, &tensors[..2], None).unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            serialize(&tensors[..2], None).unwrap()
        );
        let _ = std::fs::remove_dir_all(dir.parent().unwrap());
    }

    #[test]
    fn atomic_write_leaves_no_temporary_file() {
        let dir = tmpdir().join("atomic");
        let path = dir.join("x.bin");
        write_atomic(&path, b"first").unwrap();
        write_atomic(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        // Written piece by piece; a failure half way keeps the previous file and no temporary.
        write_atomic_with(&path, |w| {
            for piece in [&b"th"[..], b"ir", b"d"] {
                w.write_all(piece).map_err(|e| io_err(&path, e))?;
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"third");
        let e = write_atomic_with(&path, |w| {
            w.write_all(&[7u8; 3 << 20]).map_err(|e| io_err(&path, e))?;
            Err(Error::invalid("filler", "gave up half way"))
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("gave up half way"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"third");
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        let _ = std::fs::remove_dir_all(dir.parent().unwrap());
    }
}

/// Everything besides tensors that a training run needs to resume exactly: the step, the data
/// order / augmentation RNG, and free-form entries (the model config as JSON, the data-loader
/// position ...).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainingState {
    pub step: u64,
    pub rng: mvar_engine::GeneratorState,
    pub extra: BTreeMap<String, String>,
}

const META_STEP: &str = "mvar.step";
const META_SEED: &str = "mvar.rng.seed";
const META_OFFSET: &str = "mvar.rng.offset";
const META_OPT_STEP: &str = "mvar.optim.step";
const EXTRA_PREFIX: &str = "mvar.extra.";

/// Writes a training checkpoint atomically: the model's tensors under their own names, the
/// optimizer's moments as `optim.m.<name>` / `optim.v.<name>`, and the state as metadata.
pub fn save_training(
    path: &Path,
    model: &[(String, Tensor)],
    opt: &mvar_ops::AdamW,
    state: &TrainingState,
) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = model.to_vec();
    let shapes: HashMap<&str, &Tensor> = model.iter().map(|(n, t)| (n.as_str(), t)).collect();
    for (name, mo) in opt.state()? {
        let dims = shapes
            .get(name.as_str())
            .map(|t| t.dims().to_vec())
            .unwrap_or_else(|| vec![mo.m.len()]);
        tensors.push((
            format!("optim.m.{name}"),
            Tensor::from_cpu(mo.m, dims.clone(), &Device::Cpu)?,
        ));
        tensors.push((
            format!("optim.v.{name}"),
            Tensor::from_cpu(mo.v, dims, &Device::Cpu)?,
        ));
    }
    let mut meta: HashMap<String, String> = HashMap::new();
    meta.insert(META_STEP.into(), state.step.to_string());
    meta.insert(META_SEED.into(), state.rng.seed.to_string());
    meta.insert(META_OFFSET.into(), state.rng.offset.to_string());
    meta.insert(META_OPT_STEP.into(), opt.step_count().to_string());
    for (k, v) in &state.extra {
        meta.insert(format!("{EXTRA_PREFIX}{k}"), v.clone());
    }
    write_safetensors(path, &tensors, Some(meta))
}

/// Reads a training checkpoint written by [`save_training`]: loads the model's tensors into
/// `model` (strictly by name and shape), the moments into `opt`, and returns the state.
pub fn load_training(
    path: &Path,
    model: &[(String, Tensor)],
    opt: &mut mvar_ops::AdamW,
) -> Result<TrainingState> {
    let bytes = std::fs::read(path).map_err(|e| io_err(path, e))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| {
        format_err(
            path,
            format!("not a valid safetensors file (truncated or corrupt?): {e}"),
        )
    })?;
    let meta = header.metadata().clone().unwrap_or_default();
    let num = |key: &str| -> Result<u64> {
        meta.get(key).and_then(|v| v.parse().ok()).ok_or_else(|| {
            format_err(
                path,
                format!("metadata {key:?} missing or not a number: not a training checkpoint"),
            )
        })
    };
    let state = TrainingState {
        step: num(META_STEP)?,
        rng: mvar_engine::GeneratorState {
            seed: num(META_SEED)?,
            offset: num(META_OFFSET)?,
        },
        extra: meta
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix(EXTRA_PREFIX)
                    .map(|k| (k.to_string(), v.clone()))
            })
            .collect(),
    };
    let opt_step = num(META_OPT_STEP)?;
    let tensors = parse_safetensors(&bytes).map_err(|msg| format_err(path, msg))?;
    let what = format!("training checkpoint {}", path.display());
    let (model_part, optim_part): (BTreeMap<String, Tensor>, BTreeMap<String, Tensor>) = tensors
        .into_iter()
        .partition(|(k, _)| !k.starts_with("optim."));
    load_into(&what, model, &model_part, true)?;
    let mut moments = BTreeMap::new();
    for (name, target) in model {
        let (m, v) = (
            optim_part.get(&format!("optim.m.{name}")),
            optim_part.get(&format!("optim.v.{name}")),
        );
        match (m, v) {
            (Some(m), Some(v)) => {
                for (which, t) in [("optim.m", m), ("optim.v", v)] {
                    if t.elem_count() != target.elem_count() {
                        return Err(Error::Format {
                            what: what.clone(),
                            msg: format!(
                                "tensor \"{which}.{name}\" has shape {}; expected {}",
                                t.shape(),
                                target.shape()
                            ),
                        });
                    }
                }
                moments.insert(
                    name.clone(),
                    mvar_ops::Moments {
                        m: m.to_dtype(target.dtype())?.to_cpu_storage()?,
                        v: v.to_dtype(target.dtype())?.to_cpu_storage()?,
                    },
                );
            }
            (None, None) => {}
            _ => {
                return Err(Error::Format {
                    what: what.clone(),
                    msg: format!("only one of the two moments of {name:?}"),
                })
            }
        }
    }
    opt.load_state(opt_step, moments);
    Ok(state)
}
