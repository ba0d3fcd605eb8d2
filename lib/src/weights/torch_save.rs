//! `torch.save` files in both formats, with tensors rebuilt from any view (storage, offset,
//! size, stride; candle's own reader refuses views that are neither C- nor Fortran-contiguous).
//!
//! **Zip** (torch >= 1.6): `<archive>/data.pkl` holds the object, `<archive>/data/<key>` each
//! storage's raw bytes; the pickle is parsed by candle ([`candle_core::pickle::read_pth_tensor_info`]).
//!
//! **Legacy**: what `torch.save` wrote before torch 1.6 (and still writes with
//! `_use_new_zipfile_serialization=False`), e.g. older torchvision downloads and the 2019-era
//! `robustness` checkpoints (`*.pth.tar`). candle does not read it. The file is five pickles in a row, then raw bytes (torch `serialization.py`, `_legacy_save`):
//! 1. the magic number `0x1950a86a20f9469cfc6c` (a 10-byte `LONG1`),
//! 2. the protocol version `1001`,
//! 3. `sys_info` (`little_endian`, type sizes),
//! 4. the saved object, whose storages are persistent ids
//!    `('storage', torch.FloatStorage, key, location, numel, view_metadata)`,
//! 5. the list of storage keys,
//!
//! then for each key in that order: the storage's element count (i64, little endian) and its
//! elements. Pickles 2-5 are parsed with candle's own pickle machine
//! ([`candle_core::pickle::Stack`]), so tensors are rebuilt exactly as for the zip format
//! (`_rebuild_tensor_v2`: storage, offset, size, stride).

use std::collections::HashMap;
use std::io::{Cursor, Read};

use candle_core::pickle::{Object, Stack};
use candle_core::{bail, Device, Result, Tensor};

/// `torch.serialization.MAGIC_NUMBER` pickled with protocol 2: `PROTO 2`, `LONG1 10 <bytes>`,
/// `STOP`.
const MAGIC_PICKLE: [u8; 15] = [
    0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, 0x2e,
];

/// Whether `head` (the file's first bytes) starts like a legacy `torch.save` file.
pub fn has_magic(head: &[u8]) -> bool {
    head.len() >= MAGIC_PICKLE.len()
        && head[0] == 0x80
        && head[2..MAGIC_PICKLE.len()] == MAGIC_PICKLE[2..]
}

/// All tensors of a zip-format file: of the top-level dict, or of its entry `key`. Entries that
/// are not tensors are left out.
pub fn read_zip(path: &std::path::Path, key: Option<&str>) -> Result<Vec<(String, Tensor)>> {
    let infos = candle_core::pickle::read_pth_tensor_info(path, false, key)?;
    let file = std::io::BufReader::new(std::fs::File::open(path)?);
    let mut zip = zip::ZipArchive::new(file).map_err(candle_core::Error::wrap)?;
    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    let mut tensors = Vec::with_capacity(infos.len());
    for info in infos {
        if !storages.contains_key(&info.path) {
            let mut entry = zip.by_name(&info.path).map_err(|e| {
                candle_core::Error::Msg(format!("tensor `{}`: {}: {e}", info.name, info.path))
            })?;
            let mut data = Vec::with_capacity(entry.size() as usize);
            entry.read_to_end(&mut data)?;
            storages.insert(info.path.clone(), data);
        }
        let t = gather(&storages[&info.path], &info)
            .map_err(|e| candle_core::Error::Msg(format!("tensor `{}`: {e}", info.name)))?;
        tensors.push((info.name, t));
    }
    Ok(tensors)
}

/// All tensors of a legacy file: of the top-level dict, or of its entry `key` (e.g. `model`).
/// Entries that are not tensors are left out (as for the zip format).
pub fn read_legacy(bytes: &[u8], key: Option<&str>) -> Result<Vec<(String, Tensor)>> {
    if !has_magic(bytes) {
        bail!("not a legacy torch.save file (no torch magic number at the start)")
    }
    let mut r = Cursor::new(&bytes[MAGIC_PICKLE.len()..]);
    match read_pickle(&mut r, "protocol version")? {
        Object::Int(1001) => {}
        other => bail!("unsupported torch serialization protocol {other:?} (expected 1001)"),
    }
    if let Object::Dict(info) = read_pickle(&mut r, "sys_info")? {
        let big_endian = info.iter().any(|(k, v)| {
            *k == Object::Unicode("little_endian".into()) && *v == Object::Bool(false)
        });
        if big_endian {
            bail!("saved on a big-endian machine, which this reader does not support")
        }
    }
    let root = read_pickle(&mut r, "saved object")?;
    let keys = match read_pickle(&mut r, "storage key list")? {
        Object::List(keys) => keys
            .into_iter()
            .map(|k| {
                k.unicode()
                    .map_err(|k| candle_core::Error::Msg(format!("storage key {k:?}")))
            })
            .collect::<Result<Vec<String>>>()?,
        other => bail!("expected the storage key list, found {other:?}"),
    };

    let mut sizes = HashMap::new();
    collect_storages(&root, &mut sizes)?;
    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    for k in keys {
        let Some(&(class, elem)) = sizes.get(&k) else {
            bail!("storage `{k}` is listed but no tensor refers to it")
        };
        let mut count = [0u8; 8];
        r.read_exact(&mut count)
            .map_err(|_| candle_core::Error::Msg(format!("truncated before storage `{k}`")))?;
        let n = i64::from_le_bytes(count);
        let len = usize::try_from(n)
            .ok()
            .and_then(|n| n.checked_mul(elem))
            .ok_or_else(|| candle_core::Error::Msg(format!("storage `{k}`: bad size {n}")))?;
        let mut data = vec![0u8; len];
        r.read_exact(&mut data).map_err(|_| {
            candle_core::Error::Msg(format!(
                "truncated in storage `{k}` ({n} elements of {class})"
            ))
        })?;
        storages.insert(k, data);
    }

    let obj = match (key, root) {
        (Some(key), Object::Dict(entries)) => {
            let names: Vec<String> = entries
                .iter()
                .filter_map(|(k, _)| k.clone().unicode().ok())
                .collect();
            entries
                .into_iter()
                .find(|(k, _)| *k == Object::Unicode(key.to_string()))
                .map(|(_, v)| v)
                .ok_or_else(|| {
                    candle_core::Error::Msg(format!(
                        "no entry `{key}` (entries: {})",
                        names.join(", ")
                    ))
                })?
        }
        (_, root) => root,
    };
    let Object::Dict(entries) = obj else {
        bail!("the saved object is not a dict of tensors")
    };
    let mut tensors = Vec::new();
    for (name, value) in entries {
        let label = match &name {
            Object::Unicode(n) => format!("`{n}`"),
            other => format!("{other:?}"),
        };
        let info = value
            .into_tensor_info(name, std::path::Path::new(""))
            .map_err(|e| candle_core::Error::Msg(format!("tensor {label}: {e}")))?;
        let Some(info) = info else { continue };
        let storage_key = info.path.trim_start_matches('/');
        let Some(data) = storages.get(storage_key) else {
            bail!("tensor {label}: storage `{storage_key}` has no data")
        };
        let t = gather(data, &info)
            .map_err(|e| candle_core::Error::Msg(format!("tensor `{}`: {e}", info.name)))?;
        tensors.push((info.name, t));
    }
    Ok(tensors)
}

