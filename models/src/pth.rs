//! PyTorch checkpoints (`torch.save`, the zip format of PyTorch >= 1.6) read in pure Rust, and
//! their conversion to safetensors.
//!
//! Such a file is a zip archive with every entry under one folder `<archive>/`: `data.pkl` (the
//! saved object, pickled, protocol 2), `data/<key>` (the raw bytes of each storage), `byteorder`
//! (`little` or `big`; absent means little), `version` and a few more records we do not need.
//! In the pickle, each storage is a persistent id `('storage', <storage class>, <key>,
//! <location>, <numel>)` and each tensor is a call `torch._utils._rebuild_tensor_v2(storage,
//! storage_offset, size, stride, requires_grad, backward_hooks[, metadata])`, with offset and
//! strides in elements of the storage's dtype.
//!
//! Reading is safe: the pickle runs on a small virtual machine of our own that can build only
//! dicts, lists, tuples, scalars, strings, storages and tensors. A GLOBAL is honoured only for a
//! short list of names (`collections.OrderedDict`, torch's tensor / parameter rebuild functions,
//! the `torch.*Storage` classes, `torch.UntypedStorage` and the `torch.<dtype>` objects), and
//! nothing is ever called: any other global is an error naming it. Every malformed input is an
//! error that names the file and what was wrong; no input can panic.
//!
//! Every tensor reachable from the saved object is collected under its dotted key path: a state
//! dict nested as `{'model': {'blocks.0.attn.proj.weight': t}}` gives
//! `model.blocks.0.attn.proj.weight`, list items take their index (`ema.0`), and a tensor saved
//! alone is named `tensor`. Strided views are materialised into dense row-major tensors (two
//! views of one storage become two tensors). Element types: f32, f64 and bf16 stay; f16 becomes
//! f32; every integer type becomes i64; bool and u8 become u8.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use half::{bf16, f16};
use mvar_engine::{CpuStorage, Device, Error, Result, Tensor};
use zip::result::ZipError;
use zip::ZipArchive;

/// Deepest nesting of containers followed when collecting tensors.
const MAX_DEPTH: usize = 512;
/// Most container entries visited when collecting tensors: a pickle can share one object many
/// times, so a small file can describe an exponentially large tree.
const MAX_VISITS: usize = 1 << 20;
/// A view whose dense form has more elements than its storage (an expanded view, with a zero
/// stride) may not exceed this many elements: it guards against a few bytes of pickle asking for
/// gigabytes of memory.
const MAX_EXPANDED_ELEMS: usize = 1 << 24;
/// The most bytes reserved up front for one record; larger records grow as they are read, so a
/// corrupt size field cannot reserve memory the file does not back.
const MAX_RESERVE: usize = 1 << 26;

/// The tensors of a checkpoint and what was left out.
#[derive(Debug, Clone, Default)]
pub struct PthContents {
    /// Every tensor, by dotted name (after prefix stripping), dense, on the CPU.
    pub tensors: BTreeMap<String, Tensor>,
    /// Dotted names of the non-tensor entries (ints, floats, strings, None ...), skipped.
    pub skipped: Vec<String>,
    /// With a prefix: the tensors whose name does not start with it, left out.
    pub outside_prefix: Vec<String>,
}

/// What [`convert`] wrote.
#[derive(Debug, Clone, Default)]
pub struct ConvertReport {
    /// Tensors written.
    pub tensors: usize,
    /// Bytes of tensor data written (in the output dtypes).
    pub tensor_bytes: u64,
    /// Size of the safetensors file written.
    pub file_bytes: u64,
    /// Dotted names of the non-tensor entries of the checkpoint, skipped.
    pub skipped: Vec<String>,
    /// With a prefix: the tensors left out because their name does not start with it.
    pub outside_prefix: Vec<String>,
}

fn format_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Format {
        what: format!("pytorch checkpoint {}", path.display()),
        msg: msg.into(),
    }
}

/// Reads every tensor of a `torch.save` checkpoint (see the module doc). With `strip_prefix`,
/// only the tensors whose dotted name starts with it are kept, with the prefix removed; a
/// prefix without a trailing `.` gets one (`model` strips `model.`).
pub fn read_pth(path: &Path, strip_prefix: Option<&str>) -> Result<PthContents> {
    let file = std::fs::File::open(path).map_err(|e| Error::Io {
        path: path.display().to_string(),
        source: e,
    })?;
    read_archive(std::io::BufReader::new(file), strip_prefix).map_err(|msg| format_err(path, msg))
}

/// The prefix rule of `--strip-prefix`: none for None or "", else the prefix with a trailing
/// `.` (`model` strips `model.`).
pub(crate) fn dotted_prefix(strip_prefix: Option<&str>) -> Option<String> {
    strip_prefix.filter(|p| !p.is_empty()).map(|p| {
        if p.ends_with('.') {
            p.to_string()
        } else {
            format!("{p}.")
        }
    })
}

/// Parses the bytes of a `torch.save` checkpoint (see [`read_pth`]); the error says what is
/// wrong.
pub fn parse_pth(
    bytes: &[u8],
    strip_prefix: Option<&str>,
) -> std::result::Result<PthContents, String> {
    read_archive(std::io::Cursor::new(bytes), strip_prefix)
}

/// Converts a `torch.save` checkpoint to a safetensors file, written atomically, with the
/// tensors under their dotted names (after the optional prefix strip, see [`read_pth`]).
pub fn convert(input: &Path, output: &Path, strip_prefix: Option<&str>) -> Result<ConvertReport> {
    let contents = read_pth(input, strip_prefix)?;
    if contents.tensors.is_empty() {
        return Err(format_err(input, "holds no tensors: nothing to convert"));
    }
    let tensor_bytes = contents
        .tensors
        .values()
        .map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64)
        .sum();
    let named: Vec<(String, Tensor)> = contents.tensors.into_iter().collect();
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    crate::checkpoint::write_safetensors(output, &named, Some(metadata))?;
    let file_bytes = std::fs::metadata(output)
        .map_err(|e| Error::Io {
            path: output.display().to_string(),
            source: e,
        })?
        .len();
    Ok(ConvertReport {
        tensors: named.len(),
        tensor_bytes,
        file_bytes,
        skipped: contents.skipped,
        outside_prefix: contents.outside_prefix,
    })
}

