//! NumPy `.npz` files: the hand-off between export and training.
//!
//! An `.npz` is a ZIP archive of `.npy` arrays. Ours are stored (uncompressed) with a CRC-32 per
//! member, written and read here with no zip or numpy crate: the format is small, and a reader that
//! checks every length and checksum is what turns a truncated or corrupted export into a clear error
//! instead of a model trained on garbage. `numpy.load` reads what [`encode`] writes, and [`decode`]
//! also reads numpy's own `np.savez` output (including its ZIP64 extra fields).
//!
//! The training data set ([`Dataset`]) is four arrays:
//!
//! | name | dtype | shape | meaning |
//! | --- | --- | --- | --- |
//! | `states` | `<f4` | `[N, F]` | position features from the mover's perspective |
//! | `outcomes` | `<f4` | `[N]` | +1 if the mover went on to win, -1 if it lost |
//! | `game_ids` | `<i8` | `[N]` | the games DB id each sample came from (optional on read) |
//! | `config_key` | `<U…` | `[]` | e.g. `hex8_2p` |

use std::fmt::Write as _;

use thiserror::Error;

/// Why an archive or array could not be written or read.
#[derive(Debug, Error)]
pub enum NpzError {
    #[error("not a complete npz archive: {0} (truncated or not a zip file?)")]
    Zip(String),
    #[error("npz member {name:?} is corrupt: {reason}")]
    Member { name: String, reason: String },
    #[error("npz member {name:?}: {reason}")]
    Array { name: String, reason: String },
    #[error("npz is missing the {0:?} array")]
    Missing(&'static str),
    #[error("npz arrays disagree: {0}")]
    Inconsistent(String),
    #[error("npz too large: {0} (zip64 writing is not supported)")]
    TooLarge(String),
}

const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

/// CRC-32 (IEEE 802.3, as used by ZIP, PNG and gzip).
pub fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c = CRC_TABLE[((c ^ u32::from(b)) & 0xFF) as usize] ^ (c >> 8);
    }
    !c
}

