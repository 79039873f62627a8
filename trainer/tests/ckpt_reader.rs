//! The restricted `.ckpt` reader: tensors rebuilt from storages with offsets and strides,
//! Lightning's `state_dict` nesting, and refusal of any global that is not a tensor
//! rebuilder. Checkpoints are assembled here opcode by opcode, as torch.save writes them,
//! and compared with the reference's own files when the fixtures hold them.

use std::io::Write;
use std::path::Path;

mod common;

use common::{assert_mentions, assert_same, fixture};
use dreambooth_api::spec::Precision;
use dreambooth_trainer::checkpoint::{
    CheckpointError, LoadOptions, SdVersion, SourceKind, Tensors, load_pipeline_weights,
    load_pipeline_weights_with, read_ckpt, read_safetensors, save_single_file,
};
use dreambooth_trainer::schedulers::PredictionType;
use tch::{Kind, Tensor};

/// A pickle written by hand, protocol 2 as torch.save uses.
#[derive(Default)]
struct Pickle(Vec<u8>);

impl Pickle {
    fn op(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.extend_from_slice(bytes);
        self
    }
    fn text(&mut self, s: &str) -> &mut Self {
        self.op(b"X")
            .op(&(s.len() as u32).to_le_bytes())
            .op(s.as_bytes())
    }
    fn int(&mut self, v: i64) -> &mut Self {
        match v {
            0..=255 => self.op(&[b'K', v as u8]),
            _ if i32::try_from(v).is_ok() => self.op(b"J").op(&(v as i32).to_le_bytes()),
            _ => self.op(&[0x8a, 8]).op(&v.to_le_bytes()),
        }
    }
    fn global(&mut self, module: &str, name: &str) -> &mut Self {
        self.op(b"c")
            .op(module.as_bytes())
            .op(b"\n")
            .op(name.as_bytes())
            .op(b"\n")
    }
    fn ints(&mut self, values: &[i64]) -> &mut Self {
        self.op(b"(");
        for &v in values {
            self.int(v);
        }
        self.op(b"t")
    }
    fn ordered_dict(&mut self) -> &mut Self {
        self.global("collections", "OrderedDict").op(b")R")
    }
    /// `_rebuild_tensor_v2(storage key, offset, size, stride, False, OrderedDict())`.
    fn tensor(
        &mut self,
        storage: &str,
        kind: &str,
        numel: i64,
        offset: i64,
        size: &[i64],
        stride: &[i64],
    ) -> &mut Self {
        self.global("torch._utils", "_rebuild_tensor_v2").op(b"(");
        self.op(b"(")
            .text("storage")
            .global("torch", kind)
            .text(storage)
            .text("cpu")
            .int(numel)
            .op(b"tQ");
        self.int(offset)
            .ints(size)
            .ints(stride)
            .op(&[0x89])
            .ordered_dict()
            .op(b"tR")
    }
}