// ----------------------------------------------------------------------------------------------
// the archive

fn read_archive<R: Read + Seek>(
    mut reader: R,
    strip_prefix: Option<&str>,
) -> std::result::Result<PthContents, String> {
    let mut magic = [0u8; 2];
    let head = reader.read(&mut magic).unwrap_or(0);
    reader
        .seek(SeekFrom::Start(0))
        .map_err(|e| format!("cannot read: {e}"))?;
    let mut zip = match ZipArchive::new(reader) {
        Ok(z) => z,
        Err(e) => {
            // The legacy format is a bare pickle stream starting with PROTO.
            if head == 2 && magic[0] == 0x80 {
                return Err(
                    "not a zip archive: this looks like the legacy torch.save format \
                            (PyTorch < 1.6), which is not supported; re-save it with a recent \
                            PyTorch"
                        .into(),
                );
            }
            return Err(format!(
                "not a torch.save zip archive (truncated or corrupt?): {e}"
            ));
        }
    };

    let candidates: Vec<String> = zip
        .file_names_raw()
        .filter_map(|raw| {
            let name = std::str::from_utf8(raw).ok()?;
            let dir = name.strip_suffix("/data.pkl")?;
            (!dir.is_empty() && !dir.contains('/')).then(|| dir.to_string())
        })
        .collect();
    let archive = match candidates.as_slice() {
        [one] => one.clone(),
        [] => {
            return Err(
                "no <archive>/data.pkl record: not a checkpoint written by torch.save".into(),
            )
        }
        many => {
            return Err(format!(
                "{} data.pkl records (in {many:?}); expected one",
                many.len()
            ))
        }
    };

    let pkl_name = format!("{archive}/data.pkl");
    let pickle = read_record(&mut zip, &pkl_name, None)?
        .ok_or_else(|| format!("record {pkl_name} is missing"))?;
    let big_endian = match read_record(&mut zip, &format!("{archive}/byteorder"), None)? {
        None => false,
        Some(b) if b == b"little" => false,
        Some(b) if b == b"big" => true,
        Some(b) => {
            return Err(format!(
                "record {archive}/byteorder says {:?}; expected \"little\" or \"big\"",
                String::from_utf8_lossy(&b[..b.len().min(32)])
            ))
        }
    };

    let mut vm = Unpickler::new(&pickle);
    let root = vm
        .run()
        .map_err(|msg| format!("record {pkl_name}: {msg}"))?;
    let arena = vm.arena;

    let mut collector = Collector {
        arena: &arena,
        tensors: Vec::new(),
        skipped: Vec::new(),
        visits: 0,
        on_path: HashSet::new(),
    };
    collector.walk(root, "", 0)?;
    let Collector {
        tensors: found,
        skipped,
        ..
    } = collector;

    let prefix = dotted_prefix(strip_prefix);
    let mut kept: Vec<(String, usize)> = Vec::new();
    let mut outside_prefix = Vec::new();
    for (name, obj) in found {
        match &prefix {
            Some(p) => match name.strip_prefix(p.as_str()) {
                Some(rest) if !rest.is_empty() => kept.push((rest.to_string(), obj)),
                _ => outside_prefix.push(name),
            },
            None => kept.push((name, obj)),
        }
    }
    if let Some(p) = &prefix {
        if kept.is_empty() && !outside_prefix.is_empty() {
            let some: Vec<&String> = outside_prefix.iter().take(5).collect();
            return Err(format!(
                "no tensor name starts with the prefix {p:?}; names are like {some:?}"
            ));
        }
    }

    let mut storages = StorageCache {
        archive: &archive,
        big_endian,
        loaded: HashMap::new(),
    };
    // A storage's bytes are dropped once its last tensor is dense, so that the peak memory is
    // the dense tensors plus the storages still to be used, not twice the checkpoint.
    let storage_key = |obj: usize| match arena.get(obj) {
        Some(Obj::Tensor(spec)) => match arena.get(spec.storage) {
            Some(Obj::Storage { key, .. }) => Some(key.as_str()),
            _ => None,
        },
        _ => None,
    };
    let mut uses: HashMap<&str, usize> = HashMap::new();
    for (_, obj) in &kept {
        if let Some(k) = storage_key(*obj) {
            *uses.entry(k).or_default() += 1;
        }
    }
    let mut done: HashMap<usize, Tensor> = HashMap::new();
    let mut tensors = BTreeMap::new();
    for (name, obj) in kept {
        let t = match done.get(&obj) {
            Some(t) => t.clone(),
            None => {
                let t = materialise(&mut zip, &mut storages, &arena, obj, &name)?;
                done.insert(obj, t.clone());
                t
            }
        };
        if let Some(k) = storage_key(obj) {
            if let Some(n) = uses.get_mut(k) {
                *n -= 1;
                if *n == 0 {
                    storages.loaded.remove(k);
                }
            }
        }
        if tensors.insert(name.clone(), t).is_some() {
            return Err(format!(
                "two tensors are named {name:?} (a key with dots colliding with a nested key?)"
            ));
        }
    }
    Ok(PthContents {
        tensors,
        skipped,
        outside_prefix,
    })
}

/// The bytes of record `name`, or None when the archive has no such record. With `expect`, the
/// record must hold exactly that many bytes.
fn read_record<R: Read + Seek>(
    zip: &mut ZipArchive<R>,
    name: &str,
    expect: Option<usize>,
) -> std::result::Result<Option<Vec<u8>>, String> {
    let file = match zip.by_name(name) {
        Ok(f) => f,
        Err(ZipError::FileNotFound) => return Ok(None),
        Err(e) => return Err(format!("record {name}: {e}")),
    };
    let size = file.size();
    if let Some(n) = expect {
        if size != n as u64 {
            return Err(format!("record {name} holds {size} bytes; expected {n}"));
        }
    }
    let mut buf = Vec::new();
    buf.try_reserve(usize::try_from(size).unwrap_or(usize::MAX).min(MAX_RESERVE))
        .map_err(|e| format!("record {name}: {e}"))?;
    // One byte past the size: the reader checks the CRC only when it reaches the end.
    file.take(size.saturating_add(1))
        .read_to_end(&mut buf)
        .map_err(|e| format!("record {name} cannot be read (truncated or corrupt?): {e}"))?;
    if buf.len() as u64 != size {
        return Err(format!(
            "record {name} is corrupt: {} bytes where its header says {size}",
            buf.len()
        ));
    }
    Ok(Some(buf))
}

