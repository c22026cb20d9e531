//! An op-level profiler: with `MVAR_PROFILE=1`, every op dispatch adds its wall time under its
//! name (forward and backward alike, since a backward dispatches named ops too), and
//! [`report`] lists the totals. On a GPU the times are launch times unless the device is
//! synchronised (`MVAR_PROFILE=sync` does that after every op, which measures kernels at the cost
//! of speed).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

fn mode() -> u8 {
    static MODE: OnceLock<u8> = OnceLock::new();
    *MODE.get_or_init(|| match std::env::var("MVAR_PROFILE").as_deref() {
        Ok("sync") => 2,
        Ok(v) if !v.is_empty() && v != "0" => 1,
        _ => 0,
    })
}

/// True when profiling is on.
pub fn enabled() -> bool {
    mode() > 0
}

/// True when every op should synchronise its device before its time is taken.
pub fn synchronous() -> bool {
    mode() == 2
}

fn table() -> &'static Mutex<HashMap<&'static str, (u64, f64)>> {
    static T: OnceLock<Mutex<HashMap<&'static str, (u64, f64)>>> = OnceLock::new();
    T.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Records the time from its creation to its drop under `op` (a no-op when profiling is off).
pub struct Scope {
    op: &'static str,
    start: Option<Instant>,
}

impl Drop for Scope {
    fn drop(&mut self) {
        if let Some(s) = self.start {
            let mut t = table().lock().unwrap_or_else(|e| e.into_inner());
            let e = t.entry(self.op).or_insert((0, 0.0));
            e.0 += 1;
            e.1 += s.elapsed().as_secs_f64();
        }
    }
}

pub fn scope(op: &'static str) -> Scope {
    Scope {
        op,
        start: enabled().then(Instant::now),
    }
}

/// (op, calls, seconds), most expensive first.
pub fn report() -> Vec<(&'static str, u64, f64)> {
    let t = table().lock().unwrap_or_else(|e| e.into_inner());
    let mut v: Vec<_> = t.iter().map(|(k, (n, s))| (*k, *n, *s)).collect();
    v.sort_by(|a, b| b.2.partial_cmp(&a.2).unwrap_or(std::cmp::Ordering::Equal));
    v
}

/// The report as text (empty when profiling is off).
pub fn report_text() -> String {
    if !enabled() {
        return String::new();
    }
    let rows = report();
    let total: f64 = rows.iter().map(|r| r.2).sum();
    let mut s = format!("op profile (MVAR_PROFILE): {total:.2}s in ops\n");
    for (op, n, secs) in rows.iter().take(25) {
        s += &format!(
            "  {op:<22} {n:>9} calls {secs:>9.3}s {:>5.1}%\n",
            100.0 * secs / total.max(1e-12)
        );
    }
    s
}