/// One `.npy` array: dtype descriptor (`<f4`, `<i8`, `<U7`, ...), shape, and its raw C-order
/// little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray {
    pub descr: String,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl NpyArray {
    pub fn f32(shape: Vec<usize>, values: &[f32]) -> NpyArray {
        NpyArray {
            descr: "<f4".into(),
            shape,
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    pub fn i64(shape: Vec<usize>, values: &[i64]) -> NpyArray {
        NpyArray {
            descr: "<i8".into(),
            shape,
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    /// A 0-d unicode string array (numpy `<U`, UTF-32LE), readable without `allow_pickle`.
    pub fn string(s: &str) -> NpyArray {
        let chars = s.chars().count().max(1);
        let mut data: Vec<u8> = s.chars().flat_map(|c| (c as u32).to_le_bytes()).collect();
        data.resize(chars * 4, 0);
        NpyArray {
            descr: format!("<U{chars}"),
            shape: Vec::new(),
            data,
        }
    }

    /// Number of elements (1 for a 0-d array).
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes per element, for the dtypes this module understands.
    fn item_size(descr: &str) -> Option<usize> {
        match descr {
            "<f4" | "<i4" | "<u4" => Some(4),
            "<f8" | "<i8" | "<u8" => Some(8),
            "|u1" | "|i1" | "|b1" => Some(1),
            _ => {
                let (kind, n) = descr.split_at_checked(2)?;
                let n: usize = n.parse().ok()?;
                match kind {
                    "<U" => Some(4 * n),
                    "|S" => Some(n),
                    _ => None,
                }
            }
        }
    }

    /// The values as f32 (from `<f4` or `<f8`).
    pub fn to_f32(&self, name: &str) -> Result<Vec<f32>, NpzError> {
        match self.descr.as_str() {
            "<f4" => Ok(self
                .data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("4-byte chunk")))
                .collect()),
            "<f8" => Ok(self
                .data
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().expect("8-byte chunk")) as f32)
                .collect()),
            other => Err(array_error(name, format!("dtype {other} is not float32"))),
        }
    }

    /// The values as i64 (from `<i8` or `<i4`).
    pub fn to_i64(&self, name: &str) -> Result<Vec<i64>, NpzError> {
        match self.descr.as_str() {
            "<i8" => Ok(self
                .data
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().expect("8-byte chunk")))
                .collect()),
            "<i4" => Ok(self
                .data
                .chunks_exact(4)
                .map(|b| i64::from(i32::from_le_bytes(b.try_into().expect("4-byte chunk"))))
                .collect()),
            other => Err(array_error(
                name,
                format!("dtype {other} is not an integer"),
            )),
        }
    }

    /// The value of a 0-d (or 1-element) string array, `<U` or `|S`.
    pub fn to_string(&self, name: &str) -> Result<String, NpzError> {
        if self.elements() != 1 {
            return Err(array_error(name, "expected a single string".into()));
        }
        let s = if self.descr.starts_with("<U") {
            self.data
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes(b.try_into().expect("4-byte chunk")))
                .take_while(|&c| c != 0)
                .map(|c| char::from_u32(c).ok_or_else(|| array_error(name, "invalid char".into())))
                .collect::<Result<String, _>>()?
        } else if self.descr.starts_with("|S") {
            let end = self
                .data
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(self.data.len());
            String::from_utf8(self.data[..end].to_vec())
                .map_err(|_| array_error(name, "string is not utf-8".into()))?
        } else {
            return Err(array_error(
                name,
                format!("dtype {} is not a string", self.descr),
            ));
        };
        Ok(s)
    }

    /// The `.npy` file (format 1.0): magic, header dict padded to 64 bytes, data.
    pub fn to_npy(&self) -> Vec<u8> {
        let shape = match self.shape.as_slice() {
            [] => "()".to_string(),
            [n] => format!("({n},)"),
            dims => {
                let mut s = String::from("(");
                for (i, d) in dims.iter().enumerate() {
                    if i > 0 {
                        s.push_str(", ");
                    }
                    let _ = write!(s, "{d}");
                }
                s.push(')');
                s
            }
        };
        let mut header = format!(
            "{{'descr': '{}', 'fortran_order': False, 'shape': {shape}, }}",
            self.descr
        );
        let unpadded = 10 + header.len() + 1;
        header.extend(std::iter::repeat_n(' ', (64 - unpadded % 64) % 64));
        header.push('\n');
        let mut out = Vec::with_capacity(10 + header.len() + self.data.len());
        out.extend_from_slice(b"\x93NUMPY\x01\x00");
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(&self.data);
        out
    }

    /// Parses a `.npy` file, checking the header and that the data length matches the shape.
    pub fn from_npy(name: &str, bytes: &[u8]) -> Result<NpyArray, NpzError> {
        let err = |reason: &str| array_error(name, reason.to_string());
        if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
            return Err(err("not a .npy array (bad magic)"));
        }
        let (header_len, start) = match bytes[6] {
            1 => (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10),
            2 | 3 if bytes.len() >= 12 => (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            ),
            v => return Err(array_error(name, format!("unsupported .npy version {v}"))),
        };
        let header = bytes
            .get(start..start + header_len)
            .ok_or_else(|| err("truncated .npy header"))?;
        let header = std::str::from_utf8(header).map_err(|_| err("header is not text"))?;
        let descr = dict_value(header, "descr")
            .and_then(|v| v.strip_prefix('\'')?.split('\'').next())
            .ok_or_else(|| err("header has no descr"))?
            .to_string();
        match dict_value(header, "fortran_order") {
            Some(v) if v.starts_with("False") => {}
            Some(_) => return Err(err("fortran-order arrays are not supported")),
            None => return Err(err("header has no fortran_order")),
        }
        let shape_text = dict_value(header, "shape")
            .and_then(|v| v.strip_prefix('(')?.split(')').next())
            .ok_or_else(|| err("header has no shape"))?;
        let shape = shape_text
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.trim_end_matches('L').parse::<usize>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| array_error(name, format!("bad shape ({shape_text})")))?;
        let item = NpyArray::item_size(&descr)
            .ok_or_else(|| array_error(name, format!("unsupported dtype {descr}")))?;
        let want = shape
            .iter()
            .try_fold(item, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| err("shape overflows"))?;
        let data = &bytes[start + header_len..];
        if data.len() != want {
            return Err(array_error(
                name,
                format!(
                    "data is {} bytes, shape {shape:?} of {descr} needs {want}",
                    data.len()
                ),
            ));
        }
        Ok(NpyArray {
            descr,
            shape,
            data: data.to_vec(),
        })
    }
}