// ----------------------------------------------------------------------------------------------
// element types

/// The element type of a torch storage or tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PtDType {
    F32,
    F16,
    BF16,
    F64,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl PtDType {
    fn size(self) -> usize {
        match self {
            PtDType::F64 | PtDType::I64 => 8,
            PtDType::F32 | PtDType::I32 => 4,
            PtDType::F16 | PtDType::BF16 | PtDType::I16 => 2,
            PtDType::I8 | PtDType::U8 | PtDType::Bool => 1,
        }
    }

    fn name(self) -> &'static str {
        match self {
            PtDType::F32 => "float32",
            PtDType::F16 => "float16",
            PtDType::BF16 => "bfloat16",
            PtDType::F64 => "float64",
            PtDType::I64 => "int64",
            PtDType::I32 => "int32",
            PtDType::I16 => "int16",
            PtDType::I8 => "int8",
            PtDType::U8 => "uint8",
            PtDType::Bool => "bool",
        }
    }

    /// `torch.FloatStorage` and its siblings.
    fn from_storage_class(name: &str) -> Option<Self> {
        Some(match name {
            "FloatStorage" => PtDType::F32,
            "HalfStorage" => PtDType::F16,
            "BFloat16Storage" => PtDType::BF16,
            "DoubleStorage" => PtDType::F64,
            "LongStorage" => PtDType::I64,
            "IntStorage" => PtDType::I32,
            "ShortStorage" => PtDType::I16,
            "CharStorage" => PtDType::I8,
            "ByteStorage" => PtDType::U8,
            "BoolStorage" => PtDType::Bool,
            _ => return None,
        })
    }

    /// `torch.float32` and its aliases.
    fn from_dtype_name(name: &str) -> Option<Self> {
        Some(match name {
            "float32" | "float" => PtDType::F32,
            "float16" | "half" => PtDType::F16,
            "bfloat16" => PtDType::BF16,
            "float64" | "double" => PtDType::F64,
            "int64" | "long" => PtDType::I64,
            "int32" | "int" => PtDType::I32,
            "int16" | "short" => PtDType::I16,
            "int8" => PtDType::I8,
            "uint8" => PtDType::U8,
            "bool" => PtDType::Bool,
            _ => return None,
        })
    }

    /// Dense elements (`bytes`, `size()` bytes each, in file byte order) as engine storage.
    fn decode(self, bytes: &[u8], big_endian: bool) -> CpuStorage {
        fn words<const N: usize, T>(
            bytes: &[u8],
            big: bool,
            le: fn([u8; N]) -> T,
            be: fn([u8; N]) -> T,
        ) -> Vec<T> {
            bytes
                .chunks_exact(N)
                .map(|c| {
                    let mut w = [0u8; N];
                    w.copy_from_slice(c);
                    if big {
                        be(w)
                    } else {
                        le(w)
                    }
                })
                .collect()
        }
        let b = big_endian;
        match self {
            PtDType::F32 => {
                CpuStorage::F32(words(bytes, b, f32::from_le_bytes, f32::from_be_bytes))
            }
            PtDType::F64 => {
                CpuStorage::F64(words(bytes, b, f64::from_le_bytes, f64::from_be_bytes))
            }
            PtDType::F16 => CpuStorage::F32(
                words(bytes, b, u16::from_le_bytes, u16::from_be_bytes)
                    .into_iter()
                    .map(|x| f16::from_bits(x).to_f32())
                    .collect(),
            ),
            PtDType::BF16 => CpuStorage::BF16(
                words(bytes, b, u16::from_le_bytes, u16::from_be_bytes)
                    .into_iter()
                    .map(bf16::from_bits)
                    .collect(),
            ),
            PtDType::I64 => {
                CpuStorage::I64(words(bytes, b, i64::from_le_bytes, i64::from_be_bytes))
            }
            PtDType::I32 => CpuStorage::I64(
                words(bytes, b, i32::from_le_bytes, i32::from_be_bytes)
                    .into_iter()
                    .map(i64::from)
                    .collect(),
            ),
            PtDType::I16 => CpuStorage::I64(
                words(bytes, b, i16::from_le_bytes, i16::from_be_bytes)
                    .into_iter()
                    .map(i64::from)
                    .collect(),
            ),
            PtDType::I8 => CpuStorage::I64(bytes.iter().map(|&x| i64::from(x as i8)).collect()),
            PtDType::U8 | PtDType::Bool => CpuStorage::U8(bytes.to_vec()),
        }
    }
}

// ----------------------------------------------------------------------------------------------
// the pickle machine

/// A value on the pickle stack. Containers and strings live in the arena and are referred to
/// by index, so that values copy cheaply, memo sharing and in-place SETITEMS work as in Python,
/// and no nesting, however deep or cyclic, can recurse on drop.
#[derive(Debug, Clone, Copy)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Obj(usize),
}

/// The names a GLOBAL may resolve to; nothing else is ever looked up.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Global {
    OrderedDict,
    RebuildTensor,
    RebuildTensorV2,
    RebuildTensorV3,
    RebuildParameter,
    RebuildParameterWithState,
    StorageClass(PtDType),
    UntypedStorage,
    DType(PtDType),
}

