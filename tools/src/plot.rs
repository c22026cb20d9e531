//! Line plots as PNG, with no font or plotting dependency: a small canvas, axes with tick labels
//! in a built-in 5x7 bitmap font, and one polyline per series. Enough for loss and
//! learning-rate curves that a fresh machine can write without system fonts.

use std::path::{Path, PathBuf};

use mvar_engine::Result;

const W: usize = 720;
const H: usize = 420;
const LEFT: usize = 70;
const RIGHT: usize = 20;
const TOP: usize = 30;
const BOTTOM: usize = 45;

/// 5x7 glyphs, one string of 7 rows of 5 bits ('#' = ink) per character.
fn glyph(c: char) -> Option<[&'static str; 7]> {
    Some(match c {
        '0' => [
            " ### ", "#   #", "#  ##", "# # #", "##  #", "#   #", " ### ",
        ],
        '1' => [
            "  #  ", " ##  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### ",
        ],
        '2' => [
            " ### ", "#   #", "    #", "   # ", "  #  ", " #   ", "#####",
        ],
        '3' => [
            "#### ", "    #", "    #", " ### ", "    #", "    #", "#### ",
        ],
        '4' => [
            "   # ", "  ## ", " # # ", "#  # ", "#####", "   # ", "   # ",
        ],
        '5' => [
            "#####", "#    ", "#### ", "    #", "    #", "#   #", " ### ",
        ],
        '6' => [
            " ### ", "#    ", "#    ", "#### ", "#   #", "#   #", " ### ",
        ],
        '7' => [
            "#####", "    #", "   # ", "  #  ", " #   ", " #   ", " #   ",
        ],
        '8' => [
            " ### ", "#   #", "#   #", " ### ", "#   #", "#   #", " ### ",
        ],
        '9' => [
            " ### ", "#   #", "#   #", " ####", "    #", "    #", " ### ",
        ],
        '.' => [
            "     ", "     ", "     ", "     ", "     ", " ##  ", " ##  ",
        ],
        '-' => [
            "     ", "     ", "     ", "#####", "     ", "     ", "     ",
        ],
        '+' => [
            "     ", "  #  ", "  #  ", "#####", "  #  ", "  #  ", "     ",
        ],
        '(' => [
            "   # ", "  #  ", " #   ", " #   ", " #   ", "  #  ", "   # ",
        ],
        ')' => [
            " #   ", "  #  ", "   # ", "   # ", "   # ", "  #  ", " #   ",
        ],
        ':' => [
            "     ", " ##  ", " ##  ", "     ", " ##  ", " ##  ", "     ",
        ],
        'a' => [
            "     ", "     ", " ### ", "    #", " ####", "#   #", " ####",
        ],
        'b' => [
            "#    ", "#    ", "#### ", "#   #", "#   #", "#   #", "#### ",
        ],
        'c' => [
            "     ", "     ", " ####", "#    ", "#    ", "#    ", " ####",
        ],
        'd' => [
            "    #", "    #", " ####", "#   #", "#   #", "#   #", " ####",
        ],
        'e' => [
            "     ", "     ", " ### ", "#   #", "#####", "#    ", " ### ",
        ],
        'f' => [
            "  ## ", " #   ", "#### ", " #   ", " #   ", " #   ", " #   ",
        ],
        'g' => [
            "     ", " ####", "#   #", "#   #", " ####", "    #", " ### ",
        ],
        'h' => [
            "#    ", "#    ", "#### ", "#   #", "#   #", "#   #", "#   #",
        ],
        'i' => [
            "  #  ", "     ", " ##  ", "  #  ", "  #  ", "  #  ", " ### ",
        ],
        'k' => [
            "#    ", "#    ", "#  # ", "# #  ", "##   ", "# #  ", "#  # ",
        ],
        'l' => [
            " ##  ", "  #  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### ",
        ],
        'm' => [
            "     ", "     ", "## # ", "# # #", "# # #", "# # #", "# # #",
        ],
        'n' => [
            "     ", "     ", "#### ", "#   #", "#   #", "#   #", "#   #",
        ],
        'o' => [
            "     ", "     ", " ### ", "#   #", "#   #", "#   #", " ### ",
        ],
        'p' => [
            "     ", "#### ", "#   #", "#   #", "#### ", "#    ", "#    ",
        ],
        'r' => [
            "     ", "     ", "# ## ", "##   ", "#    ", "#    ", "#    ",
        ],
        's' => [
            "     ", "     ", " ####", "#    ", " ### ", "    #", "#### ",
        ],
        't' => [
            " #   ", " #   ", "#### ", " #   ", " #   ", " #   ", "  ## ",
        ],
        'u' => [
            "     ", "     ", "#   #", "#   #", "#   #", "#   #", " ####",
        ],
        'v' => [
            "     ", "     ", "#   #", "#   #", "#   #", " # # ", "  #  ",
        ],
        'w' => [
            "     ", "     ", "#   #", "# # #", "# # #", "# # #", " # # ",
        ],
        'x' => [
            "     ", "     ", "#   #", " # # ", "  #  ", " # # ", "#   #",
        ],
        'y' => [
            "     ", "#   #", "#   #", "#   #", " ####", "    #", " ### ",
        ],
        'z' => [
            "     ", "     ", "#####", "   # ", "  #  ", " #   ", "#####",
        ],
        ' ' => ["     "; 7],
        _ => return None,
    })
}

