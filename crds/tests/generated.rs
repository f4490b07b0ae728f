//! The committed CRD manifests are what the code generates.

use std::path::Path;

#[test]
fn committed_crd_manifests_match_the_code() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("generated");
    let fix = "regenerate them: cargo run -p eventops-operator -- crd --out-dir crds/generated";
    let manifests = eventops_crds::crd_manifests();
    for (file, yaml) in &manifests {
        let committed = std::fs::read_to_string(dir.join(file))
            .unwrap_or_else(|e| panic!("crds/generated/{file} is missing ({e}): {fix}"));
        assert!(
            committed == *yaml,
            "crds/generated/{file} differs from the code: {fix}"
        );
    }
    let committed_files = std::fs::read_dir(&dir).unwrap().count();
    assert_eq!(
        committed_files,
        manifests.len(),
        "crds/generated has stale files: {fix}"
    );
}
