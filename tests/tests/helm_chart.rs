//! The Helm chart (`helm/apex`): `tests/python/test_helm_chart.py` renders it with the Helm
//! SDK library for the default, HA and DaemonSet values, validates every manifest strictly
//! against the latest Kubernetes schema of `kubernetes-validate`, and has the real
//! `apex-hub --check-config` and `apex-node --check-config` accept the configs it renders.
//! `scripts/test.sh` installs `helm-python-sdk` and `kubernetes-validate`.
#![allow(clippy::unwrap_used)]

use anyhow::Result;
use apex_tests::process::bin_path;

#[test]
fn the_chart_renders_validates_and_configures_hubs_and_nodes_the_binaries_accept() -> Result<()> {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/test_helm_chart.py");
    let out = std::process::Command::new("python3")
        .arg(&script)
        .arg(bin_path("apex-hub")?)
        .arg(bin_path("apex-node")?)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
    Ok(())
}
