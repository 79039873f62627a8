//! `.safetensors` in and out, and the one place where named tensors enter a VarStore.
//!
//! Whatever precision a file holds, floating-point weights come back as fp32: training
//! keeps fp32 master weights, and half precision is only a storage format here.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use dreambooth_api::spec::Precision;
use safetensors::{Dtype, SafeTensors, View};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use super::{CheckpointError, Tensors};

/// Reads every tensor of a `.safetensors` file, floating-point ones converted to fp32.
pub fn read_safetensors(path: &Path) -> Result<Tensors, CheckpointError> {
    let bytes = super::read_file(path)?;
    let file = SafeTensors::deserialize(&bytes).map_err(|e| CheckpointError::Corrupt {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let mut tensors = Tensors::new();
    for (name, view) in file.iter() {
        let kind = kind_of(view.dtype()).ok_or_else(|| CheckpointError::UnsupportedDtype {
            path: path.to_path_buf(),
            tensor: name.to_string(),
            dtype: format!("{:?}", view.dtype()),
        })?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let tensor = Tensor::f_from_data_size(view.data(), &shape, kind)
            .map_err(|source| CheckpointError::torch(path, name, source))?;
        tensors.insert(name.to_string(), to_master(tensor));
    }
    Ok(tensors)
}

/// Writes tensors to a `.safetensors` file, floating-point ones cast to `precision`.
///
/// The header carries `format: pt`, which transformers requires before it loads a file.
pub fn write_safetensors(
    path: &Path,
    tensors: &Tensors,
    precision: Precision,
) -> Result<(), CheckpointError> {
    write_safetensors_with_metadata(path, tensors, precision, &BTreeMap::new())
}

/// [`write_safetensors`] with extra header metadata (what the file is, for tools that
/// show it), next to the `format: pt` every file gets.
pub fn write_safetensors_with_metadata(
    path: &Path,
    tensors: &Tensors,
    precision: Precision,
    extra: &BTreeMap<String, String>,
) -> Result<(), CheckpointError> {
    let target = precision_kind(precision);
    let views = tensors
        .iter()
        .map(|(name, tensor)| {
            let kind = if tensor.is_floating_point() {
                target
            } else {
                tensor.kind()
            };
            let dtype = dtype_of(kind).ok_or_else(|| CheckpointError::UnsupportedDtype {
                path: path.to_path_buf(),
                tensor: name.clone(),
                dtype: format!("{kind:?}"),
            })?;
            let shape = tensor.size().iter().map(|&d| d as usize).collect();
            Ok((
                name.as_str(),
                LazyView {
                    tensor,
                    kind,
                    dtype,
                    shape,
                },
            ))
        })
        .collect::<Result<Vec<_>, CheckpointError>>()?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|source| CheckpointError::io(parent, source))?;
    }
    let mut metadata: HashMap<String, String> = extra.clone().into_iter().collect();
    metadata.insert("format".to_string(), "pt".to_string());
    safetensors::serialize_to_file(views, Some(metadata), path).map_err(|e| match e {
        safetensors::SafeTensorError::IoError(source) => CheckpointError::io(path, source),
        other => CheckpointError::Invalid {
            path: path.to_path_buf(),
            message: other.to_string(),
        },
    })?;
    sort_header(path)
}

/// The `__metadata__` of a `.safetensors` file's header (empty when it has none).
pub fn read_safetensors_metadata(path: &Path) -> Result<BTreeMap<String, String>, CheckpointError> {
    use std::io::Read;
    let io = |source| CheckpointError::io(path, source);
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut length = [0u8; 8];
    file.read_exact(&mut length).map_err(io)?;
    let length = u64::from_le_bytes(length);
    if length > 100 << 20 {
        return Err(CheckpointError::invalid(
            path,
            format!("header of {length} bytes is not plausible"),
        ));
    }
    let mut header = vec![0u8; length as usize];
    file.read_exact(&mut header).map_err(io)?;
    let value: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| CheckpointError::invalid(path, format!("header: {e}")))?;
    Ok(value["__metadata__"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_owned())))
                .collect()
        })
        .unwrap_or_default())
}

/// Rewrites the JSON header with its keys sorted. The safetensors crate writes the
/// metadata map in hash order, which differs from run to run; sorted, the same weights
/// always give the same bytes (and sha256). Same entries, same length: done in place.
fn sort_header(path: &Path) -> Result<(), CheckpointError> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let io = |source| CheckpointError::io(path, source);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io)?;
    let mut length = [0u8; 8];
    file.read_exact(&mut length).map_err(io)?;
    let mut header = vec![0u8; u64::from_le_bytes(length) as usize];
    file.read_exact(&mut header).map_err(io)?;
    let json_end = header.iter().rposition(|&b| b == b'}').map_or(0, |i| i + 1);
    let value: serde_json::Value = serde_json::from_slice(&header[..json_end])
        .map_err(|e| CheckpointError::invalid(path, format!("header: {e}")))?;
    let sorted = serde_json::to_vec(&value).expect("JSON values serialise");
    if sorted.len() != json_end {
        return Err(CheckpointError::invalid(
            path,
            "header changed length when sorted",
        ));
    }
    file.seek(SeekFrom::Start(8)).map_err(io)?;
    file.write_all(&sorted).map_err(io)
}

