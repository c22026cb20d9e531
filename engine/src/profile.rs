//! An op-level profiler. With `MVAR_PROFILE=1`, every op dispatch adds its wall time under its
//! name, and [`report`] lists the totals; ops dispatched while the tape runs a backward pass are
//! listed apart, as `<op> (backward)`, so that a forward and its gradient can be told apart.
//! `MVAR_PROFILE=shapes` also keys every entry by its input shapes (which of a model's convs or
//! products costs what). On a GPU the times are launch times unless the device is synchronised:
//! `MVAR_PROFILE=sync` (or `sync,shapes`) does that after every op, which measures kernels at the
//! cost of speed.
//!
//! `MVAR_PROFILE=trace=FILE` (alone or in the list, e.g. `sync,trace=run.json`; `trace` alone
//! writes `mvar-trace.json`) also writes a timeline: one event per op dispatch, with its input
//! shapes, and the spans that models and drivers open ([`span`]: a training step, its forward
//! and backward, a sampled scale), in the Chrome trace-event format that Perfetto
//! (ui.perfetto.dev) and chrome://tracing open. Events are streamed to the file as they end, so a
//! long run's timeline does not grow in memory, and a run that dies keeps what was written: the
//! format allows the array's closing bracket to be missing, and [`finish`] writes it.
//!
//! On a GPU the timeline has a second track per device with the ops' GPU times: each op's
//! kernels are bracketed by two stream marks (timed CUDA events), and the marks' times are read
//! in batches (every 1024 ops or second, and at the end), with one device synchronisation per
//! batch, shown as a span. So, without `sync`, the host track shows what launching costs and
//! the GPU track what the kernels take and where the GPU waits, as Nsight Systems would.
//!
//! Memory shows as counter tracks, sampled as each op ends and written when it moved by 1 MiB
//! or more: the host heap's live bytes (when the binary registers a probe, [`set_host_memory`];
//! `mvar` counts its allocations) and, per GPU, the caching allocator's bytes in use and cached.

use std::cell::Cell;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use mvar_cuda::{CudaDevice, StreamMark};

/// What `MVAR_PROFILE` asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Mode {
    pub enabled: bool,
    pub synchronous: bool,
    pub by_shape: bool,
    /// Where the timeline goes (`trace=FILE`).
    pub trace: Option<PathBuf>,
}

/// The timeline's file when `trace` names none.
pub const DEFAULT_TRACE_FILE: &str = "mvar-trace.json";

impl Mode {
    /// Parses the variable's value: empty or `0` is off; a comma-separated list of `sync`,
    /// `shapes` and `trace[=FILE]` turns those on; any other value (`1`) is the plain profile.
    pub fn parse(value: &str) -> Mode {
        let value = value.trim();
        if value.is_empty() || value == "0" {
            return Mode::default();
        }
        let flags: Vec<&str> = value.split(',').map(str::trim).collect();
        let trace = flags.iter().find_map(|f| match f.strip_prefix("trace") {
            Some("") => Some(PathBuf::from(DEFAULT_TRACE_FILE)),
            Some(rest) => rest
                .strip_prefix('=')
                .map(|p| PathBuf::from(if p.is_empty() { DEFAULT_TRACE_FILE } else { p })),
            None => None,
        });
        Mode {
            enabled: true,
            synchronous: flags.contains(&"sync"),
            by_shape: flags.contains(&"shapes"),
            trace,
        }
    }
}

fn mode() -> &'static Mode {
    static MODE: OnceLock<Mode> = OnceLock::new();
    MODE.get_or_init(|| Mode::parse(&std::env::var("MVAR_PROFILE").unwrap_or_default()))
}

/// True when profiling is on.
pub fn enabled() -> bool {
    mode().enabled
}

/// True when every op should synchronise its device before its time is taken.
pub fn synchronous() -> bool {
    mode().synchronous
}