fn array_error(name: &str, reason: String) -> NpzError {
    NpzError::Array {
        name: name.to_string(),
        reason,
    }
}

/// The text after `'key':` in a header dict, leading spaces trimmed.
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!("'{key}':");
    let at = header.find(&pat)? + pat.len();
    Some(header[at..].trim_start())
}

// ZIP record signatures.
const LOCAL: u32 = 0x0403_4b50;
const CENTRAL: u32 = 0x0201_4b50;
const END: u32 = 0x0605_4b50;
/// 1980-01-01 00:00, the earliest DOS date: archives are byte-for-byte reproducible.
const DOS_DATE: u16 = (1 << 5) | 1;

/// A stored (uncompressed) ZIP of `name.npy` members, one per array, in the order given.
pub fn write_npz(arrays: &[(&str, &NpyArray)]) -> Result<Vec<u8>, NpzError> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, array) in arrays {
        let file_name = format!("{name}.npy");
        let npy = array.to_npy();
        let size = u32::try_from(npy.len())
            .ok()
            .filter(|&s| s != u32::MAX)
            .ok_or_else(|| NpzError::TooLarge(format!("array {name} is {} bytes", npy.len())))?;
        let offset = u32::try_from(out.len())
            .map_err(|_| NpzError::TooLarge(format!("archive exceeds 4 GiB at {name}")))?;
        let crc = crc32(&npy);
        // Local file header.
        put32(&mut out, LOCAL);
        put16(&mut out, 20); // version needed: 2.0
        put16(&mut out, 0); // flags
        put16(&mut out, 0); // method: stored
        put16(&mut out, 0); // time
        put16(&mut out, DOS_DATE);
        put32(&mut out, crc);
        put32(&mut out, size);
        put32(&mut out, size);
        put16(&mut out, file_name.len() as u16);
        put16(&mut out, 0); // extra length
        out.extend_from_slice(file_name.as_bytes());
        out.extend_from_slice(&npy);
        // Central directory entry.
        put32(&mut central, CENTRAL);
        put16(&mut central, (3 << 8) | 20); // made by: unix, 2.0
        put16(&mut central, 20);
        put16(&mut central, 0);
        put16(&mut central, 0);
        put16(&mut central, 0);
        put16(&mut central, DOS_DATE);
        put32(&mut central, crc);
        put32(&mut central, size);
        put32(&mut central, size);
        put16(&mut central, file_name.len() as u16);
        put16(&mut central, 0); // extra
        put16(&mut central, 0); // comment
        put16(&mut central, 0); // disk
        put16(&mut central, 0); // internal attributes
        put32(&mut central, 0o100644 << 16); // external: regular file, rw-r--r--
        put32(&mut central, offset);
        central.extend_from_slice(file_name.as_bytes());
    }
    let cd_offset =
        u32::try_from(out.len()).map_err(|_| NpzError::TooLarge("archive exceeds 4 GiB".into()))?;
    out.extend_from_slice(&central);
    put32(&mut out, END);
    put16(&mut out, 0);
    put16(&mut out, 0);
    put16(&mut out, arrays.len() as u16);
    put16(&mut out, arrays.len() as u16);
    put32(&mut out, central.len() as u32);
    put32(&mut out, cd_offset);
    put16(&mut out, 0); // comment length
    Ok(out)
}

