//! Writing `.ckpt` files as `torch.save` does (a zip of `data.pkl` and one record per
//! tensor), for tools that only read the old format. The pickle is built from the few
//! opcodes torch itself emits, so `torch.load(weights_only=True)` and our restricted
//! reader both accept it.

use std::io::Write;
use std::path::Path;

use dreambooth_api::spec::Precision;
use tch::Kind;
use zip::write::SimpleFileOptions;

use super::{CheckpointError, Tensors, precision_kind};

/// The folder every record sits in inside the zip; torch takes any name.
const ARCHIVE: &str = "archive";

/// Writes `{"state_dict": OrderedDict(tensors)}`; floating tensors in `precision`.
pub fn write_ckpt(
    path: &Path,
    tensors: &Tensors,
    precision: Precision,
) -> Result<(), CheckpointError> {
    let target = precision_kind(precision);
    let io = |e: std::io::Error| CheckpointError::io(path, e);
    let zip_error = |e: zip::result::ZipError| CheckpointError::invalid(path, e.to_string());
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let file = std::fs::File::create(path).map_err(io)?;
    let mut zip = zip::ZipWriter::new(std::io::BufWriter::new(file));
    let stored = SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .large_file(true);

    let mut pickle = Pickle::new();
    pickle.header();
    for (index, (name, tensor)) in tensors.iter().enumerate() {
        let kind = if tensor.is_floating_point() {
            target
        } else {
            tensor.kind()
        };
        let storage = storage_class(kind).ok_or_else(|| {
            CheckpointError::invalid(
                path,
                format!("{name}: {kind:?} tensors cannot be written to .ckpt"),
            )
        })?;
        let tensor = tensor.to_kind(kind).contiguous();
        let numel = tensor.numel();
        pickle.tensor(
            name,
            storage,
            &index.to_string(),
            numel as i64,
            &tensor.size(),
        );
        let mut bytes = vec![0u8; numel * kind.elt_size_in_bytes()];
        tensor.copy_data_u8(&mut bytes, numel);
        zip.start_file(format!("{ARCHIVE}/data/{index}"), stored)
            .map_err(zip_error)?;
        zip.write_all(&bytes).map_err(io)?;
    }
    pickle.footer();
    for (record, contents) in [
        ("data.pkl", pickle.bytes.as_slice()),
        ("version", b"3\n"),
        ("byteorder", b"little"),
    ] {
        zip.start_file(format!("{ARCHIVE}/{record}"), stored)
            .map_err(zip_error)?;
        zip.write_all(contents).map_err(io)?;
    }
    zip.finish().map_err(zip_error)?.flush().map_err(io)
}

fn storage_class(kind: Kind) -> Option<&'static str> {
    Some(match kind {
        Kind::Float => "FloatStorage",
        Kind::Half => "HalfStorage",
        Kind::BFloat16 => "BFloat16Storage",
        Kind::Double => "DoubleStorage",
        Kind::Int64 => "LongStorage",
        Kind::Int => "IntStorage",
        Kind::Bool => "BoolStorage",
        Kind::Uint8 => "ByteStorage",
        _ => return None,
    })
}

/// A protocol-2 pickle of a dict holding one `OrderedDict` of tensors.
struct Pickle {
    bytes: Vec<u8>,
}

impl Pickle {
    fn new() -> Self {
        Self { bytes: Vec::new() }
    }

    /// `{"state_dict": OrderedDict(` … and the MARK its items follow.
    fn header(&mut self) {
        self.bytes.extend_from_slice(&[0x80, 2, b'}']);
        self.string("state_dict");
        self.global("collections", "OrderedDict");
        self.bytes.extend_from_slice(b")R(");
    }

    /// `)}` and STOP: SETITEMS into the OrderedDict, SETITEM into the outer dict.
    fn footer(&mut self) {
        self.bytes.extend_from_slice(b"us.");
    }

    /// `name: _rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict())`.
    fn tensor(&mut self, name: &str, storage: &str, key: &str, numel: i64, size: &[i64]) {
        self.string(name);
        self.global("torch._utils", "_rebuild_tensor_v2");
        self.bytes.push(b'(');
        // The persistent id: ('storage', torch.<Kind>Storage, key, 'cpu', numel).
        self.bytes.push(b'(');
        self.string("storage");
        self.global("torch", storage);
        self.string(key);
        self.string("cpu");
        self.int(numel);
        self.bytes.extend_from_slice(b"tQ");
        self.int(0);
        self.tuple(size);
        self.tuple(&contiguous_strides(size));
        self.bytes.push(0x89);
        self.global("collections", "OrderedDict");
        self.bytes.extend_from_slice(b")R");
        self.bytes.extend_from_slice(b"tR");
    }

    fn tuple(&mut self, values: &[i64]) {
        self.bytes.push(b'(');
        for &value in values {
            self.int(value);
        }
        self.bytes.push(b't');
    }

    fn global(&mut self, module: &str, name: &str) {
        self.bytes.push(b'c');
        self.bytes
            .extend_from_slice(format!("{module}\n{name}\n").as_bytes());
    }

    fn string(&mut self, text: &str) {
        self.bytes.push(b'X');
        self.bytes
            .extend_from_slice(&(text.len() as u32).to_le_bytes());
        self.bytes.extend_from_slice(text.as_bytes());
    }

    fn int(&mut self, value: i64) {
        match i32::try_from(value) {
            Ok(small) => {
                self.bytes.push(b'J');
                self.bytes.extend_from_slice(&small.to_le_bytes());
            }
            Err(_) => {
                // LONG1: little-endian two's complement, 8 bytes is always enough here.
                self.bytes.extend_from_slice(&[0x8a, 8]);
                self.bytes.extend_from_slice(&value.to_le_bytes());
            }
        }
    }
}

fn contiguous_strides(size: &[i64]) -> Vec<i64> {
    let mut strides = vec![1; size.len()];
    for i in (0..size.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * size[i + 1];
    }
    strides
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Tensor;

    #[test]
    fn strides_are_row_major() {
        assert_eq!(contiguous_strides(&[2, 3, 4]), [12, 4, 1]);
        assert_eq!(contiguous_strides(&[]), Vec::<i64>::new());
    }

    #[test]
    fn our_reader_reads_what_we_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.ckpt");
        let tensors = Tensors::from([
            (
                "a.weight".to_string(),
                Tensor::arange(6, (Kind::Float, tch::Device::Cpu)).view([2, 3]),
            ),
            ("b.bias".to_string(), Tensor::from_slice(&[1.5f32, -2.0])),
            ("step".to_string(), Tensor::from_slice(&[7i64])),
        ]);
        write_ckpt(&path, &tensors, Precision::Fp16).unwrap();
        let read = super::super::read_ckpt(&path).unwrap();
        let back = &read.tensors;
        assert_eq!(back.len(), 3);
        assert!(
            back["a.weight"]
                .to_kind(Kind::Float)
                .equal(&tensors["a.weight"])
        );
        assert_eq!(back["b.bias"].size(), [2]);
        assert_eq!(back["step"].kind(), Kind::Int64);
    }
}