/// True when a timeline is written: `trace` asked for one and its file could be created (the
/// first call creates it). Without one, no shapes are formatted and no GPU marks recorded.
pub fn tracing() -> bool {
    match timeline_state() {
        Ok(open) => *open,
        Err(msg) => {
            if !TIMELINE_FAILURE_TOLD.swap(true, Ordering::Relaxed) {
                eprintln!("{msg}; no timeline is written");
            }
            false
        }
    }
}

/// Creates the timeline's file now if `MVAR_PROFILE` asks for one; an error names the file that
/// cannot be written. A binary calls this first, so that a run which asked for a timeline stops
/// at once rather than finding none at its end.
pub fn open_timeline() -> crate::Result<()> {
    match timeline_state() {
        Ok(_) => Ok(()),
        Err(msg) => {
            TIMELINE_FAILURE_TOLD.store(true, Ordering::Relaxed);
            Err(crate::Error::invalid("MVAR_PROFILE", msg.clone()))
        }
    }
}

/// Whether the timeline was told to be missing (once, by [`tracing`] or [`open_timeline`]).
static TIMELINE_FAILURE_TOLD: AtomicBool = AtomicBool::new(false);

/// Ok(whether a timeline is written), or why the one asked for cannot be.
fn timeline_state() -> &'static std::result::Result<bool, String> {
    static STATE: OnceLock<std::result::Result<bool, String>> = OnceLock::new();
    STATE.get_or_init(|| match &mode().trace {
        None => Ok(false),
        Some(path) => {
            let open = trace().lock().unwrap_or_else(|e| e.into_inner()).is_some();
            if open {
                Ok(true)
            } else {
                Err(format!(
                    "cannot write the trace to {}: {}",
                    path.display(),
                    TRACE_OPEN_ERROR
                        .get()
                        .map_or("unknown error", String::as_str)
                ))
            }
        }
    })
}

/// Why the timeline's file could not be created.
static TRACE_OPEN_ERROR: OnceLock<String> = OnceLock::new();

thread_local! {
    static IN_BACKWARD: Cell<bool> = const { Cell::new(false) };
    /// The thread's id in the timeline (0: not yet given one).
    static TRACE_TID: Cell<u32> = const { Cell::new(0) };
}

/// Marks the current thread as running a backward pass until the guard drops.
pub struct BackwardPhase {
    was: bool,
}

impl Drop for BackwardPhase {
    fn drop(&mut self) {
        IN_BACKWARD.with(|b| b.set(self.was));
    }
}

/// Called by the tape around the backward pass: ops dispatched meanwhile are profiled apart.
pub fn backward_phase() -> BackwardPhase {
    BackwardPhase {
        was: IN_BACKWARD.with(|b| b.replace(true)),
    }
}

type Table = HashMap<String, (u64, f64)>;

fn table() -> &'static Mutex<Table> {
    static T: OnceLock<Mutex<Table>> = OnceLock::new();
    T.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The table key of one dispatch.
fn key(op: &str, backward: bool, shapes: Option<&str>) -> String {
    let mut k = op.to_string();
    if backward {
        k += " (backward)";
    }
    if let Some(s) = shapes {
        k += " ";
        k += s;
    }
    k
}

/// Writes trace events in the Chrome trace-event JSON array format: `[`, then one event per
/// line, separated by commas; [`TraceWriter::finish`] closes the array.
pub struct TraceWriter<W: Write> {
    out: W,
    events: u64,
}

impl<W: Write> TraceWriter<W> {
    /// Starts the array, with the process's name as its first (metadata) event.
    pub fn new(mut out: W, process: &str) -> std::io::Result<Self> {
        out.write_all(b"[\n")?;
        let mut w = TraceWriter { out, events: 0 };
        w.event(&format!(
            r#"{{"name":"process_name","ph":"M","pid":1,"tid":0,"args":{{"name":{}}}}}"#,
            json_string(process)
        ))?;
        Ok(w)
    }

