//! A checkout's files, read without ever leaving the checkout.
//!
//! A Space's owner controls its repository, symlinks included: a
//! `.dockerignore` or `README.md` linking to `/proc/self/environ` or the
//! operator's service account token would, read with `fs::read`, put that
//! file into the generated build context and so into the image. So:
//!
//! * Every symlink in the tree is checked before anything is read or packed:
//!   one that leaves the checkout (absolute, `..` out of it, through another
//!   symlink or a symlinked directory, or a loop) refuses the whole build,
//!   naming the file ([`TreeError::Escape`]). A symlink that stays inside is
//!   kept as a symlink in the build context, as git checks it out (the engine
//!   resolves it inside the context, never on its host), and a dangling one
//!   that stays inside is kept too (it reads nothing).
//! * Every read goes through a [`cap_std::fs::Dir`] of the checkout, which
//!   resolves each path component itself beneath that directory (`openat2`
//!   `RESOLVE_BENEATH` where the kernel has it): even a file swapped for a
//!   symlink after the check cannot make a read leave the root (no TOCTOU).
//!   Symlinks inside the checkout are followed for the files hangar itself
//!   reads (README.md, .dockerignore).

use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

use cap_std::fs::Dir;

/// Most bytes read of README.md or .dockerignore (a front matter is small;
/// a huge file is not held in memory).
pub const MAX_READ: u64 = 1 << 20;

/// What stands at a path of the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    File,
    /// A symlink that stays inside the checkout (or dangles inside it), with its target.
    Symlink(PathBuf),
}

/// Why a tree cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    /// A symlink leaves the checkout: the build is refused.
    #[error(
        "{path} is a symlink to {target:?}, which leaves the repository ({why}): hangar reads nothing outside a \
         Space's repository; make it a regular file or a symlink within the repository"
    )]
    Escape { path: String, target: String, why: String },
    /// README.md or .dockerignore over [`MAX_READ`].
    #[error("{path} is larger than {} bytes", MAX_READ)]
    TooLarge { path: String },
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
}

/// The checkout at `root`, opened once; every read stays beneath it.
pub struct RepoTree {
    dir: Dir,
    root: PathBuf,
}

impl RepoTree {
    /// Opens `root` (a directory the builder made). Blocking.
    pub fn open(root: &Path) -> Result<Self, TreeError> {
        let dir = Dir::open_ambient_dir(root, cap_std::ambient_authority())
            .map_err(|source| TreeError::Io { path: root.display().to_string(), source })?;
        Ok(Self { dir, root: root.to_path_buf() })
    }

    /// Every entry below the root but `.git` (and the `skip`ped paths),
    /// `/`-separated and sorted; symlinked directories are not descended.
    /// Fails on the first symlink (in that order) that leaves the checkout. Blocking.
    pub fn walk(&self, skip: &[&str]) -> Result<Vec<(String, EntryKind)>, TreeError> {
        let mut found = Vec::new();
        let mut stack: Vec<String> = vec![String::new()];
        while let Some(dir) = stack.pop() {
            let io = |source| TreeError::Io { path: display(&dir), source };
            let entries = if dir.is_empty() { self.dir.entries() } else { self.dir.read_dir(&dir) }.map_err(io)?;
            for entry in entries {
                let entry = entry.map_err(io)?;
                let name = entry.file_name().to_string_lossy().into_owned();
                let rel = if dir.is_empty() { name } else { format!("{dir}/{name}") };
                if rel == ".git" || skip.contains(&rel.as_str()) {
                    continue;
                }
                let kind = entry.file_type().map_err(|source| TreeError::Io { path: rel.clone(), source })?;
                if kind.is_dir() {
                    stack.push(rel.clone());
                }
                found.push((rel, kind));
            }
        }
        found.sort_by(|a, b| a.0.cmp(&b.0));
        found
            .into_iter()
            .map(|(rel, kind)| {
                let kind = if kind.is_symlink() {
                    EntryKind::Symlink(self.check_symlink(&rel)?)
                } else if kind.is_dir() {
                    EntryKind::Dir
                } else {
                    EntryKind::File
                };
                Ok((rel, kind))
            })
            .collect()
    }