impl Global {
    fn resolve(module: &str, name: &str) -> Option<Global> {
        Some(match (module, name) {
            ("collections", "OrderedDict") => Global::OrderedDict,
            ("torch._utils", "_rebuild_tensor") => Global::RebuildTensor,
            ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
            ("torch._utils", "_rebuild_tensor_v3") => Global::RebuildTensorV3,
            ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
            ("torch._utils", "_rebuild_parameter_with_state") => Global::RebuildParameterWithState,
            ("torch", "UntypedStorage") | ("torch.storage", "UntypedStorage") => {
                Global::UntypedStorage
            }
            ("torch", n) => match PtDType::from_storage_class(n) {
                Some(d) => Global::StorageClass(d),
                None => Global::DType(PtDType::from_dtype_name(n)?),
            },
            _ => return None,
        })
    }
}

#[derive(Debug, Clone)]
struct TensorSpec {
    /// Arena index of the storage.
    storage: usize,
    /// The tensor's element type when it differs from the storage's (`_rebuild_tensor_v3`).
    dtype: Option<PtDType>,
    offset: usize,
    size: Vec<usize>,
    stride: Vec<usize>,
}

#[derive(Debug, Clone)]
enum Obj {
    Str(String),
    /// Bytes are never needed: only their place is kept.
    Bytes,
    /// An integer past i64 (LONG1 / LONG4): kept only to be reported as a non-tensor entry.
    BigInt,
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(Global, String),
    Storage {
        dtype: PtDType,
        key: String,
        numel: usize,
    },
    Tensor(TensorSpec),
}

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    /// Where the current opcode started, for messages.
    at: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u64, Value>,
    arena: Vec<Obj>,
}

type VmResult<T> = std::result::Result<T, String>;

impl<'a> Unpickler<'a> {
    fn new(data: &'a [u8]) -> Self {
        Unpickler {
            data,
            pos: 0,
            at: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            arena: Vec::new(),
        }
    }

    fn err<T>(&self, msg: impl std::fmt::Display) -> VmResult<T> {
        Err(format!("{msg} (opcode at byte {})", self.at))
    }

