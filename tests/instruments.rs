//! Impairments, link state and captures through real sockets: the accuracy
//! the issue asks for (delay +- 2 ms, rate within 5%, loss within a
//! binomial interval), changes while traffic flows, and hostile settings.

mod common;

use std::time::{Duration, Instant};

use common::*;
use ulan::lab::{CaptureRequest, LinkState};
use ulan::ports::PortKind;
use ulan::switch::impair::{DirectionSpec, ImpairSpec};
use ulan::testkit::{frame, mac, tag_of, Endpoint};

/// Two dgram clients a (mac 1) and b (mac 2) on lan l, each learned.
fn pair(fx: &Fixture) -> (Endpoint, Endpoint) {
    fx.lan("l");
    let mut a = fx.plug("a", PortKind::Dgram, Some("l"));
    let mut b = fx.plug("b", PortKind::Dgram, Some("l"));
    a.send(&frame(mac(2), mac(1), 60, 0)).unwrap();
    b.recv(WAIT).unwrap().unwrap();
    b.send(&frame(mac(1), mac(2), 60, 0)).unwrap();
    a.recv(WAIT).unwrap().unwrap();
    (a, b)
}

fn egress(d: DirectionSpec) -> ImpairSpec {
    ImpairSpec {
        egress: Some(d),
        ingress: None,
    }
}

