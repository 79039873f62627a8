//! A pickle machine that understands only what `torch.save` writes.
//!
//! Unpickling with Python may call any function the file names. This machine knows only
//! the opcodes `torch.save` emits and only the globals that rebuild tensors, storages and
//! ordered dicts; any other global stops the read with an error naming it, before
//! anything else happens. Nothing in the file is ever executed.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use tch::{Kind, Tensor};

use super::CheckpointError;

/// Reads the bytes of storage `data/<key>` from wherever the pickle came from.
pub(super) type StorageLoader<'a> = dyn FnMut(&str) -> Result<Vec<u8>, CheckpointError> + 'a;

/// Runs `data` (a torch.save pickle read from `path`) to its final value.
pub(super) fn unpickle(
    path: &Path,
    data: &[u8],
    load_storage: &mut StorageLoader<'_>,
) -> Result<Value, CheckpointError> {
    let mut machine = Machine {
        path: path.to_path_buf(),
        data,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        storages: HashMap::new(),
        load_storage,
    };
    machine.run()
}

/// The only callables a checkpoint may name.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Global {
    OrderedDict,
    RebuildTensor,
    RebuildParameter,
    StorageType(Kind),
}

impl Global {
    fn allowed(module: &str, name: &str) -> Option<Global> {
        Some(match (module, name) {
            ("collections", "OrderedDict") => Global::OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensor,
            ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
            ("torch", storage) => Global::StorageType(match storage {
                "FloatStorage" => Kind::Float,
                "HalfStorage" => Kind::Half,
                "BFloat16Storage" => Kind::BFloat16,
                "DoubleStorage" => Kind::Double,
                "LongStorage" => Kind::Int64,
                "IntStorage" => Kind::Int,
                "ShortStorage" => Kind::Int16,
                "CharStorage" => Kind::Int8,
                "ByteStorage" => Kind::Uint8,
                "BoolStorage" => Kind::Bool,
                _ => return None,
            }),
            _ => return None,
        })
    }
}

/// A pickled value. Lists and dicts are shared, as in Python, because the memo may hand
/// out the same object again after it has been filled.
#[derive(Debug, Clone)]
pub(super) enum Value {
    None,
    /// Booleans, floats and bytes only ever fill fields we skip (`requires_grad`, metadata).
    Bool,
    Int(i64),
    Float,
    Str(String),
    Bytes,
    Tuple(Rc<Vec<Value>>),
    List(Rc<RefCell<Vec<Value>>>),
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    Global(Global),
    /// One storage: a flat tensor of its element kind.
    Storage(Rc<Tensor>),
    Tensor(Rc<Tensor>),
}

struct Machine<'a> {
    path: PathBuf,
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    /// Stack heights at each MARK.
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    storages: HashMap<String, Rc<Tensor>>,
    load_storage: &'a mut StorageLoader<'a>,
}

