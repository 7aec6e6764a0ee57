//! The input of an import: a directory or a tar archive read in place,
//! and the streams that hash blobs and undo their compression.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufRead, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{io_err, json_err, ImportError, MAX_JSON};

/// Most members an archive may have.
const MAX_MEMBERS: usize = 200_000;

/// The input: a directory, or a tar archive read in place (members by
/// offset, no copy).
pub(super) enum Source {
    Dir(PathBuf),
    Tar {
        path: PathBuf,
        file: File,
        /// Regular members: name -> (offset of the data, size).
        members: HashMap<String, (u64, u64)>,
    },
}

/// A member or file name from an archive or a manifest, as `a/b/c`;
/// `None` for names that climb (`..`) or are empty.
fn norm(name: &str) -> Option<String> {
    let mut out: Vec<&str> = Vec::new();
    for c in name.split('/') {
        match c {
            "" | "." => {}
            ".." => return None,
            c => out.push(c),
        }
    }
    (!out.is_empty()).then(|| out.join("/"))
}

/// A member's symlink target, relative to its directory, as a name.
fn link_target(member: &str, target: &str) -> Option<String> {
    let mut at: Vec<&str> = if target.starts_with('/') {
        Vec::new()
    } else {
        let mut v: Vec<&str> = member.split('/').collect();
        v.pop();
        v
    };
    for c in target.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                at.pop()?;
            }
            c => at.push(c),
        }
    }
    norm(&at.join("/"))
}

impl Source {
    /// `input` as a layout directory or an archive. A gzipped archive
    /// (`docker save | gzip`) is first decompressed, at most `max_bytes`
    /// of it, into an unnamed file in `scratch` (gone when dropped).
    pub(super) fn open(
        input: &Path,
        scratch: &Path,
        max_bytes: u64,
    ) -> Result<Source, ImportError> {
        let meta = std::fs::metadata(input).map_err(io_err(input))?;
        if meta.is_dir() {
            return Ok(Source::Dir(input.to_path_buf()));
        }
        let file = File::open(input).map_err(io_err(input))?;
        let mut head = [0u8; 2];
        let n = file.read_at(&mut head, 0).map_err(io_err(input))?;
        if compression(&head[..n]) == Some("gzip") {
            let plain = gunzip(input, &file, scratch, max_bytes)?;
            return Source::from_file(input, plain);
        }
        Source::from_file(input, file)
    }

    fn from_file(input: &Path, file: File) -> Result<Source, ImportError> {
        let unrecognized = |message: String| ImportError::Unrecognized {
            path: input.display().to_string(),
            message,
        };
        let len = file.metadata().map_err(io_err(input))?.len();
        let mut head = [0u8; 6];
        let n = file.read_at(&mut head, 0).map_err(io_err(input))?;
        if let Some(kind) = compression(&head[..n]) {
            return Err(unrecognized(format!(
                "a {kind}-compressed file: decompress it first (an image archive is a plain tar)"
            )));
        }
        let mut members = HashMap::new();
        let mut links: Vec<(String, String)> = Vec::new();
        let mut archive = tar::Archive::new(&file);
        let entries = archive
            .entries_with_seek()
            .map_err(|e| unrecognized(format!("not a tar archive: {e}")))?;
        for (i, entry) in entries.enumerate() {
            let entry = entry.map_err(|e| {
                unrecognized(if i == 0 {
                    format!("not an OCI layout, OCI archive or docker archive (not a tar: {e})")
                } else {
                    format!("a corrupt or truncated archive: {e}")
                })
            })?;
            if i >= MAX_MEMBERS {
                return Err(unrecognized(format!("more than {MAX_MEMBERS} members")));
            }
            let Some(name) = norm(&String::from_utf8_lossy(&entry.path_bytes())) else {
                continue;
            };
            let kind = entry.header().entry_type();
            if kind.is_file() {
                let (offset, size) = (entry.raw_file_position(), entry.size());
                if offset.checked_add(size).map_or(true, |end| end > len) {
                    return Err(unrecognized(format!(
                        "a truncated archive: {name} ends past the end of the file"
                    )));
                }
                members.insert(name, (offset, size));
            } else if kind.is_symlink() || kind.is_hard_link() {
                let target = entry
                    .link_name_bytes()
                    .map(|t| String::from_utf8_lossy(&t).into_owned())
                    .unwrap_or_default();
                let target = if kind.is_symlink() {
                    link_target(&name, &target)
                } else {
                    norm(&target)
                };
                if let Some(t) = target {
                    links.push((name, t));
                }
            }
        }
        // docker save links repeated layers to the first copy.
        for _ in 0..8 {
            for (name, target) in &links {
                if !members.contains_key(name) {
                    if let Some(&m) = members.get(target) {
                        members.insert(name.clone(), m);
                    }
                }
            }
        }
        if members.is_empty() {
            return Err(unrecognized(
                "not an OCI layout, OCI archive or docker archive (no files in it)".into(),
            ));
        }
        Ok(Source::Tar {
            path: input.to_path_buf(),
            file,
            members,
        })
    }