fn read_pickle(r: &mut Cursor<&[u8]>, what: &str) -> Result<Object> {
    let mut stack = Stack::empty();
    stack
        .read_loop(r)
        .and_then(|_| stack.finalize())
        .map_err(|e| candle_core::Error::Msg(format!("reading the {what} pickle: {e}")))
}

/// Every persistent id `('storage', <class>, key, location, numel, ...)` under `obj`: key ->
/// (class, element size); the element size is needed to step over a storage's bytes.
fn collect_storages(obj: &Object, out: &mut HashMap<String, (&'static str, usize)>) -> Result<()> {
    match obj {
        Object::PersistentLoad(id) => {
            if let Object::Tuple(items) = id.as_ref() {
                if let (Some(Object::Class { class_name, .. }), Some(Object::Unicode(key))) =
                    (items.get(1), items.get(2))
                {
                    out.insert(key.clone(), element_size(class_name)?);
                }
            }
        }
        Object::Tuple(v) | Object::List(v) => {
            for o in v {
                collect_storages(o, out)?
            }
        }
        Object::Dict(kv) => {
            for (k, v) in kv {
                collect_storages(k, out)?;
                collect_storages(v, out)?;
            }
        }
        Object::Reduce { callable, args } | Object::Build { callable, args } => {
            collect_storages(callable, out)?;
            collect_storages(args, out)?;
        }
        _ => {}
    }
    Ok(())
}

/// torch's storage classes (`torch.FloatStorage`, ...) and their element sizes in bytes. Which
/// of them become tensors is candle's choice (`rebuild_args`: float, double, half, bfloat16,
/// byte, long); the others are still stepped over.
fn element_size(class: &str) -> Result<(&'static str, usize)> {
    Ok(match class {
        "FloatStorage" => ("FloatStorage", 4),
        "DoubleStorage" => ("DoubleStorage", 8),
        "HalfStorage" => ("HalfStorage", 2),
        "BFloat16Storage" => ("BFloat16Storage", 2),
        "ByteStorage" => ("ByteStorage", 1),
        "CharStorage" => ("CharStorage", 1),
        "BoolStorage" => ("BoolStorage", 1),
        "ShortStorage" => ("ShortStorage", 2),
        "IntStorage" => ("IntStorage", 4),
        "LongStorage" => ("LongStorage", 8),
        "ComplexFloatStorage" => ("ComplexFloatStorage", 8),
        "ComplexDoubleStorage" => ("ComplexDoubleStorage", 16),
        other => bail!("unknown storage type `{other}`"),
    })
}

/// The tensor a `(storage, offset, size, stride)` view selects, copied element by element in
/// row-major order (any strides, as torch allows).
fn gather(storage: &[u8], info: &candle_core::pickle::TensorInfo) -> Result<Tensor> {
    let layout = &info.layout;
    let elem = info.dtype.size_in_bytes();
    let dims = layout.dims();
    let strides = layout.stride();
    let offset = layout.start_offset() / elem;
    let numel: usize = dims.iter().product();
    let last = offset
        + dims
            .iter()
            .zip(strides)
            .map(|(d, s)| d.saturating_sub(1) * s)
            .sum::<usize>();
    if numel > 0 && (last + 1) * elem > storage.len() {
        bail!(
            "the view (offset {offset}, size {dims:?}, stride {strides:?}) reaches past its \
             storage of {} elements",
            storage.len() / elem
        )
    }
    let bytes = if layout.is_contiguous() {
        storage[offset * elem..(offset + numel) * elem].to_vec()
    } else {
        let mut out = Vec::with_capacity(numel * elem);
        let mut index = vec![0usize; dims.len()];
        for _ in 0..numel {
            let at = offset + index.iter().zip(strides).map(|(i, s)| i * s).sum::<usize>();
            out.extend_from_slice(&storage[at * elem..(at + 1) * elem]);
            for d in (0..dims.len()).rev() {
                index[d] += 1;
                if index[d] < dims[d] {
                    break;
                }
                index[d] = 0;
            }
        }
        out
    };
    Tensor::from_raw_buffer(&bytes, info.dtype, dims, &Device::Cpu)
}
