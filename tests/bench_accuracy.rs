//! The benchmark library measures what is there: through ports with known
//! impairments, loss and latency come out as set, and a vhost-user path
//! and a socket path both carry trials and bursts without loss.

mod common;

use std::path::Path;
use std::time::Duration;

use common::Fixture;
use ulan::bench::link::{Link, SocketLink, VhostLink};
use ulan::bench::rfc2544::{self, Runner, TrialSpec};
use ulan::ports::PortKind;
use ulan::switch::impair::{DirectionSpec, ImpairSpec};

fn path(fx: &Fixture, kind: PortKind) -> Box<dyn Link> {
    fx.lab.add_lan("l").unwrap();
    let g = fx.lab.add_port("g", kind, Some("l")).unwrap();
    let s = fx.lab.add_port("s", kind, Some("l")).unwrap();
    if kind == PortKind::VhostUser {
        Box::new(VhostLink::connect(Path::new(&g.path), Path::new(&s.path), 1514).unwrap())
    } else {
        Box::new(SocketLink::connect(kind, Path::new(&g.path), Path::new(&s.path)).unwrap())
    }
}

fn egress(d: DirectionSpec) -> ImpairSpec {
    ImpairSpec {
        egress: Some(d),
        ingress: None,
    }
}

fn trial(size: usize, rate: f64, secs: f64, latency: bool) -> TrialSpec {
    TrialSpec {
        size,
        rate_pps: Some(rate),
        duration: Duration::from_secs_f64(secs),
        burst: None,
        latency,
    }
}

#[test]
fn loss_counts_match_a_known_random_loss() {
    let fx = Fixture::new();
    let mut link = path(&fx, PortKind::Stream);
    let mut runner = Runner::new(link.as_mut(), None);
    runner.check_path(64, Duration::from_secs(5)).unwrap();
    // Nothing lost at a modest rate on a plain path.
    let t = runner.trial(&trial(64, 20_000.0, 0.5, false)).unwrap();
    assert_eq!(t.lost, 0, "{t:?}");
    assert!(t.passes(Some(20_000.0), 0.0), "{t:?}");
    fx.lab
        .set_impairments(
            "s",
            egress(DirectionSpec {
                loss_pct: Some(20.0),
                ..Default::default()
            }),
        )
        .unwrap();
    let t = runner.trial(&trial(64, 20_000.0, 1.0, false)).unwrap();
    // 20000 frames at p = 0.2: sigma = 0.28%; 5 sigma either way.
    assert!(t.sent >= 19_000, "{t:?}");
    assert!(
        (t.loss_pct() - 20.0).abs() < 1.5,
        "loss {:.2}%: {t:?}",
        t.loss_pct()
    );
    assert!(!t.passes(Some(20_000.0), 1.0));
    assert!(t.passes(Some(20_000.0), 25.0));
    assert_eq!(t.received.corrupt, 0);
}

#[test]
fn latency_shows_a_known_delay() {
    let fx = Fixture::new();
    let mut link = path(&fx, PortKind::Dgram);
    let mut runner = Runner::new(link.as_mut(), None);
    runner.check_path(128, Duration::from_secs(5)).unwrap();
    let plain = runner.trial(&trial(128, 2_000.0, 0.3, true)).unwrap();
    let base = plain.latency.unwrap();
    assert!(base.frames > 500 && base.p50_us < 5_000.0, "{base:?}");
    fx.lab
        .set_impairments(
            "s",
            egress(DirectionSpec {
                delay_ms: Some(20.0),
                ..Default::default()
            }),
        )
        .unwrap();
    let t = runner.trial(&trial(128, 2_000.0, 0.5, true)).unwrap();
    let l = t.latency.unwrap();
    assert_eq!(t.lost, 0, "{t:?}");
    assert!(l.frames >= 900, "{l:?}");
    // 20 ms added, +- 2 ms, over what the path itself takes.
    assert!(
        (l.p50_us - base.p50_us - 20_000.0).abs() < 2_000.0,
        "p50 {} us with the delay, {} us without",
        l.p50_us,
        base.p50_us
    );
    assert!(l.p50_us <= l.p99_us && l.p99_us <= l.max_us);
}

#[test]
fn vhost_user_trials_throughput_and_bursts() {
    let fx = Fixture::new();
    let mut link = path(&fx, PortKind::VhostUser);
    let mut runner = Runner::new(link.as_mut(), None);
    runner.check_path(64, Duration::from_secs(5)).unwrap();
    let t = runner.trial(&trial(1518, 50_000.0, 0.3, true)).unwrap();
    assert_eq!(t.lost, 0, "{t:?}");
    assert!(t.offered_pps() > 49_000.0, "{t:?}");
    assert_eq!(t.received.bytes, t.received.frames * 1514);
    let (best, top, trials) = rfc2544::throughput(
        &mut runner,
        64,
        Duration::from_millis(200),
        0.0,
        0.02,
        8,
        |_| {},
    )
    .unwrap();
    let best = best.expect("some rate passes");
    assert!(
        best > 10_000.0 && best <= top.offered_pps() * 1.0001,
        "{best} {top:?}"
    );
    assert!((1..=8).contains(&trials));
    // The rate found passes again (with a little slack for a busy host).
    let again = runner.trial(&trial(64, best * 0.9, 0.2, false)).unwrap();
    assert!(again.loss_pct() < 1.0, "{again:?}");
    let (frames, _) = rfc2544::back_to_back(&mut runner, 64, 200, 6, |_| {}).unwrap();
    assert!((1..=200).contains(&frames), "{frames}");
}
