//! Reading `torch.save` checkpoints: the fixture `data/small.pth` is written by
//! `data/make_pth.py` (the layout torch.save writes, made without torch); see that script for
//! the exact contents checked here.

use std::collections::BTreeMap;
use std::io::{Cursor, Read, Write};
use std::path::{Path, PathBuf};

use half::bf16;
use mvar_engine::{DType, Tensor};
use mvar_models::checkpoint::read_safetensors;
use mvar_models::pth::{convert, parse_pth, read_pth};
use proptest::prelude::*;
use zip::write::SimpleFileOptions;
use zip::CompressionMethod;

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn small_bytes() -> Vec<u8> {
    std::fs::read(data("small.pth")).unwrap()
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mvar-pth-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The records of an archive, in order.
fn entries(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut z = zip::ZipArchive::new(Cursor::new(bytes)).unwrap();
    (0..z.len())
        .map(|i| {
            let mut f = z.by_index(i).unwrap();
            let mut buf = Vec::new();
            f.read_to_end(&mut buf).unwrap();
            (f.name().unwrap().to_string(), buf)
        })
        .collect()
}

fn build(entries: &[(String, Vec<u8>)], method: CompressionMethod) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let opts = SimpleFileOptions::default().compression_method(method);
    for (name, bytes) in entries {
        w.start_file(name.as_str(), opts).unwrap();
        w.write_all(bytes).unwrap();
    }
    w.finish().unwrap().into_inner()
}

/// small.pth with its records changed by `edit`.
fn edited(edit: impl FnOnce(&mut Vec<(String, Vec<u8>)>)) -> Vec<u8> {
    let mut e = entries(&small_bytes());
    edit(&mut e);
    build(&e, CompressionMethod::Stored)
}

fn record<'a>(e: &'a mut [(String, Vec<u8>)], name: &str) -> &'a mut Vec<u8> {
    &mut e.iter_mut().find(|(n, _)| n == name).unwrap().1
}

fn f32s(t: &Tensor) -> Vec<f32> {
    assert_eq!(t.dtype(), DType::F32);
    t.to_vec::<f32>().unwrap()
}

const MODEL_TENSORS: [&str; 12] = [
    "blocks.0.attn.proj.weight",
    "shared.base",
    "shared.view_t",
    "norm.weight",
    "pos.ids",
    "emb.weight",
    "head.bias",
    "mask",
    "counts",
    "bytes",
    "scale",
    "empty",
];

