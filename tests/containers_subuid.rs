//! Container nodes of a user with subordinate ids (/etc/subuid and
//! /etc/subgid, mapped by newuidmap/newgidmap from the holder): the
//! container sees both ranges, root in it may chown to any mapped id, a
//! file of uid 1000 inside belongs to the range's id 999 on the host, and
//! the daemon removes such files (which its user cannot) through the same
//! mapping, leaving nothing behind.
//!
//! As root (CI) the user is its own account, `ulan-test-subid`, given the
//! range 300000-365535 once (left in place); `ulan-test` keeps none, so
//! the other container tests keep testing the plain one-id mapping.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::containers::{subid_user_or_skip, Daemon};
use common::unprivileged::SubidUser;

type Range = (u32, u32);

/// `/proc/self/uid_map`-style text as (inside, outside, count) rows.
fn id_map(text: &str) -> Vec<(u32, u32, u32)> {
    text.lines()
        .map(|l| {
            let f: Vec<u32> = l
                .split_whitespace()
                .map(|n| n.parse().unwrap_or_else(|_| panic!("{l:?}")))
                .collect();
            assert_eq!(f.len(), 3, "{l:?}");
            (f[0], f[1], f[2])
        })
        .collect()
}

/// Files under `dir` owned by a uid in `range`.
fn owned_by_range(dir: &Path, (start, count): Range) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return found;
    };
    for e in rd.flatten() {
        let Ok(m) = std::fs::symlink_metadata(e.path()) else {
            continue;
        };
        if (start..start.saturating_add(count)).contains(&m.uid()) {
            found.push(e.path().display().to_string());
        }
        if m.is_dir() {
            found.extend(owned_by_range(&e.path(), (start, count)));
        }
    }
    found
}

#[test]
fn a_subordinate_range_is_mapped_chown_works_and_its_files_are_removed() {
    let Some(SubidUser {
        user,
        uids: (su, sn),
        gids: (sg, sgn),
    }) = subid_user_or_skip()
    else {
        return;
    };
    let d = Daemon::start(user);
    d.add_sleeper("s", &[]);
    assert_eq!(d.node("s")["state"], "running");
    let uid_map = id_map(&d.sh_ok("s", "cat /proc/self/uid_map"));
    assert_eq!(uid_map, [(0, user.uid, 1), (1, su, sn)]);
    let gid_map = id_map(&d.sh_ok("s", "cat /proc/self/gid_map"));
    assert_eq!(gid_map, [(0, user.gid, 1), (1, sg, sgn)]);

    let out = d.sh_ok(
        "s",
        "touch /tmp/f && chown 1000:1000 /tmp/f && stat -c %u:%g /tmp/f",
    );
    assert_eq!(out.trim(), "1000:1000");
    // A file that uid 1000 makes itself.
    let out = d.sh_ok(
        "s",
        "echo 'u1000:x:1000:1000::/tmp:/bin/sh' >> /etc/passwd && \
         echo 'u1000:x:1000:' >> /etc/group && \
         mkdir /tmp/d && chown 1000:1000 /tmp/d && \
         su -s /bin/sh u1000 -c 'id -u; echo mine > /tmp/d/g' && stat -c %u /tmp/d/g",
    );
    assert_eq!(out.split_whitespace().collect::<Vec<_>>(), ["1000", "1000"]);
    // On the host, in the node's upper layer: the range's id 999.
    let upper = d.lab_dir().join("nodes/s/layer/upper");
    for f in ["tmp/f", "tmp/d", "tmp/d/g"] {
        let m = std::fs::symlink_metadata(upper.join(f)).unwrap();
        assert_eq!((m.uid(), m.gid()), (su + 999, sg + 999), "{f}");
    }
    // The daemon's user cannot delete those itself (d is the range's);
    // a restart starts clean all the same, through the holder's mapping.
    d.ok(&["node", "stop", "s", "--timeout", "1"]);
    d.ok(&["node", "start", "s"]);
    let out = d.sh_ok("s", "test -e /tmp/d/g && echo still || echo clean");
    assert_eq!(out.trim(), "clean");
    assert!(!upper.join("tmp/d").exists());
    d.sh_ok(
        "s",
        "mkdir /tmp/e && chown 1000:1000 /tmp/e && touch /tmp/e/x && chown 1000 /tmp/e/x",
    );
    assert!(!owned_by_range(&upper, (su, sn)).is_empty());
    d.ok(&["node", "rm", "s"]);
    assert!(!d.lab_dir().join("nodes/s").exists());
    let left = owned_by_range(d.home(), (su, sn));
    assert!(left.is_empty(), "left behind: {left:?}");
}
