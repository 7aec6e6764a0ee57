//! Container roots as Btrfs snapshots: on a Btrfs this test makes (a
//! sparse file, mkfs.btrfs, loop-mounted as root), the unprivileged
//! daemon's data dir and image store live on it, so the built-in
//! container image's rootfs is a subvolume and every node's root is its
//! own snapshot of it instead of an overlay:
//!
//! - two containers write to /, each sees only its own writes, the image
//!   is untouched, and they ping each other over a lan;
//! - the holder mounted a Btrfs snapshot (its mountinfo), not an overlay,
//!   and the node says `rootfs: btrfs-snapshot`;
//! - a plain node's snapshot is deleted at stop and made fresh at start;
//!   a persistent node keeps its own across stop/start;
//! - both with `user_subvol_rm_allowed` (deleted by ioctl) and without it
//!   (emptied, then rmdir).
//!
//! Skips loudly when not root or no loop device can be had; a missing
//! mkfs.btrfs fails under CI (scripts/setup-debian.sh installs it).

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::cli::CliUser;
use common::containers::{have, subid_user_or_skip, user_or_skip, Daemon};
use common::unprivileged::SubidUser;

/// A Btrfs loop-mounted at `mnt`; unmounted and its loop device
/// detached when dropped, also when the test fails.
struct LoopBtrfs {
    dir: tempfile::TempDir,
    mnt: PathBuf,
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl LoopBtrfs {
    fn make(options: &str) -> Result<LoopBtrfs, String> {
        let dir = tempfile::Builder::new()
            .prefix("ulan-btrfs")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let image = dir.path().join("fs.img");
        let f = std::fs::File::create(&image).map_err(|e| e.to_string())?;
        f.set_len(1 << 30).map_err(|e| e.to_string())?;
        drop(f);
        run(Command::new("mkfs.btrfs").arg("-q").arg(&image))?;
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).map_err(|e| e.to_string())?;
        let fs = LoopBtrfs { dir, mnt };
        run(Command::new("mount")
            .arg("-o")
            .arg(format!("loop,{options}"))
            .arg(&image)
            .arg(&fs.mnt))?;
        Ok(fs)
    }

    fn image(&self) -> PathBuf {
        self.dir.path().join("fs.img")
    }
}

impl Drop for LoopBtrfs {
    fn drop(&mut self) {
        let mounted = || {
            std::fs::read_to_string("/proc/self/mountinfo")
                .unwrap_or_default()
                .contains(&*self.mnt.to_string_lossy())
        };
        if mounted() && run(Command::new("umount").arg(&self.mnt)).is_err() {
            let _ = run(Command::new("umount").arg("-l").arg(&self.mnt));
        }
        // mount -o loop sets autoclear; detach what is still attached.
        if let Ok(out) = Command::new("losetup").arg("-j").arg(self.image()).output() {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                if let Some(dev) = line.split(':').next().filter(|d| d.starts_with("/dev/")) {
                    let _ = run(Command::new("losetup").arg("-d").arg(dev));
                }
            }
        }
    }
}

/// The loop-mounted Btrfs, or a loud skip; a missing mkfs.btrfs fails
/// under CI.
fn btrfs_or_skip(options: &str) -> Option<LoopBtrfs> {
    // SAFETY: getuid cannot fail.
    let why = if unsafe { libc::getuid() } != 0 {
        "root, to loop-mount a Btrfs it makes".to_string()
    } else if !have("mkfs.btrfs") {
        assert!(
            std::env::var_os("CI").is_none(),
            "mkfs.btrfs is missing under CI (apt-get install btrfs-progs)"
        );
        "mkfs.btrfs (apt-get install btrfs-progs)".to_string()
    } else {
        match LoopBtrfs::make(options) {
            Ok(fs) => return Some(fs),
            Err(e) => format!("a loop-mounted Btrfs ({e})"),
        }
    };
    ulan::testkit::skipped(format_args!("the Btrfs snapshot test needs {why}"));
    None
}

fn is_subvolume(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir() && m.ino() == 256)
}

