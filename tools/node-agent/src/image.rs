//! Which local executable stands in for a container's image.
//!
//! There are no images here: a container runs a binary built from this workspace, named
//! after the image's repository (`ghcr.io/eventops/order-processing-inventory:0.1` runs
//! `order-processing-inventory` from the bin directory), or its `command[0]`.

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Container;

/// The binary an image stands for: the last path component of its repository, without
/// registry, tag or digest. `None` for an empty name.
pub fn binary_name(image: &str) -> Option<&str> {
    let without_digest = image.split('@').next().unwrap_or(image);
    let last = without_digest.rsplit('/').next().unwrap_or(without_digest);
    // A ':' in the last component is the tag (a registry's port is in an earlier one).
    let name = last.split(':').next().unwrap_or(last);
    (!name.is_empty()).then_some(name)
}

/// Why a container has nothing to run; the message names what was looked for and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotFound {
    /// Kubernetes' waiting reason: `ErrImagePull` for an image, `CreateContainerError`
    /// for a command.
    pub reason: &'static str,
    /// What was looked for, where, and how to fix it.
    pub message: String,
}

/// The executable for `container` and the arguments that precede its `args`: the
/// command if it sets one (absolute, or looked up in `bin_dir` then `path`), else the
/// image's binary from `bin_dir`.
pub fn resolve(
    container: &Container,
    bin_dir: &Path,
    path: &str,
) -> Result<(PathBuf, Vec<String>), NotFound> {
    if let Some(command) = container.command.as_ref().filter(|c| !c.is_empty()) {
        let program = &command[0];
        let found = if program.contains('/') {
            let p = PathBuf::from(program);
            is_executable(&p).then_some(p)
        } else {
            std::iter::once(bin_dir.to_path_buf())
                .chain(std::env::split_paths(path))
                .map(|dir| dir.join(program))
                .find(|p| is_executable(p))
        };
        return match found {
            Some(p) => Ok((p, command[1..].to_vec())),
            None => Err(NotFound {
                reason: "CreateContainerError",
                message: format!(
                    "container {:?}: command {program:?} is not an executable in {} or on PATH \
                     (the EventOps node agent runs commands as local processes)",
                    container.name,
                    bin_dir.display()
                ),
            }),
        };
    }
    let image = container.image.as_deref().unwrap_or_default();
    let Some(name) = binary_name(image) else {
        return Err(NotFound {
            reason: "ErrImagePull",
            message: format!(
                "container {:?} has neither an image nor a command",
                container.name
            ),
        });
    };
    let p = bin_dir.join(name);
    if is_executable(&p) {
        Ok((p, Vec::new()))
    } else {
        Err(NotFound {
            reason: "ErrImagePull",
            message: format!(
                "image {image:?}: no binary {name:?} in {} (the EventOps node agent runs the \
                 workspace binary named after the image's repository; build it with `cargo \
                 build`)",
                bin_dir.display()
            ),
        })
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_names_lose_registry_tag_and_digest() {
        for (image, name) in [
            (
                "ghcr.io/eventops/order-processing-inventory:0.1",
                "order-processing-inventory",
            ),
            ("inventory:1", "inventory"),
            ("inventory", "inventory"),
            ("localhost:5000/team/worker", "worker"),
            ("localhost:5000/worker:2@sha256:abc", "worker"),
            ("docker.io/library/busybox@sha256:0123", "busybox"),
        ] {
            assert_eq!(binary_name(image), Some(name), "{image}");
        }
        assert_eq!(binary_name(""), None);
    }

    fn container(image: &str, command: &[&str]) -> Container {
        Container {
            name: "c".into(),
            image: Some(image.into()),
            command: (!command.is_empty()).then(|| command.iter().map(|s| s.to_string()).collect()),
            ..Default::default()
        }
    }

    #[test]
    fn images_resolve_in_the_bin_dir_and_commands_on_path_too() {
        let dir = std::env::temp_dir().join(format!("node-agent-image-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bin = dir.join("worker");
        std::fs::write(&bin, "#!/bin/sh\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();

        let (p, pre) = resolve(&container("ghcr.io/x/worker:1", &[]), &dir, "").unwrap();
        assert_eq!((p, pre), (bin.clone(), vec![]));

        let err = resolve(&container("ghcr.io/x/missing:1", &[]), &dir, "").unwrap_err();
        assert_eq!(err.reason, "ErrImagePull");
        assert!(err.message.contains("\"missing\""), "{}", err.message);

        // The command wins over the image; bin dir first, then PATH.
        let (p, pre) = resolve(&container("ignored", &["worker", "-v"]), &dir, "/bin").unwrap();
        assert_eq!((p, pre), (bin, vec!["-v".to_string()]));
        let (p, _) = resolve(&container("ignored", &["sh", "-c"]), &dir, "/usr/bin:/bin").unwrap();
        assert!(p.ends_with("sh"));
        let err = resolve(&container("x", &["no-such-program"]), &dir, "/bin").unwrap_err();
        assert_eq!(err.reason, "CreateContainerError");
        assert!(err.message.contains("no-such-program"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