    fn event(&mut self, json: &str) -> std::io::Result<()> {
        if self.events > 0 {
            self.out.write_all(b",\n")?;
        }
        self.out.write_all(json.as_bytes())?;
        self.events += 1;
        Ok(())
    }

    /// Names thread `tid` in the viewer.
    pub fn thread_name(&mut self, tid: u32, name: &str) -> std::io::Result<()> {
        self.event(&format!(
            r#"{{"name":"thread_name","ph":"M","pid":1,"tid":{tid},"args":{{"name":{}}}}}"#,
            json_string(name)
        ))
    }

    /// One complete event: `name` in category `cat` on thread `tid`, starting `start_us`
    /// microseconds after the trace's epoch and lasting `dur_us`; `shapes` goes to its args.
    pub fn complete(
        &mut self,
        name: &str,
        cat: &str,
        tid: u32,
        start_us: f64,
        dur_us: f64,
        shapes: Option<&str>,
    ) -> std::io::Result<()> {
        let args = shapes
            .map(|s| format!(r#","args":{{"shapes":{}}}"#, json_string(s)))
            .unwrap_or_default();
        self.event(&format!(
            r#"{{"name":{},"cat":{},"ph":"X","ts":{start_us:.3},"dur":{dur_us:.3},"pid":1,"tid":{tid}{args}}}"#,
            json_string(name),
            json_string(cat)
        ))
    }

    /// A counter sample: `series` (name, value) of counter `name` at `ts_us`.
    pub fn counter(
        &mut self,
        name: &str,
        ts_us: f64,
        series: &[(&str, f64)],
    ) -> std::io::Result<()> {
        let args: Vec<String> = series
            .iter()
            .map(|(k, v)| format!("{}:{v:.3}", json_string(k)))
            .collect();
        self.event(&format!(
            r#"{{"name":{},"ph":"C","ts":{ts_us:.3},"pid":1,"tid":0,"args":{{{}}}}}"#,
            json_string(name),
            args.join(",")
        ))
    }

    /// Events written so far, metadata included.
    pub fn events(&self) -> u64 {
        self.events
    }

    /// Closes the array and flushes.
    pub fn finish(&mut self) -> std::io::Result<()> {
        self.out.write_all(b"\n]\n")?;
        self.out.flush()
    }
}

/// `s` as a JSON string literal.
fn json_string(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// The open timeline of this process, if `trace` asked for one and its file could be created.
struct Trace {
    writer: TraceWriter<BufWriter<File>>,
    path: PathBuf,
    finished: bool,
}

/// The instant that the timeline's times count from (the first profiled event's start).
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn trace() -> &'static Mutex<Option<Trace>> {
    static TRACE: OnceLock<Mutex<Option<Trace>>> = OnceLock::new();
    TRACE.get_or_init(|| {
        let opened = mode().trace.as_deref().and_then(|path| {
            // "mvar train", not the binary's whole path.
            let mut args = std::env::args();
            let program = args.next().unwrap_or_default();
            let program = Path::new(&program)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or(program);
            let process = std::iter::once(program)
                .chain(args.next())
                .collect::<Vec<_>>()
                .join(" ");
            match File::create(path).and_then(|f| TraceWriter::new(BufWriter::new(f), &process)) {
                Ok(writer) => Some(Trace {
                    writer,
                    path: path.to_path_buf(),
                    finished: false,
                }),
                Err(e) => {
                    let _ = TRACE_OPEN_ERROR.set(e.to_string());
                    None
                }
            }
        });
        Mutex::new(opened)
    })
}

/// Writes one ended event to the timeline (a no-op when there is none, or once it is finished)
/// on the calling thread's track.
fn trace_event(name: &str, cat: &str, start: Instant, end: Instant, shapes: Option<&str>) {
    let (start_us, end_us) = (micros(start), micros(end));
    write_event(name, cat, None, start_us, end_us - start_us, shapes);
}

/// Microseconds from the timeline's epoch to `i`.
fn micros(i: Instant) -> f64 {
    i.saturating_duration_since(epoch()).as_secs_f64() * 1e6
}

/// A timeline track that is not a host thread: a GPU's (`cuda:N (GPU time)`).
#[derive(Clone, Copy)]
struct Track {
    tid: u32,
    ordinal: usize,
}

/// Writes one event on `track`, or on the calling thread's track (named on first use).
fn write_event(
    name: &str,
    cat: &str,
    track: Option<Track>,
    start_us: f64,
    dur_us: f64,
    shapes: Option<&str>,
) {
    let mut guard = trace().lock().unwrap_or_else(|e| e.into_inner());
    let Some(t) = guard.as_mut().filter(|t| !t.finished) else {
        return;
    };
    let tid = match track {
        Some(track) => track.tid,
        None => TRACE_TID.with(|c| {
            if c.get() == 0 {
                static NEXT: AtomicU32 = AtomicU32::new(1);
                c.set(NEXT.fetch_add(1, Ordering::Relaxed));
                let id = c.get();
                let name = std::thread::current()
                    .name()
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("thread {id}"));
                let _ = t.writer.thread_name(id, &name);
            }
            c.get()
        }),
    };
    // An I/O error mid-run (a full disk) ends the timeline, not the run.
    if let Err(err) = t.writer.complete(name, cat, tid, start_us, dur_us, shapes) {
        eprintln!(
            "MVAR_PROFILE: writing the trace to {} failed: {err}; the timeline stops here",
            t.path.display()
        );
        t.finished = true;
    }
}

/// Names a GPU track (once per device).
fn name_track(track: Track) {
    let mut guard = trace().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(t) = guard.as_mut().filter(|t| !t.finished) {
        let _ = t
            .writer
            .thread_name(track.tid, &format!("cuda:{} (GPU time)", track.ordinal));
    }
}

/// Where the host heap's live bytes come from ([`set_host_memory`]).
static HOST_MEMORY: OnceLock<fn() -> usize> = OnceLock::new();

/// Registers the probe of the host heap's live bytes for the timeline's memory counter (the
/// engine cannot count allocations itself: that takes the binary's global allocator).
pub fn set_host_memory(probe: fn() -> usize) {
    let _ = HOST_MEMORY.set(probe);
}

/// A counter sample is written when its value moved by this much since the last one written.
const COUNTER_STEP_BYTES: usize = 1 << 20;

/// Writes a counter sample of `name` at `ts_us` if `bytes` moved by [`COUNTER_STEP_BYTES`] from
/// the last one written (`last`: that value, `usize::MAX` before the first).
fn memory_counter(
    name: &str,
    last: &std::sync::atomic::AtomicUsize,
    ts_us: f64,
    bytes: usize,
    extra: Option<(&str, usize)>,
) {
    let before = last.load(Ordering::Relaxed);
    if before != usize::MAX && before.abs_diff(bytes) < COUNTER_STEP_BYTES {
        return;
    }
    last.store(bytes, Ordering::Relaxed);
    let mib = |b: usize| b as f64 / (1u64 << 20) as f64;
    let mut series = vec![("MiB", mib(bytes))];
    if let Some((k, b)) = extra {
        series.push((k, mib(b)));
    }
    let mut guard = trace().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(t) = guard.as_mut().filter(|t| !t.finished) {
        let _ = t.writer.counter(name, ts_us, &series);
    }
}

/// The memory counters after an op that ended at `end` (on `dev` for a GPU op).
fn memory_counters(end: Instant, dev: Option<&CudaDevice>) {
    use std::sync::atomic::AtomicUsize;
    static HOST_LAST: AtomicUsize = AtomicUsize::new(usize::MAX);
    static GPU_LAST: AtomicUsize = AtomicUsize::new(usize::MAX);
    let ts = micros(end);
    if let Some(probe) = HOST_MEMORY.get() {
        memory_counter("host heap (live)", &HOST_LAST, ts, probe(), None);
    }
    if let Some(dev) = dev {
        let stats = dev.memory_stats();
        // One device's counter: the engine drives one GPU at a time.
        memory_counter(
            &format!("cuda:{} memory (allocator in use; cached)", dev.ordinal()),
            &GPU_LAST,
            ts,
            stats.in_use_bytes,
            Some(("cached MiB", stats.cached_bytes)),
        );
    }
}

/// One op's kernels on a GPU, between two stream marks, waiting for their times.
struct GpuOp {
    name: String,
    cat: &'static str,
    shapes: Option<String>,
    start: StreamMark,
    end: StreamMark,
}

/// The ops of one device whose GPU times are not read yet.
struct GpuPending {
    dev: CudaDevice,
    track: Track,
    ops: Vec<GpuOp>,
    /// When the oldest of `ops` was queued.
    oldest: Option<Instant>,
    /// Marks whose times were read, to record again instead of creating events.
    spare: Vec<StreamMark>,
}

/// Ops per batch of GPU times, and the longest a pending op waits: each batch synchronises the
/// device once, and the GPU clock's f32 milliseconds stay sub-microsecond over a short batch.
const GPU_BATCH_OPS: usize = 1024;
const GPU_BATCH_AGE: Duration = Duration::from_secs(1);

fn gpu_pending() -> &'static Mutex<Vec<GpuPending>> {
    static P: OnceLock<Mutex<Vec<GpuPending>>> = OnceLock::new();
    P.get_or_init(|| Mutex::new(Vec::new()))
}