    fn take(&mut self, n: usize) -> VmResult<&'a [u8]> {
        let data: &'a [u8] = self.data;
        match self
            .pos
            .checked_add(n)
            .and_then(|end| data.get(self.pos..end))
        {
            Some(s) => {
                self.pos += n;
                Ok(s)
            }
            None => self.err(format!(
                "pickle truncated: opcode needs {n} more bytes, {} left",
                data.len().saturating_sub(self.pos)
            )),
        }
    }

    fn byte(&mut self) -> VmResult<u8> {
        Ok(self.take(1)?[0])
    }

    fn array<const N: usize>(&mut self) -> VmResult<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    /// A length field as usize.
    fn len_field(&mut self, n: usize) -> VmResult<usize> {
        let v = match n {
            1 => u64::from(self.byte()?),
            4 => u64::from(u32::from_le_bytes(self.array()?)),
            _ => u64::from_le_bytes(self.array()?),
        };
        match usize::try_from(v) {
            Ok(v) => Ok(v),
            Err(_) => self.err(format!("length {v} does not fit in memory")),
        }
    }

    /// A newline-terminated text argument (GLOBAL).
    fn line(&mut self) -> VmResult<&'a str> {
        let rest = self.data.get(self.pos..).unwrap_or(&[]);
        let Some(n) = rest.iter().position(|&b| b == b'\n') else {
            return self.err("pickle truncated: GLOBAL argument without a newline");
        };
        let line = self.take(n + 1)?;
        match std::str::from_utf8(&line[..n]) {
            Ok(s) => Ok(s),
            Err(_) => self.err("GLOBAL argument is not UTF-8"),
        }
    }

    fn alloc(&mut self, obj: Obj) -> Value {
        self.arena.push(obj);
        Value::Obj(self.arena.len() - 1)
    }

    fn push(&mut self, v: Value) {
        self.stack.push(v);
    }

    fn pop(&mut self) -> VmResult<Value> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return self.err("pickle pops past a MARK");
        }
        match self.stack.pop() {
            Some(v) => Ok(v),
            None => self.err("pickle stack underflow"),
        }
    }

    fn top(&self) -> VmResult<Value> {
        match self.stack.last() {
            Some(v) => Ok(*v),
            None => self.err("pickle stack underflow"),
        }
    }

    /// The items pushed since the last MARK, and the mark removed.
    fn pop_mark(&mut self) -> VmResult<Vec<Value>> {
        match self.marks.pop() {
            Some(m) if m <= self.stack.len() => Ok(self.stack.split_off(m)),
            _ => self.err("pickle has no MARK to pop to"),
        }
    }

    fn obj(&self, v: Value) -> Option<&Obj> {
        match v {
            Value::Obj(i) => self.arena.get(i),
            _ => None,
        }
    }

    fn str_of(&self, v: Value) -> Option<&str> {
        match self.obj(v) {
            Some(Obj::Str(s)) => Some(s),
            _ => None,
        }
    }

    fn describe(&self, v: Value) -> String {
        match v {
            Value::None => "None".into(),
            Value::Bool(b) => format!("bool {b}"),
            Value::Int(i) => format!("int {i}"),
            Value::Float(f) => format!("float {f}"),
            Value::Obj(i) => match self.arena.get(i) {
                Some(Obj::Str(s)) => format!("str {:?}", truncate(s, 40)),
                Some(Obj::Bytes) => "bytes".into(),
                Some(Obj::BigInt) => "a large int".into(),
                Some(Obj::Tuple(t)) => format!("a tuple of {}", t.len()),
                Some(Obj::List(_)) => "a list".into(),
                Some(Obj::Dict(_)) => "a dict".into(),
                Some(Obj::Global(_, n)) => format!("global {n}"),
                Some(Obj::Storage { .. }) => "a storage".into(),
                Some(Obj::Tensor(_)) => "a tensor".into(),
                None => "?".into(),
            },
        }
    }

    fn memo_put(&mut self, key: u64) -> VmResult<()> {
        let v = self.top()?;
        self.memo.insert(key, v);
        Ok(())
    }

    fn memo_get(&mut self, key: u64) -> VmResult<()> {
        match self.memo.get(&key) {
            Some(&v) => {
                self.push(v);
                Ok(())
            }
            None => self.err(format!("memo key {key} was never stored")),
        }
    }

    fn global(&mut self, module: &str, name: &str) -> VmResult<()> {
        let full = format!("{module}.{name}");
        match Global::resolve(module, name) {
            Some(g) => {
                let v = self.alloc(Obj::Global(g, full));
                self.push(v);
                Ok(())
            }
            None => self.err(format!(
                "refusing to load global {}: only tensors are read",
                truncate(&full, 120)
            )),
        }
    }

    fn int_arg(&self, v: Value, what: &str) -> VmResult<usize> {
        match v {
            Value::Int(i) if i >= 0 => {
                usize::try_from(i).or_else(|_| self.err(format!("{what} {i} is too large")))
            }
            Value::Bool(b) => Ok(usize::from(b)),
            other => self.err(format!(
                "{what} is {}; expected a non-negative int",
                self.describe(other)
            )),
        }
    }

    fn ints_arg(&self, v: Value, what: &str) -> VmResult<Vec<usize>> {
        match self.obj(v) {
            Some(Obj::Tuple(items)) | Some(Obj::List(items)) => {
                items.iter().map(|&x| self.int_arg(x, what)).collect()
            }
            _ => self.err(format!(
                "{what} is {}; expected a tuple of ints",
                self.describe(v)
            )),
        }
    }

    /// BINPERSID: `('storage', storage_type, key, location, numel)`.
    fn persistent_load(&mut self, pid: Value) -> VmResult<Value> {
        let Some(Obj::Tuple(items)) = self.obj(pid) else {
            return self.err(format!(
                "persistent id is {}; expected a tuple ('storage', type, key, location, numel)",
                self.describe(pid)
            ));
        };
        let items = items.clone();
        if !(5..=6).contains(&items.len()) || self.str_of(items[0]) != Some("storage") {
            return self.err(format!(
                "persistent id is not ('storage', type, key, location, numel): {} items, first {}",
                items.len(),
                items.first().map_or("none".into(), |&v| self.describe(v))
            ));
        }
        let dtype = match self.obj(items[1]) {
            Some(Obj::Global(Global::StorageClass(d) | Global::DType(d), _)) => *d,
            Some(Obj::Global(Global::UntypedStorage, _)) => PtDType::U8,
            _ => {
                return self.err(format!(
                    "storage type is {}; expected a torch storage class",
                    self.describe(items[1])
                ))
            }
        };
        let key = match (items[2], self.str_of(items[2])) {
            (_, Some(s)) => s.to_string(),
            (Value::Int(i), None) => i.to_string(),
            (v, None) => {
                return self.err(format!(
                    "storage key is {}; expected a string",
                    self.describe(v)
                ))
            }
        };
        let numel = self.int_arg(items[4], "storage numel")?;
        Ok(self.alloc(Obj::Storage { dtype, key, numel }))
    }

    /// REDUCE and NEWOBJ: the whitelisted globals are the only callables.
    fn call(&mut self, func: Value, args: Value) -> VmResult<Value> {
        let (g, name) = match self.obj(func) {
            Some(Obj::Global(g, name)) => (*g, name.clone()),
            _ => {
                return self.err(format!(
                    "REDUCE calls {}; expected a global",
                    self.describe(func)
                ))
            }
        };
        let args = match self.obj(args) {
            Some(Obj::Tuple(a)) => a.clone(),
            _ => {
                return self.err(format!(
                    "arguments of {name} are {}; expected a tuple",
                    self.describe(args)
                ))
            }
        };
        let arity = |ok: &[usize]| -> VmResult<()> {
            if ok.contains(&args.len()) {
                Ok(())
            } else {
                self.err(format!(
                    "{name} called with {} arguments; expected {ok:?}",
                    args.len()
                ))
            }
        };
        match g {
            Global::OrderedDict => {
                arity(&[0, 1])?;
                let mut pairs = Vec::new();
                if let Some(&init) = args.first() {
                    match self.obj(init) {
                        Some(Obj::Dict(d)) => pairs = d.clone(),
                        Some(Obj::List(items)) | Some(Obj::Tuple(items)) => {
                            for &item in items {
                                match self.obj(item) {
                                    Some(Obj::Tuple(kv)) | Some(Obj::List(kv)) if kv.len() == 2 => {
                                        pairs.push((kv[0], kv[1]))
                                    }
                                    _ => {
                                        return self.err(format!(
                                            "OrderedDict item is {}; expected a (key, value) pair",
                                            self.describe(item)
                                        ))
                                    }
                                }
                            }
                        }
                        _ => {
                            return self.err(format!(
                                "OrderedDict built from {}; expected a dict or pairs",
                                self.describe(init)
                            ))
                        }
                    }
                }
                Ok(self.alloc(Obj::Dict(pairs)))
            }
            Global::RebuildTensor | Global::RebuildTensorV2 | Global::RebuildTensorV3 => {
                let mut dtype = None;
                match g {
                    Global::RebuildTensor => arity(&[4])?,
                    Global::RebuildTensorV2 => arity(&[6, 7])?,
                    _ => {
                        arity(&[7, 8])?;
                        match self.obj(args[6]) {
                            Some(Obj::Global(Global::DType(d), _)) => dtype = Some(*d),
                            _ => {
                                return self.err(format!(
                                    "dtype argument of {name} is {}; expected a torch dtype",
                                    self.describe(args[6])
                                ))
                            }
                        }
                    }
                }
                let storage = match args[0] {
                    Value::Obj(i) if matches!(self.arena.get(i), Some(Obj::Storage { .. })) => i,
                    other => {
                        return self.err(format!(
                            "first argument of {name} is {}; expected a storage",
                            self.describe(other)
                        ))
                    }
                };
                let offset = self.int_arg(args[1], "storage offset")?;
                let size = self.ints_arg(args[2], "size")?;
                let stride = self.ints_arg(args[3], "stride")?;
                if size.len() != stride.len() {
                    return self.err(format!(
                        "tensor size {size:?} and stride {stride:?} differ in rank"
                    ));
                }
                Ok(self.alloc(Obj::Tensor(TensorSpec {
                    storage,
                    dtype,
                    offset,
                    size,
                    stride,
                })))
            }
            Global::RebuildParameter | Global::RebuildParameterWithState => {
                arity(if g == Global::RebuildParameter {
                    &[3]
                } else {
                    &[4]
                })?;
                match self.obj(args[0]) {
                    Some(Obj::Tensor(_)) => Ok(args[0]),
                    _ => self.err(format!(
                        "first argument of {name} is {}; expected a tensor",
                        self.describe(args[0])
                    )),
                }
            }
            Global::StorageClass(_) | Global::UntypedStorage | Global::DType(_) => {
                self.err(format!("refusing to call {name}: only tensors are read"))
            }
        }
    }

    fn set_items(&mut self, dict: Value, pairs: Vec<(Value, Value)>) -> VmResult<()> {
        let what = self.describe(dict);
        match dict {
            Value::Obj(i) => match self.arena.get_mut(i) {
                Some(Obj::Dict(d)) => {
                    d.extend(pairs);
                    Ok(())
                }
                _ => self.err(format!("SETITEM on {what}; expected a dict")),
            },
            _ => self.err(format!("SETITEM on {what}; expected a dict")),
        }
    }

    fn append(&mut self, list: Value, items: Vec<Value>) -> VmResult<()> {
        let what = self.describe(list);
        match list {
            Value::Obj(i) => match self.arena.get_mut(i) {
                Some(Obj::List(l)) => {
                    l.extend(items);
                    Ok(())
                }
                _ => self.err(format!("APPEND on {what}; expected a list")),
            },
            _ => self.err(format!("APPEND on {what}; expected a list")),
        }
    }

    fn run(&mut self) -> VmResult<Value> {
        loop {
            self.at = self.pos;
            if self.pos >= self.data.len() {
                return self.err("pickle ended without STOP (truncated?)");
            }
            let op = self.byte()?;
            match op {
                // PROTO
                0x80 => {
                    let p = self.byte()?;
                    if p > 5 {
                        return self.err(format!("pickle protocol {p}; expected 2 to 5"));
                    }
                }
                // FRAME: a length hint only
                0x95 => {
                    self.take(8)?;
                }
                // STOP
                b'.' => {
                    let v = self.pop()?;
                    return Ok(v);
                }
                // MARK, POP, POP_MARK, DUP
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?;
                    self.push(v);
                }
                // NONE, NEWTRUE, NEWFALSE
                b'N' => self.push(Value::None),
                0x88 => self.push(Value::Bool(true)),
                0x89 => self.push(Value::Bool(false)),
                // BININT, BININT1, BININT2
                b'J' => {
                    let v = i32::from_le_bytes(self.array()?);
                    self.push(Value::Int(v.into()));
                }
                b'K' => {
                    let v = self.byte()?;
                    self.push(Value::Int(v.into()));
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.array()?);
                    self.push(Value::Int(v.into()));
                }
                // LONG1, LONG4: little-endian two's complement
                0x8a | 0x8b => {
                    let n = self.len_field(if op == 0x8a { 1 } else { 4 })?;
                    let bytes = self.take(n)?;
                    let v = if n == 0 {
                        Value::Int(0)
                    } else if n <= 8 {
                        let fill = if bytes[n - 1] & 0x80 != 0 { 0xff } else { 0 };
                        let mut w = [fill; 8];
                        w[..n].copy_from_slice(bytes);
                        Value::Int(i64::from_le_bytes(w))
                    } else {
                        self.alloc(Obj::BigInt)
                    };
                    self.push(v);
                }
                // BINFLOAT: big-endian
                b'G' => {
                    let v = f64::from_be_bytes(self.array()?);
                    self.push(Value::Float(v));
                }
                // SHORT_BINUNICODE, BINUNICODE, BINUNICODE8
                0x8c | b'X' | 0x8d => {
                    let n = self.len_field(match op {
                        0x8c => 1,
                        b'X' => 4,
                        _ => 8,
                    })?;
                    let bytes = self.take(n)?;
                    let Ok(s) = std::str::from_utf8(bytes) else {
                        return self.err("string is not valid UTF-8");
                    };
                    let v = self.alloc(Obj::Str(s.to_string()));
                    self.push(v);
                }
                // SHORT_BINSTRING, BINSTRING (Python 2 str): read as latin-1 text
                b'U' | b'T' => {
                    let n = self.len_field(if op == b'U' { 1 } else { 4 })?;
                    let s = self.take(n)?.iter().map(|&b| char::from(b)).collect();
                    let v = self.alloc(Obj::Str(s));
                    self.push(v);
                }
                // SHORT_BINBYTES, BINBYTES, BINBYTES8, BYTEARRAY8
                b'C' | b'B' | 0x8e | 0x96 => {
                    let n = self.len_field(match op {
                        b'C' => 1,
                        b'B' => 4,
                        _ => 8,
                    })?;
                    self.take(n)?;
                    let v = self.alloc(Obj::Bytes);
                    self.push(v);
                }
                // EMPTY_TUPLE, TUPLE, TUPLE1, TUPLE2, TUPLE3
                b')' => {
                    let v = self.alloc(Obj::Tuple(Vec::new()));
                    self.push(v);
                }
                b't' => {
                    let items = self.pop_mark()?;
                    let v = self.alloc(Obj::Tuple(items));
                    self.push(v);
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    let v = self.alloc(Obj::Tuple(items));
                    self.push(v);
                }
                // EMPTY_LIST, LIST, EMPTY_SET, FROZENSET (sets are read as lists)
                b']' | 0x8f => {
                    let v = self.alloc(Obj::List(Vec::new()));
                    self.push(v);
                }
                b'l' | 0x91 => {
                    let items = self.pop_mark()?;
                    let v = self.alloc(Obj::List(items));
                    self.push(v);
                }
                // APPEND, APPENDS, ADDITEMS
                b'a' => {
                    let item = self.pop()?;
                    let list = self.top()?;
                    self.append(list, vec![item])?;
                }
                b'e' | 0x90 => {
                    let items = self.pop_mark()?;
                    let list = self.top()?;
                    self.append(list, items)?;
                }
                // EMPTY_DICT, DICT
                b'}' => {
                    let v = self.alloc(Obj::Dict(Vec::new()));
                    self.push(v);
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return self.err("DICT with an odd number of items");
                    }
                    let pairs = items.chunks_exact(2).map(|c| (c[0], c[1])).collect();
                    let v = self.alloc(Obj::Dict(pairs));
                    self.push(v);
                }
                // SETITEM, SETITEMS
                b's' => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    let dict = self.top()?;
                    self.set_items(dict, vec![(key, value)])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return self.err("SETITEMS with an odd number of items");
                    }
                    let pairs = items.chunks_exact(2).map(|c| (c[0], c[1])).collect();
                    let dict = self.top()?;
                    self.set_items(dict, pairs)?;
                }
                // BINPUT, LONG_BINPUT, MEMOIZE
                b'q' => {
                    let k = self.byte()?;
                    self.memo_put(k.into())?;
                }
                b'r' => {
                    let k = u32::from_le_bytes(self.array()?);
                    self.memo_put(k.into())?;
                }
                0x94 => {
                    let k = self.memo.len() as u64;
                    self.memo_put(k)?;
                }
                // BINGET, LONG_BINGET
                b'h' => {
                    let k = self.byte()?;
                    self.memo_get(k.into())?;
                }
                b'j' => {
                    let k = u32::from_le_bytes(self.array()?);
                    self.memo_get(k.into())?;
                }
                // GLOBAL, STACK_GLOBAL
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.global(module, name)?;
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (self.str_of(module), self.str_of(name)) {
                        (Some(m), Some(n)) => {
                            let (m, n) = (m.to_string(), n.to_string());
                            self.global(&m, &n)?;
                        }
                        _ => return self.err("STACK_GLOBAL needs two strings"),
                    }
                }
                // REDUCE
                b'R' => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let v = self.call(func, args)?;
                    self.push(v);
                }
                // NEWOBJ, NEWOBJ_EX: only OrderedDict can be instantiated
                0x81 | 0x92 => {
                    if op == 0x92 {
                        self.pop()?; // kwargs
                    }
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let v = match self.obj(cls) {
                        // `OrderedDict.__new__` ignores its arguments; items follow as SETITEMS.
                        Some(Obj::Global(Global::OrderedDict, _)) if self.obj(args).is_some() => {
                            self.alloc(Obj::Dict(Vec::new()))
                        }
                        _ => {
                            return self.err(format!(
                                "NEWOBJ of {}: only OrderedDict can be instantiated",
                                self.describe(cls)
                            ))
                        }
                    };
                    self.push(v);
                }
                // BUILD: the state (a state dict's `_metadata`, ...) is not needed and is
                // dropped; nothing is ever called.
                b'b' => {
                    self.pop()?;
                    self.top()?;
                }
                // BINPERSID
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.persistent_load(pid)?;
                    self.push(v);
                }
                other => {
                    let shown = if other.is_ascii_graphic() {
                        format!(" ({:?})", char::from(other))
                    } else {
                        String::new()
                    };
                    return self.err(format!(
                        "unknown or unsupported pickle opcode 0x{other:02x}{shown}"
                    ));
                }
            }
        }
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