struct Canvas {
    px: Vec<[u8; 3]>,
}

impl Canvas {
    fn new() -> Self {
        Canvas {
            px: vec![[255, 255, 255]; W * H],
        }
    }

    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < W && (y as usize) < H {
            self.px[y as usize * W + x as usize] = c;
        }
    }

    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: [u8; 3]) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.set(x, y, c);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    fn text(&mut self, x: i64, y: i64, s: &str, c: [u8; 3]) {
        for (i, ch) in s.chars().enumerate() {
            if let Some(g) = glyph(ch.to_ascii_lowercase()) {
                for (r, row) in g.iter().enumerate() {
                    for (k, b) in row.bytes().enumerate() {
                        if b == b'#' {
                            self.set(x + (i * 6 + k) as i64, y + r as i64, c);
                        }
                    }
                }
            }
        }
    }
}

fn fmt_tick(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-2..1e4).contains(&a) {
        format!("{v:.0e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// One curve.
pub struct Series<'a> {
    pub name: &'a str,
    pub points: &'a [(f64, f64)],
    pub color: [u8; 3],
}

/// Writes a line plot of `series` (x: step, y: value; `log_y` plots log10 y) to `path`.
pub fn line_plot(
    path: &Path,
    title: &str,
    x_label: &str,
    series: &[Series<'_>],
    log_y: bool,
) -> Result<()> {
    let mut cv = Canvas::new();
    let tr = |v: f64| if log_y { v.max(1e-12).log10() } else { v };
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|&(x, y)| (x, tr(y))))
        .filter(|p| p.1.is_finite())
        .collect();
    let (mut x0, mut x1) = pts
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
            (a.min(p.0), b.max(p.0))
        });
    let (mut y0, mut y1) = pts
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
            (a.min(p.1), b.max(p.1))
        });
    if !x0.is_finite() {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if y1 <= y0 {
        y1 = y0 + 1.0;
    }
    let pad = (y1 - y0) * 0.05;
    let (y0, y1) = (y0 - pad, y1 + pad);
    let (pw, ph) = ((W - LEFT - RIGHT) as f64, (H - TOP - BOTTOM) as f64);
    let to_px = |x: f64, y: f64| -> (i64, i64) {
        (
            LEFT as i64 + ((x - x0) / (x1 - x0) * pw) as i64,
            (TOP as f64 + ph - (y - y0) / (y1 - y0) * ph) as i64,
        )
    };
    let grey = [215, 215, 215];
    let black = [0, 0, 0];
    for i in 0..=5 {
        let fy = y0 + (y1 - y0) * i as f64 / 5.0;
        let (_, py) = to_px(x0, fy);
        cv.line((LEFT as i64, py), ((W - RIGHT) as i64, py), grey);
        let label = fmt_tick(if log_y { 10f64.powf(fy) } else { fy });
        cv.text(4, py - 3, &label, black);
        let fx = x0 + (x1 - x0) * i as f64 / 5.0;
        let (px, _) = to_px(fx, y0);
        cv.line((px, TOP as i64), (px, (H - BOTTOM) as i64), grey);
        cv.text(px - 10, (H - BOTTOM + 8) as i64, &fmt_tick(fx), black);
    }
    cv.line(
        (LEFT as i64, TOP as i64),
        (LEFT as i64, (H - BOTTOM) as i64),
        black,
    );
    cv.line(
        (LEFT as i64, (H - BOTTOM) as i64),
        ((W - RIGHT) as i64, (H - BOTTOM) as i64),
        black,
    );
    cv.text(LEFT as i64, 10, title, black);
    cv.text((W / 2) as i64 - 20, (H - 14) as i64, x_label, black);
    for (k, s) in series.iter().enumerate() {
        let mut prev: Option<(i64, i64)> = None;
        for &(x, y) in s.points {
            let y = tr(y);
            if !y.is_finite() {
                prev = None;
                continue;
            }
            let p = to_px(x, y);
            if let Some(q) = prev {
                cv.line(q, p, s.color);
            }
            prev = Some(p);
        }
        let lx = (W - RIGHT - 200) as i64;
        let ly = (TOP + 8 + 12 * k) as i64;
        cv.line((lx, ly + 3), (lx + 20, ly + 3), s.color);
        cv.text(lx + 26, ly, s.name, black);
    }
    let flat: Vec<u8> = cv.px.iter().flatten().copied().collect();
    let img = image::RgbImage::from_raw(W as u32, H as u32, flat)
        .ok_or_else(|| mvar_engine::Error::invalid("line_plot", "canvas buffer"))?;
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .map_err(|e| mvar_engine::Error::Format {
        what: path.display().to_string(),
        msg: e.to_string(),
    })?;
    mvar_models::checkpoint::write_atomic(path, &bytes)
}