/// Set when a GPU timing call failed: the GPU track stops, the host track and the run go on.
static GPU_TRACK_OFF: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn gpu_track_failed(what: &str, e: impl std::fmt::Display) {
    if !GPU_TRACK_OFF.swap(true, Ordering::Relaxed) {
        eprintln!("MVAR_PROFILE: {what} failed: {e}; the timeline's GPU track stops here");
    }
}

/// The pending list of `dev`, made on first use.
fn pending_for<'a>(all: &'a mut Vec<GpuPending>, dev: &CudaDevice) -> &'a mut GpuPending {
    let ordinal = dev.ordinal();
    let i = match all.iter().position(|p| p.dev.ordinal() == ordinal) {
        Some(i) => i,
        None => {
            let track = Track {
                tid: 1000 + ordinal as u32,
                ordinal,
            };
            name_track(track);
            all.push(GpuPending {
                dev: dev.clone(),
                track,
                ops: Vec::new(),
                oldest: None,
                spare: Vec::new(),
            });
            all.len() - 1
        }
    };
    &mut all[i]
}

/// Marks `dev`'s stream, reusing a spare mark of that device.
fn mark(dev: &CudaDevice) -> Option<StreamMark> {
    if GPU_TRACK_OFF.load(Ordering::Relaxed) {
        return None;
    }
    let spare = {
        let mut all = gpu_pending().lock().unwrap_or_else(|e| e.into_inner());
        pending_for(&mut all, dev).spare.pop()
    };
    dev.mark(spare)
        .map_err(|e| gpu_track_failed("marking the GPU stream", e))
        .ok()
}