// ----------------------------------------------------------------------------------------------
// collecting tensors by dotted name

struct Collector<'a> {
    arena: &'a [Obj],
    tensors: Vec<(String, usize)>,
    skipped: Vec<String>,
    visits: usize,
    on_path: HashSet<usize>,
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

impl Collector<'_> {
    fn key_name(&self, key: Value) -> String {
        match key {
            Value::None => "None".into(),
            Value::Bool(b) => if b { "True" } else { "False" }.into(),
            Value::Int(i) => i.to_string(),
            Value::Float(f) => f.to_string(),
            Value::Obj(i) => match self.arena.get(i) {
                Some(Obj::Str(s)) => s.clone(),
                _ => format!("<key {i}>"),
            },
        }
    }

    fn walk(&mut self, v: Value, path: &str, depth: usize) -> std::result::Result<(), String> {
        self.visits += 1;
        if self.visits > MAX_VISITS {
            return Err(format!(
                "the saved object has more than {MAX_VISITS} entries (shared many times?)"
            ));
        }
        if depth > MAX_DEPTH {
            return Err(format!(
                "the saved object nests deeper than {MAX_DEPTH} levels at {:?}",
                truncate(path, 200)
            ));
        }
        let leaf_name = || {
            if path.is_empty() {
                "<root>".to_string()
            } else {
                path.to_string()
            }
        };
        let i = match v {
            Value::Obj(i) => i,
            _ => {
                self.skipped.push(leaf_name());
                return Ok(());
            }
        };
        let arena = self.arena;
        let children: Vec<(String, Value)> = match arena.get(i) {
            Some(Obj::Tensor(_)) => {
                let name = if path.is_empty() { "tensor" } else { path };
                self.tensors.push((name.to_string(), i));
                return Ok(());
            }
            Some(Obj::Dict(pairs)) => {
                // Later SETITEMs of one key replace earlier ones, as in Python.
                let mut order: Vec<String> = Vec::new();
                let mut last: HashMap<String, Value> = HashMap::new();
                for &(k, val) in pairs {
                    let name = self.key_name(k);
                    if last.insert(name.clone(), val).is_none() {
                        order.push(name);
                    }
                }
                order
                    .into_iter()
                    .filter_map(|k| last.get(&k).map(|&val| (join(path, &k), val)))
                    .collect()
            }
            Some(Obj::List(items)) | Some(Obj::Tuple(items)) => items
                .iter()
                .enumerate()
                .map(|(j, &val)| (join(path, &j.to_string()), val))
                .collect(),
            _ => {
                self.skipped.push(leaf_name());
                return Ok(());
            }
        };
        if !self.on_path.insert(i) {
            return Err(format!(
                "the saved object contains itself (a cycle) at {:?}",
                truncate(path, 200)
            ));
        }
        for (child_path, child) in children {
            self.walk(child, &child_path, depth + 1)?;
        }
        self.on_path.remove(&i);
        Ok(())
    }
}

