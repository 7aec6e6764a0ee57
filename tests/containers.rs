//! Container nodes against the real runtime and kernel, rootless: the
//! daemon and the CLI run as an unprivileged user (`ulan-test` when the
//! tests run as root, as in CI), crun runs from the daemon's holder in a
//! user namespace where that user is root.
//!
//! - two containers on a lan ping each other and run iperf3; moving one's
//!   NIC to another lan cuts the ping, moving it back restores it;
//! - the root filesystem: the image is never written, a fresh node does not
//!   see another's writes, a restart of a plain node starts clean, a
//!   persistent node keeps its writes;
//! - exec (exit code, streams), stop (SIGTERM to init), crash (init exits
//!   non-zero: crashed with its last words);
//! - bad input: each a clear 4xx naming the problem, nothing left behind;
//! - limits: see containers_limits.rs;
//! - examples/containers.yaml whole: containers route between two lans
//!   and ping its QEMU guest (built-in image) both ways, on one lan and
//!   through the router container.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::containers::{overlay_mounts_under, user_or_skip, wait_until, Daemon};

#[test]
fn two_containers_ping_run_iperf3_and_a_nic_move_cuts_and_restores_ping() {
    let Some(user) = user_or_skip() else { return };
    let d = Daemon::start(user);
    d.ok(&["lan", "add", "l1"]);
    d.ok(&["lan", "add", "l2"]);
    for (n, ip) in [("a", "10.0.0.1/24"), ("b", "10.0.0.2/24")] {
        let nic = format!("l1,ip={ip}");
        d.add_sleeper(n, &["--nic", &nic]);
    }
    let v = d.node("a");
    assert_eq!(v["state"], "running", "{v}");
    assert_eq!(v["nics"][0]["port"], "a.eth0");
    let mac = v["nics"][0]["mac"].as_str().unwrap().to_string();
    let (code, out, err) = d.exec("a", &["ip", "addr", "show", "eth0"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("10.0.0.1/24") && out.contains(&mac), "{out}");
    let (code, out, err) = d.exec("a", &["ping", "-c", "2", "-W", "3", "10.0.0.2"]);
    assert_eq!(code, 0, "ping a -> b: {out}{err}");

    let (code, _, err) = d.exec("b", &["iperf3", "-s", "-1", "-D"]);
    assert_eq!(code, 0, "{err}");
    std::thread::sleep(Duration::from_millis(500));
    let (code, out, err) = d.exec("a", &["iperf3", "-c", "10.0.0.2", "-t", "2"]);
    assert_eq!(code, 0, "iperf3: {out}{err}");
    let line = out
        .lines()
        .rev()
        .find(|l| l.contains("receiver"))
        .unwrap_or("");
    assert!(line.contains("bits/sec"), "{out}");
    eprintln!("container -> container iperf3 (debug build): {line}");

    d.ok(&["port", "move", "b.eth0", "l2"]);
    let (code, _, _) = d.exec("a", &["ping", "-c", "2", "-W", "1", "10.0.0.2"]);
    assert_ne!(code, 0, "ping must fail with b on another lan");
    d.ok(&["port", "move", "b.eth0", "l1"]);
    let (code, out, err) = d.exec("a", &["ping", "-c", "2", "-W", "3", "10.0.0.2"]);
    assert_eq!(code, 0, "ping after moving back: {out}{err}");
}

#[test]
fn the_rootfs_is_copy_on_write_and_persistent_keeps_writes() {
    let Some(user) = user_or_skip() else { return };
    let d = Daemon::start(user);
    d.add_sleeper("w", &[]);
    // An overlay over the image, unless the home is on Btrfs
    // (tests/containers_btrfs.rs tests that path).
    let on_btrfs = ulan::vmlaunch::container::btrfs::on_btrfs(d.home());
    let root = if on_btrfs {
        "btrfs-snapshot"
    } else {
        "overlay"
    };
    assert_eq!(d.node("w")["rootfs"], root);
    let (code, _, err) = d.sh(
        "w",
        "echo written > /written && rm /bin/ls && mkdir /etc/new",
    );
    assert_eq!(code, 0, "{err}");
    let (_, out, _) = d.sh("w", "cat /written; test -e /bin/ls || echo nols");
    assert!(out.contains("written") && out.contains("nols"), "{out}");
    // The image is untouched.
    let lower = d.builtin_rootfs();
    assert!(lower.join("bin/ls").exists(), "the image lost /bin/ls");
    assert!(!lower.join("written").exists() && !lower.join("etc/new").exists());
    // A fresh node does not see w's writes.
    d.add_sleeper("f", &[]);
    let (code, out, _) = d.sh("f", "cat /written 2>&1; ls /bin/ls");
    assert_eq!(code, 0, "{out}");
    assert!(
        !out.contains("written\n") && out.contains("/bin/ls"),
        "{out}"
    );
    // A plain node starts clean after a restart.
    d.ok(&["node", "stop", "w", "--timeout", "1"]);
    d.ok(&["node", "start", "w"]);
    let (code, out, _) = d.sh("w", "test -e /written && echo still || echo clean");
    assert_eq!((code, out.trim()), (0, "clean"));
    // A persistent one keeps them.
    d.add_sleeper("p", &["--persistent"]);
    let (code, _, err) = d.sh("p", "echo kept > /kept");
    assert_eq!(code, 0, "{err}");
    d.ok(&["node", "stop", "p", "--timeout", "1"]);
    d.ok(&["node", "start", "p"]);
    let (code, out, _) = d.sh("p", "cat /kept");
    assert_eq!((code, out.trim()), (0, "kept"));
    assert!(!lower.join("kept").exists());
}

#[test]
fn exec_stop_and_crash() {
    let Some(user) = user_or_skip() else { return };
    let d = Daemon::start(user);
    d.ok(&[
        "node",
        "add",
        "e",
        "--kind",
        "container",
        "--hostname",
        "box1",
        "--env",
        "GREETING=hello",
        "--cmd",
        "sh",
        "--cmd",
        "-c",
        "--cmd",
        "trap 'exit 0' TERM; sleep 1000 & wait",
    ]);
    let (code, out, err) = d.sh(
        "e",
        "echo out; echo err >&2; hostname; echo $GREETING; id -u; exit 3",
    );
    assert_eq!(code, 3);
    assert_eq!(out, "out\nbox1\nhello\n0\n");
    assert_eq!(err, "err\n");
    let (code, _, err) = d.exec("e", &["/no/such/program"]);
    assert_ne!(code, 0);
    assert!(err.contains("/no/such/program"), "{err}");
    // Its init traps SIGTERM: the stop is quick and clean.
    let t = Instant::now();
    d.ok(&["node", "stop", "e", "--timeout", "10"]);
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    let v = d.node("e");
    assert_eq!(v["state"], "stopped", "{v}");
    let (code, _, err) = d.exec("e", &["true"]);
    assert_ne!(code, 0);
    assert!(err.contains("stopped"), "{err}");
    // An init that ignores SIGTERM is killed after the grace.
    d.ok(&[
        "node",
        "add",
        "deaf",
        "--kind",
        "container",
        "--cmd",
        "sleep",
        "--cmd",
        "1000",
    ]);
    let t = Instant::now();
    d.ok(&["node", "stop", "deaf", "--timeout", "1"]);
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    assert_eq!(d.node("deaf")["state"], "stopped");
    // Init dies: crashed, with what it said last.
    d.ok(&[
        "node",
        "add",
        "c",
        "--kind",
        "container",
        "--cmd",
        "sh",
        "--cmd",
        "-c",
        "--cmd",
        "sleep 0.3; echo dying now; exit 7",
    ]);
    wait_until("the crash", || d.node("c")["state"] == "crashed");
    let exit = d.node("c")["exit"].as_str().unwrap().to_string();
    assert!(
        exit.contains("code 7") && exit.contains("dying now"),
        "{exit}"
    );
    // Nothing of them runs as the test user any more but the daemon.
    d.ok(&["node", "rm", "c"]);
    d.ok(&["node", "rm", "e"]);
    d.ok(&["node", "rm", "deaf"]);
    assert!(!d.lab_dir().join("nodes/c").exists());
    assert_eq!(overlay_mounts_under(d.home()), 0);
}

#[test]
fn bad_input_is_refused_and_leaves_nothing() {
    let Some(user) = user_or_skip() else { return };
    let d = Daemon::start(user);
    d.ok(&["lan", "add", "l1"]);
    let plain_file = d.home().join("plain");
    std::fs::write(&plain_file, "x").unwrap();
    let plain = plain_file.to_string_lossy().into_owned();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--cmd", "/nope"],
            "\"/nope\" does not exist in the image",
        ),
        (vec!["--cmd", "nosuchprog"], "\"nosuchprog\" does not exist"),
        (
            vec!["--image", "/no/such/dir"],
            "does not exist or is not a directory",
        ),
        (vec!["--image", &plain], "is not a directory"),
        (
            vec!["--image", "missing-image"],
            "no image named \"missing-image\"",
        ),
        (vec!["--image", "../etc"], "image"),
        (vec!["--memory-mb", "0"], "memory_mb must be between"),
        (
            vec!["--memory-mb", "1073741824"],
            "memory_mb must be between",
        ),
        (vec!["--pids-max", "0"], "pids_max"),
        (vec!["--env", "NOEQUALS"], "env entry 0"),
        (vec!["--workdir", "relative"], "workdir"),
        (vec!["--hostname", "bad name"], "hostname"),
        (
            vec!["--kernel", "/boot/vmlinuz"],
            "kernel is not used by container nodes",
        ),
        (
            vec!["--nic", "l1,transport=stream"],
            "transport stream is not available for container nodes",
        ),
        (vec!["--nic", "nolan"], "nolan"),
    ];
    for (extra, needle) in cases {
        let mut args = vec!["node", "add", "bad", "--kind", "container"];
        args.extend_from_slice(&extra);
        let o = d.ulan(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{extra:?} was accepted");
        assert!(err.contains(needle), "{extra:?}: {err}");
        let ls = d.ok(&["--json", "node", "ls"]);
        assert!(!ls.contains("\"bad\""), "{extra:?} left a node: {ls}");
        assert!(
            !d.lab_dir().join("nodes/bad").exists(),
            "{extra:?} left files"
        );
        let ports = d.ok(&["--json", "port", "ls"]);
        assert!(!ports.contains("bad.eth0"), "{extra:?} left a port");
    }
    // Container fields on a QEMU node are refused too.
    let o = d.ulan(&["node", "add", "g", "--cmd", "x"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("cmd is for container nodes"));
    assert_eq!(overlay_mounts_under(d.home()), 0);
}

/// Copies the shared built-in guest image (tests/common/guests.rs builds it
/// once per target dir) into the daemon's own store, owned by the test
/// user, so the unprivileged daemon boots it without building it again.
fn give_guest_image(d: &Daemon) {
    let from = common::guests::test_store().join(ulan::vmlaunch::image::BUILTIN);
    let images = d.home().join("data/ulan/images");
    let to = images.join(ulan::vmlaunch::image::BUILTIN);
    std::fs::create_dir_all(&to).unwrap();
    for e in std::fs::read_dir(&from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
    d.user().chown_tree(&d.home().join("data"));
}

/// `ulan exec FROM -- ping IP`, retried: the first may wait for ARP, and
/// a TCG guest answers slowly on this loaded machine.
fn pings(d: &Daemon, from: &str, ip: &str) -> Result<String, String> {
    let mut last = String::new();
    for _ in 0..10 {
        let (code, out, err) = d.exec(from, &["ping", "-c", "1", "-W", "3", ip]);
        if code == 0 {
            return Ok(out);
        }
        last = format!("{out}{err}");
        std::thread::sleep(Duration::from_millis(500));
    }
    Err(last)
}

#[test]
fn a_lab_file_of_containers_and_a_guest_routes_between_two_lans() {
    let Some(user) = user_or_skip() else { return };
    // Without QEMU the container part still runs (the guest is cut out of
    // the file), after a loud skip of the guest part (a failure under CI).
    let with_guest = !common::guests::skip_without_guests("containers.yaml's QEMU guest");
    let d = Daemon::start(user);
    let mut text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/containers.yaml"),
    )
    .unwrap();
    if with_guest {
        give_guest_image(&d);
    } else {
        let cut = text.find("  - name: g1").unwrap();
        text.truncate(cut);
    }
    let file = d.home().join("lab.yaml");
    std::fs::write(&file, &text).unwrap();
    d.user().chown_tree(&file);
    d.ok(&["up", &file.to_string_lossy()]);
    let (code, out, err) = d.exec("c1", &["ping", "-c", "2", "-W", "3", "10.0.2.10"]);
    assert_eq!(code, 0, "c1 -> c2 through r1: {out}{err}");
    assert!(out.contains("ttl=63"), "one router hop: {out}");
    let (_, fwd, _) = d.exec("r1", &["cat", "/proc/sys/net/ipv4/ip_forward"]);
    assert_eq!(fwd.trim(), "1");
    let (_, fwd, _) = d.exec("c1", &["cat", "/proc/sys/net/ipv4/ip_forward"]);
    assert_eq!(fwd.trim(), "0");
    if with_guest {
        // A TCG guest boots in 5-20 s here, longer when the machine is busy.
        let deadline = Instant::now() + common::guests::BOOT;
        loop {
            let v = d.node("g1");
            match v["state"].as_str() {
                Some("running") => break,
                Some("starting") => {}
                _ => panic!("g1 did not boot: {v}"),
            }
            assert!(Instant::now() < deadline, "g1 still starting: {v}");
            std::thread::sleep(Duration::from_millis(250));
        }
        let v = d.node("g1");
        assert_eq!(v["kind"], "qemu", "{v}");
        // One lan (right): container <-> guest, both ways.
        let out = pings(&d, "c2", "10.0.2.20").unwrap_or_else(|e| panic!("c2 -> g1: {e}"));
        assert!(out.contains("ttl=64"), "same lan: {out}");
        let out = pings(&d, "g1", "10.0.2.10").unwrap_or_else(|e| panic!("g1 -> c2: {e}"));
        assert!(out.contains("ttl=64"), "same lan: {out}");
        // Through the router container: container -> guest and back.
        let out = pings(&d, "c1", "10.0.2.20").unwrap_or_else(|e| panic!("c1 -> g1: {e}"));
        assert!(out.contains("ttl=63"), "one router hop: {out}");
        let out = pings(&d, "g1", "10.0.1.10").unwrap_or_else(|e| panic!("g1 -> c1: {e}"));
        assert!(out.contains("ttl=63"), "one router hop: {out}");
    }
    let saved = d.ok(&["save"]);
    assert!(
        saved.contains("kind: container") && saved.contains("infinity"),
        "{saved}"
    );
    if with_guest {
        assert!(saved.contains("name: g1"), "{saved}");
    }
    d.ok(&["down"]);
}

/// `ulan console NODE` with its input from a pipe: `input` is typed, and
/// the session ends once the input closed and the console was quiet for a
/// moment (or at the escape key). (succeeded, stdout, stderr)
fn console(d: &Daemon, node: &str, input: &[u8]) -> (bool, String, String) {
    use std::io::Write;
    let mut c = d
        .cmd(&["console", node])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = c.stdin.take().unwrap();
    // A moment to connect: output is followed from when the client came.
    std::thread::sleep(Duration::from_millis(300));
    stdin.write_all(input).unwrap();
    drop(stdin);
    let out = c.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A marker no earlier run can have printed.
fn marker() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    format!("{}-{}", std::process::id(), t.subsec_nanos())
}

fn console_log(d: &Daemon, node: &str) -> PathBuf {
    PathBuf::from(d.node(node)["console_log"].as_str().unwrap())
}

#[test]
fn a_container_console_is_its_terminal_logged_and_shared_in_turn() {
    let Some(user) = user_or_skip() else { return };
    let d = Daemon::start(user);
    // The default cmd, /bin/sh: with a terminal it stays up.
    d.ok(&["node", "add", "t", "--kind", "container"]);
    std::thread::sleep(Duration::from_secs(1));
    let v = d.node("t");
    assert_eq!(
        v["state"], "running",
        "the shell must wait at its prompt: {v}"
    );
    // The shell computes the line: its echo of what was typed differs.
    let m = marker();
    let (ok, out, err) = console(&d, "t", format!("echo hello-$((6*7))-{m}\n").as_bytes());
    assert!(ok, "{err}");
    let want = format!("hello-42-{m}");
    assert!(out.contains(&want), "console said: {out:?} ({err})");
    let log = std::fs::read_to_string(console_log(&d, "t")).unwrap();
    assert!(log.contains(&want), "not in console.log: {log:?}");
    // Detached (Ctrl-]) and attached again: the same shell answers.
    let m2 = marker();
    let (ok, out, err) = console(&d, "t", format!("echo again-$((2+3))-{m2}\n").as_bytes());
    assert!(
        ok && out.contains(&format!("again-5-{m2}")),
        "{out:?} {err}"
    );
    let (ok, _, err) = console(&d, "t", b"echo x\n\x1d");
    assert!(ok && err.contains("left the console"), "{err}");
    // exec runs without the terminal: plain lines, no carriage returns.
    let (code, out, err) = d.exec("t", &["echo", "via-exec"]);
    assert_eq!((code, out.as_str()), (0, "via-exec\n"), "{err}");
    // A stop while a client is attached ends the client cleanly.
    let mut attached = d
        .cmd(&["console", "t"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    d.ok(&["node", "stop", "t", "--timeout", "1"]);
    let mut ended = None;
    while t.elapsed() < Duration::from_secs(15) {
        if let Some(s) = attached.try_wait().unwrap() {
            ended = Some(s);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let Some(status) = ended else {
        let _ = attached.kill();
        panic!("the console client is still attached after the stop");
    };
    let out = attached.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(status.success(), "{err}");
    assert!(err.contains("closed"), "{err}");
    assert_eq!(d.node("t")["state"], "stopped");
    // The console of a stopped node: a clear error.
    let (ok, _, err) = console(&d, "t", b"");
    assert!(!ok && err.contains("is the node running"), "{err}");
}

#[test]
fn a_container_that_prints_a_lot_unwatched_never_blocks() {
    let Some(user) = user_or_skip() else { return };
    let d = Daemon::start(user);
    const SIZE: u64 = 10_000_000;
    let script =
        format!("head -c {SIZE} /dev/zero | tr '\\0' x; echo; echo printed-all; exec sleep 1000");
    d.ok(&[
        "node",
        "add",
        "loud",
        "--kind",
        "container",
        "--cmd",
        "sh",
        "--cmd",
        "-c",
        "--cmd",
        &script,
    ]);
    let log = console_log(&d, "loud");
    let tail = |p: &Path| {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::File::open(p).unwrap();
        let len = f.metadata().unwrap().len();
        f.seek(SeekFrom::Start(len.saturating_sub(200))).unwrap();
        let mut s = String::new();
        let _ = f.read_to_string(&mut s);
        (len, s)
    };
    wait_until("10 MB in the console log", || {
        tail(&log).1.contains("printed-all")
    });
    let (len, _) = tail(&log);
    assert!(len >= SIZE, "console.log has {len} bytes");
    let (code, out, err) = d.exec("loud", &["echo", "still-answers"]);
    assert_eq!((code, out.as_str()), (0, "still-answers\n"), "{err}");
    assert_eq!(d.node("loud")["state"], "running");
}

#[test]
fn a_stopped_container_commits_to_an_image_new_nodes_start_from() {
    let Some(user) = user_or_skip() else { return };
    let d = Daemon::start(user);
    let sleep = ["--cmd", "sleep", "--cmd", "1000"];
    let mut args = vec!["node", "add", "p", "--kind", "container", "--persistent"];
    args.extend_from_slice(&sleep);
    d.ok(&args);
    // A new file, a file of the image removed (a whiteout), a directory of
    // the image replaced by a new one with one file (opaque), and a file of
    // a subordinate id where the user has a range (else chown fails).
    let (code, _, err) = d.sh(
        "p",
        "echo committed > /etc/committed-marker && rm /etc/hosts && rm -rf /var && \
         mkdir /var && echo new > /var/only-new && \
         { echo sub > /sub-owned; chown 1234:1234 /sub-owned 2>/dev/null || true; }",
    );
    assert_eq!(code, 0, "{err}");
    let (_, owner, _) = d.sh("p", "stat -c %u /sub-owned");
    // Commit of a running node: a clear 4xx.
    let o = d.ulan(&["node", "commit", "p", "img2"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("stop it first"),
        "{err}"
    );
    d.ok(&["node", "stop", "p", "--timeout", "1"]);
    let out = d.ok(&["node", "commit", "p", "img2"]);
    assert!(out.contains("img2"), "{out}");
    let ls = d.ok(&["image", "ls"]);
    assert!(ls.contains("img2"), "{ls}");
    // A new node from it sees the merged tree.
    let mut args = vec![
        "node",
        "add",
        "n2",
        "--kind",
        "container",
        "--image",
        "img2",
    ];
    args.extend_from_slice(&sleep);
    d.ok(&args);
    let (code, out, err) = d.sh(
        "n2",
        "cat /etc/committed-marker; test -e /etc/hosts && echo hosts-back; ls /var; \
         stat -c %u /sub-owned; cat /etc/passwd | head -1",
    );
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "committed", "{out}");
    assert!(
        !out.contains("hosts-back"),
        "the removed file is back: {out}"
    );
    assert_eq!(lines[1], "only-new", "the opaque dir: {out}");
    assert_eq!(lines[2], owner.trim(), "the owner of /sub-owned: {out}");
    assert!(lines[3].starts_with("root:"), "{out}");
    // The base image is untouched.
    let lower = d.builtin_rootfs();
    assert!(lower.join("etc/hosts").is_file() && lower.join("var/tmp").is_dir());
    assert!(!lower.join("etc/committed-marker").exists());
    // An existing name, an unknown node, a bad name: clear errors, and no
    // scratch dir left in the store.
    let o = d.ulan(&["node", "commit", "p", "img2"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("already exists"),
        "{err}"
    );
    let o = d.ulan(&["node", "commit", "nosuch", "img3"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("nosuch"), "{err}");
    let o = d.ulan(&["node", "commit", "p", "../escape"]);
    assert!(!o.status.success());
    let images = d.home().join("data/ulan/images");
    let names: Vec<String> = std::fs::read_dir(&images)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names
            .iter()
            .any(|n| n.starts_with(".tmp-") || n == "img3" || n == "escape"),
        "{names:?}"
    );
    // A plain (not persistent) node commits what its last run wrote.
    let mut args = vec!["node", "add", "q", "--kind", "container"];
    args.extend_from_slice(&sleep);
    d.ok(&args);
    let (code, _, err) = d.sh("q", "echo q > /q-file");
    assert_eq!(code, 0, "{err}");
    d.ok(&["node", "stop", "q", "--timeout", "1"]);
    d.ok(&["node", "commit", "q", "img5"]);
    let q = images.join("img5/rootfs/q-file");
    assert_eq!(std::fs::read_to_string(&q).unwrap_or_default(), "q\n");
    // Without its layer (gone with the run dir), nothing to commit.
    std::fs::remove_dir_all(d.lab_dir().join("nodes/q/layer")).unwrap();
    let o = d.ulan(&["node", "commit", "q", "img6"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("nothing to commit"),
        "{err}"
    );
    assert!(!images.join("img6").exists());
}
