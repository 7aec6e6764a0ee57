//! The host side of the built-in image's exec agent, reached through
//! QEMU's socket chardev behind a virtio-serial port (see
//! `guest/agent.sh` for the guest side and the protocol).
//!
//! Every request carries an id; a reply with another id is a leftover of
//! an earlier request that timed out, and is read and dropped. Bytes that
//! are no reply at all (the rest of a reply an earlier request gave up on
//! part-way) are skipped up to the next line that is one, so one abandoned
//! request does not spoil the next.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::time::Instant;

/// Most output kept per stream; more is an error, not a truncation.
pub const MAX_OUTPUT: u64 = 16 << 20;
/// Longest header line the guest sends.
const MAX_HEADER: u64 = 256;
/// Most bytes skipped (leftovers, foreign replies' bodies) while looking
/// for one reply; more is an error.
const MAX_SKIP: u64 = 4 * MAX_OUTPUT;
/// Longest command line sent.
pub const MAX_COMMAND: usize = 256 << 10;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot reach the agent socket {path}: {source}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("agent: {0}")]
    Io(#[from] std::io::Error),
    #[error("the guest's agent did not answer within {0:?} (is the guest up?)")]
    Timeout(Duration),
    #[error("the command did not finish within {0:?}")]
    CommandTimeout(Duration),
    #[error("agent closed the connection")]
    Closed,
    #[error("agent sent a bad reply: {0}")]
    Protocol(String),
    #[error("command output larger than {MAX_OUTPUT} bytes")]
    TooLarge,
    #[error("command line longer than {MAX_COMMAND} bytes")]
    CommandTooLong,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExecOutput {
    /// The command's exit code; 137 when it was killed at its timeout.
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Ids start from the clock, so a restarted daemon does not take a
/// leftover reply of its predecessor for its own.
fn next_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let _ = NEXT.compare_exchange(
        0,
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64 * 1000)
            .unwrap_or(1),
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Quotes each word for `sh` so it arrives as one word, unchanged.
pub fn shell_quote(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if !a.is_empty()
                && a.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A reply header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Pong {
        id: u64,
    },
    Result {
        id: u64,
        exit_code: i32,
        out_len: u64,
        err_len: u64,
    },
}

/// Parses one header line (without its newline); strict, and refuses a
/// RESULT announcing more than [`MAX_OUTPUT`] per stream.
pub fn parse_reply(line: &str) -> Result<Reply, AgentError> {
    let r = parse_header(line)?;
    if let Reply::Result {
        out_len, err_len, ..
    } = r
    {
        if out_len > MAX_OUTPUT || err_len > MAX_OUTPUT {
            return Err(AgentError::TooLarge);
        }
    }
    Ok(r)
}

/// [`parse_reply`] without the size limit: a reply too large to keep can
/// still be skipped exactly.
fn parse_header(line: &str) -> Result<Reply, AgentError> {
    let bad = || AgentError::Protocol(line.chars().take(80).collect());
    let f: Vec<&str> = line.split(' ').collect();
    let num = |s: &str| -> Result<u64, AgentError> {
        if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        s.parse().map_err(|_| bad())
    };
    match f.as_slice() {
        ["PONG", id] => Ok(Reply::Pong { id: num(id)? }),
        ["RESULT", id, code, out, err] => {
            let code = num(code)?;
            let (out_len, err_len) = (num(out)?, num(err)?);
            Ok(Reply::Result {
                id: num(id)?,
                exit_code: i32::try_from(code).map_err(|_| bad())?,
                out_len,
                err_len,
            })
        }
        _ => Err(bad()),
    }
}

struct Conn {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

impl Conn {
    async fn open(sock: &Path) -> Result<Conn, AgentError> {
        let s = UnixStream::connect(sock)
            .await
            .map_err(|source| AgentError::Connect {
                path: sock.display().to_string(),
                source,
            })?;
        let (r, w) = s.into_split();
        Ok(Conn {
            reader: BufReader::new(r),
            writer: w,
        })
    }

    /// The next header line, parsed without the size limit. `Ok(None)`:
    /// the line was no header (it was skipped, `skipped` counts it).
    async fn header(&mut self, skipped: &mut u64) -> Result<Option<Reply>, AgentError> {
        let mut line = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_HEADER)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return Err(AgentError::Closed);
        }
        if line.last() != Some(&b'\n') {
            *skipped += n as u64;
            // Too long for a header: skip to the end of this line.
            let mut chunk = Vec::new();
            loop {
                chunk.clear();
                let k = (&mut self.reader)
                    .take(64 << 10)
                    .read_until(b'\n', &mut chunk)
                    .await?;
                *skipped += k as u64;
                if k == 0 || chunk.last() == Some(&b'\n') || *skipped > MAX_SKIP {
                    return Ok(None);
                }
            }
        }
        line.pop();
        let reply = String::from_utf8(line)
            .ok()
            .and_then(|text| parse_header(&text).ok());
        if reply.is_none() {
            *skipped += n as u64;
        }
        Ok(reply)
    }

    /// Reads and drops `len` bytes.
    async fn discard(&mut self, len: u64) -> Result<(), AgentError> {
        let got =
            tokio::io::copy(&mut (&mut self.reader).take(len), &mut tokio::io::sink()).await?;
        if got < len {
            return Err(AgentError::Closed);
        }
        Ok(())
    }

    async fn body(&mut self, len: u64) -> Result<Vec<u8>, AgentError> {
        let mut buf = Vec::with_capacity(len.min(1 << 20) as usize);
        let got = (&mut self.reader).take(len).read_to_end(&mut buf).await?;
        if (got as u64) < len {
            return Err(AgentError::Closed);
        }
        Ok(buf)
    }

    /// Reads replies until the one for `id`; earlier ones, and bytes that
    /// are no reply, are dropped (up to [`MAX_SKIP`] bytes).
    async fn reply_for(&mut self, id: u64) -> Result<(Reply, Vec<u8>, Vec<u8>), AgentError> {
        let mut skipped = 0u64;
        let mut junk = false;
        loop {
            if skipped > MAX_SKIP {
                return Err(AgentError::Protocol(format!(
                    "no reply in the first {MAX_SKIP} bytes"
                )));
            }
            let r = match self.header(&mut skipped).await {
                Ok(Some(r)) => r,
                Ok(None) => {
                    junk = true;
                    continue;
                }
                // Nothing but junk, then the end: say it was junk.
                Err(AgentError::Closed) if junk => {
                    return Err(AgentError::Protocol(
                        "no valid reply before the agent closed the connection".into(),
                    ))
                }
                Err(e) => return Err(e),
            };
            match r {
                Reply::Pong { id: rid } if rid == id => return Ok((r, Vec::new(), Vec::new())),
                Reply::Pong { .. } => {}
                Reply::Result {
                    id: rid,
                    out_len,
                    err_len,
                    ..
                } => {
                    let total = out_len.saturating_add(err_len);
                    if rid == id && out_len <= MAX_OUTPUT && err_len <= MAX_OUTPUT {
                        let out = self.body(out_len).await?;
                        let err = self.body(err_len).await?;
                        return Ok((r, out, err));
                    }
                    // Someone else's reply, or ours too large to keep:
                    // read past it, so what comes next starts clean.
                    skipped = skipped.saturating_add(total);
                    if skipped > MAX_SKIP {
                        return Err(if rid == id {
                            AgentError::TooLarge
                        } else {
                            AgentError::Protocol(format!("a reply of {total} bytes to skip"))
                        });
                    }
                    let drained = self.discard(total).await;
                    if rid == id {
                        // Too large either way; drained or not, say so.
                        return Err(AgentError::TooLarge);
                    }
                    drained?;
                }
            }
        }
    }
}

/// One PING; the agent must answer within `timeout`.
pub async fn ping(sock: &Path, timeout: Duration) -> Result<(), AgentError> {
    tokio::time::timeout(timeout, async {
        let mut c = Conn::open(sock).await?;
        let id = next_id();
        c.writer
            .write_all(format!("PING {id}\n").as_bytes())
            .await?;
        c.reply_for(id).await.map(drop)
    })
    .await
    .map_err(|_| AgentError::Timeout(timeout))?
}

/// Pings until the agent answers or `deadline` passes (the guest is
/// booting: the socket exists as soon as QEMU runs).
pub async fn wait_ready(sock: &Path, deadline: Instant) -> Result<(), AgentError> {
    let start = Instant::now();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match ping(sock, left.min(Duration::from_secs(2))).await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(match e {
                    AgentError::Timeout(_) => AgentError::Timeout(start.elapsed()),
                    e => e,
                })
            }
            Err(AgentError::Timeout(_)) => {}
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Runs `argv` in the guest. The command may run `timeout` (the guest
/// kills it then, exit code 137); the reply may take a little longer.
pub async fn exec(
    sock: &Path,
    argv: &[String],
    timeout: Duration,
) -> Result<ExecOutput, AgentError> {
    let cmd = shell_quote(argv);
    if cmd.len() > MAX_COMMAND {
        return Err(AgentError::CommandTooLong);
    }
    let secs = timeout.as_secs().max(1);
    let id = next_id();
    let work = async {
        let mut c = Conn::open(sock).await?;
        let mut req = format!("EXEC {id} {secs} {}\n", cmd.len()).into_bytes();
        req.extend_from_slice(cmd.as_bytes());
        c.writer.write_all(&req).await?;
        match c.reply_for(id).await? {
            (Reply::Result { exit_code, .. }, out, err) => Ok(ExecOutput {
                exit_code,
                stdout: String::from_utf8_lossy(&out).into_owned(),
                stderr: String::from_utf8_lossy(&err).into_owned(),
            }),
            (Reply::Pong { .. }, _, _) => Err(AgentError::Protocol("PONG for an EXEC".into())),
        }
    };
    let limit = Duration::from_secs(secs) + Duration::from_secs(15);
    tokio::time::timeout(limit, work)
        .await
        .map_err(|_| AgentError::CommandTimeout(limit))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    #[test]
    fn quoting_keeps_words_intact() {
        let argv: Vec<String> = ["echo", "a b", "it's", "", "$HOME", "x;y", "10.0.0.1/24"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let q = shell_quote(&argv);
        assert_eq!(q, r"echo 'a b' 'it'\''s' '' '$HOME' 'x;y' 10.0.0.1/24");
        // The real shell agrees.
        let out = std::process::Command::new("sh")
            .args([
                "-c",
                &format!("for w in {q}; do printf '[%s]' \"$w\"; done"),
            ])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            "[echo][a b][it's][][$HOME][x;y][10.0.0.1/24]"
        );
    }

    #[test]
    fn headers_are_parsed_strictly() {
        assert_eq!(parse_reply("PONG 7").unwrap(), Reply::Pong { id: 7 });
        assert_eq!(
            parse_reply("RESULT 9 3 10 0").unwrap(),
            Reply::Result {
                id: 9,
                exit_code: 3,
                out_len: 10,
                err_len: 0
            }
        );
        for bad in [
            "",
            "PONG",
            "PONG x",
            "PONG 1 2",
            "RESULT 1 2 3",
            "RESULT 1 -2 3 4",
            "RESULT 1 2 +3 4",
            "RESULT 1 99999999999 3 4",
            "RESULT 1 2 3 99999999999999999999999",
            "HELLO 1",
            "pong 1",
            " PONG 1",
        ] {
            assert!(parse_reply(bad).is_err(), "{bad:?}");
        }
        assert!(matches!(
            parse_reply(&format!("RESULT 1 0 {} 0", MAX_OUTPUT + 1)),
            Err(AgentError::TooLarge)
        ));
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// A fake guest: answers each request with what `answer` returns.
    async fn fake_guest(
        answer: fn(&str, Vec<u8>) -> Vec<u8>,
    ) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let l = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let (r, mut w) = s.into_split();
                let mut r = BufReader::new(r);
                let mut line = String::new();
                if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                    continue;
                }
                let f: Vec<&str> = line.trim_end().split(' ').collect();
                let mut body = Vec::new();
                if f[0] == "EXEC" {
                    let len: u64 = f[3].parse().unwrap();
                    (&mut r).take(len).read_to_end(&mut body).await.unwrap();
                }
                let _ = w.write_all(&answer(line.trim_end(), body)).await;
            }
        });
        (dir, path)
    }

    fn id_of(line: &str) -> &str {
        line.split(' ').nth(1).unwrap()
    }

    #[test]
    fn exec_skips_stale_replies_and_reads_both_streams() {
        rt().block_on(async {
            let (_d, p) = fake_guest(|line, body| {
                assert_eq!(body, b"echo 'a b'");
                let mut out = b"RESULT 1 0 3 0\nold".to_vec(); // stale
                out.extend_from_slice(format!("RESULT {} 3 4 2\nout\nerr", id_of(line)).as_bytes());
                out
            })
            .await;
            let r = exec(&p, &["echo".into(), "a b".into()], Duration::from_secs(5))
                .await
                .unwrap();
            assert_eq!(
                r,
                ExecOutput {
                    exit_code: 3,
                    stdout: "out\n".into(),
                    stderr: "er".into()
                }
            );
        });
    }

    #[test]
    fn hostile_or_broken_agents_are_errors() {
        rt().block_on(async {
            let argv = ["true".to_string()];
            let t = Duration::from_secs(2);
            let (_d, p) = fake_guest(|_, _| b"garbage\n".to_vec()).await;
            assert!(matches!(
                exec(&p, &argv, t).await,
                Err(AgentError::Protocol(_))
            ));
            let (_d, p) = fake_guest(|_, _| vec![b'x'; 1000]).await;
            assert!(matches!(
                exec(&p, &argv, t).await,
                Err(AgentError::Protocol(_))
            ));
            let (_d, p) =
                fake_guest(|l, _| format!("RESULT {} 0 100 0\nshort", id_of(l)).into_bytes()).await;
            assert!(matches!(exec(&p, &argv, t).await, Err(AgentError::Closed)));
            let (_d, p) = fake_guest(|_, _| Vec::new()).await;
            assert!(matches!(exec(&p, &argv, t).await, Err(AgentError::Closed)));
            let (_d, p) =
                fake_guest(|l, _| format!("RESULT {} 0 99999999999 0\n", id_of(l)).into_bytes())
                    .await;
            assert!(matches!(
                exec(&p, &argv, t).await,
                Err(AgentError::TooLarge)
            ));
            let e = exec(&_d.path().join("none"), &argv, t).await.unwrap_err();
            assert!(matches!(e, AgentError::Connect { .. }), "{e}");
            let long = vec!["x".repeat(MAX_COMMAND + 1)];
            assert!(matches!(
                exec(&p, &long, t).await,
                Err(AgentError::CommandTooLong)
            ));
        });
    }

    /// The rest of a reply an earlier request gave up on (no header at
    /// all, long lines, stray newlines), then a foreign RESULT too large to
    /// keep: all skipped, and ours is read.
    #[test]
    fn leftovers_of_abandoned_replies_are_skipped() {
        rt().block_on(async {
            let (_d, p) = fake_guest(|line, _| {
                let mut out = vec![b'a'; 300_000];
                out.extend_from_slice(b"\nshort junk\n\n\0PONG 1\n");
                out.extend_from_slice(format!("RESULT 5 0 {} 0\n", MAX_OUTPUT + 1).as_bytes());
                out.extend(std::iter::repeat(b'z').take(MAX_OUTPUT as usize + 1));
                out.extend_from_slice(format!("RESULT {} 0 2 0\nok", id_of(line)).as_bytes());
                out
            })
            .await;
            let r = exec(&p, &["true".into()], Duration::from_secs(5))
                .await
                .unwrap();
            assert_eq!(r.stdout, "ok");
            let (_d, p) = fake_guest(|line, _| {
                let mut out = b"junk without end".repeat(100);
                out.extend_from_slice(format!("\nPONG {}\n", id_of(line)).as_bytes());
                out
            })
            .await;
            ping(&p, Duration::from_secs(2)).await.unwrap();
            // Ours, too large: refused, and read past.
            let (_d, p) = fake_guest(|line, _| {
                let mut out =
                    format!("RESULT {} 0 {} 0\n", id_of(line), MAX_OUTPUT + 1).into_bytes();
                out.extend(std::iter::repeat(b'z').take(MAX_OUTPUT as usize + 1));
                out
            })
            .await;
            assert!(matches!(
                exec(&p, &["true".into()], Duration::from_secs(5)).await,
                Err(AgentError::TooLarge)
            ));
        });
    }

    #[test]
    fn ping_and_wait_ready() {
        rt().block_on(async {
            let (_d, p) =
                fake_guest(|l, _| format!("PONG 1\nPONG {}\n", id_of(l)).into_bytes()).await;
            ping(&p, Duration::from_secs(2)).await.unwrap();
            wait_ready(&p, Instant::now() + Duration::from_secs(2))
                .await
                .unwrap();
            // Nobody answers: the deadline is kept.
            let dir = tempfile::tempdir().unwrap();
            let silent = dir.path().join("silent.sock");
            let _l = UnixListener::bind(&silent).unwrap();
            let t0 = Instant::now();
            let e = wait_ready(&silent, Instant::now() + Duration::from_millis(500))
                .await
                .unwrap_err();
            assert!(matches!(e, AgentError::Timeout(_)), "{e}");
            assert!(t0.elapsed() < Duration::from_secs(3));
        });
    }
}