    pub(super) fn has(&self, name: &str) -> bool {
        match self {
            Source::Dir(d) => d.join(name).is_file(),
            Source::Tar { members, .. } => members.contains_key(name),
        }
    }

    /// A file of the layout by name: its reader and size.
    pub(super) fn read(&self, name: &str) -> Result<Option<Blob<'_>>, ImportError> {
        let Some(name) = norm(name) else {
            return Ok(None);
        };
        match self {
            Source::Dir(d) => {
                let p = d.join(&name);
                let f = match File::open(&p) {
                    Ok(f) => f,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(io_err(&p)(e)),
                };
                let m = f.metadata().map_err(io_err(&p))?;
                if !m.is_file() {
                    return Ok(None);
                }
                Ok(Some((Box::new(f.take(m.len())), m.len())))
            }
            Source::Tar { file, members, .. } => Ok(members.get(&name).map(|&(pos, size)| {
                let r: Box<dyn Read + '_> = Box::new(At {
                    file,
                    pos,
                    end: pos + size,
                });
                (r, size)
            })),
        }
    }

    /// A small file read whole (index.json, manifest.json, oci-layout).
    pub(super) fn read_small(&self, name: &str) -> Result<Option<Vec<u8>>, ImportError> {
        let Some((r, size)) = self.read(name)? else {
            return Ok(None);
        };
        if size > MAX_JSON {
            return Err(json_err(name, format!("larger than {MAX_JSON} bytes")));
        }
        let mut out = Vec::new();
        r.take(MAX_JSON)
            .read_to_end(&mut out)
            .map_err(|e| json_err(name, e))?;
        Ok(Some(out))
    }

    pub(super) fn label(&self) -> String {
        match self {
            Source::Dir(d) => d.display().to_string(),
            Source::Tar { path, .. } => path.display().to_string(),
        }
    }
}

/// A file of the input: its reader and size.
pub(super) type Blob<'a> = (Box<dyn Read + 'a>, u64);

/// A member's bytes, read in place by offset.
struct At<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl Read for At<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.end.saturating_sub(self.pos);
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// What a stream is compressed with, by its magic bytes.
/// Decompresses a gzipped archive into an unnamed file in `scratch`,
/// refusing more than `max_bytes` of output (a gzip bomb).
fn gunzip(input: &Path, file: &File, scratch: &Path, max_bytes: u64) -> Result<File, ImportError> {
    let bad = |message: String| ImportError::Unrecognized {
        path: input.display().to_string(),
        message,
    };
    std::fs::create_dir_all(scratch).map_err(io_err(scratch))?;
    let mut out = tempfile::tempfile_in(scratch).map_err(io_err(scratch))?;
    let mut gz =
        flate2::read::MultiGzDecoder::new(std::io::BufReader::new(file)).take(max_bytes + 1);
    let n = std::io::copy(&mut gz, &mut out)
        .map_err(|e| bad(format!("a corrupt or truncated gzip file: {e}")))?;
    if n > max_bytes {
        return Err(bad(format!(
            "it decompresses to more than {} MiB (the import's size cap)",
            max_bytes >> 20
        )));
    }
    // Read from its start, as an archive opened afresh.
    std::io::Seek::rewind(&mut out).map_err(io_err(scratch))?;
    Ok(out)
}

pub(super) fn compression(head: &[u8]) -> Option<&'static str> {
    if head.starts_with(&[0x1f, 0x8b]) {
        Some("gzip")
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd])
        // A zstd stream may open with a skippable frame (0x184D2A5?).
        || (head.len() >= 4 && head[0] & 0xf0 == 0x50 && head[1..4] == [0x2a, 0x4d, 0x18])
    {
        Some("zstd")
    } else if head.starts_with(b"BZh") {
        Some("bzip2")
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Some("xz")
    } else {
        None
    }
}

// --- digests --------------------------------------------------------------

/// A `sha256:HEX` digest's hex part; other algorithms are refused.
pub(super) fn sha256_hex(digest: &str) -> Result<&str, ImportError> {
    match digest.split_once(':') {
        Some(("sha256", hex))
            if hex.len() == 64
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) =>
        {
            Ok(hex)
        }
        _ => Err(ImportError::Blob {
            digest: digest.chars().take(100).collect(),
            message: "not a sha256 digest (only sha256 is supported)".into(),
        }),
    }
}

/// Bytes seen and their sha256, as a stream passes.
#[derive(Default)]
pub(super) struct Hashed {
    sha: Sha256,
    pub(super) bytes: u64,
}