// ----------------------------------------------------------------------------------------------
// storages and dense tensors

struct StorageCache<'a> {
    archive: &'a str,
    big_endian: bool,
    /// key -> (dtype, numel, bytes)
    loaded: HashMap<String, (PtDType, usize, Vec<u8>)>,
}

impl StorageCache<'_> {
    fn get<R: Read + Seek>(
        &mut self,
        zip: &mut ZipArchive<R>,
        dtype: PtDType,
        key: &str,
        numel: usize,
        tensor: &str,
    ) -> std::result::Result<&[u8], String> {
        if !self.loaded.contains_key(key) {
            let name = format!("{}/data/{key}", self.archive);
            let nbytes = numel.checked_mul(dtype.size()).ok_or_else(|| {
                format!("tensor {tensor:?}: storage {key} of {numel} elements is too large")
            })?;
            let bytes = read_record(zip, &name, Some(nbytes))
                .map_err(|e| format!("tensor {tensor:?}: {e}"))?
                .ok_or_else(|| {
                    format!("tensor {tensor:?}: storage record {name} is missing from the archive")
                })?;
            self.loaded.insert(key.to_string(), (dtype, numel, bytes));
        }
        match self.loaded.get(key) {
            Some((d, n, bytes)) if *d == dtype && *n == numel => Ok(bytes),
            Some((d, n, _)) => Err(format!(
                "tensor {tensor:?}: storage {key} is used as {numel} {} elements and elsewhere \
                 as {n} {} elements",
                dtype.name(),
                d.name()
            )),
            None => Err(format!(
                "tensor {tensor:?}: storage {key} could not be kept"
            )),
        }
    }
}

