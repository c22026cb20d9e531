//! The `mvar` command line end to end on tiny configs: an interrupted (kill -9) and resumed run
//! has the same loss curve as an uninterrupted one, and bad input gets a clear message and a
//! non-zero exit, never a panic.
//!
//! The commands run on the CPU unless `MVAR_CLI_DEVICE` names another device (`cuda`): then the
//! same tests check the driver's GPU path end to end (training, checkpoints and `--resume` bit for
//! bit, sampling, evaluation). CI runs them so on the CUDA emulator, the GPU bundle
//! (tools/gpu-test.sh) on the GPU.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The binary under test: cargo's build of it, or `MVAR_BIN` where the test binary runs away
/// from the build tree (the GPU bundle of tools/gpu-test.sh).
fn mvar() -> Command {
    let bin = std::env::var_os("MVAR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_mvar")));
    let mut c = Command::new(bin);
    c.env("MVAR_DEVICE", device());
    c
}

/// The device the commands run on: `MVAR_CLI_DEVICE`, default `cpu`.
fn device() -> String {
    std::env::var("MVAR_CLI_DEVICE").unwrap_or_else(|_| "cpu".into())
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mvar-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs and expects success.
fn ok(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap();
    let t = text(&o);
    assert!(o.status.success(), "{cmd:?} failed:\n{t}");
    t
}

/// Runs and expects a clean failure: exit status 1, `error:` with every one of `needles`, and
/// no panic.
fn fails(cmd: &mut Command, needles: &[&str]) {
    let o = cmd.output().unwrap();
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{cmd:?}: expected exit 1\n{t}");
    assert!(!t.contains("panicked"), "{cmd:?} panicked:\n{t}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("error:"), "{cmd:?}: no error line\n{t}");
    for n in needles {
        assert!(err.contains(n), "{cmd:?}: message lacks {n:?}:\n{err}");
    }
}

/// A 2-class image folder of 8x8 PNGs.
fn tiny_images(root: &Path) {
    for (c, class) in ["red", "blue"].iter().enumerate() {
        let dir = root.join(class);
        std::fs::create_dir_all(&dir).unwrap();
        for k in 0..6u32 {
            let img = image::RgbImage::from_fn(8, 8, |x, y| {
                let v = ((x * 31 + y * 17 + k * 40) % 200) as u8;
                if c == 0 {
                    image::Rgb([200, v, 30])
                } else {
                    image::Rgb([20, v, 220])
                }
            });
            img.save(dir.join(format!("{k}.png"))).unwrap();
        }
    }
}

const TOKENIZER_FLAGS: &[&str] = &[
    "--side",
    "8",
    "--ch",
    "32",
    "--ch-mult",
    "1,1",
    "--z-channels",
    "4",
    "--res-blocks",
    "1",
    "--patch-nums",
    "1,2,4",
    "--batch",
    "4",
];

/// One tiny data set and tokenizer shared by the tests of this file.
fn tokenizer() -> &'static (PathBuf, PathBuf) {
    static TOK: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    TOK.get_or_init(|| {
        let root = scratch("shared");
        let data = root.join("data");
        tiny_images(&data);
        let tok = root.join("tok");
        ok(mvar()
            .arg("train-tokenizer")
            .args(TOKENIZER_FLAGS)
            .args(["--vocab", "16", "--steps", "3", "--data"])
            .arg(&data)
            .arg("--out")
            .arg(&tok));
        (data, tok)
    })
}

fn train_cmd(data: &Path, tok: &Path, out: &Path, steps: u64) -> Command {
    train_cmd_depth(data, tok, out, steps, 1)
}

fn train_cmd_depth(data: &Path, tok: &Path, out: &Path, steps: u64, depth: usize) -> Command {
    train_cmd_model(data, tok, out, steps, depth, "mvar")
}

fn train_cmd_model(
    data: &Path,
    tok: &Path,
    out: &Path,
    steps: u64,
    depth: usize,
    model: &str,
) -> Command {
    let mut c = mvar();
    c.args(["train", "--model", model, "--width", "32"])
        .arg("--depth")
        .arg(depth.to_string())
        .args(["--heads", "2", "--batch", "4", "--kernel-size", "3"])
        .args(["--checkpoint-every", "10", "--log-every", "1000"])
        .arg("--steps")
        .arg(steps.to_string())
        .arg("--data")
        .arg(data)
        .arg("--tokenizer")
        .arg(tok)
        .arg("--out")
        .arg(out);
    c
}

fn metric_lines(out: &Path) -> Vec<String> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// The lines of a training folder's val.jsonl, parsed.
fn val_lines(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("val.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

/// Starts `cmd`, kills it (SIGKILL) once `out/metrics.jsonl` has `lines` lines (or after
/// `limit_s` seconds), checks that the signal ended it, and returns the lines written by then.
fn kill_at_metric_lines(cmd: &mut Command, out: &Path, lines: usize, limit_s: u64) -> usize {
    use std::os::unix::process::ExitStatusExt;
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while metric_lines(out).len() < lines && t0.elapsed() < Duration::from_secs(limit_s) {
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(
        status.signal(),
        Some(9),
        "the run ended before it could be killed: {status:?}"
    );
    metric_lines(out).len()
}

/// A resumed run's metrics and held-out lines equal the uninterrupted run's, line for line.
fn same_curves(
    out: &Path,
    reference: &[String],
    val_reference: &[serde_json::Value],
    at_kill: usize,
) {
    let resumed = metric_lines(out);
    assert_eq!(
        resumed.len(),
        reference.len(),
        "killed after {at_kill} lines"
    );
    for (a, b) in resumed.iter().zip(reference) {
        assert_eq!(
            a, b,
            "differs after resuming (killed after {at_kill} lines)"
        );
    }
    assert_eq!(
        val_lines(out),
        val_reference,
        "the held-out figures differ after resuming (killed after {at_kill} lines)"
    );
}

/// A best/ folder's weights: the safetensors data section (the header's metadata map has no
/// fixed order, the tensors have) and the metadata.
fn best_weights(out: &Path) -> (Vec<u8>, serde_json::Value) {
    let path = out.join("best/model.safetensors");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (bytes[8 + n..].to_vec(), header["__metadata__"].clone())
}

/// A data set with a training and a held-out split, and the shared tokenizer.
fn split_data(root: &Path) -> PathBuf {
    let data = root.join("data");
    tiny_images(&data.join("train"));
    tiny_images(&data.join("test"));
    data
}

#[test]
fn kill_9_then_resume_continues_the_loss_curve_bit_for_bit() {
    let (_, tok) = tokenizer();
    let root = scratch("resume");
    // With a held-out split scored every 7 steps: val.jsonl must continue as metrics.jsonl does.
    let data = &split_data(&root);
    let train_cmd = |data: &Path, tok: &Path, out: &Path, steps: u64| {
        let mut c = train_cmd(data, tok, out, steps);
        c.args(["--eval-every", "7"]);
        c
    };
    const STEPS: u64 = 300;
    let whole = root.join("whole");
    ok(&mut train_cmd(data, tok, &whole, STEPS));
    let reference = metric_lines(&whole);
    assert_eq!(reference.len(), STEPS as usize);
    let val_reference = val_lines(&whole);
    assert_eq!(val_reference.len(), 1 + 300 / 7 + 1, "{val_reference:?}");

    let cut = root.join("cut");
    // Killed between checkpoints, a few steps after step 20.
    let at_kill = kill_at_metric_lines(&mut train_cmd(data, tok, &cut, STEPS), &cut, 25, 120);
    assert!(at_kill < STEPS as usize);
    let log = ok(train_cmd(data, tok, &cut, STEPS).arg("--resume"));
    assert!(log.contains("resumed from"), "{log}");
    same_curves(&cut, &reference, &val_reference, at_kill);
    // best/ holds the same weights of the same step: the checkpoint kept the lowest loss.
    let (whole_best, whole_meta) = best_weights(&whole);
    let (cut_best, cut_meta) = best_weights(&cut);
    assert_eq!(cut_meta, whole_meta);
    assert!(
        whole_meta["mvar.best.step"].as_str().unwrap() != "0",
        "{whole_meta}: the test would not cover a best after step 0"
    );
    assert!(
        cut_best == whole_best,
        "best/ weights differ after resuming"
    );
    // A second run into the same folder must not silently replace the checkpoint.
    fails(
        &mut train_cmd(data, tok, &cut, STEPS),
        &["already holds a training checkpoint", "--resume"],
    );
    let _ = std::fs::remove_dir_all(&root);
}

/// The tokenizer resumes bit for bit too: its generator (random crops, flips, the restarts of
/// dead codes), the codes' last hits, the step and the budget come back from the checkpoint,
/// and its held-out figures continue as its metrics do.
#[test]
fn kill_9_then_resume_continues_the_tokenizer_curve_bit_for_bit() {
    let root = scratch("tokenizer-resume");
    let data = split_data(&root);
    const STEPS: u64 = 40;
    let cmd = |out: &Path| {
        let mut c = mvar();
        c.arg("train-tokenizer")
            .args(TOKENIZER_FLAGS)
            .args(["--vocab", "32", "--dead-after", "10", "--eval-every", "7"])
            .args(["--checkpoint-every", "10", "--log-every", "1000"])
            .arg("--steps")
            .arg(STEPS.to_string())
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(out);
        c
    };
    let whole = root.join("whole");
    ok(&mut cmd(&whole));
    let reference = metric_lines(&whole);
    assert_eq!(reference.len(), STEPS as usize);
    // Dead codes were restarted, so the resumed run must restore when each code was last hit.
    assert!(
        reference.iter().any(|l| !l.contains("\"restarted\":0")),
        "no code was restarted: the test would not cover the codes' last hits"
    );
    let val_reference = val_lines(&whole);
    assert_eq!(val_reference.len(), 1 + 40 / 7 + 1, "{val_reference:?}");

    let cut = root.join("cut");
    let at_kill = kill_at_metric_lines(&mut cmd(&cut), &cut, 25, 300);
    let log = ok(cmd(&cut).arg("--resume"));
    assert!(log.contains("resumed from"), "{log}");
    same_curves(&cut, &reference, &val_reference, at_kill);
    let _ = std::fs::remove_dir_all(&root);
}

/// Image folders past the memory budget (`MVAR_DATA_MEMORY_MB`) are streamed from their files:
/// the tokenizer's and the transformer's curves are the ones of the same folders held in
/// memory, bit for bit, and the token cache made from a streamed folder is the held one's.
#[test]
fn streamed_image_folders_train_the_curves_of_held_ones() {
    let root = scratch("streamed");
    let data = split_data(&root);
    let tokenizer = |out: &Path, budget_mb: &str| {
        let mut c = mvar();
        c.env("MVAR_DATA_MEMORY_MB", budget_mb)
            .arg("train-tokenizer")
            .args(TOKENIZER_FLAGS)
            .args(["--vocab", "16", "--steps", "6", "--eval-every", "4"])
            .args(["--val-images", "5", "--log-every", "1000", "--data"])
            .arg(&data)
            .arg("--out")
            .arg(out);
        ok(&mut c)
    };
    let held_log = tokenizer(&root.join("tok-held"), "64");
    assert!(!held_log.contains("streamed from"), "{held_log}");
    let streamed_log = tokenizer(&root.join("tok-streamed"), "0");
    assert!(
        streamed_log.contains("streamed from the image files"),
        "{streamed_log}"
    );
    assert_eq!(
        metric_lines(&root.join("tok-streamed")),
        metric_lines(&root.join("tok-held"))
    );
    assert_eq!(
        val_lines(&root.join("tok-streamed")),
        val_lines(&root.join("tok-held"))
    );
    // --val-images: 5 of the 12 held-out images per evaluation, and of the training split's.
    let val = val_lines(&root.join("tok-held"));
    assert!(val.iter().all(|v| v["images"] == 5), "{val:?}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("tok-held/report.json")).unwrap())
            .unwrap();
    assert_eq!(report["train"]["images"], 5, "{report}");
    let tok = root.join("tok-held");
    let transformer = |out: &Path, budget_mb: &str| {
        let mut c = train_cmd(&data, &tok, out, 12);
        c.env("MVAR_DATA_MEMORY_MB", budget_mb)
            .args(["--eval-every", "5"]);
        ok(&mut c)
    };
    let streamed_log = transformer(&root.join("streamed"), "0");
    assert!(
        streamed_log.contains("streamed from the image files")
            && streamed_log.contains("wrote the token cache"),
        "{streamed_log}"
    );
    let held_log = transformer(&root.join("held"), "64");
    assert!(
        held_log.contains("reusing the token cache"),
        "the held folder has the streamed one's fingerprint: {held_log}"
    );
    assert_eq!(
        metric_lines(&root.join("streamed")),
        metric_lines(&root.join("held"))
    );
    assert_eq!(
        val_lines(&root.join("streamed")),
        val_lines(&root.join("held"))
    );
    fails(
        mvar()
            .env("MVAR_DATA_MEMORY_MB", "lots")
            .args(["train-tokenizer", "--steps", "1", "--data"])
            .arg(&data)
            .arg("--out")
            .arg(root.join("bad-budget")),
        &["MVAR_DATA_MEMORY_MB", "\"lots\"", "MiB"],
    );
    let _ = std::fs::remove_dir_all(&root);
}

/// Scoring the held-out split during training: before the first step, every --eval-every steps
/// and after the last, per token and per scale, into val.jsonl and the loss plot; the training
/// curve is the same bit for bit with or without it. A held-out split of other classes is
/// refused, naming it.
#[test]
fn early_stop_ends_the_run_when_the_held_out_loss_stops_falling() {
    let (_, tok) = tokenizer();
    let root = scratch("early-stop");
    let data = split_data(&root);
    // A learning rate of 0 leaves the weights as they are, so each evaluation after step 0 ties
    // with it: not lower. The second of them ends the run.
    let flat = |out: &Path| {
        let mut c = train_cmd(&data, tok, out, 20);
        c.args(["--eval-every", "3", "--early-stop", "2", "--base-lr", "0"]);
        c
    };
    let out = root.join("flat");
    let log = ok(&mut flat(&out));
    let steps: Vec<u64> = val_lines(&out)
        .iter()
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [0, 3, 6], "{log}");
    assert_eq!(metric_lines(&out).len(), 6, "{log}");
    assert!(
        log.contains("early stop at step 6 of 20: 2 held-out evaluations in a row without a loss per token below"),
        "{log}"
    );
    assert!(log.contains("(the lowest: "), "{log}");
    assert!(log.contains("(stopped early; 20 were planned)"), "{log}");
    assert_eq!(best_weights(&out).1["mvar.best.step"], "0");
    for file in [
        "model.safetensors",
        "model.json",
        "samples.png",
        "progression.png",
    ] {
        assert!(out.join(file).exists(), "{file}\n{log}");
    }
    // The run is over: --resume trains nothing more. Weights of best/ that were removed are
    // named, not claimed.
    std::fs::remove_file(out.join("best/model.safetensors")).unwrap();
    let again = ok(flat(&out).arg("--resume"));
    assert!(again.contains("at step 6 of 6"), "{again}");
    assert!(
        again.contains("best/model.safetensors is gone: it held the lowest held-out loss")
            && again.contains("its weights were removed from"),
        "{again}"
    );
    assert_eq!(metric_lines(&out).len(), 6, "{again}");
    // Without held-out scores there is nothing to stop on: refused, naming the flag.
    fails(
        train_cmd(&data, tok, &root.join("unscored"), 5).args([
            "--eval-every",
            "0",
            "--early-stop",
            "2",
        ]),
        &["--early-stop 2 needs held-out scores", "--eval-every is 0"],
    );
    fails(
        train_cmd(&data, tok, &root.join("nolr"), 5).arg("--base-lr=-1"),
        &["--base-lr -1: expected a finite number >= 0"],
    );
}

#[test]
fn held_out_scores_during_training_leave_the_training_curve_as_it_is() {
    let (_, tok) = tokenizer();
    let root = scratch("validation");
    let data = split_data(&root);
    const STEPS: u64 = 12;
    let plain = root.join("plain");
    ok(train_cmd(&data, tok, &plain, STEPS).args(["--eval-every", "0"]));
    assert!(!plain.join("val.jsonl").exists());
    let scored = root.join("scored");
    let log = ok(train_cmd(&data, tok, &scored, STEPS).args(["--eval-every", "5"]));
    assert_eq!(metric_lines(&plain), metric_lines(&scored));
    let val = val_lines(&scored);
    let steps: Vec<u64> = val.iter().map(|v| v["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [0, 5, 10, 12], "{log}");
    // The tiny tokenizer's pyramid 1, 2, 4: 1 + 4 + 16 tokens per image, 12 held-out images.
    let tokens = [1.0, 4.0, 16.0];
    for v in &val {
        assert_eq!(v["sequences"], 12, "{v}");
        let per_scale: Vec<f64> = v["scale_loss"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(per_scale.len(), 3, "{v}");
        let mean = per_scale
            .iter()
            .zip(tokens)
            .map(|(l, t)| l * t)
            .sum::<f64>()
            / 21.0;
        let loss = v["loss"].as_f64().unwrap();
        assert!(
            (loss - mean).abs() < 1e-9,
            "{v}: loss {loss}, per-scale mean {mean}"
        );
        let acc = v["accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc), "{v}");
    }
    // Untrained, every one of the 16 codes is about equally likely.
    let first = val[0]["loss"].as_f64().unwrap();
    assert!((first - 16f64.ln()).abs() < 0.5, "step 0 loss {first}");
    assert!(log.contains("held-out at step 12: loss per token"), "{log}");
    // best/: the weights of the first evaluation with the lowest loss, a model folder that
    // `mvar sample` takes.
    let losses: Vec<f64> = val.iter().map(|v| v["loss"].as_f64().unwrap()).collect();
    let lowest = (0..losses.len()).fold(0, |b, i| if losses[i] < losses[b] { i } else { b });
    let (_, meta) = best_weights(&scored);
    assert_eq!(
        meta["mvar.best.step"],
        val[lowest]["step"].to_string(),
        "{meta}"
    );
    assert_eq!(
        meta["mvar.best.held_out_loss_per_token"],
        val[lowest]["loss"].to_string(),
        "{meta}"
    );
    assert!(
        log.contains(&format!(
            "the lowest held-out loss per token, {:.4}, was at step {}",
            losses[lowest], val[lowest]["step"]
        )),
        "{log}"
    );
    assert!(!plain.join("best").exists());
    let sampled = root.join("best-samples");
    ok(mvar()
        .args(["sample", "--n", "2", "--class", "0", "--ckpt"])
        .arg(scored.join("best"))
        .arg("--out")
        .arg(&sampled));
    assert!(sampled.join("grid.png").exists());
    // --decode-batch 1: the decoder takes one image a pass; the same images (to a unit of the
    // 8-bit pixels: a GPU's GEMMs may sum in another order for another batch).
    let one_by_one = root.join("decoded-one-by-one");
    ok(mvar()
        .args([
            "sample",
            "--n",
            "2",
            "--class",
            "0",
            "--decode-batch",
            "1",
            "--ckpt",
        ])
        .arg(scored.join("best"))
        .arg("--out")
        .arg(&one_by_one));
    for png in ["grid.png", "0000-blue.png", "0001-blue.png"] {
        let [a, b] =
            [&sampled, &one_by_one].map(|d| image::open(d.join(png)).unwrap().to_rgb8().into_raw());
        let worst = a.iter().zip(&b).map(|(x, y)| x.abs_diff(*y)).max();
        assert!(
            a.len() == b.len() && worst <= Some(1),
            "{png}: off by {worst:?}"
        );
    }
    // --progression: a row per class of the image after each scale, the last column the sample
    // (batches of one, so the rows come from different batches).
    let progressed = root.join("progression");
    let log = ok(mvar()
        .args([
            "sample",
            "--n",
            "2",
            "--batch",
            "1",
            "--progression",
            "--ckpt",
        ])
        .arg(scored.join("best"))
        .arg("--out")
        .arg(&progressed));
    assert!(
        log.contains("progression.png (2 rows of 3 scales)"),
        "{log}"
    );
    let grid = image::open(progressed.join("progression.png"))
        .unwrap()
        .to_rgb8();
    let side = image::open(progressed.join("0000-blue.png"))
        .unwrap()
        .width();
    assert_eq!(grid.dimensions(), (3 * (side + 1) + 1, 2 * (side + 1) + 1));
    let cell = |row: u32, col: u32| -> Vec<u8> {
        let mut v = Vec::new();
        for y in 0..side {
            for x in 0..side {
                v.extend(
                    grid.get_pixel(col * (side + 1) + 1 + x, row * (side + 1) + 1 + y)
                        .0,
                );
            }
        }
        v
    };
    for (row, sample) in [(0, "0000-blue.png"), (1, "0002-red.png")] {
        let want = image::open(progressed.join(sample))
            .unwrap()
            .to_rgb8()
            .into_raw();
        let last = cell(row, 2);
        let worst = want.iter().zip(&last).map(|(a, b)| a.abs_diff(*b)).max();
        assert!(
            worst <= Some(1),
            "row {row}: the last scale is not {sample} (off by {worst:?})"
        );
        assert_ne!(
            cell(row, 0),
            last,
            "row {row}: the first scale is the whole image"
        );
    }
    // --more-smooth: the official sampler's Gumbel-softmax codes (on the GPU path in CI too).
    let smooth = root.join("smooth");
    let log = ok(mvar()
        .args([
            "sample",
            "--n",
            "2",
            "--top-k",
            "4",
            "--more-smooth",
            "--ckpt",
        ])
        .arg(scored.join("best"))
        .arg("--out")
        .arg(&smooth));
    assert!(smooth.join("grid.png").exists(), "{log}");
    // The training curve in the same units, per token: an MVAR step's official loss over the
    // scales it trains, times all tokens over those.
    for l in metric_lines(&scored) {
        let m: serde_json::Value = serde_json::from_str(&l).unwrap();
        let (a, b) = (
            m["scales"][0].as_u64().unwrap(),
            m["scales"][1].as_u64().unwrap(),
        );
        let trained: f64 = tokens[a as usize..b as usize].iter().sum();
        let want = m["loss"].as_f64().unwrap() * 21.0 / trained;
        assert!(
            (m["token_loss"].as_f64().unwrap() - want).abs() < 1e-9 * want,
            "{l}"
        );
    }
    for png in ["loss.png", "lr.png"] {
        let img = image::open(scored.join(png)).unwrap_or_else(|e| panic!("{png}: {e}"));
        assert!(img.width() > 100, "{png}");
    }

    let other = root.join("other-classes");
    tiny_images(&other.join("train"));
    tiny_images(&other.join("test"));
    std::fs::rename(other.join("test/blue"), other.join("test/green")).unwrap();
    fails(
        &mut train_cmd(&other, tok, &root.join("refused"), STEPS),
        &[
            "held-out split \"test\"",
            "green",
            "blue",
            "expected the same",
        ],
    );
    let _ = std::fs::remove_dir_all(&root);
}

/// The README's main job, each stage cut to two steps, on a tiny data set with a held-out split:
/// it writes every file it promises and ends by saying where they are and what the classifier
/// makes of the samples.
#[test]
fn the_demo_writes_every_file_it_promises() {
    let root = scratch("demo");
    let data = root.join("data");
    tiny_images(&data.join("train"));
    tiny_images(&data.join("test"));
    let out = root.join("demo");
    let log = ok(mvar()
        .arg("demo")
        .args(["--minutes", "5", "--vocab", "64"])
        .args([
            "--tokenizer-steps",
            "2",
            "--model-steps",
            "2",
            "--classifier-steps",
            "2",
        ])
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&out));
    // The budget's split: the transformer's step time is taken before the tokenizer starts.
    assert!(
        log.contains("held-out evaluations, should take"),
        "no budget plan in:\n{log}"
    );
    for stage in [
        "== 1/5 tokenizer",
        "== 2/5 MVAR",
        "== 3/5",
        "== 4/5",
        "== 5/5",
    ] {
        assert!(log.contains(stage), "no {stage:?} in:\n{log}");
    }
    for file in [
        "tokenizer/recon.png",
        "tokenizer/metrics.jsonl",
        "mvar/samples.png",
        "mvar/progression.png",
        "mvar/metrics.jsonl",
        "mvar/eval.json",
        "classifier/metrics.jsonl",
        "loss.png",
        "lr.png",
        // Each training folder's own curves and held-out figures.
        "tokenizer/val.jsonl",
        "tokenizer/loss.png",
        "tokenizer/psnr.png",
        "mvar/val.jsonl",
        "mvar/loss.png",
        "mvar/lr.png",
        // The weights of the lowest held-out loss, a model folder.
        "mvar/best/model.safetensors",
        "mvar/best/model.json",
    ] {
        let f = out.join(file);
        assert!(
            std::fs::metadata(&f).is_ok_and(|m| m.len() > 0),
            "{} was not written:\n{log}",
            f.display()
        );
    }
    // The closing lines name the samples, reconstructions, curves and report.
    let tail = &log[log.find("done. samples").expect("no closing summary")..];
    for file in [
        "mvar/samples.png",
        "mvar/progression.png",
        "tokenizer/recon.png",
        "loss.png",
        "lr.png",
        "mvar/eval.json",
    ] {
        let f = out.join(file).display().to_string();
        assert!(tail.contains(&f), "the summary does not name {f}:\n{tail}");
    }
    assert!(tail.contains("the classifier labels"), "{tail}");
    assert_eq!(metric_lines(&out.join("mvar")).len(), 2);
    assert_eq!(metric_lines(&out.join("tokenizer")).len(), 2);
    // The held-out split scored before the first step and after the last.
    for stage in ["tokenizer", "mvar"] {
        let steps: Vec<_> = val_lines(&out.join(stage))
            .iter()
            .map(|v| v["step"].clone())
            .collect();
        assert_eq!(steps, [0, 2], "{stage}/val.jsonl");
    }
    // The report covers the 12 held-out images at every scale of the demo's pyramid and 20
    // samples per class.
    let eval: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("mvar/eval.json")).unwrap())
            .unwrap();
    assert_eq!(eval["images"], 12, "{eval}");
    assert_eq!(
        eval["per_scale"].as_array().map(Vec::len),
        Some(6),
        "{eval}"
    );
    assert_eq!(eval["sample_quality"]["samples"], 40, "{eval}");
    assert_eq!(eval["sample_quality"]["chance"], 0.5, "{eval}");
    let _ = std::fs::remove_dir_all(&root);
}

/// `MVAR_PROFILE=trace=FILE`: a timeline in the trace-event format (what Perfetto opens), with
/// each training step's forward, backward and update as spans, the ops (with their shapes) inside
/// them, and the closing samples' scales.
#[test]
fn a_profiled_run_writes_a_timeline_of_its_steps_and_ops() {
    let (data, tok) = tokenizer();
    let root = scratch("trace");
    let trace = root.join("timeline.json");
    let log = ok(train_cmd(data, tok, &root.join("mvar"), 3)
        .env("MVAR_PROFILE", format!("trace={}", trace.display())));
    assert!(log.contains("op profile (MVAR_PROFILE)"), "{log}");
    assert!(
        log.contains(&format!("events in {}", trace.display())),
        "{log}"
    );
    let events: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(&trace).unwrap()).expect("one JSON array");
    assert_eq!(events[0]["args"]["name"], "mvar train");
    let complete: Vec<&serde_json::Value> = events.iter().filter(|e| e["ph"] == "X").collect();
    let name = |e: &serde_json::Value| e["name"].as_str().unwrap().to_string();
    let start = |e: &serde_json::Value| e["ts"].as_f64().unwrap();
    let end = |e: &serde_json::Value| start(e) + e["dur"].as_f64().unwrap();
    let spans = |prefix: &str| -> Vec<&serde_json::Value> {
        complete
            .iter()
            .copied()
            .filter(|e| e["cat"] == "span" && name(e).starts_with(prefix))
            .collect()
    };
    let steps = spans("train step ");
    let names: Vec<String> = steps.iter().map(|e| name(e)).collect();
    assert_eq!(names, ["train step 1", "train step 2", "train step 3"]);
    for step in &steps {
        // Times are written to the nanosecond: an inner event may pass its span's rounded end
        // by that much.
        let inside = |e: &serde_json::Value| start(e) >= start(step) && end(e) <= end(step) + 0.01;
        for part in ["forward", "backward", "clip and AdamW"] {
            assert!(
                spans(part).into_iter().any(inside),
                "{}: no {part} span inside it",
                name(step)
            );
        }
        assert!(complete.iter().any(|e| e["cat"] == "op"
            && name(e) == "matmul"
            && e["args"]["shapes"]
                .as_str()
                .is_some_and(|s| s.starts_with('['))
            && inside(e)));
        assert!(complete
            .iter()
            .any(|e| e["cat"] == "op,backward" && name(e).ends_with(" (backward)") && inside(e)));
    }
    assert!(!spans("MVAR scale 0 (1x1)").is_empty());
    // On a GPU, a second track holds the ops' GPU times, read in batches at a device sync each.
    let gpu: Vec<&serde_json::Value> = complete
        .iter()
        .copied()
        .filter(|e| e["cat"].as_str().is_some_and(|c| c.starts_with("gpu")))
        .collect();
    // Memory counters: the host heap always, the GPU allocator on a GPU.
    let counters = |prefix: &str| {
        events
            .iter()
            .filter(|e| {
                e["ph"] == "C"
                    && name(e).starts_with(prefix)
                    && e["args"]["MiB"].as_f64().is_some_and(|m| m > 0.0)
            })
            .count()
    };
    assert!(counters("host heap (live)") > 0);
    if device() == "cpu" {
        assert_eq!(counters("cuda:"), 0);
        assert!(gpu.is_empty(), "GPU times in a CPU run: {:?}", gpu[0]);
    } else {
        assert!(events.iter().any(|e| e["ph"] == "M"
            && e["tid"] == 1000
            && e["args"]["name"] == "cuda:0 (GPU time)"));
        assert!(gpu
            .iter()
            .all(|e| e["tid"] == 1000 && e["dur"].as_f64() >= Some(0.0)));
        assert!(gpu
            .iter()
            .any(|e| name(e) == "matmul" && e["args"]["shapes"].is_string()));
        assert!(gpu.iter().any(|e| e["cat"] == "gpu,backward"));
        assert!(!spans("timeline: reading").is_empty());
        assert!(counters("cuda:0 memory") > 0);
    }
    // A timeline that cannot be written stops the run before it starts, naming the file.
    let unwritable = root.join("no-such-folder").join("run.json");
    fails(
        train_cmd(data, tok, &root.join("not-traced"), 2)
            .env("MVAR_PROFILE", format!("trace={}", unwritable.display())),
        &[
            "cannot write the trace to",
            &unwritable.display().to_string(),
        ],
    );
    assert!(!root.join("not-traced").join("metrics.jsonl").exists());
    let _ = std::fs::remove_dir_all(&root);
}

/// With --minutes, --steps is an upper bound: a device that could fill the budget with more
/// steps stops at the cap (the demo relies on it so that a GPU finishes early).
#[test]
fn a_time_budget_never_trains_past_steps() {
    let (data, tok) = tokenizer();
    let root = scratch("budget");
    let out = root.join("mvar");
    let log = ok(train_cmd(data, tok, &out, 12).args(["--minutes", "0.3"]));
    assert!(log.contains("training 12 steps (the --steps cap;"), "{log}");
    assert_eq!(metric_lines(&out).len(), 12);
    let tok_out = root.join("tok");
    let log = ok(mvar()
        .arg("train-tokenizer")
        .args(TOKENIZER_FLAGS)
        .args([
            "--vocab",
            "16",
            "--steps",
            "11",
            "--minutes",
            "0.3",
            "--data",
        ])
        .arg(data)
        .arg("--out")
        .arg(&tok_out));
    assert!(log.contains("training 11 steps (the --steps cap;"), "{log}");
    assert_eq!(metric_lines(&tok_out).len(), 11);
    // The tokenizer sets its step count again at step 60 (50 steps after the calibration): the
    // cap holds there too.
    let tok_out = root.join("tok-replanned");
    let log = ok(mvar()
        .arg("train-tokenizer")
        .args(TOKENIZER_FLAGS)
        .args(["--vocab", "16", "--steps", "63", "--minutes", "1", "--data"])
        .arg(data)
        .arg("--out")
        .arg(&tok_out));
    assert!(log.contains("training 63 steps (the --steps cap;"), "{log}");
    assert_eq!(metric_lines(&tok_out).len(), 63);
    // --epochs caps the steps (and a budget) at that many passes over the token cache: the 12
    // images, each with and without its flip, at batch 4 are 6 steps a pass.
    let out = root.join("mvar-epochs");
    let log = ok(train_cmd(data, tok, &out, 40).args(["--epochs", "2.5", "--minutes", "0.3"]));
    assert!(
        log.contains("epochs: 2.5 passes over 24 sequences at batch 4 cap the run at 15 steps"),
        "{log}"
    );
    assert!(log.contains("training 15 steps (the --steps cap;"), "{log}");
    assert_eq!(metric_lines(&out).len(), 15);
    fails(
        train_cmd(data, tok, &root.join("mvar-no-epochs"), 4).args(["--epochs", "0"]),
        &["--epochs 0", "expected a number of passes > 0"],
    );
    fails(
        train_cmd(data, tok, &root.join("mvar-drop-path"), 4).args(["--drop-path", "1.5"]),
        &["drop_path_rate 1.5", "expected a rate below 1"],
    );
    let _ = std::fs::remove_dir_all(&root);
}

/// Runs `mvar <cmd> <arg>` and expects a usage error: clap's exit status 2 while the flags are
/// read, before anything runs, with each of `needles` in its message.
fn usage_error(cmd: &str, arg: &str, needles: &[&str]) {
    let o = mvar().arg(cmd).arg(arg).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{cmd} {arg}:\n{err}");
    for n in needles {
        assert!(err.contains(n), "{cmd} {arg}: lacks {n:?}:\n{err}");
    }
}

#[test]
fn a_guidance_strength_that_is_not_a_finite_number_is_refused() {
    for cmd in ["sample", "eval", "train"] {
        for bad in ["nan", "inf", "-inf"] {
            usage_error(
                cmd,
                &format!("--cfg={bad}"),
                &[
                    &format!("invalid value '{bad}' for '--cfg"),
                    "expected a finite number",
                ],
            );
        }
    }
}

#[test]
fn loss_weights_rates_and_batches_that_a_step_cannot_use_are_named_before_training() {
    let out = scratch("bad-flags");
    let tok = "train-tokenizer";
    for (cmd, flag, value, message) in [
        (tok, "--l1", "-1", "--l1 -1: expected a finite number >= 0"),
        (
            tok,
            "--l2",
            "nan",
            "--l2 NaN: expected a finite number >= 0",
        ),
        (
            tok,
            "--chroma",
            "-2",
            "--chroma -2: expected a finite number >= 0",
        ),
        (
            tok,
            "--beta",
            "inf",
            "--beta inf: expected a finite number >= 0",
        ),
        (
            tok,
            "--lr",
            "-0.1",
            "--lr -0.1: expected a finite number >= 0",
        ),
        (
            tok,
            "--batch",
            "0",
            "--batch 0: expected at least one image per step",
        ),
        (
            "train",
            "--wpe",
            "nan",
            "--wpe NaN: expected a finite number >= 0",
        ),
        (
            "train",
            "--weight-decay",
            "-1",
            "--weight-decay -1: expected a finite number >= 0",
        ),
        (
            "train",
            "--batch",
            "0",
            "--batch 0: expected at least one sequence per step",
        ),
    ] {
        fails(
            mvar()
                .arg(cmd)
                .arg(format!("{flag}={value}"))
                .arg("--out")
                .arg(out.join(cmd)),
            &[message],
        );
    }
    assert!(!out.join(tok).exists() && !out.join("train").exists());
}

#[test]
fn bench_refuses_neighbourhoods_that_do_not_fit_before_timing_any_model() {
    let o = mvar()
        .args([
            "bench", "--model", "var-d1", "--model", "mvar-d1", "--vae-ch", "32",
        ])
        .args([
            "--batch",
            "1",
            "--sample-batch",
            "1",
            "--steps",
            "1",
            "--sample-reps",
            "1",
        ])
        .args(["--kernel-size", "4"])
        .output()
        .unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert_eq!(o.status.code(), Some(1), "{out}\n{err}");
    assert!(err.contains("kernel_size 4: expected an odd size"), "{err}");
    assert!(
        !out.contains("train step"),
        "a model was timed first:\n{out}"
    );
}

#[test]
fn a_folder_that_is_not_a_model_folder_is_named_with_what_it_is() {
    let root = scratch("not-a-model");
    let (_, tok) = tokenizer();
    for (dir, what) in [
        (root.join("missing"), "no such folder"),
        (root.clone(), "a folder without model.json"),
        (
            tok.clone(),
            "a tokenizer folder written by `mvar train-tokenizer` instead",
        ),
    ] {
        for cmd in ["sample", "eval"] {
            fails(
                mvar()
                    .arg(cmd)
                    .arg("--ckpt")
                    .arg(&dir)
                    .arg("--out")
                    .arg(root.join("out")),
                &[
                    what,
                    "expected a model folder written by `mvar train` or `mvar import`",
                ],
            );
        }
    }
    // And a model folder where a tokenizer is expected.
    let data = root.join("data");
    tiny_images(&data);
    let model = root.join("model");
    ok(&mut train_cmd(&data, tok, &model, 1));
    fails(
        &mut train_cmd(&data, &model, &root.join("model2"), 1),
        &[
            "a model folder written by `mvar train` or `mvar import` instead",
            "expected a tokenizer folder written by `mvar train-tokenizer`",
        ],
    );
}

#[test]
fn a_budget_that_is_not_a_positive_number_of_minutes_is_refused() {
    for cmd in ["demo", "train", "train-tokenizer", "train-classifier"] {
        for bad in ["0", "-1", "nan", "inf", "ten"] {
            usage_error(
                cmd,
                &format!("--minutes={bad}"),
                &[
                    &format!("invalid value '{bad}' for '--minutes"),
                    "expected a number of minutes above 0",
                ],
            );
        }
    }
}

#[test]
fn missing_and_empty_data_folders_are_named() {
    let root = scratch("nodata");
    let missing = root.join("does-not-exist");
    fails(
        mvar()
            .arg("train-tokenizer")
            .args(TOKENIZER_FLAGS)
            .arg("--data")
            .arg(&missing)
            .arg("--out")
            .arg(root.join("o")),
        &["does-not-exist"],
    );
    let empty = root.join("empty");
    std::fs::create_dir_all(empty.join("some-class")).unwrap();
    fails(
        mvar()
            .arg("train-tokenizer")
            .args(TOKENIZER_FLAGS)
            .arg("--data")
            .arg(&empty)
            .arg("--out")
            .arg(root.join("o")),
        &["no images found", "empty"],
    );
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn unreadable_and_truncated_images_are_named() {
    let root = scratch("badimg");
    let data = root.join("data");
    tiny_images(&data);
    std::fs::write(data.join("red").join("garbage.png"), b"this is not a png").unwrap();
    fails(
        mvar()
            .arg("train-tokenizer")
            .args(TOKENIZER_FLAGS)
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(root.join("o")),
        &["garbage.png"],
    );
    std::fs::remove_file(data.join("red").join("garbage.png")).unwrap();
    let good = std::fs::read(data.join("blue").join("0.png")).unwrap();
    std::fs::write(data.join("blue").join("cut.png"), &good[..good.len() / 2]).unwrap();
    fails(
        mvar()
            .arg("train-tokenizer")
            .args(TOKENIZER_FLAGS)
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(root.join("o")),
        &["cut.png"],
    );
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn mixed_image_sizes_are_refused_where_images_are_used_as_they_are() {
    let root = scratch("mixed");
    let data = root.join("data");
    tiny_images(&data);
    image::RgbImage::from_pixel(12, 8, image::Rgb([9, 9, 9]))
        .save(data.join("blue").join("wide.png"))
        .unwrap();
    let exact = |data: &Path| {
        let mut c = mvar();
        c.arg("train-tokenizer")
            .args(TOKENIZER_FLAGS)
            .args(["--steps", "1", "--preprocess", "exact", "--data"])
            .arg(data)
            .arg("--out")
            .arg(root.join("o"));
        c
    };
    fails(
        &mut exact(&data),
        &["wide.png", "image is 12x8", "expected 8x8", "mixed sizes"],
    );
    // The official preprocessing resizes, so the same folder trains.
    ok(mvar()
        .arg("train-tokenizer")
        .args(TOKENIZER_FLAGS)
        .args(["--steps", "1", "--data"])
        .arg(&data)
        .arg("--out")
        .arg(root.join("o2")));
    std::fs::remove_file(data.join("blue").join("wide.png")).unwrap();
    ok(&mut exact(&data));
    let _ = std::fs::remove_dir_all(&root);
}

/// Out of GPU memory: a batch far beyond any GPU's memory stops with exit 1 and a message that
/// says what was asked and what was free. Needs a GPU (skipped, and said so, without one).
#[test]
fn running_out_of_gpu_memory_says_what_was_asked_and_free() {
    let probe = mvar()
        .env("MVAR_DEVICE", "cuda")
        .arg("info")
        .output()
        .unwrap();
    if !probe.status.success() || !text(&probe).contains("device: cuda") {
        assert!(
            std::env::var("MVAR_REQUIRE_GPU").as_deref() != Ok("1"),
            "MVAR_REQUIRE_GPU=1 but `mvar info` found no CUDA device:\n{}",
            text(&probe)
        );
        eprintln!("skipped: no CUDA device");
        return;
    }
    let root = scratch("oom");
    let data = root.join("data");
    tiny_images(&data);
    // A batch of 2048 images of 256 x 256 through 512 channels: the first conv's output alone
    // is 275 GB, while the batch on the host is 1.6 GB and the weights ~0.3 GB.
    let mut c = mvar();
    c.env("MVAR_DEVICE", "cuda")
        .arg("train-tokenizer")
        .args(["--side", "256", "--ch", "512", "--ch-mult", "1,1,1,1,1"])
        .args(["--res-blocks", "1", "--patch-nums", "1,2,4,8,16"])
        .args(["--batch", "2048", "--steps", "1"])
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(root.join("o"));
    fails(&mut c, &["CUDA out of memory", "asked for", "bytes free"]);
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn micro_batch_auto_trains_in_the_passes_that_fit_the_gpu() {
    // Needs a GPU of a known, small memory: the CUDA emulator, whose size is set per process
    // (MVAR_EMU_MEMORY_MB). On the CPU nothing runs out of GPU memory, and a real GPU has what
    // it has.
    if device() != "cuda" {
        eprintln!("skipped: the CPU has no GPU memory to run out of");
        return;
    }
    if !text(&mvar().arg("info").output().unwrap()).contains("mvar CUDA emulator") {
        eprintln!("skipped: not the CUDA emulator, whose memory size the test sets");
        return;
    }
    let (data, tok) = tokenizer();
    let root = scratch("micro-auto");
    // 80 MiB: 32 of them the cuBLAS workspace; a batch of 256 of this model needs more than 96
    // in one pass, passes of 64 need less than 64 (measured on the emulator, 2026-12-08).
    let train = |micro: &str, out: &str| {
        let mut c = mvar();
        c.env("MVAR_EMU_MEMORY_MB", "80")
            .args(["train", "--model", "var", "--depth", "1", "--width", "128"])
            .args(["--heads", "2", "--batch", "256", "--steps", "2"])
            .args(["--checkpoint-every", "10", "--log-every", "1000"])
            .args(["--micro-batch", micro])
            .arg("--data")
            .arg(data)
            .arg("--tokenizer")
            .arg(tok)
            .arg("--out")
            .arg(root.join(out));
        c
    };
    let t = ok(&mut train("auto", "auto"));
    let line = t
        .lines()
        .find(|l| l.contains("out of GPU memory in passes of 256 sequences"))
        .unwrap_or_else(|| panic!("no line on the passes that did not fit:\n{t}"));
    let found: usize = line
        .split("passes of ")
        .nth(2)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no pass size in {line:?}"));
    assert!((1..256).contains(&found), "{line}");
    // The steps are those of a run given that pass size from the start, to the bit: the step
    // that ran out of memory left no gradient and no random draw behind. The checkpoint keeps
    // the size for a resumed run.
    ok(&mut train(&found.to_string(), "fixed"));
    assert_eq!(
        metric_lines(&root.join("auto")),
        metric_lines(&root.join("fixed"))
    );
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn a_truncated_array_data_set_is_named() {
    // Raw arrays have one fixed image size: a file that is not a whole number of records has
    // a truncated or foreign image in it.
    let root = scratch("badbin");
    std::fs::write(root.join("batches.meta.txt"), "a\nb\n").unwrap();
    std::fs::write(root.join("train.bin"), vec![0u8; 3073 * 2 + 100]).unwrap();
    fails(
        mvar()
            .arg("train-tokenizer")
            .args(["--data"])
            .arg(&root)
            .arg("--out")
            .arg(root.join("o")),
        &["train.bin", "expected a non-empty multiple of 3073"],
    );
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn a_checkpoint_of_another_config_is_refused() {
    let (data, tok) = tokenizer();
    let root = scratch("otherckpt");
    let out = root.join("m");
    ok(&mut train_cmd(data, tok, &out, 2));
    fails(
        train_cmd_depth(data, tok, &out, 2, 2).arg("--resume"),
        &["train.safetensors"],
    );
    // A tokenizer checkpoint with another codebook size.
    let tok2 = root.join("tok2");
    ok(mvar()
        .arg("train-tokenizer")
        .args(TOKENIZER_FLAGS)
        .args(["--vocab", "16", "--steps", "2", "--data"])
        .arg(data)
        .arg("--out")
        .arg(&tok2));
    fails(
        mvar()
            .arg("train-tokenizer")
            .args(TOKENIZER_FLAGS)
            .args(["--vocab", "32", "--steps", "4", "--resume", "--data"])
            .arg(data)
            .arg("--out")
            .arg(&tok2),
        &["tokenizer-train.safetensors"],
    );
    // A missing checkpoint to resume is named too.
    fails(
        train_cmd(data, tok, &root.join("nothing-here"), 2).arg("--resume"),
        &["nothing-here"],
    );
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn a_diverging_run_stops_at_the_bad_step_and_keeps_the_last_checkpoint() {
    let (data, tok) = tokenizer();
    let root = scratch("nan");
    let out = root.join("m");
    let mut cmd = train_cmd(data, tok, &out, 200);
    cmd.args(["--base-lr", "1e30", "--warmup", "0"]);
    fails(
        &mut cmd,
        &[
            "stopped at step",
            "last good checkpoint",
            "train.safetensors",
        ],
    );
    let lines = metric_lines(&out);
    assert!(lines.len() < 200, "the run should have stopped early");
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn classifier_and_eval_report_the_figures_and_refuse_mismatched_inputs() {
    let (_, tok) = tokenizer();
    let root = scratch("eval");
    let data = root.join("data");
    tiny_images(&data.join("train"));
    tiny_images(&data.join("test"));
    let model = root.join("m");
    ok(&mut train_cmd(&data, tok, &model, 2));
    let clf = root.join("clf");
    let classifier = |data: &Path, out: &Path| {
        let mut c = mvar();
        c.args(["train-classifier", "--side", "8", "--channels", "8,16"])
            .args(["--steps", "3", "--batch", "4", "--data"])
            .arg(data)
            .arg("--out")
            .arg(out);
        c
    };
    let t = ok(&mut classifier(&data, &clf));
    assert!(t.contains("val: accuracy"), "{t}");
    let eval = |clf: &Path| {
        let mut c = mvar();
        c.args(["eval", "--per-class", "2", "--ckpt"])
            .arg(&model)
            .arg("--classifier")
            .arg(clf)
            .arg("--data")
            .arg(&data);
        c
    };
    let t = ok(&mut eval(&clf));
    for needle in [
        "reconstruction PSNR",
        "classifier accuracy of the samples",
        "Frechet distance",
    ] {
        assert!(t.contains(needle), "eval output lacks {needle:?}:\n{t}");
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("eval.json")).unwrap()).unwrap();
    assert_eq!(report["per_scale"].as_array().unwrap().len(), 3);
    let acc = report["sample_quality"]["classifier_accuracy"]
        .as_f64()
        .unwrap();
    assert!((0.0..=1.0).contains(&acc), "{report}");

    // A classifier of another class count.
    let three = root.join("three");
    tiny_images(&three);
    std::fs::create_dir_all(three.join("green")).unwrap();
    for f in ["0.png", "1.png"] {
        std::fs::copy(three.join("red").join(f), three.join("green").join(f)).unwrap();
    }
    let clf3 = root.join("clf3");
    ok(&mut classifier(&three, &clf3));
    fails(&mut eval(&clf3), &["clf3", "3 classes"]);
    // No held-out split, and a missing classifier folder, are named.
    fails(
        mvar()
            .args(["eval", "--ckpt"])
            .arg(&model)
            .arg("--data")
            .arg(&three),
        &["held-out split", "test"],
    );
    fails(&mut eval(&root.join("no-classifier")), &["no-classifier"]);
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn edit_writes_a_sheet_and_names_a_bad_box_or_image() {
    let (data, tok) = tokenizer();
    let root = scratch("edit");
    let model = root.join("m");
    ok(&mut train_cmd(data, tok, &model, 2));
    let image = data.join("red").join("0.png");
    let edit = |extra: &[&str], image: &Path| {
        let mut c = mvar();
        c.args(["edit", "--n", "2", "--ckpt"])
            .arg(&model)
            .arg("--image")
            .arg(image)
            .arg("--out")
            .arg(root.join("e"))
            .args(extra);
        c
    };
    let t = ok(&mut edit(&["--box", "0,0,4,8"], &image));
    assert!(t.contains("in-painting") && t.contains("50%"), "{t}");
    assert!(root.join("e").join("edits.png").is_file());
    // Classes are the sorted folder names: 0 = blue, 1 = red.
    let t = ok(&mut edit(&["--outpaint", "--class", "0"], &image));
    assert!(t.contains("out-painting") && t.contains("blue"), "{t}");
    fails(
        &mut edit(&["--box", "0,0,9,4"], &image),
        &["box", "x1 <= 8"],
    );
    fails(&mut edit(&["--box", "1,2,3"], &image), &["--box", "four"]);
    fails(
        &mut edit(&["--box", "0,0,4,8", "--more-smooth"], &image),
        &["more_smooth", "teacher-forces"],
    );
    let broken = root.join("broken.png");
    std::fs::write(&broken, b"\x89PNG\r\n\x1a\nnot really").unwrap();
    fails(&mut edit(&[], &broken), &["broken.png"]);
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn init_from_takes_a_folder_or_a_file_strictly_and_model_names_carry_the_depth() {
    let (data, tok) = tokenizer();
    let root = scratch("init");
    let base = root.join("base");
    ok(&mut train_cmd(data, tok, &base, 2));
    let weights = base.join("model.safetensors");
    for (i, init) in [base.clone(), weights.clone()].iter().enumerate() {
        let t = ok(train_cmd(data, tok, &root.join(format!("ft{i}")), 2)
            .arg("--init-from")
            .arg(init));
        assert!(
            t.contains("initialised from") && t.contains("model.safetensors"),
            "{t}"
        );
    }
    // `--model mvar-d2` sets depth 2 (it overrides --depth 1): the depth-1 weights lack block 1.
    let mut deeper = train_cmd_model(data, tok, &root.join("d2"), 2, 1, "mvar-d2");
    deeper.arg("--init-from").arg(&weights);
    fails(&mut deeper, &["model.safetensors", "blocks.1"]);
    // A malformed name is a usage error (clap's exit status 2) that says what is accepted.
    let o = train_cmd_model(data, tok, &root.join("bad"), 2, 1, "mvar-dx")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("positive integer"));
    let _ = std::fs::remove_dir_all(&root);
}

/// `mvar bench --what tokenizer` times the tokenizer's training step (the fresh tokenizer of the
/// --vae-* flags), writes the figures to the JSON, and times no transformer.
#[test]
fn bench_times_the_tokenizer_training_step() {
    let json = scratch("bench-tokenizer").join("bench.jsonl");
    let out = ok(mvar()
        .args(["bench", "--what", "tokenizer", "--vae-ch", "32"])
        .args(["--vae-ch-mult", "1,1", "--vae-res-blocks", "1"])
        .args(["--patch-nums", "1,2,4", "--vocab", "32", "--batch", "2"])
        .args(["--steps", "2", "--json"])
        .arg(&json));
    for needle in [
        "1 residual blocks per level",
        "8x8 images",
        "precision f32",
        "tokenizer train step, batch 2:",
        "(median of 2 steps;",
        "peak memory",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in:\n{out}");
    }
    assert!(!out.contains("== var") && !out.contains("== mvar"), "{out}");
    let text = std::fs::read_to_string(&json).unwrap();
    let figures: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(figures["model"], "tokenizer");
    assert_eq!(
        (figures["batch"].as_u64(), figures["side"].as_u64()),
        (Some(2), Some(8))
    );
    assert_eq!(figures["steps"].as_u64(), Some(2));
    assert!(figures["median_s"].as_f64().unwrap() > 0.0, "{text}");
    assert!(figures["peak_bytes"].as_u64().unwrap() > 0, "{text}");
}

/// `mvar bench` on a tiny VAR and MVAR: every MVAR segment is timed, memory is reported, the
/// JSON holds the same figures, and the ratio line compares the two models.
#[test]
fn bench_times_training_and_sampling_and_states_the_ratios() {
    let root = scratch("bench");
    let json = root.join("bench.jsonl");
    let tiny = |kernel: &str, steps: &str| {
        let mut cmd = mvar();
        cmd.args(["bench", "--model", "var-d2", "--model", "mvar-d2"])
            .args(["--width", "64", "--heads", "2", "--batch", "3"])
            .args([
                "--sample-batch",
                "2",
                "--patch-nums",
                "1,2,3,4",
                "--vocab",
                "32",
            ])
            .args(["--classes", "3", "--vae-ch", "32", "--vae-ch-mult", "1,1"])
            .args([
                "--kernel-size",
                kernel,
                "--steps",
                steps,
                "--sample-reps",
                "1",
            ])
            .args(["--top-k", "5"]);
        cmd
    };
    let t = ok(tiny("3", "2").arg("--json").arg(&json));
    for needle in [
        "== var-d2",
        "== mvar-d2",
        "3x3 neighbourhoods from scale 2",
        "train segment scales 0..2 (5 tokens, 80 % of steps)",
        "train segment scales 2..3 (9 tokens, 10 % of steps)",
        "train segment scales 3..4 (16 tokens, 10 % of steps)",
        "train step, batch 3:",
        "sample 2 images:",
        "== var-d2 : mvar-d2 (VAR's figure over MVAR's): training step time",
    ] {
        assert!(t.contains(needle), "no {needle:?} in:\n{t}");
    }
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&json)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for (line, segments) in lines.iter().zip([1, 3]) {
        let train = &line["train"]["measured"];
        let segs = train["segments"].as_array().unwrap();
        assert_eq!(segs.len(), segments, "{line}");
        assert!(segs.iter().all(|s| s["steps"] == 2), "{line}");
        let share: f64 = segs.iter().map(|s| s["share"].as_f64().unwrap()).sum();
        assert!((share - 1.0).abs() < 1e-9, "{line}");
        assert!(train["step_s"].as_f64().unwrap() > 0.0, "{line}");
        assert!(train["peak_bytes"].as_u64().unwrap() > 0, "{line}");
        let sample = &line["sample"]["measured"];
        assert!(sample["batch_s"].as_f64().unwrap() > sample["decode_s"].as_f64().unwrap());
        assert!(sample["weights_bytes"].as_u64().unwrap() > 0, "{line}");
    }
    // An even kernel is refused by the model, naming the size.
    fails(&mut tiny("4", "2"), &["kernel_size 4", "odd"]);
    fails(&mut tiny("3", "0"), &["--steps 0"]);
    let _ = std::fs::remove_dir_all(&root);
}

/// The fixture set: `MVAR_FIXTURES_DIR`, default ../shared/fixtures next to the repository.
fn fixtures_dir() -> PathBuf {
    std::env::var_os("MVAR_FIXTURES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures"))
}

/// Official weights through the command line: `mvar import` makes a model folder of the weights
/// files a fixture set's sampling outputs name (configuration read off the tensors), then greedy
/// `mvar sample` with the fixture's labels and guidance writes exactly the official sampler's
/// tokens, and, where the fixture stores the image, the same image to the PNG's 8-bit rounding.
/// Driven by manifest.json: every file produced by `VAR.autoregressive_infer_cfg` or
/// `MVAR.autoregressive_infer`, every run it holds.
#[test]
fn imported_official_weights_sample_as_the_official_code() {
    use mvar_models::checkpoint::read_safetensors;
    let dir = fixtures_dir();
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("manifest.json")).unwrap_or_else(|e| {
            panic!(
                "{}/manifest.json: {e} (set MVAR_FIXTURES_DIR)",
                dir.display()
            )
        }),
    )
    .unwrap();
    let root = scratch("import");
    let mut checked = 0;
    for (file, entry) in manifest["files"].as_object().unwrap() {
        let producers = entry["producer"]["functions"].to_string();
        if !producers.contains("autoregressive_infer") {
            continue;
        }
        let kind = if producers.contains("MVAR.") {
            "mvar"
        } else {
            "var"
        };
        let cfg = &entry["config"];
        // "var_weights.safetensors (a note)": the file name is the first word.
        let named = |key: &str| {
            let v = cfg[key]
                .as_str()
                .unwrap_or_else(|| panic!("{file}: no {key}"));
            dir.join(v.split_whitespace().next().unwrap())
        };
        assert_eq!(
            cfg["top_k"], 1,
            "{file}: only greedy sampling is reproducible"
        );
        let model = root.join(file).join("model");
        let t = ok(mvar()
            .args(["import", "--kind", kind, "--model"])
            .arg(named("weights_file"))
            .arg("--vae")
            .arg(named("vqvae_weights_file"))
            .arg("--out")
            .arg(&model));
        assert!(t.contains(&format!("{kind}-d")), "{t}");
        let want = read_safetensors(&dir.join(file)).unwrap();
        let labels = want["label_B"].to_vec::<i64>().unwrap();
        for (run, rc) in cfg["runs"].as_object().unwrap() {
            let prefix = if run == "main" {
                String::new()
            } else {
                run.clone()
            };
            let out = root.join(file).join(run);
            let npz = out.join("samples.npz");
            let mut cmd = mvar();
            cmd.arg("sample");
            // The fixtures are f32 runs: on the CPU, where `auto` is f32, the default is checked;
            // on a GPU, where `auto` is bf16, f32 is asked for.
            if device() != "cpu" {
                cmd.args(["--precision", "f32"]);
            }
            // One image per batch: batching must not change greedy tokens.
            cmd.args(["--n", "1", "--top-k", "1", "--top-p", "0", "--tokens"])
                .args(["--batch", "1", "--npz"])
                .arg(&npz)
                .args(["--cfg", &rc["cfg"].to_string()])
                .arg("--ckpt")
                .arg(&model)
                .arg("--out")
                .arg(&out);
            for l in &labels {
                cmd.args(["--class", &l.to_string()]);
            }
            let t = ok(&mut cmd);
            assert!(t.contains(", f32)"), "expected an f32 run:\n{t}");
            let got = read_safetensors(&out.join("tokens.safetensors")).unwrap();
            assert_eq!(got["label_B"].to_vec::<i64>().unwrap(), labels);
            let mut si = 0;
            while let Some(w) = want.get(&format!("{prefix}idx.{si}")) {
                let g = got
                    .get(&format!("idx.{si}"))
                    .unwrap_or_else(|| panic!("{file} {run}: no idx.{si} written"));
                assert_eq!(
                    g.to_vec::<i64>().unwrap(),
                    w.to_vec::<i64>().unwrap(),
                    "{file} {run}: scale {si}"
                );
                si += 1;
            }
            assert!(
                si > 0
                    && got.contains_key(&format!("idx.{}", si - 1))
                    && !got.contains_key(&format!("idx.{si}"))
            );
            // The .npz holds the PNGs' pixels, NHWC, after numpy's header.
            let npy = {
                use std::io::Read;
                let mut z = zip::ZipArchive::new(std::fs::File::open(&npz).unwrap()).unwrap();
                let mut f = z.by_name("arr_0.npy").unwrap();
                let mut v = Vec::new();
                f.read_to_end(&mut v).unwrap();
                v
            };
            let data = &npy[10 + u16::from_le_bytes([npy[8], npy[9]]) as usize..];
            let header = String::from_utf8_lossy(&npy[10..npy.len() - data.len()]).to_string();
            let n = labels.len();
            let side = ((data.len() / n / 3) as f64).sqrt() as usize;
            assert!(
                header.contains(&format!("'shape': ({n}, {side}, {side}, 3)")),
                "{header}"
            );
            for (i, l) in labels.iter().enumerate() {
                let png = image::open(out.join(format!("{i:04}-{l}.png")))
                    .unwrap()
                    .to_rgb8();
                assert!(png.as_raw()[..] == data[i * side * side * 3..(i + 1) * side * side * 3]);
            }
            if let Some(img) = want.get(&format!("{prefix}img")) {
                let (b, s) = (img.dims()[0], img.dims()[2]);
                let px = img.to_vec::<f32>().unwrap();
                for (i, l) in labels.iter().enumerate().take(b) {
                    let png = image::open(out.join(format!("{i:04}-{l}.png")))
                        .unwrap()
                        .to_rgb8();
                    let mut worst = 0.0f32;
                    for (x, y, p) in png.enumerate_pixels() {
                        for c in 0..3 {
                            let v = px[((i * 3 + c) * s + y as usize) * s + x as usize] * 255.0;
                            let d = mvar_ops::testing::abs_diff(p[c] as f64, v as f64);
                            worst = worst.max(d as f32);
                        }
                    }
                    // Rounding to 8 bits costs 0.5, plus the fixture README's f32 image
                    // tolerance, 1e-4 (0.0255 of 255).
                    assert!(
                        worst <= 0.5 + 255.0 * 1e-4,
                        "{file} {run}: image {i} off by {worst} of 255"
                    );
                }
            }
            checked += 1;
        }
        // bf16 autocast runs through (its tokens may differ from f32's where margins are small).
        let bf16 = root.join(file).join("bf16");
        let t = ok(mvar()
            .args([
                "sample",
                "--n",
                "1",
                "--class",
                "0",
                "--precision",
                "bf16",
                "--tokens",
                "--no-png",
            ])
            .arg("--ckpt")
            .arg(&model)
            .arg("--out")
            .arg(&bf16));
        assert!(t.contains("bf16 autocast"), "{t}");
        let got = read_safetensors(&bf16.join("tokens.safetensors")).unwrap();
        assert_eq!(got["idx.0"].dims(), [1, want["idx.0"].dims()[1]]);
        let files: Vec<_> = std::fs::read_dir(&bf16)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(files, ["tokens.safetensors"], "--no-png wrote images");
    }
    assert!(
        checked > 0,
        "the manifest in {} lists no sampling fixture",
        dir.display()
    );
    let _ = std::fs::remove_dir_all(&root);
}

/// `mvar import` refuses what does not fit, naming the file and what was expected, and writes
/// nothing then.
#[test]
fn import_names_what_does_not_fit() {
    let dir = fixtures_dir();
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    let of_class = |class: &str| {
        let files = manifest["files"].as_object().unwrap();
        let (name, _) = files
            .iter()
            .find(|(_, e)| {
                e["config"]["class_"] == class && !e["config"]["weights_file"].is_string()
            })
            .unwrap_or_else(|| panic!("no {class} weights file in the manifest"));
        dir.join(name)
    };
    let (var_w, vae_w) = (of_class("VAR"), of_class("VQVAE"));
    let root = scratch("import-bad");
    let out = root.join("model");
    let import = |model: &Path, vae: &Path| {
        let mut c = mvar();
        c.args(["import", "--kind", "var", "--model"])
            .arg(model)
            .arg("--vae")
            .arg(vae)
            .arg("--out")
            .arg(&out);
        c
    };
    // The two files swapped: the transformer tensor that is looked for first is named.
    fails(
        &mut import(&vae_w, &var_w),
        &["\"pos_start\" is missing", "transformer weights"],
    );
    // A truncated file.
    let bytes = std::fs::read(&var_w).unwrap();
    let cut = root.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    fails(&mut import(&cut, &vae_w), &["cut.safetensors"]);
    // A pyramid that does not fit the weights.
    fails(
        import(&var_w, &vae_w).args(["--patch-nums", "1,2,3"]),
        &["pyramid [1, 2, 3] has 3 scales"],
    );
    // Class names that are not one per class.
    let names = root.join("names.txt");
    std::fs::write(&names, "cat\ndog\n").unwrap();
    fails(
        import(&var_w, &vae_w).arg("--class-names").arg(&names),
        &["names.txt", "2 class names"],
    );
    assert!(
        !out.join("model.json").exists(),
        "a refused import wrote a model"
    );
    // A folder that holds a model is kept unless --overwrite.
    ok(&mut import(&var_w, &vae_w));
    fails(
        &mut import(&var_w, &vae_w),
        &["already holds a model", "--overwrite"],
    );
    ok(import(&var_w, &vae_w).arg("--overwrite"));
    let _ = std::fs::remove_dir_all(&root);
}

/// `--recompute-activations`: the blocks run again in the backward, which must not change
/// training: with drop-path on (its masks replayed) and label dropout, MVAR's loss and gradient
/// norm curves are the plain run's, step for step.
#[test]
fn recomputed_activations_train_the_same_curve() {
    let (data, tok) = tokenizer();
    let root = scratch("recompute");
    let run = |name: &str, recompute: bool| {
        let out = root.join(name);
        let mut cmd = train_cmd_model(data, tok, &out, 6, 2, "mvar");
        cmd.args(["--drop-path", "0.3"]);
        if recompute {
            cmd.arg("--recompute-activations");
        }
        let log = ok(&mut cmd);
        (out, log)
    };
    let (plain, _) = run("plain", false);
    let (again, log) = run("recomputed", true);
    assert!(log.contains("block activations recomputed"), "{log}");
    let curve = |out: &Path| -> Vec<(f64, f64)> {
        metric_lines(out)
            .iter()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (
                    v["loss"].as_f64().unwrap(),
                    v["grad_norm"].as_f64().unwrap(),
                )
            })
            .collect()
    };
    let (a, b) = (curve(&plain), curve(&again));
    assert_eq!(a.len(), 6);
    assert_eq!(a, b, "loss and gradient norm per step");
    let _ = std::fs::remove_dir_all(&root);
}

/// `--micro-batch`: the batch runs in passes whose gradients add up, so without label dropout
/// and drop-path the loss curve is the one-pass curve (up to summation order); the setting is
/// stored in the checkpoint, which a resumed run keeps.
#[test]
fn micro_batches_follow_the_whole_batch_curve() {
    let (data, tok) = tokenizer();
    let root = scratch("micro");
    let run = |name: &str, micro: &str| {
        let out = root.join(name);
        let log = ok(train_cmd_model(data, tok, &out, 12, 1, "var").args([
            "--cond-drop",
            "0",
            "--drop-path",
            "0",
            "--micro-batch",
            micro,
        ]));
        (out, log)
    };
    let (whole, _) = run("whole", "0");
    let (parts, log) = run("parts", "3");
    assert!(log.contains("batch 4 in 2 passes of at most 3"), "{log}");
    let loss = |out: &Path| -> Vec<f64> {
        metric_lines(out)
            .iter()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                    .as_f64()
                    .unwrap()
            })
            .collect()
    };
    let (a, b) = (loss(&whole), loss(&parts));
    assert_eq!(a.len(), 12);
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-4 * x.abs(),
            "step {}: {x} vs {y}",
            i + 1
        );
    }
    // The checkpoint records the passes.
    let ckpt = std::fs::read(parts.join("train.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(ckpt[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8_lossy(&ckpt[8..8 + header_len]);
    let meta: serde_json::Value = serde_json::from_str(&header).unwrap();
    assert_eq!(
        meta["__metadata__"]["mvar.extra.micro_batch"], "3",
        "{}",
        meta["__metadata__"]
    );
    let _ = std::fs::remove_dir_all(&root);
}
