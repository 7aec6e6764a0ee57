//! The real KVM probe on this machine. Where the host KVM is kvm_pvm (the
//! CI and dev hosts), a stock kernel hangs under it: the probe must say
//! Unusable and say why. Elsewhere it must say Usable, or give a reason.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ulan::vmlaunch::qemu::accel::{self, KvmStatus, KVM_PVM_MODULE};
use ulan::vmlaunch::spec::Accel;

const QEMU: &str = "qemu-system-x86_64";

fn have_qemu() -> bool {
    let ok = Command::new(QEMU)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "{QEMU} missing under CI: .ci/run should install it"
        );
        ulan::testkit::skipped(format_args!(
            "{QEMU} is not installed (apt-get install qemu-system-x86)"
        ));
    }
    ok
}

#[test]
fn real_probe_tells_the_truth_about_this_host() {
    if !have_qemu() {
        return;
    }
    let Some(kernel) = accel::find_probe_kernel() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "no /boot/vmlinuz-* under CI: .ci/run should install linux-image-amd64"
        );
        ulan::testkit::skipped(format_args!(
            "no readable /boot/vmlinuz-* to boot for the probe"
        ));
        return;
    };
    let timeout = Duration::from_secs(15);
    let t0 = Instant::now();
    let status = accel::probe_kvm(Path::new(QEMU), &kernel, timeout);
    let took = t0.elapsed();
    eprintln!("probe of {} took {took:?}: {status:?}", kernel.display());
    // Killed at the timeout at the latest, not left running.
    assert!(took < timeout + Duration::from_secs(5), "{took:?}");

    if Path::new(KVM_PVM_MODULE).exists() {
        match &status {
            KvmStatus::Unusable { reason } => assert!(
                reason.contains("kvm_pvm") || reason.contains("within 15"),
                "reason names neither kvm_pvm nor the timeout: {reason}"
            ),
            KvmStatus::Usable => panic!("kvm_pvm host, yet the probe says KVM is usable"),
        }
    } else if let KvmStatus::Unusable { reason } = &status {
        assert!(!reason.trim().is_empty());
    }

    // What `auto` makes of it: KVM exactly when usable, else TCG with
    // one warning that carries the reason.
    let choice = accel::resolve(Accel::Auto, || status.clone()).unwrap();
    assert_eq!(choice.kvm, status.is_usable());
    match &status {
        KvmStatus::Usable => assert!(choice.warning.is_none()),
        KvmStatus::Unusable { reason } => {
            let w = choice.warning.unwrap();
            assert!(w.contains(reason.as_str()) && w.ends_with("using TCG (slower)"));
            assert!(!w.contains('\n'), "one line: {w:?}");
        }
    }
}

#[test]
fn real_qemu_version_is_at_least_7_2() {
    if !have_qemu() {
        return;
    }
    let v = accel::qemu_version(Path::new(QEMU)).unwrap();
    assert!(v >= (7, 2, 0), "{v:?}");
}

/// The Usable path with a real QEMU and kernel: a wrapper turns the
/// probe's `-accel kvm -cpu host` into TCG, which works everywhere. The
/// guest must reach the root-mount panic and QEMU must exit by itself
/// (panic=-1, -no-reboot), well before the timeout.
#[test]
fn a_working_accelerator_is_recognised() {
    if !have_qemu() {
        return;
    }
    let Some(kernel) = accel::find_probe_kernel() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "no /boot/vmlinuz-* under CI: .ci/run should install linux-image-amd64"
        );
        ulan::testkit::skipped(format_args!("no readable /boot/vmlinuz-* to boot"));
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let wrapper = dir.path().join("qemu-tcg");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nn=$#\nfor a in \"$@\"; do\n  case \"$a\" in\n    kvm) a=tcg;;\n    \
             host) a=max;;\n  esac\n  set -- \"$@\" \"$a\"\ndone\nshift $n\nexec {QEMU} \"$@\"\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let timeout = Duration::from_secs(90);
    let t0 = Instant::now();
    let status = accel::probe_kvm_boot(&wrapper, &kernel, timeout);
    eprintln!("TCG stand-in probe took {:?}: {status:?}", t0.elapsed());
    assert_eq!(status, KvmStatus::Usable);
    assert!(t0.elapsed() < timeout);
}
