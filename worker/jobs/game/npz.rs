//! NumPy `.npz` files: the hand-off between export and training.
//!
//! An `.npz` is a ZIP archive of `.npy` arrays. The archive is the `zip` crate's: members are
//! written deflated (as numpy's `savez_compressed` does; level 1, as the data are mostly floats)
//! and in ZIP64 where a member or the archive needs it, and read stored or deflated, with every
//! member's CRC-32 checked as it is read, so a truncated or corrupted export is a clear error
//! instead of a model trained on garbage. The `.npy` arrays inside are encoded and parsed here
//! (a header and little-endian data, as numpy's format document gives them), with every length
//! checked. `numpy.load` reads what [`write_npz`] writes, and [`read_npz`] reads numpy's own
//! `np.savez` and `np.savez_compressed` output.
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

/// A ZIP of `name.npy` members, one per array, in the order given: deflated, ZIP64 where
/// needed, dated 1980-01-01 00:00 (the earliest DOS date) so that archives are byte-for-byte
/// reproducible.
pub fn write_npz(arrays: &[(&str, &NpyArray)]) -> Result<Vec<u8>, NpzError> {
    use std::io::Write;
    let zip_error = |e: &dyn std::fmt::Display| NpzError::Zip(e.to_string());
    let mut writer = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (name, array) in arrays {
        let npy = array.to_npy();
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated)
            .compression_level(Some(1))
            .unix_permissions(0o644)
            .large_file(npy.len() as u64 >= u64::from(u32::MAX));
        writer
            .start_file(format!("{name}.npy"), options)
            .map_err(|e| zip_error(&e))?;
        writer.write_all(&npy).map_err(|e| zip_error(&e))?;
    }
    let out = writer.finish().map_err(|e| zip_error(&e))?;
    Ok(out.into_inner())
}

/// How many times its own size an archive's members may claim to inflate to ([`read_npz`]).
const MAX_INFLATION: u64 = 200;

/// Every array of an `.npz`, in archive order, stored or deflated, with every member's CRC-32
/// checked.
pub fn read_npz(bytes: &[u8]) -> Result<Vec<(String, NpyArray)>, NpzError> {
    use std::io::Read;
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes))
        .map_err(|e| NpzError::Zip(e.to_string()))?;
    // An archive may claim any size for its members, and the zip crate inflates up to the size
    // claimed: the members together may not claim more than MAX_INFLATION times the archive
    // (deflate tops out near 1,032:1; real exports compress far less) plus 64 MiB, so a zip bomb
    // is refused before anything is inflated.
    let limit = (bytes.len() as u64)
        .saturating_mul(MAX_INFLATION)
        .saturating_add(64 << 20);
    let mut claimed = 0u64;
    let mut arrays = Vec::with_capacity(archive.len());
    for i in 0..archive.len() {
        let mut file = archive
            .by_index(i)
            .map_err(|e| NpzError::Zip(e.to_string()))?;
        let file_name = file
            .name()
            .map_err(|e| NpzError::Zip(format!("member {i} has an unreadable name: {e}")))?
            .to_string();
        let member = |reason: String| NpzError::Member {
            name: file_name.clone(),
            reason,
        };
        claimed = claimed.saturating_add(file.size());
        if claimed > limit {
            return Err(member(format!(
                "the members claim {claimed} bytes inflated, more than {MAX_INFLATION} times the \
                 {}-byte archive (a zip bomb, or a damaged directory)",
                bytes.len()
            )));
        }
        // The size claimed is a hint only (reading stops at the data's real end): reserved up to
        // 64 MiB, grown as the data come.
        let mut data = Vec::new();
        let _ = data.try_reserve(usize::try_from(file.size()).unwrap_or(0).min(64 << 20));
        // The zip crate checks the CRC-32 when the member has been read to its end.
        file.read_to_end(&mut data)
            .map_err(|e| member(format!("{e} (truncated or corrupt)")))?;
        let name = file_name
            .strip_suffix(".npy")
            .unwrap_or(&file_name)
            .to_string();
        let array = NpyArray::from_npy(&name, &data)?;
        arrays.push((name, array));
    }
    Ok(arrays)
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
        let clean = sample().encode().unwrap();
        // Every byte of the first member's (deflated) data, which runs to the next local header.
        let start = 30 + "states.npy".len();
        let end = start
            + clean[start..]
                .windows(4)
                .position(|w| w == [0x50, 0x4b, 0x03, 0x04])
                .unwrap();
        let mut caught = 0;
        for at in start..end {
            let mut bytes = clean.clone();
            bytes[at] ^= 0x40;
            // The inflater or the CRC-32 says so, naming the member; or the flip did not change
            // what the data inflate to (a back-reference moved within a run of zeros, a padding
            // bit): never different numbers read as good ones.
            match Dataset::decode(&bytes) {
                Ok(d) => assert_eq!(d, sample(), "byte {at}"),
                Err(e) => {
                    caught += 1;
                    assert!(e.to_string().contains("\"states.npy\""), "byte {at}: {e}");
                }
            }
        }
        assert!(
            caught > (end - start) * 3 / 4,
            "{caught} of {}",
            end - start
        );
    }

    #[test]
    fn a_member_claiming_to_inflate_beyond_reason_is_refused_before_inflating() {
        use std::io::Write;
        let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated)
            .large_file(true);
        w.start_file("states.npy", opts).unwrap();
        // 128 MiB of zeros deflate to about 125 KiB: over 200 times the archive.
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..128 {
            w.write_all(&zeros).unwrap();
        }
        let bomb = w.finish().unwrap().into_inner();
        assert!(bomb.len() < 2 << 20, "{}", bomb.len());
        let err = read_npz(&bomb).unwrap_err().to_string();
        assert!(err.contains("zip bomb"), "{err}");
    }

    #[test]
    fn members_are_deflated_and_a_stored_archive_reads_too() {
        let d = sample();
        let bytes = d.encode().unwrap();
        // Local header of the first member: method 8, deflate.
        assert_eq!(u16::from_le_bytes([bytes[8], bytes[9]]), 8);
        // np.savez (stored) archives, as a user's export may write them.
        use std::io::Write;
        let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let stored = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        for (name, a) in [
            ("states", NpyArray::f32(vec![3, 3], &d.states)),
            ("outcomes", NpyArray::f32(vec![3], &d.outcomes)),
            ("config_key", NpyArray::string("hex8_2p")),
        ] {
            w.start_file(format!("{name}.npy"), stored).unwrap();
            w.write_all(&a.to_npy()).unwrap();
        }
        let plain = w.finish().unwrap().into_inner();
        let back = Dataset::decode(&plain).unwrap();
        assert_eq!((back.states, back.outcomes), (d.states, d.outcomes));
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