/// Reads the GPU times of `p`'s ops and writes them to its track: the device is synchronised,
/// an anchor mark recorded and reached, and each op placed at the anchor's host time less the
/// GPU time from its start to the anchor.
fn flush_gpu(p: &mut GpuPending) {
    if p.ops.is_empty() {
        return;
    }
    let _span = span(|| format!("timeline: reading {} GPU times (device sync)", p.ops.len()));
    let anchored = p.dev.synchronize().and_then(|()| {
        let anchor = p.dev.mark(p.spare.pop())?;
        p.dev.synchronize()?;
        Ok((anchor, micros(Instant::now())))
    });
    let (anchor, anchor_us) = match anchored {
        Ok(a) => a,
        Err(e) => {
            gpu_track_failed("synchronising the GPU for its times", e);
            p.ops.clear();
            return;
        }
    };
    for op in std::mem::take(&mut p.ops) {
        let times = op
            .start
            .ms_until(&anchor)
            .and_then(|before| Ok((before, op.start.ms_until(&op.end)?)));
        match times {
            Ok((before_ms, dur_ms)) => write_event(
                &op.name,
                op.cat,
                Some(p.track),
                anchor_us - before_ms * 1e3,
                dur_ms * 1e3,
                op.shapes.as_deref(),
            ),
            Err(e) => {
                gpu_track_failed("reading GPU times", e);
                break;
            }
        }
        p.spare.extend([op.start, op.end]);
    }
    p.spare.push(anchor);
    p.oldest = None;
}

