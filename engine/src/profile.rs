//! An op-level profiler. With `MVAR_PROFILE=1`, every op dispatch adds its wall time under its
//! name, and [`report`] lists the totals; ops dispatched while the tape runs a backward pass are
//! listed apart, as `<op> (backward)`, so that a forward and its gradient can be told apart.
//! `MVAR_PROFILE=shapes` also keys every entry by its input shapes (which of a model's convs or
//! products costs what). On a GPU the times are launch times unless the device is synchronised:
//! `MVAR_PROFILE=sync` (or `sync,shapes`) does that after every op, which measures kernels at the
//! cost of speed.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

/// What `MVAR_PROFILE` asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mode {
    pub enabled: bool,
    pub synchronous: bool,
    pub by_shape: bool,
}

impl Mode {
    /// Parses the variable's value: empty or `0` is off; a comma-separated list of `sync` and
    /// `shapes` turns those on; any other value (`1`) is the plain profile.
    pub fn parse(value: &str) -> Mode {
        let value = value.trim();
        if value.is_empty() || value == "0" {
            return Mode::default();
        }
        let flags: Vec<&str> = value.split(',').map(str::trim).collect();
        Mode {
            enabled: true,
            synchronous: flags.contains(&"sync"),
            by_shape: flags.contains(&"shapes"),
        }
    }
}

fn mode() -> Mode {
    static MODE: OnceLock<Mode> = OnceLock::new();
    *MODE.get_or_init(|| Mode::parse(&std::env::var("MVAR_PROFILE").unwrap_or_default()))
}

/// True when profiling is on.
pub fn enabled() -> bool {
    mode().enabled
}

/// True when every op should synchronise its device before its time is taken.
pub fn synchronous() -> bool {
    mode().synchronous
}

thread_local! {
    static IN_BACKWARD: Cell<bool> = const { Cell::new(false) };
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
fn key(op: &str, backward: bool, shapes: Option<String>) -> String {
    let mut k = op.to_string();
    if backward {
        k += " (backward)";
    }
    if let Some(s) = shapes {
        k += " ";
        k += &s;
    }
    k
}

/// Records the time from its creation to its drop under its key (a no-op when profiling is off).
pub struct Scope {
    key: Option<(String, Instant)>,
}

impl Drop for Scope {
    fn drop(&mut self) {
        if let Some((k, s)) = self.key.take() {
            let secs = s.elapsed().as_secs_f64();
            let mut t = table().lock().unwrap_or_else(|e| e.into_inner());
            let e = t.entry(k).or_insert((0, 0.0));
            e.0 += 1;
            e.1 += secs;
        }
    }
}

/// Times one dispatch of `op`; `shapes` (called only under `MVAR_PROFILE=shapes`) describes
/// its inputs.
pub fn scope(op: &'static str, shapes: impl FnOnce() -> String) -> Scope {
    let m = mode();
    if !m.enabled {
        return Scope { key: None };
    }
    let backward = IN_BACKWARD.with(Cell::get);
    let shapes = m.by_shape.then(shapes);
    Scope {
        key: Some((key(op, backward, shapes), Instant::now())),
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
/// they are keyed by shape.
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
                ..plain
            }
        );
        assert_eq!(
            Mode::parse("shapes, sync"),
            Mode {
                synchronous: true,
                by_shape: true,
                ..plain
            }
        );
    }

    #[test]
    fn backward_dispatches_get_their_own_key() {
        assert_eq!(key("conv2d", false, None), "conv2d");
        assert_eq!(
            key("conv2d", true, Some("[1,2] [3]".into())),
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