/// Copies `tensors` into every variable of `vs`, by name.
///
/// Nothing is copied unless the names and shapes match exactly: a missing tensor, an
/// extra one, or a wrong shape is an error naming the tensor, both shapes, `source` and
/// `component`, because a half-loaded model trains without complaint and produces noise.
pub fn fill_var_store(
    vs: &mut VarStore,
    tensors: &Tensors,
    source: &Path,
    component: &str,
) -> Result<(), CheckpointError> {
    let variables = vs.variables();
    let mut names: Vec<&String> = variables.keys().collect();
    names.sort();

    let missing: Vec<&String> = names
        .iter()
        .copied()
        .filter(|n| !tensors.contains_key(*n))
        .collect();
    if let Some(first) = missing.first() {
        return Err(CheckpointError::MissingTensor {
            path: source.to_path_buf(),
            component: component.to_string(),
            tensor: first.to_string(),
            expected: variables[*first].size(),
            others: missing.len() - 1,
        });
    }
    let unexpected: Vec<&String> = tensors
        .keys()
        .filter(|n| !variables.contains_key(*n))
        .collect();
    if let Some(first) = unexpected.first() {
        return Err(CheckpointError::UnexpectedTensor {
            path: source.to_path_buf(),
            component: component.to_string(),
            tensor: first.to_string(),
            shape: tensors[*first].size(),
            others: unexpected.len() - 1,
        });
    }
    for name in &names {
        let (expected, found) = (variables[*name].size(), tensors[*name].size());
        if expected != found {
            return Err(CheckpointError::ShapeMismatch {
                path: source.to_path_buf(),
                component: component.to_string(),
                tensor: name.to_string(),
                expected,
                found,
            });
        }
    }
    tch::no_grad(|| {
        for name in names {
            let mut variable = variables[name].shallow_clone();
            variable
                .f_copy_(&tensors[name])
                .map_err(|source_err| CheckpointError::torch(source, name, source_err))?;
        }
        Ok(())
    })
}

/// The storage kind a precision stands for.
pub fn precision_kind(precision: Precision) -> Kind {
    match precision {
        Precision::Fp32 => Kind::Float,
        Precision::Fp16 => Kind::Half,
        Precision::Bf16 => Kind::BFloat16,
    }
}

/// Floating-point tensors become fp32 on the CPU; integer buffers keep their kind.
pub(crate) fn to_master(tensor: Tensor) -> Tensor {
    if tensor.is_floating_point() && tensor.kind() != Kind::Float {
        tensor.to_kind(Kind::Float)
    } else {
        tensor
    }
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::BOOL => Kind::Bool,
        Dtype::U8 => Kind::Uint8,
        Dtype::I8 => Kind::Int8,
        Dtype::I16 => Kind::Int16,
        Dtype::I32 => Kind::Int,
        Dtype::I64 => Kind::Int64,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        _ => return None,
    })
}

fn dtype_of(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Bool => Dtype::BOOL,
        Kind::Uint8 => Dtype::U8,
        Kind::Int8 => Dtype::I8,
        Kind::Int16 => Dtype::I16,
        Kind::Int => Dtype::I32,
        Kind::Int64 => Dtype::I64,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        _ => return None,
    })
}

/// Converts one tensor at a time while the file is written, so saving a model never
/// holds a second full copy of it in the target precision.
struct LazyView<'a> {
    tensor: &'a Tensor,
    kind: Kind,
    dtype: Dtype,
    shape: Vec<usize>,
}

impl View for LazyView<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        let converted = self
            .tensor
            .to_device(Device::Cpu)
            .to_kind(self.kind)
            .contiguous();
        let numel = converted.numel();
        let mut bytes = vec![0u8; self.data_len()];
        // The View trait cannot fail; a CPU tensor of a supported kind always copies out.
        converted.copy_data_u8(&mut bytes, numel);
        Cow::Owned(bytes)
    }

    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.kind.elt_size_in_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn;

    fn sample() -> Tensors {
        Tensors::from([
            (
                "a.weight".to_string(),
                Tensor::from_slice(&[1.0f32, -2.5, 3.25, 1e-3]).reshape([2, 2]),
            ),
            ("a.bias".to_string(), Tensor::from_slice(&[0.5f32, 7.0])),
            ("ids".to_string(), Tensor::from_slice(&[0i64, 1, 2])),
        ])
    }

    #[test]
    fn every_precision_reads_back_as_fp32_and_keeps_integers() {
        let dir = tempfile::tempdir().unwrap();
        for precision in [Precision::Fp32, Precision::Fp16, Precision::Bf16] {
            let path = dir.path().join(format!("{precision:?}.safetensors"));
            write_safetensors(&path, &sample(), precision).unwrap();
            let back = read_safetensors(&path).unwrap();
            assert_eq!(back["a.weight"].kind(), Kind::Float);
            assert_eq!(back["a.weight"].size(), vec![2, 2]);
            assert_eq!(back["ids"].kind(), Kind::Int64);
            let expected = sample()["a.weight"]
                .to_kind(precision_kind(precision))
                .to_kind(Kind::Float);
            assert!(back["a.weight"].equal(&expected), "{precision:?}");
        }
    }

    #[test]
    fn header_declares_pytorch_format() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        write_safetensors(&path, &sample(), Precision::Fp16).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let (_, metadata) = SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(metadata.metadata().as_ref().unwrap()["format"], "pt");
        assert_eq!(metadata.info("a.weight").unwrap().dtype, Dtype::F16);
    }

    #[test]
    fn fill_copies_only_when_everything_matches() {
        let mut vs = nn::VarStore::new(Device::Cpu);
        let w = vs.root().sub("a").zeros("weight", &[2, 2]);
        let mut tensors = sample();
        tensors.remove("ids");
        fill_var_store(&mut vs, &tensors, Path::new("m.safetensors"), "unet").unwrap_err();
        let _b = vs.root().sub("a").zeros("bias", &[2]);
        fill_var_store(&mut vs, &tensors, Path::new("m.safetensors"), "unet").unwrap();
        assert!(w.equal(&tensors["a.weight"]));
    }
}