fn put16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn get16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn get32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn get64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Every array of an `.npz`, in archive order, with every member's CRC-32 checked.
pub fn read_npz(bytes: &[u8]) -> Result<Vec<(String, NpyArray)>, NpzError> {
    let zip = |s: &str| NpzError::Zip(s.to_string());
    // The end-of-central-directory record: 22 bytes plus a comment of up to 64 KiB.
    let last = bytes
        .len()
        .checked_sub(22)
        .ok_or_else(|| zip("file too short"))?;
    let first = last.saturating_sub(0xFFFF);
    let end = (first..=last)
        .rev()
        .find(|&at| {
            get32(bytes, at) == Some(END)
                && get16(bytes, at + 20).map(|c| at + 22 + usize::from(c)) == Some(bytes.len())
        })
        .ok_or_else(|| zip("end of central directory not found"))?;
    let entries = usize::from(get16(bytes, end + 10).expect("in bounds"));
    let cd_size = get32(bytes, end + 12).expect("in bounds") as usize;
    let cd_offset = get32(bytes, end + 16).expect("in bounds") as usize;
    if cd_offset.checked_add(cd_size).is_none_or(|e| e > end) {
        return Err(zip("central directory lies outside the file"));
    }
    let mut arrays = Vec::with_capacity(entries);
    let mut at = cd_offset;
    for _ in 0..entries {
        let bad_cd = || zip("central directory entry is cut short");
        if get32(bytes, at) != Some(CENTRAL) {
            return Err(zip("bad central directory entry"));
        }
        let flags = get16(bytes, at + 8).ok_or_else(bad_cd)?;
        let method = get16(bytes, at + 10).ok_or_else(bad_cd)?;
        let crc = get32(bytes, at + 16).ok_or_else(bad_cd)?;
        let mut csize = u64::from(get32(bytes, at + 20).ok_or_else(bad_cd)?);
        let mut usize_ = u64::from(get32(bytes, at + 24).ok_or_else(bad_cd)?);
        let name_len = usize::from(get16(bytes, at + 28).ok_or_else(bad_cd)?);
        let extra_len = usize::from(get16(bytes, at + 30).ok_or_else(bad_cd)?);
        let comment_len = usize::from(get16(bytes, at + 32).ok_or_else(bad_cd)?);
        let mut local = u64::from(get32(bytes, at + 42).ok_or_else(bad_cd)?);
        let name_bytes = bytes.get(at + 46..at + 46 + name_len).ok_or_else(bad_cd)?;
        let file_name = String::from_utf8_lossy(name_bytes).into_owned();
        let extra = bytes
            .get(at + 46 + name_len..at + 46 + name_len + extra_len)
            .ok_or_else(bad_cd)?;
        zip64_sizes(extra, &mut usize_, &mut csize, &mut local);
        at += 46 + name_len + extra_len + comment_len;

        let member = |reason: String| NpzError::Member {
            name: file_name.clone(),
            reason,
        };
        if flags & 1 != 0 {
            return Err(member("encrypted members are not supported".into()));
        }
        if method != 0 {
            return Err(member(format!(
                "compression method {method} is not supported (write with np.savez, not savez_compressed)"
            )));
        }
        if csize != usize_ {
            return Err(member("stored member with differing sizes".into()));
        }
        let local = usize::try_from(local).map_err(|_| member("bad offset".into()))?;
        if get32(bytes, local) != Some(LOCAL) {
            return Err(member("local header missing".into()));
        }
        let local_name = usize::from(get16(bytes, local + 26).unwrap_or(0));
        let local_extra = usize::from(get16(bytes, local + 28).unwrap_or(0));
        let start = local + 30 + local_name + local_extra;
        let data = usize::try_from(csize)
            .ok()
            .and_then(|n| bytes.get(start..start.checked_add(n)?))
            .ok_or_else(|| member(format!("data cut short (needs {csize} bytes)")))?;
        let actual = crc32(data);
        if actual != crc {
            return Err(member(format!(
                "crc-32 mismatch (stored {crc:08x}, computed {actual:08x})"
            )));
        }
        let name = file_name
            .strip_suffix(".npy")
            .unwrap_or(&file_name)
            .to_string();
        let array = NpyArray::from_npy(&name, data)?;
        arrays.push((name, array));
    }
    Ok(arrays)
}

