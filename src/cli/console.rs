//! `ulan console NODE`: the guest's serial console, interactively. The
//! terminal goes raw (so Ctrl-C, arrows and tab reach the guest) until the
//! escape key, Ctrl-], or the guest's end. QEMU serves one console client
//! at a time; its output is logged by QEMU whether or not anyone watches.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// Ctrl-]
pub const ESCAPE: u8 = 0x1d;

/// Puts a terminal in raw mode and restores it when dropped.
struct RawMode {
    fd: i32,
    saved: libc::termios,
}

impl RawMode {
    fn enter(fd: BorrowedFd<'_>) -> io::Result<RawMode> {
        let fd = fd.as_raw_fd();
        // SAFETY: termios is plain data; tcgetattr fills it.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd is a valid open descriptor for the call's duration.
        if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let saved = t;
        // SAFETY: cfmakeraw only edits the struct.
        unsafe { libc::cfmakeraw(&mut t) };
        // SAFETY: as above.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(RawMode { fd, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores what tcgetattr returned on the same fd.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

/// What ended a console session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Escape,
    GuestClosed,
    InputClosed,
}

/// Relays between `input`/`output` and the console socket until the
/// escape byte, the socket's end, or (input not a terminal) end of input
/// followed by `linger` without console output.
pub fn relay(
    sock: &mut UnixStream,
    input: &mut dyn Read,
    input_fd: BorrowedFd<'_>,
    output: &mut dyn Write,
    linger: Duration,
) -> io::Result<Ended> {
    let mut buf = [0u8; 4096];
    let mut input_open = true;
    let mut quiet_since = Instant::now();
    loop {
        let mut fds = [
            libc::pollfd {
                fd: sock.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: if input_open { input_fd.as_raw_fd() } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: fds is a valid array of two pollfd for the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, 100) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[0].revents != 0 {
            let got = sock.read(&mut buf)?;
            if got == 0 {
                return Ok(Ended::GuestClosed);
            }
            output.write_all(&buf[..got])?;
            output.flush()?;
            quiet_since = Instant::now();
        }
        if input_open && fds[1].revents != 0 {
            let got = input.read(&mut buf)?;
            if got == 0 {
                input_open = false;
                quiet_since = Instant::now();
            } else if let Some(pos) = buf[..got].iter().position(|&b| b == ESCAPE) {
                sock.write_all(&buf[..pos])?;
                return Ok(Ended::Escape);
            } else {
                sock.write_all(&buf[..got])?;
            }
        }
        if !input_open && quiet_since.elapsed() >= linger {
            return Ok(Ended::InputClosed);
        }
    }
}

/// The interactive session on this process's terminal.
pub fn attach(node: &str, socket: &Path) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::io::IsTerminal;
    let mut sock = UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot reach node {node}'s console at {} (is the node running?)",
            socket.display()
        )
    })?;
    let stdin = io::stdin();
    let tty = stdin.is_terminal();
    let _raw = if tty {
        eprintln!("ulan: console of {node}; Ctrl-] leaves (press Enter for a prompt)\r");
        Some(RawMode::enter(stdin.as_fd())?)
    } else {
        None
    };
    let mut input = stdin.lock();
    let ended = relay(
        &mut sock,
        &mut input,
        io::stdin().as_fd(),
        &mut io::stdout(),
        Duration::from_secs(2),
    )?;
    drop(_raw);
    match ended {
        Ended::Escape => eprintln!("\nulan: left the console of {node}"),
        Ended::GuestClosed => eprintln!("\nulan: the console of {node} closed (guest stopped?)"),
        Ended::InputClosed => {}
    }
    Ok(())
}

use std::os::fd::AsFd;

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn relays_both_ways_and_stops_at_the_escape_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let guest = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"login: ").unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 64];
            while !got.ends_with(b"ls\n") {
                let n = s.read(&mut buf).unwrap();
                assert!(n > 0);
                got.extend_from_slice(&buf[..n]);
            }
            s.write_all(b"bin etc\n").unwrap();
            // Stay until the client leaves.
            loop {
                let n = s.read(&mut buf).unwrap();
                if n == 0 {
                    return got;
                }
                got.extend_from_slice(&buf[..n]);
            }
        });
        let mut sock = UnixStream::connect(&path).unwrap();
        // Input arrives through a pipe: "ls\n", then the escape key.
        let (r, mut w) = pipe();
        w.write_all(b"ls\n").unwrap();
        let mut out = Vec::new();
        let mut reader = std::fs::File::from(r.try_clone().unwrap());
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            w.write_all(&[b'x', ESCAPE, b'y']).unwrap();
        });
        let ended = relay(
            &mut sock,
            &mut reader,
            r.as_fd(),
            &mut out,
            Duration::from_secs(1),
        )
        .unwrap();
        writer.join().unwrap();
        assert_eq!(ended, Ended::Escape);
        drop(sock);
        // What came before the escape key went through; nothing after it.
        assert_eq!(guest.join().unwrap(), b"ls\nx");
        assert_eq!(out, b"login: bin etc\n");
    }

    #[test]
    fn ends_when_the_guest_closes_or_input_ends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"bye\n").unwrap();
        });
        let mut sock = UnixStream::connect(&path).unwrap();
        let (r, _w) = pipe();
        let mut reader = std::fs::File::from(r.try_clone().unwrap());
        let mut out = Vec::new();
        let ended = relay(
            &mut sock,
            &mut reader,
            r.as_fd(),
            &mut out,
            Duration::from_secs(1),
        )
        .unwrap();
        t.join().unwrap();
        assert_eq!(ended, Ended::GuestClosed);
        assert_eq!(out, b"bye\n");

        // Input closes, the guest stays silent: the session ends after linger.
        let path2 = dir.path().join("c2.sock");
        let listener = UnixListener::bind(&path2).unwrap();
        let mut sock = UnixStream::connect(&path2).unwrap();
        let _peer = listener.accept().unwrap();
        let (r, w) = pipe();
        drop(w);
        let mut reader = std::fs::File::from(r.try_clone().unwrap());
        let t0 = Instant::now();
        let ended = relay(
            &mut sock,
            &mut reader,
            r.as_fd(),
            &mut out,
            Duration::from_millis(200),
        )
        .unwrap();
        assert_eq!(ended, Ended::InputClosed);
        assert!(t0.elapsed() >= Duration::from_millis(200));
    }

    fn pipe() -> (std::os::fd::OwnedFd, std::fs::File) {
        use std::os::fd::FromRawFd;
        let mut fds = [0i32; 2];
        // SAFETY: pipe fills two new descriptors that we then own.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: fresh descriptors from pipe(2).
        unsafe {
            (
                std::os::fd::OwnedFd::from_raw_fd(fds[0]),
                std::fs::File::from_raw_fd(fds[1]),
            )
        }
    }
}