/// Queues an op's GPU marks; reads a batch when it is full or old.
fn push_gpu_op(dev: &CudaDevice, op: GpuOp) {
    let mut all = gpu_pending().lock().unwrap_or_else(|e| e.into_inner());
    let p = pending_for(&mut all, dev);
    p.ops.push(op);
    let oldest = *p.oldest.get_or_insert_with(Instant::now);
    if p.ops.len() >= GPU_BATCH_OPS || oldest.elapsed() >= GPU_BATCH_AGE {
        flush_gpu(p);
    }
}

/// Closes the timeline's array and flushes it; returns a line saying where it is (None without
/// a timeline). Events that end later are not written.
pub fn finish() -> Option<String> {
    let mut guard = mode()
        .trace
        .as_ref()
        .map(|_| trace().lock().unwrap_or_else(|e| e.into_inner()))?;
    if guard.as_ref().is_some_and(|t| !t.finished) {
        // The GPU tracks' last batches first (they write through the same lock).
        drop(guard);
        for p in gpu_pending()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter_mut()
        {
            flush_gpu(p);
        }
        guard = trace().lock().unwrap_or_else(|e| e.into_inner());
    }
    let t = guard.as_mut()?;
    if t.finished {
        return None;
    }
    t.finished = true;
    Some(match t.writer.finish() {
        Ok(()) => format!(
            "trace (MVAR_PROFILE): {} events in {} (open it in ui.perfetto.dev or chrome://tracing)",
            t.writer.events(),
            t.path.display()
        ),
        Err(e) => format!(
            "trace (MVAR_PROFILE): closing {} failed: {e}",
            t.path.display()
        ),
    })
}

/// What a [`Scope`] records when it drops.
struct Record {
    name: String,
    cat: &'static str,
    /// The profile table's key (op dispatches only; spans are on the timeline only).
    table_key: Option<String>,
    shapes: Option<String>,
    start: Instant,
    /// The device and the stream mark before the op's kernels ([`Scope::on_gpu`]).
    gpu: Option<(CudaDevice, StreamMark)>,
}

/// Records the time from its creation to its drop: an op dispatch in the profile table and on
/// the timeline, a span on the timeline (a no-op when profiling is off).
pub struct Scope {
    record: Option<Record>,
}

impl Drop for Scope {
    fn drop(&mut self) {
        let Some(r) = self.record.take() else {
            return;
        };
        let end = Instant::now();
        let is_op = r.table_key.is_some();
        // The closing mark goes on the stream first, before this thread spends time writing.
        let gpu = r
            .gpu
            .and_then(|(dev, start)| mark(&dev).map(|end| (dev, start, end)));
        if let Some(k) = r.table_key {
            let secs = end.duration_since(r.start).as_secs_f64();
            let mut t = table().lock().unwrap_or_else(|e| e.into_inner());
            let e = t.entry(k).or_insert((0, 0.0));
            e.0 += 1;
            e.1 += secs;
        }
        if tracing() {
            trace_event(&r.name, r.cat, r.start, end, r.shapes.as_deref());
            if is_op {
                memory_counters(end, gpu.as_ref().map(|(dev, _, _)| dev));
            }
        }
        if let Some((dev, start, end)) = gpu {
            let cat = if r.cat == "op" { "gpu" } else { "gpu,backward" };
            push_gpu_op(
                &dev,
                GpuOp {
                    name: r.name,
                    cat,
                    shapes: r.shapes,
                    start,
                    end,
                },
            );
        }
    }
}