/// The file system type mounted at the container's root (`.../bundle/
/// rootfs`) in the holder's mount namespace, and whether it has an
/// overlay mounted anywhere.
fn holder_root_mount(holder_pid: u64) -> (String, bool) {
    let info = std::fs::read_to_string(format!("/proc/{holder_pid}/mountinfo")).unwrap();
    let mut root_type = String::new();
    let mut overlay = false;
    for line in info.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let fstype = right.split_whitespace().next().unwrap_or("");
        overlay |= fstype == "overlay";
        if left
            .split_whitespace()
            .nth(4)
            .is_some_and(|m| m.ends_with("/bundle/rootfs"))
        {
            root_type = fstype.to_string();
        }
    }
    (root_type, overlay)
}

fn snapshot_roots_on_btrfs(options: &str) {
    let Some(user) = user_or_skip() else { return };
    let Some(fs) = btrfs_or_skip(options) else {
        return;
    };
    let parent = fs.mnt.join("u");
    std::fs::create_dir(&parent).unwrap();
    user.chown_tree(&parent);
    let cli = CliUser::as_account_in("ct", user, &parent);
    // What a killed daemon of this lab left: a plain node's snapshot with
    // files in it, and a planted link. The next daemon sweeps both, and
    // never follows the link.
    let stale = cli.data_dir().join("ulan/labs/ct/layers");
    std::fs::create_dir_all(&stale).unwrap();
    ulan::vmlaunch::container::btrfs::create_subvolume(&stale.join("gone")).unwrap();
    std::fs::write(stale.join("gone/junk"), "x").unwrap();
    let aside = parent.join("aside");
    std::fs::create_dir(&aside).unwrap();
    std::fs::write(aside.join("keep"), "x").unwrap();
    std::os::unix::fs::symlink(&aside, stale.join("link")).unwrap();
    common::cli::give_to(cli.home(), cli.account().unwrap());
    let d = Daemon::start_as(cli);
    for n in ["gone", "link"] {
        assert!(
            std::fs::symlink_metadata(stale.join(n)).is_err(),
            "the stale {n} outlived a new daemon"
        );
    }
    assert_eq!(std::fs::read_to_string(aside.join("keep")).unwrap(), "x");
    d.ok(&["lan", "add", "l1"]);
    d.add_sleeper("a", &["--nic", "l1,ip=10.0.0.1/24"]);
    d.add_sleeper("b", &["--nic", "l1,ip=10.0.0.2/24"]);
    let image = d.builtin_rootfs();
    assert!(is_subvolume(&image), "{} is no subvolume", image.display());
    let layers = d.lab_data_dir().join("layers");
    for n in ["a", "b"] {
        let v = d.node(n);
        assert_eq!(v["rootfs"], "btrfs-snapshot", "{v}");
        assert!(is_subvolume(&layers.join(n)), "{n} has no snapshot");
        let (root_type, overlay) = holder_root_mount(v["pid"].as_u64().unwrap());
        assert_eq!(root_type, "btrfs", "{n}'s root");
        assert!(!overlay, "{n}'s holder mounted an overlay");
    }
    let text = d.ok(&["node", "show", "a"]);
    assert!(text.contains("btrfs-snapshot"), "{text}");

    d.sh_ok("a", "echo a > /only-a && rm /bin/ls");
    d.sh_ok("b", "echo b > /only-b");
    let out = d.sh_ok("a", "ls /only-* ; test -e /bin/ls || echo nols");
    assert_eq!(out, "/only-a\nnols\n");
    let out = d.sh_ok("b", "ls /only-* /bin/ls");
    assert_eq!(out, "/bin/ls\n/only-b\n");
    // The writes are in the node's snapshot; the image has none of them.
    assert!(layers.join("a/only-a").is_file());
    assert!(!layers.join("a/bin/ls").exists());
    assert!(image.join("bin/ls").exists(), "the image lost /bin/ls");
    for f in ["only-a", "only-b"] {
        assert!(!image.join(f).exists(), "{f} reached the image");
    }
    let (code, out, err) = d.exec("a", &["ping", "-c", "2", "-W", "3", "10.0.0.2"]);
    assert_eq!(code, 0, "ping a -> b: {out}{err}");
    let (code, out, err) = d.exec("b", &["ping", "-c", "2", "-W", "3", "10.0.0.1"]);
    assert_eq!(code, 0, "ping b -> a: {out}{err}");

    // A plain node's snapshot goes at stop; the next start has a fresh one.
    d.ok(&["node", "stop", "a", "--timeout", "1"]);
    assert!(!layers.join("a").exists(), "a's snapshot outlived its stop");
    d.ok(&["node", "start", "a"]);
    assert_eq!(d.node("a")["rootfs"], "btrfs-snapshot");
    let out = d.sh_ok(
        "a",
        "test -e /only-a && echo still || echo clean; ls /bin/ls",
    );
    assert_eq!(out, "clean\n/bin/ls\n");

    // A persistent node keeps its own snapshot, in its data dir.
    d.add_sleeper("p", &["--persistent"]);
    assert_eq!(d.node("p")["rootfs"], "btrfs-snapshot");
    d.sh_ok("p", "echo kept > /kept");
    d.ok(&["node", "stop", "p", "--timeout", "1"]);
    let kept = d.lab_data_dir().join("nodes/p/rootfs");
    assert!(is_subvolume(&kept), "p's snapshot went at stop");
    assert_eq!(
        std::fs::read_to_string(kept.join("kept")).unwrap(),
        "kept\n"
    );
    assert!(!layers.join("p").exists());
    d.ok(&["node", "start", "p"]);
    assert_eq!(d.sh_ok("p", "cat /kept"), "kept\n");
    assert!(!image.join("kept").exists());

    // Commit of a stopped snapshot node: its tree, snapshotted into the
    // store as a subvolume, so nodes of the new image get snapshots too.
    d.ok(&["node", "stop", "p", "--timeout", "1"]);
    d.ok(&["node", "commit", "p", "pimg"]);
    let pimg = d.data_dir().join("ulan/images/pimg/rootfs");
    assert!(is_subvolume(&pimg), "the committed rootfs is no subvolume");
    assert_eq!(
        std::fs::read_to_string(pimg.join("kept")).unwrap(),
        "kept\n"
    );
    d.add_sleeper("p2", &["--image", "pimg"]);
    assert_eq!(d.node("p2")["rootfs"], "btrfs-snapshot");
    assert_eq!(d.sh_ok("p2", "cat /kept"), "kept\n");
    d.sh_ok("p2", "echo p2 > /kept");
    d.ok(&["node", "rm", "p2"]);
    assert_eq!(
        std::fs::read_to_string(pimg.join("kept")).unwrap(),
        "kept\n"
    );
    d.ok(&["node", "start", "p"]);

    // An imported image on Btrfs is a subvolume too: a docker archive of
    // the built-in image's files, made with tar and sha256sum.
    let work = parent.join("archive");
    std::fs::create_dir(&work).unwrap();
    let script = format!(
        r#"set -e
        cd {work}
        tar -C {root} -cf layer.tar .
        L=$(sha256sum layer.tar | cut -d' ' -f1)
        printf '{{"architecture":"amd64","os":"linux","config":{{"Cmd":["/bin/sh"]}},"rootfs":{{"type":"layers","diff_ids":["sha256:%s"]}}}}' $L > cfg.json
        C=$(sha256sum cfg.json | cut -d' ' -f1)
        mv cfg.json $C.json
        mkdir $L && mv layer.tar $L/layer.tar
        printf '[{{"Config":"%s.json","RepoTags":["b:1"],"Layers":["%s/layer.tar"]}}]' $C $L > manifest.json
        tar -cf ../img.tar manifest.json $C.json $L"#,
        work = work.display(),
        root = image.display()
    );
    run(Command::new("sh").args(["-c", &script])).unwrap();
    d.user().chown_tree(&parent.join("img.tar"));
    let archive = parent.join("img.tar").display().to_string();
    d.ok(&["image", "import", &archive, "bimg"]);
    let bimg = d.data_dir().join("ulan/images/bimg/rootfs");
    assert!(is_subvolume(&bimg), "the imported rootfs is no subvolume");
    d.add_sleeper("imp", &["--image", "bimg"]);
    assert_eq!(d.node("imp")["rootfs"], "btrfs-snapshot");
    d.sh_ok("imp", "echo imp > /imp");
    assert!(
        !bimg.join("imp").exists(),
        "a node wrote into the imported image"
    );
    d.ok(&["node", "rm", "imp"]);

    // Hostile leftovers where snapshots go are not followed: a symlink
    // at a plain node's snapshot path is removed (its target stays), and
    // a persistent node's `rootfs` symlinked to the image gives an
    // overlay over the image, never writes into it.
    let outside = parent.join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("keep"), "x").unwrap();
    std::os::unix::fs::symlink(&outside, layers.join("h")).unwrap();
    d.user().chown_tree(&outside);
    d.add_sleeper("h", &[]);
    assert_eq!(d.node("h")["rootfs"], "btrfs-snapshot");
    assert!(is_subvolume(&layers.join("h")));
    d.sh_ok("h", "echo h > /keep");
    let q = d.lab_data_dir().join("nodes/q");
    std::fs::create_dir_all(&q).unwrap();
    std::os::unix::fs::symlink(&image, q.join("rootfs")).unwrap();
    d.user().chown_tree(&d.lab_data_dir());
    d.add_sleeper("q", &["--persistent"]);
    assert_eq!(d.node("q")["rootfs"], "overlay");
    d.sh_ok("q", "echo q > /evil");
    assert!(!image.join("evil").exists(), "q wrote into the image");
    for n in ["h", "q"] {
        d.ok(&["node", "rm", n]);
    }
    assert_eq!(std::fs::read_to_string(outside.join("keep")).unwrap(), "x");

    for n in ["a", "b", "p"] {
        d.ok(&["node", "rm", n]);
    }
    let left: Vec<_> = std::fs::read_dir(&layers)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "snapshots left: {left:?}");
    // Persistent files outlive the node, as a persistent disk does.
    assert!(is_subvolume(&kept));
    drop(d);
}