/// Replaces 0xFFFFFFFF sizes/offset with the values of a ZIP64 extra field (id 1), in the order the
/// spec lists them: uncompressed size, compressed size, local header offset.
fn zip64_sizes(mut extra: &[u8], usize_: &mut u64, csize: &mut u64, local: &mut u64) {
    while extra.len() >= 4 {
        let id = get16(extra, 0).expect("len checked");
        let len = usize::from(get16(extra, 2).expect("len checked"));
        let Some(body) = extra.get(4..4 + len) else {
            return;
        };
        if id == 1 {
            let mut at = 0;
            for field in [usize_, csize, local] {
                if *field == u64::from(u32::MAX)
                    && let Some(v) = get64(body, at)
                {
                    *field = v;
                    at += 8;
                }
            }
            return;
        }
        extra = &extra[4 + len..];
    }
}

/// Samples for the value model: `states` is row-major `[len, num_features]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    pub config_key: String,
    pub num_features: usize,
    pub states: Vec<f32>,
    pub outcomes: Vec<f32>,
    /// The games DB id of each sample; empty when the file did not say.
    pub game_ids: Vec<i64>,
}

impl Dataset {
    pub fn new(config_key: &str, num_features: usize) -> Dataset {
        Dataset {
            config_key: config_key.to_string(),
            num_features,
            states: Vec::new(),
            outcomes: Vec::new(),
            game_ids: Vec::new(),
        }
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.outcomes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.outcomes.is_empty()
    }

    /// Appends one sample.
    pub fn push(&mut self, features: &[f32], outcome: f32, game_id: i64) {
        assert_eq!(features.len(), self.num_features, "feature length");
        self.states.extend_from_slice(features);
        self.outcomes.push(outcome);
        self.game_ids.push(game_id);
    }

    /// The `.npz` bytes.
    pub fn encode(&self) -> Result<Vec<u8>, NpzError> {
        let n = self.len();
        let states = NpyArray::f32(vec![n, self.num_features], &self.states);
        let outcomes = NpyArray::f32(vec![n], &self.outcomes);
        let ids = NpyArray::i64(vec![self.game_ids.len()], &self.game_ids);
        let key = NpyArray::string(&self.config_key);
        write_npz(&[
            ("states", &states),
            ("outcomes", &outcomes),
            ("game_ids", &ids),
            ("config_key", &key),
        ])
    }

