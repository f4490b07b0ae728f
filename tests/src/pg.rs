//! PostgreSQL helpers for the runtime's inbox tests: fresh databases, `psql`, and a
//! private PostgreSQL server with TLS and certificates made with `openssl`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use eventops_devenv::EnvInfo;

use crate::unique;

/// A new, empty database on the test server; returns its `postgres://` URL.
pub async fn fresh_database(info: &EnvInfo) -> String {
    let name = unique("inbox").replace('-', "_");
    crate::runtime::postgres(info)
        .await
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("CREATE DATABASE");
    let (base, _) = info
        .postgres_url
        .rsplit_once('/')
        .expect("postgres_url ends in /<database>");
    format!("{base}/{name}")
}

/// A client on `url` without TLS.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
    tokio::spawn(connection);
    client
}

/// PostgreSQL's server binaries (`initdb`, `postgres`, `psql`), as `tools/install-postgres.sh`
/// finds them.
pub fn postgres_bin() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is installed under /usr/lib/postgresql (tools/install-postgres.sh)")
        .filter_map(|e| Some(e.ok()?.path().join("bin")))
        .filter(|d| d.join("initdb").exists())
        .collect();
    dirs.sort();
    dirs.pop().expect("a PostgreSQL bin directory with initdb")
}

/// The shipped migration file `name` (in `consumer-runtime/migrations/`).
pub fn migration_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../consumer-runtime/migrations")
        .join(name)
}

/// Runs `psql url -1 -v ON_ERROR_STOP=1 -f file`, the documented way to apply a
/// migration; panics with psql's output when it fails.
pub fn psql_file(url: &str, file: &Path) {
    let out = Command::new(postgres_bin().join("psql"))
        .arg(url)
        .args(["-1", "-v", "ON_ERROR_STOP=1", "-q", "-f"])
        .arg(file)
        .output()
        .expect("running psql");
    assert!(
        out.status.success(),
        "psql -f {} failed: {}{}",
        file.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The uid and gid of Debian's `postgres` user when this process runs as root
/// (PostgreSQL refuses to run as root).
fn server_owner() -> Option<(u32, u32)> {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    if !root {
        return None;
    }
    let id = |flag: &str| -> u32 {
        let out = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .expect("id postgres");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("the postgres user exists")
    };
    Some((id("-u"), id("-g")))
}

/// A private PostgreSQL server with `ssl=on`, a certificate for the host name
/// [`TlsPostgres::HOST`] signed by its own CA, listening on 127.0.0.1. Stopped and
/// removed when dropped.
pub struct TlsPostgres {
    /// Its directory: data, socket, certificates.
    pub dir: PathBuf,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// The CA that signed the server's certificate (PEM).
    pub ca: PathBuf,
    /// Another CA, which did not (PEM).
    pub other_ca: PathBuf,
    child: Child,
}

impl TlsPostgres {
    /// The only name in the server certificate (no IP address in it).
    pub const HOST: &'static str = "eventops-db.test";

    /// Makes the certificates, runs `initdb` and starts the server; panics if it is not
    /// ready within 30 s.
    pub fn start() -> Self {
        let dir = std::env::temp_dir().join(unique("eventops-pgtls"));
        std::fs::create_dir_all(&dir).unwrap();
        let openssl = |args: &[&str]| run(Command::new("openssl").current_dir(&dir).args(args));
        for ca in ["ca", "other-ca"] {
            openssl(&[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.pem"),
                "-days",
                "2",
                "-subj",
                &format!("/CN=eventops test {ca}"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ]);
        }
        openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=eventops-db.test",
        ]);
        std::fs::write(
            dir.join("server.ext"),
            format!(
                "subjectAltName=DNS:{}\nbasicConstraints=critical,CA:FALSE\n\
                 keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
                Self::HOST
            ),
        )
        .unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ]);

        let owner = server_owner();
        let as_owner = |program: PathBuf| {
            let mut cmd = Command::new(program);
            if let Some((uid, gid)) = owner {
                use std::os::unix::process::CommandExt;
                cmd.uid(uid).gid(gid);
            }
            cmd
        };
        if let Some((uid, gid)) = owner {
            run(Command::new("chown")
                .arg("-R")
                .arg(format!("{uid}:{gid}"))
                .arg(&dir));
        }
        run(Command::new("chmod").arg("600").arg(dir.join("server.key")));
        let bin = postgres_bin();
        run(as_owner(bin.join("initdb"))
            .arg("-D")
            .arg(dir.join("data"))
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"]));
        let port = crate::free_port();
        let log = std::fs::File::create(dir.join("postgres.log")).unwrap();
        let child = as_owner(bin.join("postgres"))
            .arg("-D")
            .arg(dir.join("data"))
            .arg("-p")
            .arg(port.to_string())
            .arg("-k")
            .arg(&dir)
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .args(["-c", "ssl=on"])
            .arg("-c")
            .arg(format!(
                "ssl_cert_file={}",
                dir.join("server.crt").display()
            ))
            .arg("-c")
            .arg(format!("ssl_key_file={}", dir.join("server.key").display()))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting postgres");
        let server = Self {
            ca: dir.join("ca.pem"),
            other_ca: dir.join("other-ca.pem"),
            dir,
            port,
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !Command::new(bin.join("pg_isready"))
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            assert!(
                Instant::now() < deadline,
                "the TLS PostgreSQL did not start: {}",
                std::fs::read_to_string(server.dir.join("postgres.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    /// A `key=value` connection string to database `postgres` as `postgres`, reaching
    /// 127.0.0.1 for `host`, with `tls` appended (`sslmode=... sslrootcert=...`).
    pub fn url(&self, host: &str, tls: &str) -> String {
        format!(
            "host={host} hostaddr=127.0.0.1 port={} user=postgres dbname=postgres {tls}",
            self.port
        )
    }
}

impl Drop for TlsPostgres {
    fn drop(&mut self) {
        // SIGINT: PostgreSQL's fast shutdown.
        send_signal(self.child.id(), 2);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn send_signal(pid: u32, signal: i32) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status();
}