    /// The target of the symlink at `rel`, if it stays inside the checkout.
    fn check_symlink(&self, rel: &str) -> Result<PathBuf, TreeError> {
        // The link's own text (readlink follows nothing): for the lexical
        // check and the message.
        let target =
            std::fs::read_link(self.root.join(rel)).map_err(|source| TreeError::Io { path: rel.to_owned(), source })?;
        let escape = |why: &str| TreeError::Escape {
            path: rel.to_owned(),
            target: target.display().to_string(),
            why: why.to_owned(),
        };
        if let Some(why) = lexical_escape(rel, &target) {
            return Err(escape(why));
        }
        // The lexical check misses chains (`l -> d/..` with `d -> .`): resolve
        // for real, beneath the root.
        match self.dir.metadata(rel) {
            Ok(_) => Ok(target),
            // Dangling inside the checkout: reads nothing, kept.
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(target),
            Err(e) => Err(escape(&format!("resolving it: {e}"))),
        }
    }

    /// The content of the file at `rel` (following symlinks inside the
    /// checkout only), `None` if there is none. At most [`MAX_READ`] bytes.
    pub fn read(&self, rel: &str) -> Result<Option<Vec<u8>>, TreeError> {
        let file = match self.dir.open(rel) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(self.open_error(rel, source)),
        };
        let mut bytes = Vec::new();
        file.take(MAX_READ + 1)
            .read_to_end(&mut bytes)
            .map_err(|source| TreeError::Io { path: rel.to_owned(), source })?;
        if bytes.len() as u64 > MAX_READ {
            return Err(TreeError::TooLarge { path: rel.to_owned() });
        }
        Ok(Some(bytes))
    }

    /// Opens the regular file at `rel` for reading, beneath the root.
    pub fn open_file(&self, rel: &str) -> Result<std::fs::File, TreeError> {
        let file = self.dir.open(rel).map_err(|source| self.open_error(rel, source))?;
        Ok(file.into_std())
    }

    /// An open that failed: a symlink leaving the root (swapped in after the
    /// walk, or met on the way) says so, anything else is I/O.
    fn open_error(&self, rel: &str, source: io::Error) -> TreeError {
        match std::fs::symlink_metadata(self.root.join(rel)) {
            Ok(m) if m.file_type().is_symlink() => match self.check_symlink(rel) {
                Err(escape @ TreeError::Escape { .. }) => escape,
                _ => TreeError::Io { path: rel.to_owned(), source },
            },
            _ => TreeError::Io { path: rel.to_owned(), source },
        }
    }
}

fn display(dir: &str) -> String {
    if dir.is_empty() { ".".to_owned() } else { dir.to_owned() }
}