    /// Reads and validates an `.npz` data set: every checksum, the dtypes, and that the arrays agree
    /// on the number of samples.
    pub fn decode(bytes: &[u8]) -> Result<Dataset, NpzError> {
        let mut arrays = read_npz(bytes)?;
        let mut take = |name: &'static str| {
            arrays
                .iter()
                .position(|(n, _)| n == name)
                .map(|i| arrays.swap_remove(i).1)
        };
        let states = take("states").ok_or(NpzError::Missing("states"))?;
        let outcomes = take("outcomes").ok_or(NpzError::Missing("outcomes"))?;
        let key = take("config_key").ok_or(NpzError::Missing("config_key"))?;
        let ids = take("game_ids");
        let [n, f] = states.shape[..] else {
            return Err(array_error(
                "states",
                format!("expected 2 dimensions, got shape {:?}", states.shape),
            ));
        };
        if outcomes.shape != [n] {
            return Err(NpzError::Inconsistent(format!(
                "states has {n} rows but outcomes has shape {:?}",
                outcomes.shape
            )));
        }
        let game_ids = match ids {
            Some(ids) if ids.shape != [n] => {
                return Err(NpzError::Inconsistent(format!(
                    "states has {n} rows but game_ids has shape {:?}",
                    ids.shape
                )));
            }
            Some(ids) => ids.to_i64("game_ids")?,
            None => Vec::new(),
        };
        let outcomes = outcomes.to_f32("outcomes")?;
        if let Some(bad) = outcomes.iter().find(|o| !(-1.0..=1.0).contains(*o)) {
            return Err(array_error(
                "outcomes",
                format!("outcome {bad} is outside [-1, 1]"),
            ));
        }
        let states = states.to_f32("states")?;
        if states.iter().any(|v| !v.is_finite()) {
            return Err(array_error("states", "contains a non-finite value".into()));
        }
        Ok(Dataset {
            config_key: key.to_string("config_key")?,
            num_features: f,
            states,
            outcomes,
            game_ids,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Dataset {
        let mut d = Dataset::new("hex8_2p", 3);
        d.push(&[1.0, 0.0, 0.5], 1.0, 7);
        d.push(&[0.0, 1.0, -0.25], -1.0, 7);
        d.push(&[0.0, 0.0, 1.0], 1.0, 9);
        d
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn npy_header_is_padded_to_64_bytes_and_round_trips() {
        for a in [
            NpyArray::f32(vec![2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
            NpyArray::f32(vec![0, 129], &[]),
            NpyArray::i64(vec![2], &[-1, 1 << 40]),
            NpyArray::string("hex6_2p"),
        ] {
            let npy = a.to_npy();
            let header_len = usize::from(u16::from_le_bytes([npy[8], npy[9]]));
            assert_eq!((10 + header_len) % 64, 0);
            assert_eq!(npy[10 + header_len - 1], b'\n');
            assert_eq!(NpyArray::from_npy("x", &npy).unwrap(), a);
        }
        assert_eq!(
            NpyArray::string("hex6_2p").to_string("k").unwrap(),
            "hex6_2p"
        );
    }

    #[test]
    fn dataset_round_trips() {
        let d = sample();
        let bytes = d.encode().unwrap();
        assert_eq!(Dataset::decode(&bytes).unwrap(), d);
        let empty = Dataset::new("hex6_2p", 75);
        assert_eq!(Dataset::decode(&empty.encode().unwrap()).unwrap(), empty);
    }

    #[test]
    fn every_truncation_is_a_clear_error() {
        let bytes = sample().encode().unwrap();
        for len in 0..bytes.len() {
            let err = Dataset::decode(&bytes[..len]).unwrap_err().to_string();
            assert!(err.contains("truncated"), "{len}: {err}");
        }
    }

    #[test]
    fn a_flipped_byte_is_caught_by_the_checksum() {
        let mut bytes = sample().encode().unwrap();
        // Inside the first member's data (the states values).
        bytes[30 + "states.npy".len() + 70] ^= 0x40;
        let err = Dataset::decode(&bytes).unwrap_err().to_string();
        assert!(err.contains("crc-32 mismatch"), "{err}");
    }

    #[test]
    fn inconsistent_or_missing_arrays_are_refused() {
        let states = NpyArray::f32(vec![2, 1], &[1.0, 2.0]);
        let outcomes = NpyArray::f32(vec![3], &[1.0, -1.0, 1.0]);
        let key = NpyArray::string("hex8_2p");
        let bytes = write_npz(&[
            ("states", &states),
            ("outcomes", &outcomes),
            ("config_key", &key),
        ])
        .unwrap();
        let err = Dataset::decode(&bytes).unwrap_err().to_string();
        assert!(err.contains("disagree"), "{err}");
        let bytes = write_npz(&[("states", &states), ("config_key", &key)]).unwrap();
        let err = Dataset::decode(&bytes).unwrap_err().to_string();
        assert!(err.contains("missing the \"outcomes\""), "{err}");
        let out_of_range = NpyArray::f32(vec![2], &[1.0, 3.0]);
        let bytes = write_npz(&[
            ("states", &states),
            ("outcomes", &out_of_range),
            ("config_key", &key),
        ])
        .unwrap();
        assert!(
            Dataset::decode(&bytes)
                .unwrap_err()
                .to_string()
                .contains("outside")
        );
    }

    /// Runs python3 with `script` on `file`; `None` if python3 (or a module it imports) is missing.
    fn python(script: &str, file: &std::path::Path) -> Option<std::process::Output> {
        let out = std::process::Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(file)
            .output()
            .ok()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains("ModuleNotFoundError") {
            return None;
        }
        Some(out)
    }

    #[test]
    fn python_reads_the_archive_and_numpy_reads_the_arrays_when_available() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.npz");
        std::fs::write(&path, sample().encode().unwrap()).unwrap();
        // The standard library's zipfile checks the structure and every CRC.
        let zip_check = "import sys, zipfile\n\
            z = zipfile.ZipFile(sys.argv[1])\n\
            assert z.testzip() is None\n\
            print(sorted(z.namelist()))";
        if let Some(out) = python(zip_check, &path) {
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(
                String::from_utf8_lossy(&out.stdout).trim(),
                "['config_key.npy', 'game_ids.npy', 'outcomes.npy', 'states.npy']"
            );
        }
        let numpy_check = "import sys, numpy as np\n\
            d = np.load(sys.argv[1])\n\
            assert d['states'].dtype == np.float32 and d['states'].shape == (3, 3)\n\
            assert d['outcomes'].tolist() == [1.0, -1.0, 1.0]\n\
            assert d['game_ids'].tolist() == [7, 7, 9]\n\
            assert str(d['config_key']) == 'hex8_2p'\n\
            assert abs(float(d['states'][1, 2]) + 0.25) < 1e-7\n\
            np.savez(sys.argv[1] + '.np.npz', states=d['states'], outcomes=d['outcomes'], config_key=d['config_key'])";
        match python(numpy_check, &path) {
            None => eprintln!("numpy not available: skipping the numpy read check"),
            Some(out) => {
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                // And numpy's own writer (ZIP64 extras) reads back here.
                let ours =
                    Dataset::decode(&std::fs::read(dir.path().join("d.npz.np.npz")).unwrap())
                        .unwrap();
                assert_eq!(ours.states, sample().states);
                assert!(ours.game_ids.is_empty());
            }
        }
    }

    #[test]
    fn zip64_extra_fields_from_python_are_understood() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("z.npz");
        let npy = dir.path().join("states.npy");
        std::fs::write(&npy, NpyArray::f32(vec![1, 2], &[0.5, 1.5]).to_npy()).unwrap();
        let script = "import sys, os, zipfile\n\
            d = os.path.dirname(sys.argv[1])\n\
            with zipfile.ZipFile(sys.argv[1], 'w') as z:\n\
            \x20   with z.open('states.npy', 'w', force_zip64=True) as f:\n\
            \x20       f.write(open(os.path.join(d, 'states.npy'), 'rb').read())";
        let Some(out) = python(script, &path) else {
            eprintln!("python3 not available: skipping");
            return;
        };
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let arrays = read_npz(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(arrays.len(), 1);
        assert_eq!(arrays[0].0, "states");
        assert_eq!(arrays[0].1.to_f32("states").unwrap(), vec![0.5, 1.5]);
    }
}