/// (step, value) pairs of `key` from a metrics JSONL file; lines that do not parse are skipped.
pub fn read_metric(path: &Path, key: &str) -> Vec<(f64, f64)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            Some((v["step"].as_f64()?, v[key].as_f64()?))
        })
        .collect()
}

/// Plots a training curve (`train`, named `train_name`) and, where the training folder `dir`
/// has a val.jsonl, its held-out figures of `held_out_key`, into `dir/file`; returns the path.
pub fn training_and_held_out(
    dir: &Path,
    file: &str,
    title: &str,
    (train_name, train): (&str, &[(f64, f64)]),
    held_out_key: &str,
    log_y: bool,
) -> Result<PathBuf> {
    let held_out = read_metric(&dir.join("val.jsonl"), held_out_key);
    let mut series = vec![Series {
        name: train_name,
        points: train,
        color: [200, 40, 40],
    }];
    if !held_out.is_empty() {
        series.push(Series {
            name: "held-out",
            points: &held_out,
            color: [30, 90, 200],
        });
    }
    let path = dir.join(file);
    line_plot(&path, title, "step", &series, log_y)?;
    Ok(path)
}

/// Steps of the window that [`pyramid_token_loss`] averages over.
pub const PYRAMID_WINDOW: u64 = 50;

/// The training loss per token over the whole pyramid, comparable with a held-out loss per
/// token, from a `mvar train` metrics file: each step trains one segment of scales (VAR: all of
/// them; MVAR: the official 8:1:1 cycle), so the per-step losses mix easy and hard scales in
/// the cycle's proportions, not the pyramid's. Per segment, the mean `token_loss` of its steps
/// in the last [`PYRAMID_WINDOW`] steps (or its latest step, if it had none there), weighted by
/// its share of the pyramid's tokens (`loss` / `token_loss`). Points start once segments
/// covering all `scales` scales have been trained; a file without `token_loss` gives the
/// 20-step mean of `loss`.
pub fn pyramid_token_loss(metrics: &Path, scales: usize) -> Vec<(f64, f64)> {
    struct Step {
        step: u64,
        segment: (u64, u64),
        token_loss: f64,
        share: f64,
    }
    let steps: Vec<Step> = std::fs::read_to_string(metrics)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            let token_loss = v["token_loss"].as_f64()?;
            Some(Step {
                step: v["step"].as_u64()?,
                segment: (v["scales"][0].as_u64()?, v["scales"][1].as_u64()?),
                token_loss,
                share: v["loss"].as_f64()? / token_loss,
            })
        })
        .filter(|s| s.share.is_finite())
        .collect();
    if steps.is_empty() {
        return smooth(&read_metric(metrics, "loss"), 20);
    }
    // Every segment's steps, in order, as indices into `steps`.
    let mut by_segment: std::collections::BTreeMap<(u64, u64), Vec<usize>> = Default::default();
    let mut out = Vec::new();
    for (i, s) in steps.iter().enumerate() {
        by_segment.entry(s.segment).or_default().push(i);
        let covered: u64 = by_segment.keys().map(|&(a, b)| b.saturating_sub(a)).sum();
        if covered < scales as u64 {
            continue; // a segment of the pyramid not trained yet
        }
        let mut total = 0.0;
        for idx in by_segment.values() {
            let recent: Vec<&Step> = idx
                .iter()
                .rev()
                .map(|&j| &steps[j])
                .take_while(|t| t.step + PYRAMID_WINDOW > s.step)
                .collect();
            let (share, mean) = match recent.as_slice() {
                [] => {
                    let t = &steps[idx[idx.len() - 1]];
                    (t.share, t.token_loss)
                }
                r => (
                    r[0].share,
                    r.iter().map(|t| t.token_loss).sum::<f64>() / r.len() as f64,
                ),
            };
            total += share * mean;
        }
        out.push((s.step as f64, total));
    }
    out
}

