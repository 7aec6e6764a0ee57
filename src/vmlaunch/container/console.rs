//! A container's terminal: crun (`process.terminal` and
//! `--console-socket`) sends the pty master over a Unix socket the daemon
//! listens on; the daemon drains it into the console log and serves it on
//! the console socket like a UML guest's stdin/stdout.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::AsyncWrite;

/// Receives one file descriptor (SCM_RIGHTS) from `sock`, as crun sends
/// the pty master: a short message with the fd attached.
pub async fn recv_fd(sock: &tokio::net::UnixStream) -> io::Result<OwnedFd> {
    loop {
        sock.readable().await?;
        match sock.try_io(tokio::io::Interest::READABLE, || {
            recv_fd_now(sock.as_raw_fd())
        }) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

fn recv_fd_now(fd: RawFd) -> io::Result<OwnedFd> {
    let mut data = [0u8; 256];
    // Room for a few fds: any beyond the first are closed.
    let mut control = [0u64; 16];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; the buffers outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: recvmsg into the buffers above; CLOEXEC on received fds.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut got: Vec<OwnedFd> = Vec::new();
    // SAFETY: walking the control messages recvmsg filled in.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let p = libc::CMSG_DATA(c).cast::<RawFd>();
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    got.push(OwnedFd::from_raw_fd(p.add(i).read_unaligned()));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if got.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            if n == 0 {
                "the console socket closed without a terminal"
            } else {
                "a message without a terminal on the console socket"
            },
        ));
    }
    Ok(got.swap_remove(0))
}

/// A pty master, non-blocking, shared by the reader (the log pump) and
/// the writer (console input).
#[derive(Clone)]
pub struct Pty(Arc<AsyncFd<OwnedFd>>);

impl Pty {
    /// Takes `fd` (a pty master): non-blocking, 24x80 (crun leaves the size
    /// at 0x0, which line editors take badly).
    pub fn new(fd: OwnedFd) -> io::Result<Pty> {
        let raw = fd.as_raw_fd();
        // SAFETY: fcntl and ioctl on an fd we own, with plain data.
        unsafe {
            let flags = libc::fcntl(raw, libc::F_GETFL);
            if flags < 0 || libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
                return Err(io::Error::last_os_error());
            }
            let ws = libc::winsize {
                ws_row: 24,
                ws_col: 80,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            libc::ioctl(raw, libc::TIOCSWINSZ, &ws);
        }
        // SAFETY: the AsyncFd owns `fd` (an OwnedFd) until it is dropped.
        let fd = unsafe { AsyncFd::register(fd) }?;
        Ok(Pty(Arc::new(fd)))
    }

    /// Reads what the container printed. `Ok(0)` once no process holds the
    /// terminal any more (the kernel says EIO then).
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.0.readable().await?;
            // SAFETY: read into `buf`, at most its length.
            match guard.try_io(|fd| {
                let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            }) {
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for Pty {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = match self.0.poll_write_ready(cx) {
                Poll::Ready(Ok(g)) => g,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            };
            // SAFETY: write from `buf`, at most its length.
            match guard.try_io(|fd| {
                let n = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            }) {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn openpty() -> (OwnedFd, OwnedFd) {
        // SAFETY: posix_openpt/grantpt/unlockpt/ptsname_r on fresh fds.
        unsafe {
            let m = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
            assert!(m >= 0);
            assert_eq!(libc::grantpt(m), 0);
            assert_eq!(libc::unlockpt(m), 0);
            let mut name = [0 as libc::c_char; 64];
            assert_eq!(libc::ptsname_r(m, name.as_mut_ptr(), name.len()), 0);
            let s = libc::open(
                name.as_ptr(),
                libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
            );
            assert!(s >= 0);
            (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(s))
        }
    }

    #[tokio::test]
    async fn a_pty_master_passes_over_a_socket_and_reads_to_the_end() {
        let (master, slave) = openpty();
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        // Sent as crun does: one byte with the fd.
        let sent = {
            let fd = master.as_raw_fd();
            let mut data = [b'x'];
            let mut iov = libc::iovec {
                iov_base: data.as_mut_ptr().cast(),
                iov_len: 1,
            };
            let mut control = [0u64; 4];
            // SAFETY: building one SCM_RIGHTS message in local buffers.
            unsafe {
                let mut msg: libc::msghdr = std::mem::zeroed();
                msg.msg_iov = &mut iov;
                msg.msg_iovlen = 1;
                msg.msg_control = control.as_mut_ptr().cast();
                msg.msg_controllen = libc::CMSG_SPACE(4) as _;
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(4) as _;
                libc::CMSG_DATA(c).cast::<RawFd>().write_unaligned(fd);
                libc::sendmsg(a.as_raw_fd(), &msg, 0)
            }
        };
        assert_eq!(sent, 1);
        drop(master);
        b.set_nonblocking(true).unwrap();
        let b = tokio::net::UnixStream::from_std(b).unwrap();
        let mut pty = Pty::new(recv_fd(&b).await.unwrap()).unwrap();
        let mut slave = std::fs::File::from(slave);
        // Output to the slave arrives at the master, then EIO reads as end.
        std::io::Write::write_all(&mut slave, b"hello\n").unwrap();
        pty.write_all(b"typed\n").await.unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(&slave), &mut line).unwrap();
        assert_eq!(line, "typed\n");
        drop(slave);
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        loop {
            let n = pty.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        let got = String::from_utf8_lossy(&got);
        assert!(got.starts_with("hello\r\n"), "{got:?}");
        // Without an fd: a clear error.
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        drop(a);
        assert!(recv_fd(&b).await.is_err());
    }
}