impl Hashed {
    pub(super) fn hex(&self) -> String {
        hex(&self.sha.clone().finalize())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The sha256 of `bytes`, in hex.
pub(super) fn sha256_of(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Passes a stream through, hashing it; more than `limit` bytes is an
/// error (a size bomb).
pub(super) struct Hashing<'a, R> {
    pub(super) inner: R,
    pub(super) state: &'a mut Hashed,
    pub(super) limit: u64,
}

impl<R: Read> Read for Hashing<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.state.sha.update(&buf[..n]);
        self.state.bytes += n as u64;
        if self.state.bytes > self.limit {
            return Err(io::Error::other(TOO_BIG));
        }
        Ok(n)
    }
}

pub(super) const TOO_BIG: &str = "the layers hold more bytes than the limit (see --max-size)";

/// A layer's tar stream, decompressed when it is gzip or zstd.
pub(super) enum Decoded<R: BufRead> {
    Plain(R),
    Gzip(flate2::bufread::MultiGzDecoder<R>),
    Zstd(Box<ZstdFrames<R>>),
}

impl<R: BufRead> Read for Decoded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Decoded::Plain(r) => r.read(buf),
            Decoded::Gzip(r) => r.read(buf),
            Decoded::Zstd(r) => r.read(buf),
        }
    }
}

impl<R: BufRead> Decoded<R> {
    pub(super) fn into_inner(self) -> R {
        match self {
            Decoded::Plain(r) => r,
            Decoded::Gzip(r) => r.into_inner(),
            Decoded::Zstd(r) => r.src,
        }
    }
}

/// A zstd stream decoded as it is read: one frame or several in a row
/// (what `zstd` writes, and what zstd:chunked layers hold), skippable
/// frames skipped. The decoder refuses a window over 100 MiB, so a
/// hostile header cannot make it allocate more.
pub(super) struct ZstdFrames<R: BufRead> {
    src: R,
    dec: ruzstd::FrameDecoder,
    in_frame: bool,
}

impl<R: BufRead> ZstdFrames<R> {
    pub(super) fn new(src: R) -> ZstdFrames<R> {
        ZstdFrames {
            src,
            dec: ruzstd::FrameDecoder::new(),
            in_frame: false,
        }
    }
}

fn corrupt_zstd(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("a corrupt zstd stream: {e}"),
    )
}

impl<R: BufRead> Read for ZstdFrames<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.in_frame {
                let n = self.dec.read(buf)?;
                if n > 0 {
                    return Ok(n);
                }
                if self.dec.is_finished() {
                    if let (Some(want), Some(got)) = (
                        self.dec.get_checksum_from_data(),
                        self.dec.get_calculated_checksum(),
                    ) {
                        if want != got {
                            return Err(corrupt_zstd("a frame's checksum does not match"));
                        }
                    }
                    self.in_frame = false;
                    continue;
                }
                // At least one block (or an error at a truncated one).
                self.dec
                    .decode_blocks(
                        &mut self.src,
                        ruzstd::BlockDecodingStrategy::UptoBytes(buf.len().max(64 << 10)),
                    )
                    .map_err(corrupt_zstd)?;
                continue;
            }
            if self.src.fill_buf()?.is_empty() {
                return Ok(0);
            }
            match self.dec.reset(&mut self.src) {
                Ok(()) => self.in_frame = true,
                Err(ruzstd::frame_decoder::FrameDecoderError::ReadFrameHeaderError(
                    ruzstd::frame::ReadFrameHeaderError::SkipFrame { length, .. },
                )) => {
                    let skipped = io::copy(
                        &mut (&mut self.src).take(u64::from(length)),
                        &mut io::sink(),
                    )?;
                    if skipped != u64::from(length) {
                        return Err(corrupt_zstd("a truncated skippable frame"));
                    }
                }
                Err(e) => return Err(corrupt_zstd(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_names_and_links_stay_inside_the_archive() {
        assert_eq!(
            norm("./blobs//sha256/ab").as_deref(),
            Some("blobs/sha256/ab")
        );
        assert_eq!(norm("a/../b"), None);
        assert_eq!(norm("./"), None);
        assert_eq!(
            link_target("x/y/layer.tar", "../z/layer.tar").as_deref(),
            Some("x/z/layer.tar")
        );
        assert_eq!(link_target("x/layer.tar", "/abs").as_deref(), Some("abs"));
        assert_eq!(link_target("layer.tar", "../../up"), None);
        assert!(sha256_hex(&format!("sha256:{}", "a".repeat(64))).is_ok());
        assert!(sha256_hex(&format!("sha256:{}", "A".repeat(64))).is_err());
        assert!(sha256_hex("sha256:abc").is_err());
        assert!(sha256_hex(&format!("md5:{}", "a".repeat(64))).is_err());
        assert_eq!(compression(&[0x1f, 0x8b, 8]), Some("gzip"));
        assert_eq!(compression(b"ustar"), None);
    }
}
