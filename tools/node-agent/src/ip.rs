//! Pod networking stand-in: every pod gets its own loopback address (Linux routes all of
//! 127.0.0.0/8 to `lo`), so several pods can each bind the same port.
//!
//! Several environments may run on one machine, each with its own agent: an address is
//! taken by holding an exclusive `flock` on a file named after it in a directory shared
//! by all agents, and released when that file is closed (also when an agent dies).

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// A loopback address held for one pod.
#[derive(Debug)]
pub struct PodIp {
    /// The address.
    pub ip: Ipv4Addr,
    _lock: File,
}

/// Hands out 127.1.0.1 ... 127.254.255.254, skipping addresses other agents hold.
pub struct Allocator {
    dir: PathBuf,
    next: u32,
}

const FIRST: u32 = u32::from_be_bytes([127, 1, 0, 1]);
const LAST: u32 = u32::from_be_bytes([127, 254, 255, 254]);

impl Allocator {
    /// Uses `dir` (created if missing) for the lock files.
    pub fn new(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the pod IP lock directory {}", dir.display()))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            next: FIRST,
        })
    }

    /// The next free address. Addresses are handed out round-robin, so a pod's address is
    /// not reused right after it is released.
    pub fn allocate(&mut self) -> anyhow::Result<PodIp> {
        for _ in 0..(LAST - FIRST) {
            let ip = Ipv4Addr::from(self.next);
            self.next = if self.next >= LAST {
                FIRST
            } else {
                self.next + 1
            };
            let [_, _, _, last] = ip.octets();
            if last == 0 || last == 255 {
                continue;
            }
            let path = self.dir.join(ip.to_string());
            let file = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .with_context(|| format!("opening {}", path.display()))?;
            // SAFETY: flock on a descriptor this function owns.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(PodIp { ip, _lock: file });
            }
        }
        bail!("every loopback address for pods is taken")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_unique_across_allocators_and_freed_on_drop() {
        let dir = std::env::temp_dir().join(format!("node-agent-ip-{}", std::process::id()));
        let mut a = Allocator::new(&dir).unwrap();
        let mut b = Allocator::new(&dir).unwrap();
        let first = a.allocate().unwrap();
        assert_eq!(first.ip, Ipv4Addr::new(127, 1, 0, 1));
        // Another agent skips what the first holds.
        let other = b.allocate().unwrap();
        assert_eq!(other.ip, Ipv4Addr::new(127, 1, 0, 2));
        drop(first);
        let mut c = Allocator::new(&dir).unwrap();
        assert_eq!(c.allocate().unwrap().ip, Ipv4Addr::new(127, 1, 0, 1));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