#[test]
fn reads_every_tensor_with_exact_values() {
    let c = read_pth(&data("small.pth"), None).unwrap();
    let mut want: Vec<String> = MODEL_TENSORS.iter().map(|n| format!("model.{n}")).collect();
    want.push("ema.0".into());
    want.sort();
    assert_eq!(c.tensors.keys().cloned().collect::<Vec<_>>(), want);
    let t = |n: &str| &c.tensors[&format!("model.{n}")];

    let w = t("blocks.0.attn.proj.weight");
    assert_eq!(w.dims(), &[3, 4]);
    assert_eq!(
        f32s(w),
        (0..12).map(|i| 0.5 * i as f32 - 2.0).collect::<Vec<_>>()
    );

    // f16 widens to f32 exactly.
    let n = t("norm.weight");
    assert_eq!(n.dims(), &[5]);
    assert_eq!(f32s(n), vec![1.0, -0.5, 0.25, 65504.0, 2f32.powi(-14)]);

    let ids = t("pos.ids");
    assert_eq!((ids.dtype(), ids.dims()), (DType::I64, &[2usize, 3][..]));
    assert_eq!(
        ids.to_vec::<i64>().unwrap(),
        vec![0, -1, 7, 1 << 40, -(1 << 33), 123456789]
    );

    let e = t("emb.weight");
    assert_eq!((e.dtype(), e.dims()), (DType::BF16, &[2usize, 2][..]));
    assert_eq!(
        e.to_vec::<bf16>().unwrap(),
        [1.5f32, -2.25, 0.09375, 1024.0]
            .map(bf16::from_f32)
            .to_vec()
    );

    // An nn.Parameter is read as its data.
    assert_eq!(f32s(t("head.bias")), vec![0.1, -0.2, 0.3]);

    let m = t("mask");
    assert_eq!(m.dtype(), DType::U8);
    assert_eq!(m.to_vec::<u8>().unwrap(), vec![1, 0, 1, 1]);
    // int32 widens to i64.
    let counts = t("counts");
    assert_eq!(counts.dtype(), DType::I64);
    assert_eq!(
        counts.to_vec::<i64>().unwrap(),
        vec![3, -4, i32::MAX as i64]
    );
    assert_eq!(t("bytes").to_vec::<u8>().unwrap(), vec![0, 17, 255]);

    // 0-dim f64 and an empty tensor.
    let s = t("scale");
    assert_eq!((s.dtype(), s.rank()), (DType::F64, 0));
    assert_eq!(s.to_vec::<f64>().unwrap(), vec![0.125]);
    let empty = t("empty");
    assert_eq!((empty.dims(), empty.elem_count()), (&[0usize, 3][..], 0));

    assert_eq!(f32s(&c.tensors["ema.0"]), vec![4.0, 5.0]);

    // Non-tensor entries are reported by their dotted names.
    let mut skipped = c.skipped.clone();
    skipped.sort();
    assert_eq!(
        skipped,
        [
            "config.betas.0",
            "config.betas.1",
            "config.flag",
            "config.lr",
            "config.name",
            "epoch",
            "step"
        ]
    );
    assert!(c.outside_prefix.is_empty());
}

#[test]
fn strided_view_is_materialised_and_shares_its_storage_with_another_tensor() {
    let c = read_pth(&data("small.pth"), Some("model")).unwrap();
    let shared: Vec<f32> = (0..20).map(|i| 0.25 * i as f32 - 1.0).collect();
    let base = &c.tensors["shared.base"];
    assert_eq!(base.dims(), &[4, 5]);
    assert_eq!(f32s(base), shared);
    // shared.view_t: offset 2, size [3, 4], stride [1, 5]: element (i, j) = shared[2 + i + 5 j].
    let view = &c.tensors["shared.view_t"];
    assert_eq!(view.dims(), &[3, 4]);
    let want: Vec<f32> = (0..3)
        .flat_map(|i| (0..4).map(move |j| (i, j)))
        .map(|(i, j)| shared[2 + i + 5 * j])
        .collect();
    assert_eq!(f32s(view), want);
    // The view is the transpose of base's columns 2..5.
    let b = f32s(base);
    for i in 0..3 {
        for j in 0..4 {
            assert_eq!(f32s(view)[i * 4 + j], b[j * 5 + 2 + i]);
        }
    }
    // Dense copies: the two tensors no longer alias each other.
    assert!(!base.same_storage(view));
}