impl Scope {
    /// For an op about to queue work on `dev`: with a timeline, marks the stream so that the
    /// op's kernels get their GPU time on the device's track (call it before the launches; the
    /// closing mark is recorded when the scope drops).
    pub fn on_gpu(&mut self, dev: &CudaDevice) {
        if !tracing() {
            return;
        }
        if let Some(r) = self.record.as_mut().filter(|r| r.table_key.is_some()) {
            r.gpu = mark(dev).map(|m| (dev.clone(), m));
        }
    }
}

/// Times one dispatch of `op`; `shapes` (called only under `MVAR_PROFILE=shapes` or with a
/// timeline) describes its inputs.
pub fn scope(op: &'static str, shapes: impl FnOnce() -> String) -> Scope {
    let m = mode();
    if !m.enabled {
        return Scope { record: None };
    }
    let backward = IN_BACKWARD.with(Cell::get);
    let shapes = (m.by_shape || tracing()).then(shapes);
    let table_key = key(op, backward, shapes.as_deref().filter(|_| m.by_shape));
    let (name, cat) = if backward {
        (format!("{op} (backward)"), "op,backward")
    } else {
        (op.to_string(), "op")
    };
    epoch();
    Scope {
        record: Some(Record {
            name,
            cat,
            table_key: Some(table_key),
            shapes,
            start: Instant::now(),
            gpu: None,
        }),
    }
}

/// A span of the timeline around what a model or driver does (a training step, its forward, a
/// sampled scale): ops dispatched inside it nest under it in the viewer. Only written with a
/// timeline (`MVAR_PROFILE=trace`); `name` is called only then.
pub fn span(name: impl FnOnce() -> String) -> Scope {
    if !tracing() {
        return Scope { record: None };
    }
    epoch();
    Scope {
        record: Some(Record {
            name: name(),
            cat: "span",
            table_key: None,
            shapes: None,
            start: Instant::now(),
            gpu: None,
        }),
    }
}

/// (entry, calls, seconds), most expensive first.
pub fn report() -> Vec<(String, u64, f64)> {
    let t = table().lock().unwrap_or_else(|e| e.into_inner());
    let mut v: Vec<_> = t.iter().map(|(k, (n, s))| (k.clone(), *n, *s)).collect();
    v.sort_by(|a, b| b.2.total_cmp(&a.2).then_with(|| a.0.cmp(&b.0)));
    v
}