impl Machine<'_> {
    fn error(&self, message: impl Into<String>) -> CheckpointError {
        CheckpointError::Pickle {
            path: self.path.clone(),
            offset: self.pos,
            message: message.into(),
        }
    }

    fn take(&mut self, n: usize) -> Result<&[u8], CheckpointError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.data.len());
        let end =
            end.ok_or_else(|| self.error("the pickle ends in the middle of an instruction"))?;
        let bytes = &self.data[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn u8(&mut self) -> Result<u8, CheckpointError> {
        Ok(self.take(1)?[0])
    }

    fn le<const N: usize>(&mut self) -> Result<[u8; N], CheckpointError> {
        Ok(self.take(N)?.try_into().expect("take returns N bytes"))
    }

    fn line(&mut self) -> Result<String, CheckpointError> {
        let rest = &self.data[self.pos..];
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| self.error("unterminated GLOBAL"))?;
        let text = String::from_utf8_lossy(&rest[..end]).into_owned();
        self.pos += end + 1;
        Ok(text)
    }

    fn text(&mut self, len: usize) -> Result<Value, CheckpointError> {
        let bytes = self.take(len)?.to_vec();
        String::from_utf8(bytes)
            .map(Value::Str)
            .map_err(|_| self.error("string is not UTF-8"))
    }

    fn pop(&mut self) -> Result<Value, CheckpointError> {
        self.stack
            .pop()
            .ok_or_else(|| self.error("stack underflow"))
    }

    fn top(&self) -> Result<&Value, CheckpointError> {
        self.stack
            .last()
            .ok_or_else(|| self.error("stack underflow"))
    }

    /// Everything pushed since the last MARK.
    fn pop_mark(&mut self) -> Result<Vec<Value>, CheckpointError> {
        let height = self
            .marks
            .pop()
            .ok_or_else(|| self.error("no MARK to pop to"))?;
        if height > self.stack.len() {
            return Err(self.error("stack underflow"));
        }
        Ok(self.stack.split_off(height))
    }

    fn memoize(&mut self, index: u32) -> Result<(), CheckpointError> {
        let value = self.top()?.clone();
        self.memo.insert(index, value);
        Ok(())
    }

    fn recall(&mut self, index: u32) -> Result<(), CheckpointError> {
        let value = self
            .memo
            .get(&index)
            .cloned()
            .ok_or_else(|| self.error(format!("memo {index} is empty")))?;
        self.stack.push(value);
        Ok(())
    }

    fn run(&mut self) -> Result<Value, CheckpointError> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?; // PROTO
                }
                0x95 => {
                    self.take(8)?; // FRAME: a length hint only
                }
                b'.' => return self.pop(),
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let top = self.top()?.clone();
                    self.stack.push(top)
                }
                b'N' => self.stack.push(Value::None),
                0x88 | 0x89 => self.stack.push(Value::Bool),
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(v.into()))
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.le()?);
                    self.stack.push(Value::Int(v.into()))
                }
                b'J' => {
                    let v = i32::from_le_bytes(self.le()?);
                    self.stack.push(Value::Int(v.into()))
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    let v = self.long(n)?;
                    self.stack.push(v)
                }
                0x8b => {
                    let n = u32::from_le_bytes(self.le()?) as usize;
                    let v = self.long(n)?;
                    self.stack.push(v)
                }
                b'G' => {
                    self.take(8)?;
                    self.stack.push(Value::Float)
                }
                b'X' => {
                    let n = u32::from_le_bytes(self.le()?) as usize;
                    let v = self.text(n)?;
                    self.stack.push(v)
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let v = self.text(n)?;
                    self.stack.push(v)
                }
                0x8d => {
                    let n = u64::from_le_bytes(self.le()?) as usize;
                    let v = self.text(n)?;
                    self.stack.push(v)
                }
                b'B' | b'C' => {
                    let n = if op == b'B' {
                        u32::from_le_bytes(self.le()?) as usize
                    } else {
                        self.u8()? as usize
                    };
                    self.take(n)?;
                    self.stack.push(Value::Bytes)
                }
                b'}' => self.stack.push(Value::Dict(Rc::default())),
                b']' => self.stack.push(Value::List(Rc::default())),
                b')' => self.stack.push(Value::Tuple(Rc::default())),
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(Rc::new(items)))
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    if self.stack.len() < n {
                        return Err(self.error("stack underflow"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(Value::Tuple(Rc::new(items)))
                }
                b'a' => {
                    let item = self.pop()?;
                    self.extend_list(vec![item])?
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.extend_list(items)?
                }
                b's' => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    self.extend_dict(vec![key, value])?
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.extend_dict(items)?
                }
                b'q' => {
                    let i = self.u8()?;
                    self.memoize(i.into())?
                }
                b'r' => {
                    let i = u32::from_le_bytes(self.le()?);
                    self.memoize(i)?
                }
                0x94 => self.memoize(self.memo.len() as u32)?,
                b'h' => {
                    let i = self.u8()?;
                    self.recall(i.into())?
                }
                b'j' => {
                    let i = u32::from_le_bytes(self.le()?);
                    self.recall(i)?
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let global = self.global(&module, &name)?;
                    self.stack.push(global)
                }
                0x93 => {
                    let (Value::Str(name), Value::Str(module)) = (self.pop()?, self.pop()?) else {
                        return Err(self.error("STACK_GLOBAL needs two strings"));
                    };
                    let global = self.global(&module, &name)?;
                    self.stack.push(global)
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let result = self.reduce(callable, args)?;
                    self.stack.push(result)
                }
                b'b' => {
                    self.pop()?; // BUILD: the state of an OrderedDict or a tensor carries no weights
                    match self.top()? {
                        Value::Dict(_) | Value::Tensor(_) => {}
                        _ => {
                            return Err(
                                self.error("BUILD on something that is not a dict or tensor")
                            );
                        }
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let storage = self.persistent_load(pid)?;
                    self.stack.push(storage)
                }
                other => {
                    self.pos -= 1;
                    return Err(self.error(format!(
                        "pickle opcode 0x{other:02x} is not one torch.save writes; refusing to go on"
                    )));
                }
            }
        }
    }

    /// A little-endian two's complement integer of `n` bytes (LONG1/LONG4).
    fn long(&mut self, n: usize) -> Result<Value, CheckpointError> {
        if n > 8 {
            return Err(self.error("integer wider than 64 bits"));
        }
        let bytes = self.take(n)?;
        let mut buffer = if bytes.last().is_some_and(|b| b & 0x80 != 0) {
            [0xff; 8]
        } else {
            [0; 8]
        };
        buffer[..n].copy_from_slice(bytes);
        Ok(Value::Int(i64::from_le_bytes(buffer)))
    }

    fn global(&self, module: &str, name: &str) -> Result<Value, CheckpointError> {
        Global::allowed(module, name)
            .map(Value::Global)
            .ok_or_else(|| CheckpointError::ForbiddenGlobal {
                path: self.path.clone(),
                global: format!("{module}.{name}"),
            })
    }

    fn extend_list(&mut self, items: Vec<Value>) -> Result<(), CheckpointError> {
        match self.top()? {
            Value::List(list) => {
                list.borrow_mut().extend(items);
                Ok(())
            }
            _ => Err(self.error("APPEND to something that is not a list")),
        }
    }

    fn extend_dict(&mut self, items: Vec<Value>) -> Result<(), CheckpointError> {
        if !items.len().is_multiple_of(2) {
            return Err(self.error("SETITEMS with an odd number of items"));
        }
        let Value::Dict(dict) = self.top()? else {
            return Err(self.error("SETITEM on something that is not a dict"));
        };
        let dict = dict.clone();
        let mut dict = dict.borrow_mut();
        let mut items = items.into_iter();
        while let (Some(key), Some(value)) = (items.next(), items.next()) {
            dict.push((key, value));
        }
        Ok(())
    }

    fn reduce(&mut self, callable: Value, args: Value) -> Result<Value, CheckpointError> {
        let Value::Tuple(args) = args else {
            return Err(self.error("REDUCE arguments are not a tuple"));
        };
        match (callable, args.as_slice()) {
            (Value::Global(Global::OrderedDict), []) => Ok(Value::Dict(Rc::default())),
            (Value::Global(Global::RebuildTensor), [storage, offset, size, stride, ..])
                if args.len() >= 6 =>
            {
                self.rebuild_tensor(storage, offset, size, stride)
            }
            (Value::Global(Global::RebuildParameter), [tensor @ Value::Tensor(_), ..]) => {
                Ok(tensor.clone())
            }
            (callable, _) => Err(self.error(format!(
                "cannot call {callable:?} with {} arguments",
                args.len()
            ))),
        }
    }

    fn ints(&self, value: &Value, what: &str) -> Result<Vec<i64>, CheckpointError> {
        let Value::Tuple(items) = value else {
            return Err(self.error(format!("tensor {what} is not a tuple")));
        };
        items
            .iter()
            .map(|item| match item {
                Value::Int(i) if *i >= 0 => Ok(*i),
                _ => Err(self.error(format!("tensor {what} holds something other than a size"))),
            })
            .collect()
    }

    fn rebuild_tensor(
        &self,
        storage: &Value,
        offset: &Value,
        size: &Value,
        stride: &Value,
    ) -> Result<Value, CheckpointError> {
        let Value::Storage(storage) = storage else {
            return Err(self.error("tensor without a storage"));
        };
        let Value::Int(offset) = *offset else {
            return Err(self.error("tensor offset is not an integer"));
        };
        let (size, stride) = (self.ints(size, "size")?, self.ints(stride, "stride")?);
        if size.len() != stride.len() || offset < 0 {
            return Err(self.error("tensor size, stride and offset do not fit together"));
        }
        // The furthest element the view touches must lie inside the storage.
        let reach = if size.contains(&0) {
            0
        } else {
            offset
                + 1
                + size
                    .iter()
                    .zip(&stride)
                    .map(|(n, s)| (n - 1) * s)
                    .sum::<i64>()
        };
        if reach > storage.numel() as i64 {
            return Err(self.error(format!(
                "tensor of size {size:?} at offset {offset} reaches past its storage of {} elements",
                storage.numel()
            )));
        }
        let tensor = storage
            .as_strided(size.as_slice(), stride.as_slice(), offset)
            .contiguous();
        Ok(Value::Tensor(Rc::new(tensor)))
    }

    /// `('storage', torch.<Kind>Storage, key, location, numel)`: the bytes of `data/<key>`.
    fn persistent_load(&mut self, pid: Value) -> Result<Value, CheckpointError> {
        let Value::Tuple(pid) = pid else {
            return Err(self.error("persistent id is not a tuple"));
        };
        let [
            Value::Str(tag),
            Value::Global(Global::StorageType(kind)),
            Value::Str(key),
            _,
            Value::Int(numel),
        ] = pid.as_slice()
        else {
            return Err(self.error("persistent id is not a torch storage reference"));
        };
        if tag != "storage" {
            return Err(self.error(format!("persistent id of kind {tag:?}")));
        }
        if let Some(storage) = self.storages.get(key) {
            return Ok(Value::Storage(storage.clone()));
        }
        let name = format!("data/{key}");
        let bytes = (self.load_storage)(key)?;
        let needed = (*numel as usize) * kind.elt_size_in_bytes();
        if *numel < 0 || bytes.len() < needed {
            return Err(CheckpointError::Corrupt {
                path: self.path.clone(),
                message: format!(
                    "storage {name} has {} bytes, {needed} expected",
                    bytes.len()
                ),
            });
        }
        let storage = Tensor::f_from_data_size(&bytes[..needed], &[*numel], *kind)
            .map_err(|source| CheckpointError::torch(&self.path, &name, source))?;
        let storage = Rc::new(storage);
        self.storages.insert(key.clone(), storage.clone());
        Ok(Value::Storage(storage))
    }
}