/// A user with subordinate ids on a Btrfs mounted without
/// `user_subvol_rm_allowed`: its container's files of the range are in
/// the snapshot, which the daemon's user cannot empty itself; stop
/// removes it all the same, through the holder's mapping.
#[test]
fn a_snapshot_with_subordinate_ids_is_removed_through_the_mapping() {
    let Some(SubidUser { user, uids, .. }) = subid_user_or_skip() else {
        return;
    };
    let Some(fs) = btrfs_or_skip("defaults") else {
        return;
    };
    let parent = fs.mnt.join("u");
    std::fs::create_dir(&parent).unwrap();
    user.chown_tree(&parent);
    let d = Daemon::start_as(CliUser::as_account_in("ct", user, &parent));
    d.add_sleeper("s", &[]);
    assert_eq!(d.node("s")["rootfs"], "btrfs-snapshot");
    d.sh_ok(
        "s",
        "mkdir -p /srv/d && echo x > /srv/d/f && chown -R 1000:1000 /srv/d && chmod 700 /srv/d",
    );
    let snap = d.lab_data_dir().join("layers/s");
    let m = std::fs::symlink_metadata(snap.join("srv/d/f")).unwrap();
    assert_eq!(m.uid(), uids.0 + 999);
    d.ok(&["node", "stop", "s", "--timeout", "1"]);
    assert!(!snap.exists(), "the snapshot outlived the stop");
    d.ok(&["node", "start", "s"]);
    let out = d.sh_ok("s", "test -e /srv/d && echo still || echo clean");
    assert_eq!(out.trim(), "clean");
    d.ok(&["node", "rm", "s"]);
    assert!(!snap.exists());
    drop(d);
}

#[test]
fn snapshot_roots_on_btrfs_deleted_by_ioctl() {
    snapshot_roots_on_btrfs("user_subvol_rm_allowed");
}

#[test]
fn snapshot_roots_on_btrfs_deleted_by_rmdir() {
    snapshot_roots_on_btrfs("defaults");
}