/// The dense row-major copy of one (possibly strided) tensor.
fn materialise<R: Read + Seek>(
    zip: &mut ZipArchive<R>,
    storages: &mut StorageCache<'_>,
    arena: &[Obj],
    obj: usize,
    name: &str,
) -> std::result::Result<Tensor, String> {
    let Some(Obj::Tensor(spec)) = arena.get(obj) else {
        return Err(format!("tensor {name:?}: not a tensor"));
    };
    let Some(Obj::Storage {
        dtype: storage_dtype,
        key,
        numel,
    }) = arena.get(spec.storage)
    else {
        return Err(format!("tensor {name:?}: its storage is not a storage"));
    };
    let dtype = spec.dtype.unwrap_or(*storage_dtype);
    let esize = dtype.size();
    let big_endian = storages.big_endian;
    let bytes = storages.get(zip, *storage_dtype, key, *numel, name)?;
    let storage_elems = bytes.len() / esize;

    let layout = || {
        format!(
            "size {:?}, stride {:?}, offset {}",
            spec.size, spec.stride, spec.offset
        )
    };
    let count = spec
        .size
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("tensor {name:?}: {} has too many elements", layout()))?;
    let mut dense: Vec<u8> = Vec::new();
    if count > 0 {
        // The furthest element the view reaches must lie inside the storage.
        let last = spec
            .size
            .iter()
            .zip(&spec.stride)
            .try_fold(spec.offset, |acc, (&d, &s)| {
                (d - 1).checked_mul(s).and_then(|x| acc.checked_add(x))
            });
        match last {
            Some(last) if last < storage_elems => {}
            _ => {
                return Err(format!(
                    "tensor {name:?}: storage {key} is too small: {} reaches past its {} {} \
                     elements",
                    layout(),
                    storage_elems,
                    dtype.name()
                ))
            }
        }
        if count > storage_elems && count > MAX_EXPANDED_ELEMS {
            return Err(format!(
                "tensor {name:?}: {} expands {storage_elems} stored elements to {count}; \
                 refusing to materialise more than {MAX_EXPANDED_ELEMS}",
                layout()
            ));
        }
        let total = count
            .checked_mul(esize)
            .ok_or_else(|| format!("tensor {name:?}: {} is too large", layout()))?;
        dense
            .try_reserve_exact(total)
            .map_err(|e| format!("tensor {name:?}: {total} bytes: {e}"))?;
        gather(bytes, esize, spec, &mut dense);
    }
    let cpu = dtype.decode(&dense, big_endian);
    Tensor::from_cpu(cpu, spec.size.clone(), &Device::Cpu)
        .map_err(|e| format!("tensor {name:?}: {e}"))
}

/// Appends the view's elements in row-major order. The caller has checked that every index the
/// view reaches lies inside `bytes`.
fn gather(bytes: &[u8], esize: usize, spec: &TensorSpec, out: &mut Vec<u8>) {
    let rank = spec.size.len();
    let contiguous = {
        let mut expect = 1usize;
        let mut ok = true;
        for (&d, &s) in spec.size.iter().zip(&spec.stride).rev() {
            if d != 1 && s != expect {
                ok = false;
                break;
            }
            expect = expect.saturating_mul(d);
        }
        ok
    };
    let count: usize = spec.size.iter().product();
    if contiguous {
        let start = spec.offset * esize;
        if let Some(src) = bytes.get(start..start + count * esize) {
            out.extend_from_slice(src);
        }
        return;
    }
    // Odometer over all indices, innermost axis in a tight loop. An axis of size 1 may carry any
    // stride, so the running offset is kept with wrapping arithmetic: it is exact whenever it is
    // used.
    let (inner_len, inner_stride) = (spec.size[rank - 1], spec.stride[rank - 1]);
    let mut index = vec![0usize; rank.saturating_sub(1)];
    let mut base = spec.offset;
    for _ in 0..count / inner_len {
        for j in 0..inner_len {
            let at = base
                .wrapping_add(j.wrapping_mul(inner_stride))
                .wrapping_mul(esize);
            if let Some(src) = at.checked_add(esize).and_then(|end| bytes.get(at..end)) {
                out.extend_from_slice(src);
            }
        }
        for axis in (0..rank - 1).rev() {
            index[axis] += 1;
            base = base.wrapping_add(spec.stride[axis]);
            if index[axis] < spec.size[axis] {
                break;
            }
            base = base.wrapping_sub(spec.stride[axis].wrapping_mul(spec.size[axis]));
            index[axis] = 0;
        }
    }
}