/// The report as text (empty when profiling is off): the 25 most expensive entries, or 40 when
/// they are keyed by shape; with a timeline, it is closed ([`finish`]) and named last.
pub fn report_text() -> String {
    let m = mode();
    if !m.enabled {
        return String::new();
    }
    let rows = report();
    let total: f64 = rows.iter().map(|r| r.2).sum();
    let shown = if m.by_shape { 40 } else { 25 };
    let width = rows
        .iter()
        .take(shown)
        .map(|r| r.0.len())
        .max()
        .unwrap_or(0)
        .max(22);
    let mut s = format!("op profile (MVAR_PROFILE): {total:.2}s in ops\n");
    for (op, n, secs) in rows.iter().take(shown) {
        s += &format!(
            "  {op:<width$} {n:>9} calls {secs:>9.3}s {:>5.1}%\n",
            100.0 * secs / total.max(1e-12)
        );
    }
    if rows.len() > shown {
        let rest: f64 = rows[shown..].iter().map(|r| r.2).sum();
        s += &format!("  ({} more entries, {rest:.3}s)\n", rows.len() - shown);
    }
    if let Some(line) = finish() {
        s += &line;
        s += "\n";
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_variable_selects_the_mode() {
        assert_eq!(Mode::parse(""), Mode::default());
        assert_eq!(Mode::parse("0"), Mode::default());
        let plain = Mode {
            enabled: true,
            ..Mode::default()
        };
        assert_eq!(Mode::parse("1"), plain);
        assert_eq!(
            Mode::parse("sync"),
            Mode {
                synchronous: true,
                ..plain.clone()
            }
        );
        assert_eq!(
            Mode::parse("shapes, sync"),
            Mode {
                synchronous: true,
                by_shape: true,
                ..plain.clone()
            }
        );
        let traced = |p: &str| Mode {
            trace: Some(PathBuf::from(p)),
            ..plain.clone()
        };
        assert_eq!(Mode::parse("trace"), traced(DEFAULT_TRACE_FILE));
        assert_eq!(Mode::parse("trace="), traced(DEFAULT_TRACE_FILE));
        assert_eq!(Mode::parse("trace=/tmp/a b.json"), traced("/tmp/a b.json"));
        assert_eq!(
            Mode::parse("sync,trace=run.json"),
            Mode {
                synchronous: true,
                ..traced("run.json")
            }
        );
        // A word that only starts like the flag is not it.
        assert_eq!(Mode::parse("tracer"), plain);
    }

    #[test]
    fn the_timeline_is_a_trace_event_array_even_when_cut_short() {
        let mut buf = Vec::new();
        {
            let mut w = TraceWriter::new(&mut buf, "mvar train").unwrap();
            w.thread_name(1, "main").unwrap();
            w.complete("step 1", "span", 1, 0.0, 120.5, None).unwrap();
            w.complete("matmul", "op", 1, 10.25, 30.0, Some("[2,3] [3,4]"))
                .unwrap();
            w.complete("odd \"name\"\\\n", "op,backward", 2, 50.0, 1.0, None)
                .unwrap();
            assert_eq!(w.events(), 5);
        }
        // Cut short (a run that died): the array lacks its bracket, which viewers add.
        let cut = String::from_utf8(buf.clone()).unwrap() + "]";
        let events: Vec<serde_json::Value> = serde_json::from_str(&cut).unwrap();
        assert_eq!(events.len(), 5);
        TraceWriter {
            out: &mut buf,
            events: 5,
        }
        .finish()
        .unwrap();
        let events: Vec<serde_json::Value> =
            serde_json::from_slice(&buf).expect("a finished trace is one JSON array");
        assert_eq!(events[0]["ph"], "M");
        assert_eq!(events[0]["args"]["name"], "mvar train");
        assert_eq!(events[1]["args"]["name"], "main");
        let m = &events[3];
        assert_eq!(
            (m["name"].as_str(), m["cat"].as_str(), m["ph"].as_str()),
            (Some("matmul"), Some("op"), Some("X"))
        );
        assert_eq!(
            (m["ts"].as_f64(), m["dur"].as_f64()),
            (Some(10.25), Some(30.0))
        );
        assert_eq!(m["args"]["shapes"], "[2,3] [3,4]");
        assert_eq!(events[4]["name"], "odd \"name\"\\\n");
        assert_eq!(events[4]["tid"], 2);
    }

    #[test]
    fn backward_dispatches_get_their_own_key() {
        assert_eq!(key("conv2d", false, None), "conv2d");
        assert_eq!(
            key("conv2d", true, Some("[1,2] [3]")),
            "conv2d (backward) [1,2] [3]"
        );
        let inside = {
            let _phase = backward_phase();
            let nested = {
                let _inner = backward_phase();
                IN_BACKWARD.with(Cell::get)
            };
            // Leaving a nested phase keeps the outer one.
            nested && IN_BACKWARD.with(Cell::get)
        };
        assert!(inside);
        assert!(!IN_BACKWARD.with(Cell::get));
    }
}