#[test]
fn prefix_stripping() {
    let c = read_pth(&data("small.pth"), Some("model.")).unwrap();
    let mut want: Vec<&str> = MODEL_TENSORS.to_vec();
    want.sort();
    assert_eq!(
        c.tensors.keys().map(|s| s.as_str()).collect::<Vec<_>>(),
        want
    );
    assert_eq!(c.outside_prefix, vec!["ema.0".to_string()]);
    // Without the trailing dot, the same.
    let d = read_pth(&data("small.pth"), Some("model")).unwrap();
    assert_eq!(
        c.tensors.keys().collect::<Vec<_>>(),
        d.tensors.keys().collect::<Vec<_>>()
    );
    // A deeper prefix and an empty one.
    let deeper = read_pth(&data("small.pth"), Some("model.shared")).unwrap();
    assert_eq!(
        deeper.tensors.keys().collect::<Vec<_>>(),
        vec!["base", "view_t"]
    );
    assert_eq!(
        read_pth(&data("small.pth"), Some(""))
            .unwrap()
            .tensors
            .len(),
        13
    );
    // A prefix that matches nothing is an error that shows some names.
    let e = read_pth(&data("small.pth"), Some("modle"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("small.pth") && e.contains("\"modle.\"") && e.contains("model."),
        "{e}"
    );
}

#[test]
fn convert_round_trips_through_safetensors() {
    let dir = tmpdir("convert");
    let out = dir.join("small.safetensors");
    let report = convert(&data("small.pth"), &out, Some("model")).unwrap();
    assert_eq!(report.tensors, 12);
    // 12 + 20 + 12 (3x4 view) f32, 5 f16 as f32, 6 i64, 4 bf16, 3 f32, 4 bool,
    // 3 i32 as i64, 3 u8, 1 f64, 0.
    let want_bytes = (12 + 20 + 12 + 5 + 3) * 4 + (6 + 3) * 8 + 4 * 2 + 4 + 3 + 8;
    assert_eq!(report.tensor_bytes, want_bytes as u64);
    assert_eq!(report.file_bytes, std::fs::metadata(&out).unwrap().len());
    assert_eq!(report.outside_prefix, vec!["ema.0".to_string()]);
    assert_eq!(report.skipped.len(), 7);

    let back = read_safetensors(&out).unwrap();
    let orig = read_pth(&data("small.pth"), Some("model")).unwrap().tensors;
    assert_eq!(
        back.keys().collect::<Vec<_>>(),
        orig.keys().collect::<Vec<_>>()
    );
    for (name, t) in &orig {
        let b = &back[name];
        assert_eq!((b.dtype(), b.dims()), (t.dtype(), t.dims()), "{name}");
        assert_eq!(
            b.to_cpu_storage().unwrap(),
            t.to_cpu_storage().unwrap(),
            "{name}"
        );
    }
    // No temporary file is left beside the output.
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);

    // Without a prefix every tensor is written under its full name.
    let all = dir.join("all.safetensors");
    assert_eq!(convert(&data("small.pth"), &all, None).unwrap().tensors, 13);
    assert!(read_safetensors(&all)
        .unwrap()
        .contains_key("model.blocks.0.attn.proj.weight"));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn forbidden_global_is_refused_by_name() {
    let e = read_pth(&data("evil.pth"), None).unwrap_err().to_string();
    assert!(
        e.contains("evil.pth")
            && e.contains("refusing to load global os.system: only tensors are read"),
        "{e}"
    );
    // Any other global too, e.g. one hidden as a storage type or via STACK_GLOBAL.
    let stack_global = [
        &b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93"[..],
        b"\x8c\x011\x85R.",
    ]
    .concat();
    let e = parse_pth(&with_pickle(stack_global), None).unwrap_err();
    assert!(e.contains("refusing to load global builtins.eval"), "{e}");
    let e = parse_pth(&with_pickle(b"\x80\x02ctorch\nload\n.".to_vec()), None).unwrap_err();
    assert!(e.contains("refusing to load global torch.load"), "{e}");
    // A whitelisted name that is not a function is never called.
    let e = parse_pth(
        &with_pickle(b"\x80\x02ctorch\nFloatStorage\n)R.".to_vec()),
        None,
    )
    .unwrap_err();
    assert!(e.contains("refusing to call torch.FloatStorage"), "{e}");
}

/// small.pth with data.pkl replaced.
fn with_pickle(pkl: Vec<u8>) -> Vec<u8> {
    edited(|e| *record(e, "archive/data.pkl") = pkl)
}

#[test]
fn truncated_and_corrupt_files_are_errors_naming_the_file() {
    let dir = tmpdir("truncated");
    let bytes = small_bytes();
    for cut in [
        0,
        1,
        10,
        100,
        bytes.len() / 2,
        bytes.len() - 30,
        bytes.len() - 1,
    ] {
        let p = dir.join(format!("cut{cut}.pth"));
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let e = read_pth(&p, None).unwrap_err().to_string();
        assert!(
            e.contains(&format!("cut{cut}.pth")) && e.contains("truncated or corrupt"),
            "{e}"
        );
    }
    // A flipped byte inside a stored record fails its CRC.
    let data0 = {
        let z = zip::ZipArchive::new(Cursor::new(&bytes)).unwrap();
        let i = z.index_for_name("archive/data/1").unwrap();
        let mut z = z;
        let f = z.by_index(i).unwrap();
        f.data_start().unwrap() as usize
    };
    let mut bad = bytes.clone();
    bad[data0 + 3] ^= 0x40;
    let e = parse_pth(&bad, None).unwrap_err();
    assert!(e.contains("archive/data/1") && e.contains("corrupt"), "{e}");

    let e = read_pth(&dir.join("nope.pth"), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope.pth"), "{e}");
    let e = parse_pth(b"not a zip at all", None).unwrap_err();
    assert!(e.contains("not a torch.save zip archive"), "{e}");
    let e = parse_pth(b"\x80\x02\x8a\x0alegacy...", None).unwrap_err();
    assert!(e.contains("legacy torch.save format"), "{e}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn structural_errors_say_what_is_wrong() {
    // Missing data.pkl.
    let e = parse_pth(
        &edited(|e| e.retain(|(n, _)| n != "archive/data.pkl")),
        None,
    )
    .unwrap_err();
    assert!(e.contains("no <archive>/data.pkl"), "{e}");
    // A storage record missing.
    let e = parse_pth(&edited(|e| e.retain(|(n, _)| n != "archive/data/3")), None).unwrap_err();
    assert!(
        e.contains("archive/data/3") && e.contains("missing") && e.contains("model.pos.ids"),
        "{e}"
    );
    // A storage record shorter than its numel says.
    let e = parse_pth(&edited(|e| record(e, "archive/data/1").truncate(40)), None).unwrap_err();
    assert!(
        e.contains("archive/data/1") && e.contains("holds 40 bytes; expected 80"),
        "{e}"
    );
    // Storage numel too small for the view's size/stride/offset: shared storage numel 20 -> 13
    // (`K\x14` after '1' is its BININT1 numel), with the record cut to match.
    let e = parse_pth(
        &edited(|e| {
            let pkl = record(e, "archive/data.pkl");
            let at = find(pkl, b"X\x01\x00\x00\x001q\x11h\x09K\x14").unwrap() + 11;
            pkl[at] = 13;
            record(e, "archive/data/1").truncate(13 * 4);
        }),
        None,
    )
    .unwrap_err();
    assert!(
        e.contains("model.shared")
            && e.contains("storage 1 is too small")
            && e.contains("reaches past its 13 float32 elements"),
        "{e}"
    );
    // A bad byteorder record.
    let e = parse_pth(
        &edited(|e| *record(e, "archive/byteorder") = b"middle".to_vec()),
        None,
    )
    .unwrap_err();
    assert!(e.contains("byteorder") && e.contains("middle"), "{e}");
    // An unknown opcode, with its value and position.
    let e = parse_pth(&with_pickle(b"\x80\x02}\xff.".to_vec()), None).unwrap_err();
    assert!(
        e.contains("archive/data.pkl")
            && e.contains("unknown or unsupported pickle opcode 0xff")
            && e.contains("at byte 3"),
        "{e}"
    );
    // A pickle without STOP, stack underflow, a bad memo key, a cycle.
    let e = parse_pth(&with_pickle(b"\x80\x02}q\x00".to_vec()), None).unwrap_err();
    assert!(e.contains("without STOP"), "{e}");
    let e = parse_pth(&with_pickle(b"\x80\x02s.".to_vec()), None).unwrap_err();
    assert!(e.contains("underflow"), "{e}");
    let e = parse_pth(&with_pickle(b"\x80\x02h\x07.".to_vec()), None).unwrap_err();
    assert!(e.contains("memo key 7"), "{e}");
    let e = parse_pth(&with_pickle(b"\x80\x02]q\x00h\x00a.".to_vec()), None).unwrap_err();
    assert!(e.contains("cycle"), "{e}");
    // A persistent id that is not a storage.
    let e = parse_pth(&with_pickle(b"\x80\x02K\x01Q.".to_vec()), None).unwrap_err();
    assert!(e.contains("persistent id"), "{e}");
    // No tensors at all: reading gives none, converting refuses.
    let c = parse_pth(
        &with_pickle(b"\x80\x02}X\x01\x00\x00\x00aK\x01s.".to_vec()),
        None,
    )
    .unwrap();
    assert!(c.tensors.is_empty() && c.skipped == ["a"]);
    let dir = tmpdir("notensors");
    let p = dir.join("none.pth");
    std::fs::write(&p, with_pickle(b"\x80\x02}.".to_vec())).unwrap();
    let e = convert(&p, &dir.join("none.safetensors"), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("none.pth") && e.contains("no tensors"), "{e}");
    let _ = std::fs::remove_dir_all(dir);
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn all_cpu(c: &BTreeMap<String, Tensor>) -> Vec<(String, mvar_engine::CpuStorage)> {
    c.iter()
        .map(|(n, t)| (n.clone(), t.to_cpu_storage().unwrap()))
        .collect()
}

#[test]
fn deflated_records_and_other_archive_names_are_read() {
    let want = all_cpu(&parse_pth(&small_bytes(), None).unwrap().tensors);
    let mut e = entries(&small_bytes());
    for (n, _) in e.iter_mut() {
        *n = n.replacen("archive/", "my_model/", 1);
    }
    let deflated = build(&e, CompressionMethod::Deflated);
    assert_eq!(all_cpu(&parse_pth(&deflated, None).unwrap().tensors), want);
}

#[test]
fn big_endian_storages_are_swapped() {
    let want = all_cpu(&parse_pth(&small_bytes(), None).unwrap().tensors);
    // Element size of each storage key, in the order make_pth.py pickles them.
    let sizes = [4, 4, 2, 8, 2, 4, 1, 4, 1, 8, 4, 4];
    let big = edited(|e| {
        *record(e, "archive/byteorder") = b"big".to_vec();
        for (key, size) in sizes.iter().enumerate() {
            let r = record(e, &format!("archive/data/{key}"));
            for c in r.chunks_mut(*size) {
                c.reverse();
            }
        }
    });
    assert_eq!(all_cpu(&parse_pth(&big, None).unwrap().tensors), want);
}

/// A protocol 4 pickle (FRAME, MEMOIZE, STACK_GLOBAL, SHORT_BINUNICODE, LONG1) over the
/// fixture's first storage, written by hand: {'w': v2 tensor, 'p': parameter, 'n': -2**40}.
#[test]
fn protocol_4_opcodes() {
    let mut p: Vec<u8> = b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00}\x94(".to_vec();
    let short = |s: &str| [&[0x8c, s.len() as u8][..], s.as_bytes(), b"\x94"].concat();
    let tensor = |p: &mut Vec<u8>, first: bool| {
        if first {
            p.extend(short("torch._utils"));
            p.extend(short("_rebuild_tensor_v2"));
            p.extend(b"\x93\x94");
        } else {
            p.extend(b"h\x04"); // the memoized _rebuild_tensor_v2
        }
        p.extend(b"(");
        // persistent id ('storage', torch.FloatStorage, '0', 'cpu', 12)
        p.extend(b"(");
        p.extend(short("storage"));
        p.extend(short("torch"));
        p.extend(short("FloatStorage"));
        p.extend(b"\x93\x94");
        p.extend(short("0"));
        p.extend(short("cpu"));
        p.extend(b"K\x0ct\x94Q");
        // offset 1, size (2, 3), stride (1, 2)
        p.extend(b"K\x01K\x02K\x03\x86\x94K\x01K\x02\x86\x94\x89");
        p.extend(short("collections"));
        p.extend(short("OrderedDict"));
        p.extend(b"\x93\x94)R\x94t\x94R\x94");
    };
    p.extend(short("w"));
    tensor(&mut p, true);
    p.extend(short("p"));
    p.extend(b"\x8c\x0ctorch._utils\x8c\x12_rebuild_parameter\x93");
    tensor(&mut p, false);
    p.extend(b"\x88}\x94\x87R");
    p.extend(short("n"));
    p.extend(b"\x8a\x06\x00\x00\x00\x00\x00\xff");
    p.extend(b"u.");
    let c = parse_pth(&with_pickle(p), None).unwrap();
    let w: Vec<f32> = (0..12).map(|i| 0.5 * i as f32 - 2.0).collect();
    let want: Vec<f32> = (0..2)
        .flat_map(|i| (0..3).map(move |j| (i, j)))
        .map(|(i, j)| w[1 + i + 2 * j])
        .collect();
    assert_eq!(f32s(&c.tensors["w"]), want);
    assert_eq!(f32s(&c.tensors["p"]), want);
    assert_eq!(c.skipped, vec!["n".to_string()]);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: mvar_ops::testing::proptest_cases(256), ..ProptestConfig::default() })]

    /// Random byte edits of the whole file: every outcome is Ok or Err, never a panic.
    #[test]
    fn mutated_files_never_panic(edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..8)) {
        let mut bytes = small_bytes();
        for (at, value, kind) in edits {
            let i = at.index(bytes.len());
            match kind {
                0 => bytes[i] = value,
                1 => bytes.insert(i, value),
                _ => { bytes.remove(i); }
            }
        }
        let _ = parse_pth(&bytes, None);
    }

    /// Random edits of data.pkl and the storages inside a valid zip, so that the pickle machine
    /// and the tensor materialisation see them (whole-file edits mostly stop at a CRC).
    #[test]
    fn mutated_pickles_never_panic(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 1..6),
        storage_cut in any::<prop::sample::Index>(),
    ) {
        let bytes = edited(|e| {
            let pkl = record(e, "archive/data.pkl");
            for (at, value, kind) in edits {
                let i = at.index(pkl.len());
                match kind {
                    0 | 3 => pkl[i] = value,
                    1 => pkl.insert(i, value),
                    _ => { pkl.remove(i); }
                }
            }
            let victim = storage_cut.index(12);
            let r = record(e, &format!("archive/data/{victim}"));
            let keep = r.len().saturating_sub(storage_cut.index(3));
            r.truncate(keep);
        });
        let _ = parse_pth(&bytes, Some("model"));
    }
}