/// A zip laid out as torch.save lays it out: `<name>/data.pkl`, `<name>/data/<key>`.
fn write_ckpt(path: &Path, pickle: &[u8], storages: &[(&str, Vec<u8>)]) {
    let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let stored =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", stored).unwrap();
    zip.write_all(pickle).unwrap();
    zip.start_file("archive/byteorder", stored).unwrap();
    zip.write_all(b"little").unwrap();
    for (key, bytes) in storages {
        zip.start_file(format!("archive/data/{key}"), stored)
            .unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.finish().unwrap();
}

fn bytes_of(tensor: &Tensor) -> Vec<u8> {
    let tensor = tensor.contiguous();
    let mut bytes = vec![0u8; tensor.numel() * tensor.kind().elt_size_in_bytes()];
    tensor.copy_data_u8(&mut bytes, tensor.numel());
    bytes
}

/// `torch.save({"state_dict": tensors, "global_step": step})`, one fp32 storage per tensor.
fn save_state_dict(path: &Path, tensors: &Tensors, global_step: Option<i64>) {
    let mut p = Pickle::default();
    p.op(&[0x80, 2])
        .op(b"}q\x00(")
        .text("state_dict")
        .ordered_dict()
        .op(b"(");
    let mut storages = Vec::new();
    for (i, (name, tensor)) in tensors.iter().enumerate() {
        let key = i.to_string();
        let size = tensor.size();
        let mut stride = vec![1i64; size.len()];
        for d in (0..size.len().saturating_sub(1)).rev() {
            stride[d] = stride[d + 1] * size[d + 1];
        }
        p.text(name).tensor(
            &key,
            "FloatStorage",
            tensor.numel() as i64,
            0,
            &size,
            &stride,
        );
        storages.push((key, bytes_of(tensor)));
    }
    p.op(b"u");
    if let Some(step) = global_step {
        p.text("global_step").int(step);
    }
    p.op(b"u.");
    let storages: Vec<(&str, Vec<u8>)> = storages
        .iter()
        .map(|(k, b)| (k.as_str(), b.clone()))
        .collect();
    write_ckpt(path, &p.0, &storages);
}

#[test]
fn views_share_storage_with_offsets_and_strides() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("views.ckpt");
    let data: Vec<f32> = (0..6).map(|i| i as f32 * 0.5 - 1.0).collect();
    let half = Tensor::from_slice(&[1.5f32, -2.25]).to_kind(Kind::Half);
    let mut p = Pickle::default();
    p.op(&[0x80, 2]).op(b"}q\x00(");
    p.text("w")
        .tensor("0", "FloatStorage", 6, 0, &[2, 3], &[3, 1])
        .op(b"q\x01");
    p.text("w_t")
        .tensor("0", "FloatStorage", 6, 0, &[3, 2], &[1, 3]);
    p.text("row").tensor("0", "FloatStorage", 6, 3, &[3], &[1]);
    p.text("half").tensor("1", "HalfStorage", 2, 0, &[2], &[1]);
    p.text("again").op(b"h\x01");
    p.text("epoch").int(1 << 40);
    p.op(b"u.");
    write_ckpt(
        &path,
        &p.0,
        &[
            ("0", bytes_of(&Tensor::from_slice(&data))),
            ("1", bytes_of(&half)),
        ],
    );

    let checkpoint = read_ckpt(&path).unwrap();
    let t = &checkpoint.tensors;
    let w = Tensor::from_slice(&data).reshape([2, 3]);
    assert!(t["w"].equal(&w));
    assert!(t["w_t"].equal(&w.tr()));
    assert!(t["row"].equal(&Tensor::from_slice(&data[3..])));
    assert_eq!(
        t["half"].kind(),
        Kind::Float,
        "half storages load as fp32 master weights"
    );
    assert!(t["half"].equal(&Tensor::from_slice(&[1.5f32, -2.25])));
    assert!(
        t["again"].equal(&w),
        "a memoised tensor comes back from the memo"
    );
    assert_eq!(t.len(), 5, "the integer entry is not a tensor");
    assert_eq!(checkpoint.global_step, None);
}

#[test]
fn views_reaching_past_their_storage_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("overrun.ckpt");
    let mut p = Pickle::default();
    p.op(&[0x80, 2])
        .op(b"}(")
        .text("w")
        .tensor("0", "FloatStorage", 4, 2, &[2, 2], &[2, 1])
        .op(b"u.");
    write_ckpt(&path, &p.0, &[("0", vec![0; 16])]);
    let message = read_ckpt(&path).unwrap_err().to_string();
    assert_mentions(&message, &["overrun.ckpt", "past its storage"]);
}

#[test]
fn forbidden_globals_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("evil.ckpt");
    let mut p = Pickle::default();
    p.op(&[0x80, 2])
        .global("os", "system")
        .op(b"(")
        .text("echo pwned")
        .op(b"tR.");
    write_ckpt(&path, &p.0, &[]);
    let err = read_ckpt(&path).unwrap_err();
    assert!(
        matches!(&err, CheckpointError::ForbiddenGlobal { global, .. } if global == "os.system"),
        "{err:?}"
    );
    let message = err.to_string();
    assert_mentions(&message, &["evil.ckpt", "`os.system`"]);

    let mut p = Pickle::default();
    p.op(&[0x80, 4]).op(b"\x8c\x08builtins\x8c\x04eval\x93.");
    write_ckpt(&path, &p.0, &[]);
    let message = read_ckpt(&path).unwrap_err().to_string();
    assert!(message.contains("`builtins.eval`"), "{message}");
}

