//! A reader for `torch.save` files (`.ckpt`, `.bin`) that never runs pickle code.
//!
//! A `.ckpt` is a zip holding `<archive>/data.pkl` and one `<archive>/data/<key>` entry
//! per storage; the pickle is read by the restricted machine in [`super::pickle`].

use std::fs::File;
use std::io::Read;
use std::path::Path;

use super::pickle::{Value, unpickle};
use super::safetensors::to_master;
use super::{CheckpointError, Tensors};

/// The tensors of a checkpoint and the training step it was saved at, if recorded.
#[derive(Debug)]
pub struct Checkpoint {
    pub tensors: Tensors,
    /// Lightning's `global_step`: diffusers tells SD 2.x base (875000) from 768-v by it.
    pub global_step: Option<i64>,
}

/// Reads the state dict of a zip-format `torch.save` file, `{"state_dict": ...}` nesting
/// included; floating-point tensors come back as fp32.
pub fn read_ckpt(path: &Path) -> Result<Checkpoint, CheckpointError> {
    if !path.is_file() {
        return Err(CheckpointError::NotFound {
            path: path.to_path_buf(),
        });
    }
    let file = File::open(path).map_err(|source| CheckpointError::io(path, source))?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| CheckpointError::Invalid {
        path: path.to_path_buf(),
        message: format!(
            "not a zip-format torch checkpoint ({e}); files saved by torch older than 1.6 are not supported"
        ),
    })?;
    let pickle_name = archive
        .file_names()
        .find(|name| name.ends_with("/data.pkl") && name.matches('/').count() == 1)
        .map(str::to_string)
        .ok_or_else(|| CheckpointError::Invalid {
            path: path.to_path_buf(),
            message: "the archive has no <name>/data.pkl, so it is not a torch checkpoint".into(),
        })?;
    let prefix = pickle_name.trim_end_matches("data.pkl").to_string();
    if let Ok(order) = read_entry(&mut archive, &format!("{prefix}byteorder"), path)
        && order != b"little"
    {
        return Err(CheckpointError::Invalid {
            path: path.to_path_buf(),
            message: format!(
                "storages are {}-endian; only little-endian is supported",
                String::from_utf8_lossy(&order)
            ),
        });
    }
    let pickle = read_entry(&mut archive, &pickle_name, path)?;
    let mut load_storage =
        |key: &str| read_entry(&mut archive, &format!("{prefix}data/{key}"), path);
    let root = unpickle(path, &pickle, &mut load_storage)?;
    state_dict(root, path)
}

fn read_entry(
    archive: &mut zip::ZipArchive<File>,
    name: &str,
    path: &Path,
) -> Result<Vec<u8>, CheckpointError> {
    let corrupt = |message: String| CheckpointError::Corrupt {
        path: path.to_path_buf(),
        message,
    };
    let mut entry = archive
        .by_name(name)
        .map_err(|e| corrupt(format!("entry {name}: {e}")))?;
    let mut bytes = Vec::with_capacity(entry.size() as usize);
    entry
        .read_to_end(&mut bytes)
        .map_err(|e| corrupt(format!("entry {name}: {e}")))?;
    Ok(bytes)
}

/// Picks the tensors out of the unpickled object: Lightning nests them under `state_dict`.
fn state_dict(root: Value, path: &Path) -> Result<Checkpoint, CheckpointError> {
    let not_a_dict = || CheckpointError::Invalid {
        path: path.to_path_buf(),
        message: "the checkpoint does not hold a dict of tensors".into(),
    };
    let Value::Dict(top) = root else {
        return Err(not_a_dict());
    };
    let top = top.borrow();
    let lookup = |name: &str| {
        top.iter()
            .find(|(k, _)| matches!(k, Value::Str(s) if s == name))
            .map(|(_, v)| v)
    };
    let global_step = match lookup("global_step") {
        Some(Value::Int(step)) => Some(*step),
        _ => None,
    };
    let entries = match lookup("state_dict") {
        Some(Value::Dict(inner)) => inner.borrow().clone(),
        _ => top.clone(),
    };
    let mut tensors = Tensors::new();
    for (key, value) in entries {
        if let (Value::Str(name), Value::Tensor(tensor)) = (key, value) {
            tensors.insert(name, to_master(tensor.shallow_clone()));
        }
    }
    if tensors.is_empty() {
        return Err(not_a_dict());
    }
    Ok(Checkpoint {
        tensors,
        global_step,
    })
}
