//! The files the configuration names: the configuration itself, DSN and
//! credential files, certificates. Each is read whole, small and regular.

use std::path::Path;

/// Files lockjam reads (configuration, DSN and credential files) are at
/// most this large.
const MAX_FILE_BYTES: u64 = 1 << 20;

/// Reads a regular file of at most [`MAX_FILE_BYTES`]: a FIFO would hang
/// and a device such as /dev/zero would never end.
pub(crate) fn read_small_file(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let cannot = |e: std::io::Error| {
        format!(
            "cannot read {}: {e}; check the path and that lockjam may read it",
            path.display()
        )
    };
    let metadata = std::fs::metadata(path).map_err(cannot)?;
    if !metadata.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    let mut text = String::new();
    std::fs::File::open(path)
        .map_err(cannot)?
        .take(MAX_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(cannot)?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(format!("{} is larger than {MAX_FILE_BYTES} bytes", path.display()));
    }
    Ok(text)
}

/// A one-line secret (a password, a token, a DSN): the file's text without
/// the white space around it, never empty.
pub(super) fn read_secret(path: &Path) -> Result<String, String> {
    let text = read_small_file(path)?;
    let text = text.trim();
    if text.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(text.to_string())
}