/// `mvar import` reads either format through one function, told apart by the first bytes (not
/// the extension), with the same prefix rule.
#[test]
fn read_state_dict_takes_either_format_with_the_same_prefix_rule() {
    use mvar_models::import::read_state_dict;
    let dir = tmpdir("state-dict");
    let st = dir.join("small.safetensors");
    convert(&data("small.pth"), &st, None).unwrap();
    // A .pth named like a safetensors file and the reverse still read as what they are.
    let pth_named_st = dir.join("really-a-pth.safetensors");
    std::fs::copy(data("small.pth"), &pth_named_st).unwrap();
    let st_named_pth = dir.join("really-safetensors.pth");
    std::fs::copy(&st, &st_named_pth).unwrap();
    for prefix in [None, Some("model"), Some("model.shared.")] {
        let want = read_pth(&data("small.pth"), prefix).unwrap().tensors;
        for path in [&pth_named_st, &st_named_pth] {
            let got = read_state_dict(path, prefix).unwrap();
            assert_eq!(
                got.keys().collect::<Vec<_>>(),
                want.keys().collect::<Vec<_>>(),
                "{} {prefix:?}",
                path.display()
            );
            for (name, t) in &want {
                assert_eq!(
                    got[name].to_cpu_storage().unwrap(),
                    t.to_cpu_storage().unwrap(),
                    "{name}"
                );
            }
        }
    }
    let e = read_state_dict(&st_named_pth, Some("modle"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("really-safetensors.pth") && e.contains("\"modle.\""),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
