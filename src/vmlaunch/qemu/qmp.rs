//! A minimal QMP client: connect, leave capabilities negotiation, run one
//! command. QEMU's monitor socket takes one client at a time, so each
//! operation connects, does its work and goes.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// QMP replies are small; anything longer is not QEMU talking.
const MAX_LINE: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP socket {path}: {source}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP: {0}")]
    Io(#[from] std::io::Error),
    #[error("QMP: no answer within {0:?}")]
    Timeout(Duration),
    #[error("QMP: connection closed")]
    Closed,
    #[error("QMP: unexpected message: {0}")]
    Protocol(String),
    #[error("QMP command {command} failed: {message}")]
    Command { command: String, message: String },
}

pub struct Qmp {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
    line: String,
}

impl Qmp {
    /// Connects and negotiates; the greeting and the capabilities answer
    /// must come within `timeout`.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.display().to_string(),
                source,
            })?;
        let (r, w) = stream.into_split();
        let mut qmp = Qmp {
            reader: BufReader::new(r),
            writer: w,
            line: String::new(),
        };
        tokio::time::timeout(timeout, async {
            let greeting = qmp.read_message().await?;
            if greeting.get("QMP").is_none() {
                return Err(QmpError::Protocol(short(&greeting)));
            }
            qmp.execute("qmp_capabilities").await.map(|_| ())
        })
        .await
        .map_err(|_| QmpError::Timeout(timeout))??;
        Ok(qmp)
    }

    async fn read_message(&mut self) -> Result<Value, QmpError> {
        self.line.clear();
        let n = (&mut self.reader)
            .take(MAX_LINE as u64)
            .read_line(&mut self.line)
            .await?;
        if n == 0 {
            return Err(QmpError::Closed);
        }
        serde_json::from_str(self.line.trim_end())
            .map_err(|_| QmpError::Protocol(self.line.chars().take(120).collect::<String>()))
    }

    /// Runs a command; events that arrive meanwhile are skipped.
    pub async fn execute(&mut self, command: &str) -> Result<Value, QmpError> {
        self.execute_with(command, None).await
    }

    /// Runs a command with arguments.
    pub async fn execute_with(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let msg = match arguments {
            Some(a) => serde_json::json!({ "execute": command, "arguments": a }),
            None => serde_json::json!({ "execute": command }),
        };
        self.writer.write_all(format!("{msg}\n").as_bytes()).await?;
        loop {
            let v = self.read_message().await?;
            if let Some(ret) = v.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = v.get("error") {
                return Err(QmpError::Command {
                    command: command.into(),
                    message: err
                        .get("desc")
                        .and_then(Value::as_str)
                        .unwrap_or("unknown error")
                        .to_string(),
                });
            }
            if v.get("event").is_none() {
                return Err(QmpError::Protocol(short(&v)));
            }
        }
    }
}

fn short(v: &Value) -> String {
    v.to_string().chars().take(120).collect()
}

/// Connects, retrying while the socket does not exist or refuses (QEMU is
/// still starting), until `timeout`.
pub async fn connect_when_up(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match Qmp::connect(path, left.max(Duration::from_millis(100))).await {
            Ok(q) => return Ok(q),
            Err(QmpError::Connect { .. }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A fake QEMU monitor that answers with the given lines in order.
    async fn fake(lines: &'static [&'static str]) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            s.write_all(lines[0].as_bytes()).await.unwrap();
            for l in &lines[1..] {
                let _ = s.read(&mut buf).await;
                s.write_all(l.as_bytes()).await.unwrap();
            }
            let _ = s.read(&mut buf).await;
        });
        (dir, path)
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    const GREETING: &str = "{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n";

    #[test]
    fn negotiates_and_runs_a_command_skipping_events() {
        rt().block_on(async {
            let (_d, p) = fake(&[
                GREETING,
                "{\"return\": {}}\n",
                "{\"event\": \"POWERDOWN\"}\n{\"return\": {\"status\": \"running\"}}\n",
            ])
            .await;
            let mut q = Qmp::connect(&p, Duration::from_secs(2)).await.unwrap();
            let r = q.execute("query-status").await.unwrap();
            assert_eq!(r["status"], "running");
        });
    }

    #[test]
    fn command_errors_and_garbage_are_reported() {
        rt().block_on(async {
            let (_d, p) = fake(&[
                GREETING,
                "{\"return\": {}}\n",
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"nope\"}}\n",
            ])
            .await;
            let mut q = Qmp::connect(&p, Duration::from_secs(2)).await.unwrap();
            let e = q.execute("quit").await.unwrap_err().to_string();
            assert!(e.contains("quit failed: nope"), "{e}");

            let (_d, p) = fake(&["not json at all\n"]).await;
            let e = Qmp::connect(&p, Duration::from_secs(2))
                .await
                .err()
                .unwrap();
            assert!(matches!(e, QmpError::Protocol(_)), "{e}");

            let (_d, p) = fake(&["{\"hello\": 1}\n"]).await;
            let e = Qmp::connect(&p, Duration::from_secs(2))
                .await
                .err()
                .unwrap();
            assert!(matches!(e, QmpError::Protocol(_)), "{e}");
        });
    }

    #[test]
    fn silence_times_out_and_absence_is_a_connect_error() {
        rt().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("qmp.sock");
            let _l = UnixListener::bind(&path).unwrap();
            let e = Qmp::connect(&path, Duration::from_millis(200))
                .await
                .err()
                .unwrap();
            assert!(matches!(e, QmpError::Timeout(_)), "{e}");
            let e = connect_when_up(&dir.path().join("none"), Duration::from_millis(200))
                .await
                .err()
                .unwrap();
            assert!(matches!(e, QmpError::Connect { .. }), "{e}");
        });
    }
}