/// The curves of `mvar train`: `loss.png` (training and held-out loss per token) and `lr.png`.
pub fn transformer_curves(dir: &Path, what: &str, scales: usize) -> Result<(PathBuf, PathBuf)> {
    let metrics = dir.join("metrics.jsonl");
    let loss_png = training_and_held_out(
        dir,
        "loss.png",
        &format!("{what} loss (nats per token)"),
        (
            "training (all scales)",
            &pyramid_token_loss(&metrics, scales),
        ),
        "loss",
        true,
    )?;
    let lr_png = dir.join("lr.png");
    line_plot(
        &lr_png,
        &format!("{what} learning rate"),
        "step",
        &[Series {
            name: "lr",
            points: &read_metric(&metrics, "lr"),
            color: [20, 140, 60],
        }],
        false,
    )?;
    Ok((loss_png, lr_png))
}

/// Moving average over `window` points (plots of noisy per-step losses).
pub fn smooth(points: &[(f64, f64)], window: usize) -> Vec<(f64, f64)> {
    let w = window.max(1);
    points
        .iter()
        .enumerate()
        .map(|(i, &(x, _))| {
            let lo = i.saturating_sub(w - 1);
            let m = points[lo..=i].iter().map(|p| p.1).sum::<f64>() / (i - lo + 1) as f64;
            (x, m)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A metrics file of `mvar train` lines: (step, first scale, end scale, token loss), with a
    /// pyramid of 130 tokens whose segments [0, 4), [4, 5), [5, 6) hold 30, 36 and 64.
    fn metrics_file(name: &str, rows: &[(u64, u64, u64, f64)]) -> PathBuf {
        let tokens = |a: u64, b: u64| {
            [1.0, 4.0, 9.0, 16.0, 36.0, 64.0][a as usize..b as usize]
                .iter()
                .sum::<f64>()
        };
        let text: String = rows
            .iter()
            .map(|&(step, a, b, tl)| {
                format!(
                    "{{\"step\":{step},\"loss\":{},\"token_loss\":{tl},\"scales\":[{a},{b}]}}\n",
                    tl * tokens(a, b) / 130.0
                )
            })
            .collect();
        let path = std::env::temp_dir().join(format!("mvar-{name}-{}.jsonl", std::process::id()));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn the_training_loss_is_weighted_as_the_pyramid_not_as_the_cycle() {
        // MVAR's cycle: eight steps of the first segment, then one of each later one. The first
        // segment's tokens score 2 nats, the second's 4, the last's 6.
        let mut rows = Vec::new();
        for step in 1..=40u64 {
            let (a, b, tl) = match (step - 1) % 10 {
                8 => (4, 5, 4.0),
                9 => (5, 6, 6.0),
                _ => (0, 4, 2.0),
            };
            rows.push((step, a, b, tl));
        }
        let path = metrics_file("pyramid", &rows);
        let curve = pyramid_token_loss(&path, 6);
        // Points from step 10, when the last segment has been trained.
        assert_eq!(curve.first().map(|p| p.0), Some(10.0));
        assert_eq!(curve.len(), 31);
        let want = (30.0 * 2.0 + 36.0 * 4.0 + 64.0 * 6.0) / 130.0;
        for &(step, v) in &curve {
            assert!((v - want).abs() < 1e-12, "step {step}: {v} against {want}");
        }
        // The plain mean over steps would weigh the easy first segment 8 times in 10.
        let plain = smooth(&read_metric(&path, "token_loss"), 20);
        assert!((plain.last().unwrap().1 - want).abs() > 1.0);

        // VAR (one segment, every scale): the 50-step mean of the per-token loss.
        let var: Vec<_> = (1..=60u64).map(|s| (s, 0, 6, s as f64)).collect();
        let path2 = metrics_file("pyramid-var", &var);
        let curve = pyramid_token_loss(&path2, 6);
        assert_eq!(curve.len(), 60);
        assert!((curve[59].1 - (11..=60).sum::<u64>() as f64 / 50.0).abs() < 1e-12);
        let _ = std::fs::remove_file(path);
        let _ = std::fs::remove_file(path2);
    }

    #[test]
    fn a_plot_is_written() {
        let pts: Vec<(f64, f64)> = (1..200)
            .map(|i| (i as f64, 5.0 / (i as f64).sqrt()))
            .collect();
        let path = std::env::temp_dir().join(format!("mvar-plot-{}.png", std::process::id()));
        line_plot(
            &path,
            "loss",
            "step",
            &[Series {
                name: "train",
                points: &pts,
                color: [200, 40, 40],
            }],
            true,
        )
        .unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (W as u32, H as u32));
        assert!(img.pixels().any(|p| p.0 == [200, 40, 40]));
        let _ = std::fs::remove_file(path);
        assert_eq!(
            smooth(&[(0.0, 1.0), (1.0, 3.0)], 2),
            vec![(0.0, 1.0), (1.0, 2.0)]
        );
        assert!(glyph('q').is_none() && glyph('7').is_some());
    }
}