#[test]
fn unknown_opcodes_and_non_zip_files_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("odd.ckpt");
    write_ckpt(&path, &[0x80, 2, b'i'], &[]);
    let message = read_ckpt(&path).unwrap_err().to_string();
    assert_mentions(&message, &["odd.ckpt", "0x69"]);

    std::fs::write(&path, b"\x80\x02not a zip").unwrap();
    let message = read_ckpt(&path).unwrap_err().to_string();
    assert_mentions(&message, &["odd.ckpt", "zip"]);
}

/// An SD 2.x ckpt at Lightning step 875000 is the 512 base model: epsilon, as diffusers decides.
#[test]
fn sd2_ckpt_reads_like_its_single_file_and_step_875000_means_epsilon() {
    let dir = tempfile::tempdir().unwrap();
    let model = load_pipeline_weights(&fixture("tiny-sd2")).unwrap();
    let single = dir.path().join("sd2.safetensors");
    save_single_file(&model, &single, Precision::Fp32).unwrap();
    let tensors = read_safetensors(&single).unwrap();

    let ckpt = dir.path().join("sd2.ckpt");
    save_state_dict(&ckpt, &tensors, Some(875_000));
    let checkpoint = read_ckpt(&ckpt).unwrap();
    assert_eq!(checkpoint.global_step, Some(875_000));
    assert_same(&checkpoint.tensors, &tensors, "sd2.ckpt");

    let loaded = load_pipeline_weights(&ckpt).unwrap();
    assert_eq!(
        (loaded.kind, loaded.version, loaded.prediction_type),
        (SourceKind::Ckpt, SdVersion::Sd2, PredictionType::Epsilon)
    );
    assert_eq!(loaded.scheduler["prediction_type"], "epsilon");
    assert!(
        loaded
            .unet
            .tensors
            .iter()
            .all(|(k, t)| t.equal(&model.unet.tensors[k]))
    );

    save_state_dict(&ckpt, &tensors, Some(110_000));
    assert_eq!(
        load_pipeline_weights(&ckpt).unwrap().prediction_type,
        PredictionType::VPrediction
    );
    let told = LoadOptions {
        prediction_type: Some(PredictionType::Epsilon),
        ..Default::default()
    };
    assert_eq!(
        load_pipeline_weights_with(&ckpt, &told)
            .unwrap()
            .prediction_type,
        PredictionType::Epsilon
    );
}

/// The reference's torch.save of its tiny single file, every float stored as fp16.
#[test]
fn reference_ckpt_holds_its_single_file_in_half_precision() {
    let checkpoint = read_ckpt(&fixture("tiny-sd1.ckpt")).unwrap();
    let expected = read_safetensors(&fixture("tiny-sd1.safetensors")).unwrap();
    assert_eq!(
        checkpoint.tensors.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>()
    );
    for (name, tensor) in &expected {
        let got = &checkpoint.tensors[name];
        assert_eq!(got.kind(), tensor.kind(), "{name}");
        let want = if tensor.is_floating_point() {
            tensor.to_kind(Kind::Half).to_kind(Kind::Float)
        } else {
            tensor.shallow_clone()
        };
        assert!(got.equal(&want), "{name}");
    }
    assert_eq!(checkpoint.global_step, Some(0));

    let model = load_pipeline_weights(&fixture("tiny-sd1.ckpt")).unwrap();
    assert_eq!(
        (model.kind, model.version, model.prediction_type),
        (SourceKind::Ckpt, SdVersion::Sd1, PredictionType::Epsilon)
    );
    assert!(
        !model
            .text_encoder
            .tensors
            .keys()
            .any(|k| k.contains("position_ids"))
    );
}

#[test]
fn reference_forbidden_ckpt_is_refused() {
    let err = read_ckpt(&fixture("forbidden.ckpt")).unwrap_err();
    // Protocol 2 spells Python 3's `builtins` as `__builtin__`; the file's own name is shown.
    assert!(
        matches!(&err, CheckpointError::ForbiddenGlobal { global, .. } if global == "__builtin__.print"),
        "{err:?}"
    );
    let message = err.to_string();
    assert_mentions(&message, &["forbidden.ckpt", "`__builtin__.print`"]);
}