/// Why the symlink at `link` (relative to the checkout, `/`-separated) with
/// target `target` leaves the checkout by its text alone, if it does:
/// an absolute target, or `..` climbing above the root. Pure.
pub fn lexical_escape(link: &str, target: &Path) -> Option<&'static str> {
    // Depth of the link's directory below the root.
    let mut depth = link.split('/').filter(|c| !c.is_empty() && *c != ".").count().saturating_sub(1) as i64;
    for component in target.components() {
        match component {
            Component::RootDir | Component::Prefix(_) => return Some("an absolute path"),
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return Some("`..` climbs out of it");
                }
            }
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn lexical_escapes() {
        let p = Path::new;
        assert_eq!(lexical_escape(".dockerignore", p("/var/run/secrets/token")), Some("an absolute path"));
        assert_eq!(lexical_escape("README.md", p("../outside")), Some("`..` climbs out of it"));
        assert_eq!(lexical_escape("a/b/link", p("../../../x")), Some("`..` climbs out of it"));
        assert_eq!(lexical_escape("a/link", p("sub/../../../x")), Some("`..` climbs out of it"));
        assert_eq!(lexical_escape("a/b/link", p("../../x")), None);
        assert_eq!(lexical_escape("link", p("./docs/README.md")), None);
        assert_eq!(lexical_escape("link", p("d/..")), None, "lexically inside; the real resolution decides");
    }

    /// A checkout with an outside file next to it: (tempdir, root, outside file).
    fn tree() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path().join("repo");
        std::fs::create_dir_all(root.join("docs")).expect("mkdir");
        std::fs::write(root.join("docs/guide.md"), "inside").expect("write");
        let outside = tmp.path().join("secret");
        std::fs::write(&outside, "OUTSIDE-SECRET").expect("write");
        (tmp, root, outside)
    }

    fn refused(root: &Path, name: &str) -> String {
        let t = RepoTree::open(root).expect("open");
        match t.walk(&[]) {
            Err(e @ TreeError::Escape { .. }) => {
                let msg = e.to_string();
                assert!(msg.starts_with(&format!("{name} is a symlink")), "{msg}");
                msg
            }
            other => panic!("{name}: expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn symlinks_leaving_the_checkout_are_refused_by_name() {
        let (_tmp, root, outside) = tree();
        symlink(&outside, root.join(".dockerignore")).expect("symlink");
        let msg = refused(&root, ".dockerignore");
        assert!(!msg.contains("OUTSIDE-SECRET"), "{msg}");
        std::fs::remove_file(root.join(".dockerignore")).expect("rm");

        symlink("../secret", root.join("docs/../README.md")).expect("symlink");
        refused(&root, "README.md");
        std::fs::remove_file(root.join("README.md")).expect("rm");

        // A chain: each link alone looks inside, together they leave.
        symlink(".", root.join("here")).expect("symlink");
        symlink("here/../secret", root.join("app.py")).expect("symlink");
        refused(&root, "app.py");
        std::fs::remove_file(root.join("app.py")).expect("rm");

        // A chain through an inside link to an outside one: the outside one is named.
        symlink("/etc", root.join("docs/etc")).expect("symlink");
        symlink("docs/etc/hostname", root.join("hostname")).expect("symlink");
        let msg = refused(&root, "docs/etc");
        assert!(msg.contains("absolute"), "{msg}");
        std::fs::remove_file(root.join("docs/etc")).expect("rm");
        std::fs::remove_file(root.join("hostname")).expect("rm");

        // A symlinked directory leaving the checkout.
        symlink("../..", root.join("docs/up")).expect("symlink");
        refused(&root, "docs/up");
        std::fs::remove_file(root.join("docs/up")).expect("rm");

        // A loop never resolves: refused too.
        symlink("loop-b", root.join("loop-a")).expect("symlink");
        symlink("loop-a", root.join("loop-b")).expect("symlink");
        refused(&root, "loop-a");
    }

    #[test]
    fn symlinks_inside_are_kept_and_followed_for_reads() {
        let (_tmp, root, _outside) = tree();
        symlink("docs/guide.md", root.join("README.md")).expect("symlink");
        symlink("docs", root.join("manual")).expect("symlink");
        symlink("missing.txt", root.join("dangling")).expect("symlink");
        std::fs::create_dir_all(root.join(".git")).expect("mkdir");
        std::fs::write(root.join(".git/config"), "x").expect("write");
        let t = RepoTree::open(&root).expect("open");
        let entries = t.walk(&[]).expect("walk");
        assert_eq!(
            entries,
            [
                ("README.md".to_owned(), EntryKind::Symlink("docs/guide.md".into())),
                ("dangling".to_owned(), EntryKind::Symlink("missing.txt".into())),
                ("docs".to_owned(), EntryKind::Dir),
                ("docs/guide.md".to_owned(), EntryKind::File),
                ("manual".to_owned(), EntryKind::Symlink("docs".into())),
            ]
        );
        assert_eq!(t.read("README.md").expect("read").as_deref(), Some(&b"inside"[..]));
        assert_eq!(t.read("manual/guide.md").expect("read").as_deref(), Some(&b"inside"[..]));
        assert_eq!(t.read("absent").expect("read"), None);
    }

    #[test]
    fn reads_never_leave_the_root_even_after_the_walk() {
        let (_tmp, root, outside) = tree();
        let t = RepoTree::open(&root).expect("open");
        t.walk(&[]).expect("clean tree");
        // Swapped in after the check: the read itself refuses.
        symlink(&outside, root.join(".dockerignore")).expect("symlink");
        let e = t.read(".dockerignore").expect_err("refused");
        assert!(matches!(e, TreeError::Escape { ref path, .. } if path == ".dockerignore"), "{e}");
        symlink("../..", root.join("docs/up")).expect("symlink");
        assert_eq!(std::fs::read(root.join("docs/up/secret")).expect("plain fs follows"), b"OUTSIDE-SECRET");
        assert!(t.open_file("docs/up/secret").is_err());
        assert!(t.read("docs/up/secret").is_err());
        // Oversized reads stop at the limit.
        std::fs::write(root.join("README.md"), vec![b'x'; MAX_READ as usize + 1]).expect("write");
        assert!(matches!(t.read("README.md"), Err(TreeError::TooLarge { .. })));
    }
}
