//! The Helm chart installs the CRDs the code generates (`charts/eventops/crds/`).

use std::path::Path;

#[test]
fn chart_crds_match_the_code() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/eventops/crds");
    let fix = "regenerate them: tools/gen-crds";
    let manifests = eventops_crds::crd_manifests();
    for (file, yaml) in &manifests {
        let committed = std::fs::read_to_string(dir.join(file))
            .unwrap_or_else(|e| panic!("charts/eventops/crds/{file} is missing ({e}): {fix}"));
        assert!(
            committed == *yaml,
            "charts/eventops/crds/{file} differs from the code: {fix}"
        );
    }
    let committed_files = std::fs::read_dir(&dir).unwrap().count();
    assert_eq!(
        committed_files,
        manifests.len(),
        "charts/eventops/crds has stale files: {fix}"
    );
}
