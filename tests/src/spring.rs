//! The Spring Kafka oracle (`tests/spring-oracle`): a plain spring-kafka 4.x program whose
//! own classes write the reference records the runtime's are compared with. Built with
//! Maven once per version of its sources into the component cache (`~/.cache/eventops`,
//! like Kafka); a missing JDK or Maven fails the test that needs it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use eventops_devenv::EnvInfo;

/// The project's directory in the repository.
fn project_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("spring-oracle")
}

/// `$EVENTOPS_CACHE`, else `$XDG_CACHE_HOME/eventops`, else `~/.cache/eventops`, as
/// `tools/lib.sh` chooses it.
fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("EVENTOPS_CACHE") {
        return dir.into();
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache")
        });
    base.join("eventops")
}

/// FNV-1a over the paths and contents of the oracle's sources: the cache key.
fn sources_hash(dir: &Path) -> u64 {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("reading the oracle's sources") {
            let path = entry.unwrap().path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n != "target") {
                    walk(&path, out);
                }
            } else {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(dir, &mut files);
    files.sort();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for f in files {
        let rel = f.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
        for b in rel.bytes().chain(std::fs::read(&f).unwrap()) {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// The oracle's class path, building it with Maven first when this version of its sources
/// has not been built yet (about 30 s with a warm `~/.m2`).
pub fn oracle_classpath() -> String {
    static BUILD: Mutex<()> = Mutex::new(());
    let _one_at_a_time = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let src = project_dir();
    let dest = cache_dir().join(format!("spring-oracle-{:016x}", sources_hash(&src)));
    let classpath = format!(
        "{}:{}/*",
        dest.join("target/spring-oracle.jar").display(),
        dest.join("target/lib").display()
    );
    if dest.join(".complete").exists() {
        return classpath;
    }
    for (tool, package) in [("java", "openjdk-17-jdk-headless"), ("mvn", "maven")] {
        let found = Command::new(tool).arg("-version").output().is_ok();
        assert!(
            found,
            "`{tool}` is not installed: the Spring interoperability tests build a Spring Kafka \
             4.x program (Java 17+) with Maven; install it (Debian: apt-get install {package})"
        );
    }
    let building = dest.with_extension(format!("building-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&building);
    copy_dir(&src, &building);
    let out = Command::new("mvn")
        .args(["-B", "-q", "package", "-DskipTests", "-f"])
        .arg(building.join("pom.xml"))
        .output()
        .expect("running mvn");
    assert!(
        out.status.success(),
        "building the Spring oracle with Maven failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(building.join(".complete"), "").unwrap();
    // Another test process may have finished the same build meanwhile: either copy serves.
    if std::fs::rename(&building, &dest).is_err() {
        let _ = std::fs::remove_dir_all(&building);
    }
    assert!(
        dest.join(".complete").exists(),
        "{} was not built",
        dest.display()
    );
    classpath
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n != "target") {
                copy_dir(&path, &target);
            }
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}

/// Runs the oracle in `mode` (see `SpringOracle.java`) against the test broker as the
/// super user with `args` (`--name value` pairs without the dashes); returns its standard
/// output. Panics with its output when it fails or runs longer than `timeout`.
pub async fn run_oracle(
    info: &EnvInfo,
    mode: &str,
    args: &[(&str, &str)],
    timeout: Duration,
) -> String {
    let classpath = tokio::task::spawn_blocking(oracle_classpath).await.unwrap();
    let mut cmd = tokio::process::Command::new("java");
    cmd.arg("-Xmx256m")
        .arg("-cp")
        .arg(classpath)
        .arg("dev.eventops.oracle.SpringOracle")
        .arg(mode);
    let login = [
        ("bootstrap", info.kafka_bootstrap.as_str()),
        ("mechanism", info.kafka_sasl_mechanism.as_str()),
        ("user", info.kafka_admin_user.as_str()),
        ("password", info.kafka_admin_password.as_str()),
    ];
    for (name, value) in login.iter().chain(args) {
        cmd.arg(format!("--{name}")).arg(value);
    }
    cmd.kill_on_drop(true);
    let out = tokio::time::timeout(timeout, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("the Spring oracle ({mode}) ran longer than {timeout:?}"))
        .expect("running java");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "the Spring oracle ({mode}) failed ({}):\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}