/// One-way times (µs) of `n` frames a -> b sent every `gap`.
fn one_way(a: &mut Endpoint, b: &mut Endpoint, n: u32, gap: Duration) -> Vec<f64> {
    let mut out = Vec::new();
    for i in 0..n {
        let t = Instant::now();
        a.send(&frame(mac(2), mac(1), 100, 1000 + i)).unwrap();
        let f = b.recv(WAIT).unwrap().expect("frame lost");
        assert_eq!(tag_of(&f), Some(1000 + i));
        out.push(t.elapsed().as_secs_f64() * 1e6);
        std::thread::sleep(gap);
    }
    out
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[test]
fn a_50ms_delay_adds_50ms_one_way() {
    let fx = Fixture::new();
    let (mut a, mut b) = pair(&fx);
    let mut base = one_way(&mut a, &mut b, 40, Duration::from_millis(5));
    fx.lab
        .set_impairments(
            "b",
            egress(DirectionSpec {
                delay_ms: Some(50.0),
                ..Default::default()
            }),
        )
        .unwrap();
    let mut delayed = one_way(&mut a, &mut b, 40, Duration::from_millis(5));
    let added = (median(&mut delayed) - median(&mut base)) / 1000.0;
    println!("added one-way delay: {added:.3} ms");
    assert!((added - 50.0).abs() <= 2.0, "added {added} ms");
    // No frame early.
    assert!(delayed.iter().all(|&t| t >= 50_000.0), "{delayed:?}");
    // Cleared: back to the base delay.
    fx.lab.set_impairments("b", ImpairSpec::default()).unwrap();
    let mut after = one_way(&mut a, &mut b, 20, Duration::from_millis(2));
    assert!(median(&mut after) < 10_000.0);
    assert!(!fx.lab.port("b").unwrap().impaired);
}

#[test]
fn a_rate_limit_holds_within_5_percent_over_a_second() {
    let fx = Fixture::new();
    let (mut a, mut b) = pair(&fx);
    fx.lab
        .set_impairments(
            "b",
            egress(DirectionSpec {
                rate_kbps: Some(10_000),
                ..Default::default()
            }),
        )
        .unwrap();
    // Offer 20 Mbit/s of 1250-byte frames (2000/s) for 2 s.
    let recv = std::thread::spawn(move || {
        let mut arrivals = Vec::new();
        while let Some(f) = b.recv(Duration::from_millis(500)).unwrap() {
            arrivals.push((Instant::now(), f.len()));
        }
        arrivals
    });
    let start = Instant::now();
    let mut sent = 0u32;
    while start.elapsed() < Duration::from_secs(2) {
        let due = start + Duration::from_micros(500) * sent;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        a.send(&frame(mac(2), mac(1), 1250, sent)).unwrap();
        sent += 1;
    }
    let arrivals = recv.join().unwrap();
    // One second in the middle, after the burst has gone.
    let t0 = arrivals[0].0 + Duration::from_millis(500);
    let t1 = t0 + Duration::from_secs(1);
    let bytes: usize = arrivals
        .iter()
        .filter(|(t, _)| *t >= t0 && *t < t1)
        .map(|(_, l)| l)
        .sum();
    let bps = bytes as f64 * 8.0;
    println!("rate held: {:.3} Mbit/s of 10", bps / 1e6);
    assert!((bps - 10e6).abs() <= 0.05 * 10e6, "{bps} bit/s");
    let s = fx.wait_stats("b", |s| s.tx_drop_impair_queue > 0);
    assert_eq!(s.tx_dropped, s.tx_drop_impair_queue);
    assert_eq!(
        s.tx_frames + s.tx_drop_impair_queue,
        sent as u64 + 1,
        "every frame is either sent or counted: {s:?}"
    );
}

#[test]
fn loss_matches_a_binomial_interval_and_is_counted() {
    let fx = Fixture::new();
    let (mut a, mut b) = pair(&fx);
    fx.lab
        .set_impairments(
            "a",
            ImpairSpec {
                ingress: Some(DirectionSpec {
                    loss_pct: Some(10.0),
                    ..Default::default()
                }),
                egress: None,
            },
        )
        .unwrap();
    let n = 20_000u32;
    let recv = std::thread::spawn(move || {
        let mut got = 0u32;
        while b.recv(Duration::from_millis(500)).unwrap().is_some() {
            got += 1;
        }
        got
    });
    for i in 0..n {
        a.send(&frame(mac(2), mac(1), 60, i)).unwrap();
        if i % 100 == 99 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let got = recv.join().unwrap();
    let s = fx.stats("a");
    let sb = fx.wait_stats("b", |sb| sb.tx_frames + sb.tx_dropped >= got as u64);
    // The impairment's own decisions: every frame it saw was lost or
    // forwarded (the frame from `pair` and the no-lan one came before).
    let decided = s.rx_drop_impair_loss + s.rx_frames - 2;
    assert_eq!(decided, n as u64, "{s:?}");
    let lost = s.rx_drop_impair_loss as f64;
    let sd = (n as f64 * 0.1 * 0.9).sqrt();
    println!("lost {lost} of {n} (expected 2000 +- {:.0})", 4.5 * sd);
    assert!((lost - 2000.0).abs() <= 4.5 * sd, "{lost}");
    assert_eq!(s.rx_dropped, s.rx_drop_no_lan + s.rx_drop_impair_loss);
    // What was forwarded reached b, or b's queue counted it.
    assert_eq!(
        sb.tx_frames + sb.tx_dropped,
        s.rx_frames - s.rx_drop_no_lan,
        "{sb:?}"
    );
    assert_eq!(got as u64, sb.tx_frames - 1);
}

#[test]
fn changing_impairments_while_traffic_flows_loses_and_reorders_nothing() {
    let fx = Fixture::new();
    let (mut a, mut b) = pair(&fx);
    let set = |ms: Option<f64>| {
        let spec = match ms {
            Some(ms) => egress(DirectionSpec {
                delay_ms: Some(ms),
                jitter_ms: Some(ms / 4.0),
                ..Default::default()
            }),
            None => ImpairSpec::default(),
        };
        fx.lab.set_impairments("b", spec).unwrap();
    };
    set(Some(20.0));
    let recv = std::thread::spawn(move || {
        let mut tags = Vec::new();
        while let Some(f) = b.recv(Duration::from_millis(700)).unwrap() {
            tags.push(tag_of(&f).unwrap());
        }
        tags
    });
    for i in 1..=3000u32 {
        a.send(&frame(mac(2), mac(1), 200, i)).unwrap();
        match i {
            1000 => set(Some(2.0)),
            2000 => set(None),
            _ => {}
        }
        // 4 frames a millisecond: what waits stays within b's queue when
        // a change lets it all go at once.
        if i % 4 == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let tags = recv.join().unwrap();
    let sb = fx.stats("b");
    assert_eq!(sb.tx_dropped, 0, "{sb:?}");
    let jumps: Vec<(u32, u32)> = tags
        .windows(2)
        .filter(|w| w[1] != w[0] + 1)
        .map(|w| (w[0], w[1]))
        .collect();
    assert!(jumps.is_empty(), "out of order or lost after: {jumps:?}");
    assert_eq!(tags.len(), 3000);
}

#[test]
fn a_down_link_forwards_nothing_either_way_until_it_is_up() {
    let fx = Fixture::new();
    let (mut a, mut b) = pair(&fx);
    let rt = rt();
    let (info, carrier) = rt
        .block_on(fx.lab.set_port_link("b", LinkState::Down))
        .unwrap();
    assert_eq!(info.link, LinkState::Down);
    assert_eq!(carrier, None, "not a guest NIC: nothing to tell");
    a.send(&frame(mac(2), mac(1), 60, 1)).unwrap();
    b.send(&frame(mac(1), mac(2), 60, 2)).unwrap();
    assert!(b.recv(QUIET).unwrap().is_none());
    assert!(a.recv(QUIET).unwrap().is_none());
    let s = fx.wait_stats("b", |s| {
        s.rx_drop_link_down == 1 && s.tx_drop_link_down >= 1
    });
    assert_eq!(s.rx_dropped, s.rx_drop_no_lan + 1, "{s:?}");
    // Its addresses went with the link: a's next frame to mac 2 floods.
    assert!(rt
        .block_on(fx.lab.fdb("l"))
        .unwrap()
        .iter()
        .all(|e| e.port != "b"));
    rt.block_on(fx.lab.set_port_link("b", LinkState::Up))
        .unwrap();
    a.send(&frame(mac(2), mac(1), 60, 3)).unwrap();
    assert_eq!(tag_of(&b.recv(WAIT).unwrap().unwrap()), Some(3));
    b.send(&frame(mac(1), mac(2), 60, 4)).unwrap();
    assert_eq!(tag_of(&a.recv(WAIT).unwrap().unwrap()), Some(4));
    assert_eq!(fx.lab.port("b").unwrap().link, LinkState::Up);
}

#[test]
fn hostile_impairments_and_captures_are_refused_and_change_nothing() {
    let fx = Fixture::new();
    let (mut a, mut b) = pair(&fx);
    let bad = [
        r#"{"egress":{"loss_pct":150}}"#,
        r#"{"egress":{"delay_ms":31536000000}}"#,
        r#"{"egress":{"rate_kbps":0}}"#,
        r#"{"ingress":{"jitter_ms":-3}}"#,
        r#"{"ingress":{"reorder_pct":5}}"#,
    ];
    for body in bad {
        let spec: ImpairSpec = serde_json::from_str(body).unwrap();
        let e = fx.lab.set_impairments("a", spec).unwrap_err();
        assert!(
            e.to_string().contains("must")
                || e.to_string().contains("needs")
                || e.to_string().contains("forward nothing"),
            "{e}"
        );
    }
    assert!(fx.lab.impairments("a").unwrap().is_empty());
    assert!(fx
        .lab
        .set_impairments("ghost", ImpairSpec::default())
        .is_err());
    let cap = |req: CaptureRequest| fx.lab.start_capture(req).unwrap_err().to_string();
    let port = |p: &str| CaptureRequest {
        port: Some(p.into()),
        ..Default::default()
    };
    assert!(cap(port("ghost")).contains("no port named"));
    assert!(cap(CaptureRequest {
        path: Some("/nonexistent-dir/x.pcapng".into()),
        ..port("a")
    })
    .contains("cannot create the capture file"));
    assert!(cap(CaptureRequest {
        path: Some("relative.pcapng".into()),
        ..port("a")
    })
    .contains("absolute"));
    assert!(cap(CaptureRequest {
        lan: Some("l".into()),
        ..port("a")
    })
    .contains("not both"));
    assert!(cap(CaptureRequest {
        snaplen: Some(10),
        ..port("a")
    })
    .contains("snaplen"));
    assert!(fx.lab.capture_list().is_empty());
    a.send(&frame(mac(2), mac(1), 60, 9)).unwrap();
    assert_eq!(tag_of(&b.recv(WAIT).unwrap().unwrap()), Some(9));
}

#[test]
fn a_stream_reader_that_stops_reading_ends_its_capture_not_forwarding() {
    let fx = Fixture::new();
    let (mut a, mut b) = pair(&fx);
    let info = fx
        .lab
        .start_capture(CaptureRequest {
            lan: Some("l".into()),
            ..Default::default()
        })
        .unwrap();
    let rx = fx.lab.capture_stream(&info.id).unwrap();
    // A second reader is refused.
    assert!(fx
        .lab
        .capture_stream(&info.id)
        .unwrap_err()
        .to_string()
        .contains("already being streamed"));
    let sender = std::thread::spawn(move || {
        let start = Instant::now();
        let mut sent = 0u32;
        while start.elapsed() < Duration::from_secs(7) {
            for _ in 0..10 {
                a.send(&frame(mac(2), mac(1), 1500, sent)).unwrap();
                sent += 1;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        sent
    });
    let mut got = 0u32;
    let mut last = None;
    while let Some(f) = b.recv(Duration::from_millis(500)).unwrap() {
        let tag = tag_of(&f).unwrap();
        assert!(last.map_or(true, |l| tag > l), "reordered at {tag}");
        last = Some(tag);
        got += 1;
    }
    let sent = sender.join().unwrap();
    // Forwarding went on the whole time: anything b missed is b's own
    // queue (counted), never a wait for the capture.
    let sb = fx.stats("b");
    assert_eq!(got as u64 + sb.tx_dropped, sent as u64, "{sb:?}");
    assert!(got as f64 > 0.95 * sent as f64, "{got} of {sent}");
    let c = fx.lab.capture(&info.id).unwrap();
    assert_eq!(c.state, "ended", "{c:?}");
    assert!(
        c.reason.as_deref().unwrap().contains("stopped reading"),
        "{c:?}"
    );
    assert!(c.dropped > 0);
    assert!(fx.stats("a").capture_dropped > 0);
    drop(rx);
}
