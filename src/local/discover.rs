//! Which Spaces a folder holds.
//!
//! * `DIR/README.md` with front matter (`---` first): `DIR` itself is one Space repository.
//! * Otherwise, in `DIR` (sorted, hidden entries skipped):
//!   - `*.yaml` / `*.yml` files: Space manifests, the same YAML as the CRD
//!     (several documents per file; documents of other kinds are skipped);
//!   - a folder with `space.yaml` (or `space.yml`): its manifests; a Space
//!     there without `source` or `image` is built from that folder;
//!   - a folder whose `README.md` has front matter: a Space repository,
//!     named after the folder.
//!
//! A manifest's `source.git` that is a local path (relative to the manifest's
//! folder) is built from that folder's working tree, as it is on disk.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::builder::repo_tree::{RepoTree, TreeError};
use crate::proxy::SpaceKey;
use crate::space::{GitSource, Space, SpaceSpec};

/// File names of a folder's own manifest.
const FOLDER_MANIFESTS: [&str; 2] = ["space.yaml", "space.yml"];

/// Where a Space's image comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum Origin {
    /// A local folder, built from its working tree.
    Folder(PathBuf),
    /// A git repository URL (`https://`, `file://`...), built at its revision.
    Git(GitSource),
    /// A prebuilt image, run as it is.
    Image(String),
}

/// One Space of the folder.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalSpace {
    pub key: SpaceKey,
    pub spec: SpaceSpec,
    pub origin: Origin,
    /// The manifest or folder it was found in (for messages).
    pub found_in: PathBuf,
}

/// A folder that cannot be read as Spaces; the message names the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DiscoverError(pub String);

/// The Spaces in `dir`; `owner` is the namespace of those that name none.
pub fn discover(dir: &Path, owner: &str) -> Result<Vec<LocalSpace>, DiscoverError> {
    let io = |e: std::io::Error, p: &Path| DiscoverError(format!("{}: {e}", p.display()));
    let dir = dir.canonicalize().map_err(|e| io(e, dir))?;
    if !dir.is_dir() {
        return Err(DiscoverError(format!("{} is not a folder", dir.display())));
    }
    let mut spaces = Vec::new();
    if is_space_repo(&dir) {
        spaces.push(folder_space(&dir, owner)?);
    } else {
        let mut entries: Vec<PathBuf> =
            std::fs::read_dir(&dir).map_err(|e| io(e, &dir))?.filter_map(|e| e.ok().map(|e| e.path())).collect();
        entries.sort();
        for path in entries {
            let hidden = path.file_name().and_then(|n| n.to_str()).is_none_or(|n| n.starts_with('.'));
            if hidden {
                continue;
            }
            if path.is_file() && path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                spaces.extend(manifest_spaces(&path, owner, None)?);
            } else if path.is_dir() {
                if let Some(manifest) = FOLDER_MANIFESTS.iter().map(|m| path.join(m)).find(|m| m.is_file()) {
                    spaces.extend(manifest_spaces(&manifest, owner, Some(&path))?);
                } else if is_space_repo(&path) {
                    spaces.push(folder_space(&path, owner)?);
                }
            }
        }
    }
    let mut seen = BTreeSet::new();
    for s in &spaces {
        if !seen.insert(s.key.clone()) {
            return Err(DiscoverError(format!("Space {} is defined twice (again in {})", s.key, s.found_in.display())));
        }
    }
    Ok(spaces)
}

/// A folder whose README.md opens with front matter (a README without it is
/// documentation, like this folder's own). The README is read beneath the
/// folder only: one that links out of it (or is too large to read) is not
/// read, and the folder is taken as a Space whose build then says why.
fn is_space_repo(dir: &Path) -> bool {
    match RepoTree::open(dir).and_then(|t| t.read("README.md")) {
        Ok(Some(text)) => String::from_utf8_lossy(&text).trim_start_matches('\u{feff}').starts_with("---"),
        Ok(None) => false,
        Err(TreeError::Escape { .. } | TreeError::TooLarge { .. }) => true,
        Err(TreeError::Io { .. }) => false,
    }
}

fn folder_space(dir: &Path, owner: &str) -> Result<LocalSpace, DiscoverError> {
    let base = dir.file_name().and_then(|n| n.to_str()).unwrap_or("space");
    let name = dns_label(base)
        .ok_or_else(|| DiscoverError(format!("{}: cannot make a Space name of {base:?}", dir.display())))?;
    Ok(LocalSpace {
        key: SpaceKey::new(owner, name),
        spec: SpaceSpec { hardware: crate::space::hardware::DEFAULT_FLAVOR.to_owned(), ..SpaceSpec::default() },
        origin: Origin::Folder(dir.to_path_buf()),
        found_in: dir.to_path_buf(),
    })
}

/// `Hello World_2` -> `hello-world-2`: a DNS label, or `None` if nothing is left.
pub fn dns_label(text: &str) -> Option<String> {
    let mut out = String::new();
    for c in text.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    let out: String = out.trim_matches('-').chars().take(63).collect();
    let out = out.trim_end_matches('-').to_owned();
    (!out.is_empty()).then_some(out)
}

fn is_dns_label(s: &str) -> bool {
    dns_label(s).as_deref() == Some(s)
}

/// The Spaces of one manifest file. `folder`: the manifest is a folder's own
/// `space.yaml`, and Spaces without source or image are built from it.
fn manifest_spaces(path: &Path, owner: &str, folder: Option<&Path>) -> Result<Vec<LocalSpace>, DiscoverError> {
    let fail = |m: String| DiscoverError(format!("{}: {m}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut out = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(&text).enumerate() {
        let value = serde_json::Value::deserialize(doc).map_err(|e| fail(format!("document {}: {e}", i + 1)))?;
        if value.is_null() {
            continue;
        }
        let (api, kind) = (value["apiVersion"].as_str().unwrap_or(""), value["kind"].as_str().unwrap_or(""));
        if kind != "Space" || !api.starts_with("hangar.dev/") {
            tracing::info!(file = %path.display(), api, kind, "skipping a document that is not a Space");
            continue;
        }
        if api != "hangar.dev/v1alpha1" {
            return Err(fail(format!("document {}: apiVersion {api} is not hangar.dev/v1alpha1", i + 1)));
        }
        let space: Space = serde_path_to_error::deserialize(&value)
            .map_err(|e| fail(format!("document {}: {} at {}", i + 1, e.inner(), e.path())))?;
        let name = space.metadata.name.clone().unwrap_or_default();
        let namespace = space.metadata.namespace.clone().unwrap_or_else(|| owner.to_owned());
        for (what, v) in [("metadata.name", &name), ("metadata.namespace", &namespace)] {
            if !is_dns_label(v) {
                return Err(fail(format!("{what} {v:?} must be a DNS label (a-z, 0-9, '-')")));
            }
        }
        let spec = space.spec;
        let origin = match (&spec.source, &spec.image, folder) {
            (Some(_), Some(_), _) => {
                return Err(fail(format!("Space {name}: set spec.source or spec.image, not both")));
            }
            (None, Some(image), _) => Origin::Image(image.clone()),
            (Some(src), None, _) if src.git.contains("://") => Origin::Git(src.clone()),
            (Some(src), None, _) => {
                let dir = base.join(&src.git);
                if !dir.is_dir() {
                    return Err(fail(format!("Space {name}: spec.source.git {:?} is not a folder", src.git)));
                }
                Origin::Folder(dir.canonicalize().map_err(|e| fail(e.to_string()))?)
            }
            (None, None, Some(dir)) => Origin::Folder(dir.to_path_buf()),
            (None, None, None) => return Err(fail(format!("Space {name}: spec.source or spec.image is required"))),
        };
        out.push(LocalSpace { key: SpaceKey::new(namespace, name), spec, origin, found_in: path.to_path_buf() });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, text: &str) {
        if let Some(p) = path.parent() {
            std::fs::create_dir_all(p).expect("mkdir");
        }
        std::fs::write(path, text).expect("write");
    }

    #[test]
    fn labels() {
        assert_eq!(dns_label("Hello World_2").as_deref(), Some("hello-world-2"));
        assert_eq!(dns_label("--x--").as_deref(), Some("x"));
        assert_eq!(dns_label("___"), None);
        assert!(is_dns_label("static-site"));
        assert!(!is_dns_label("Static"));
    }

    #[test]
    fn finds_folders_manifests_and_skips_the_rest() {
        let tmp = tempfile::tempdir().expect("tmp");
        let d = tmp.path();
        write(&d.join("Static Site/README.md"), "---\nsdk: static\n---\n");
        write(&d.join("notes/todo.txt"), "not a Space");
        write(&d.join("docs/README.md"), "# just documentation");
        write(&d.join("README.md"), "# the folder's own documentation");
        write(&d.join(".hidden/README.md"), "---\nsdk: static\n---\n");
        write(
            &d.join("echo/space.yaml"),
            "apiVersion: hangar.dev/v1alpha1\nkind: Space\nmetadata: {name: echo}\nspec: {sleepAfter: 3s}\n",
        );
        write(
            &d.join("more.yaml"),
            "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\n---\n\
             apiVersion: hangar.dev/v1alpha1\nkind: Space\nmetadata: {name: img, namespace: bob}\nspec: {image: 'x:1'}\n---\n\
             apiVersion: hangar.dev/v1alpha1\nkind: Space\nmetadata: {name: rel}\nspec: {source: {git: 'Static Site'}}\n---\n\
             apiVersion: hangar.dev/v1alpha1\nkind: Space\nmetadata: {name: remote}\nspec: {source: {git: 'https://h/r.git', revision: v1}}\n",
        );
        let spaces = discover(d, "local").expect("discovers");
        let keys: Vec<String> = spaces.iter().map(|s| s.key.to_string()).collect();
        assert_eq!(keys, ["local/static-site", "local/echo", "bob/img", "local/rel", "local/remote"]);
        let root = d.canonicalize().expect("canonical");
        assert_eq!(spaces[0].origin, Origin::Folder(root.join("Static Site")));
        assert_eq!(spaces[1].origin, Origin::Folder(root.join("echo")));
        assert_eq!(spaces[1].spec.sleep_after.as_deref(), Some("3s"));
        assert_eq!(spaces[2].origin, Origin::Image("x:1".into()));
        assert_eq!(spaces[3].origin, Origin::Folder(root.join("Static Site")));
        assert!(matches!(&spaces[4].origin, Origin::Git(g) if g.revision == "v1"));
    }

    #[test]
    fn a_readme_linking_out_of_its_folder_is_not_read() {
        let tmp = tempfile::tempdir().expect("tmp");
        let d = tmp.path().join("spaces");
        write(&tmp.path().join("outside.md"), "# not front matter: must not decide anything\n");
        std::fs::create_dir_all(d.join("linked")).expect("mkdir");
        std::os::unix::fs::symlink(tmp.path().join("outside.md"), d.join("linked/README.md")).expect("symlink");
        write(&d.join("inside/docs/README.md"), "---\nsdk: static\n---\n");
        std::os::unix::fs::symlink("docs/README.md", d.join("inside/README.md")).expect("symlink");
        let spaces = discover(&d, "me").expect("discovers");
        let keys: Vec<String> = spaces.iter().map(|s| s.key.to_string()).collect();
        // `linked` is a Space (its build refuses the link, by name); `inside` follows its link.
        assert_eq!(keys, ["me/inside", "me/linked"]);
    }

    #[test]
    fn a_repo_folder_is_one_space() {
        let tmp = tempfile::tempdir().expect("tmp");
        let d = tmp.path().join("my_app");
        write(&d.join("README.md"), "---\nsdk: static\n---\n");
        write(&d.join("sub/README.md"), "---\nsdk: static\n---\n");
        let spaces = discover(&d, "me").expect("discovers");
        assert_eq!(spaces.len(), 1);
        assert_eq!(spaces[0].key, SpaceKey::new("me", "my-app"));
    }

    #[test]
    fn errors_name_the_file() {
        let tmp = tempfile::tempdir().expect("tmp");
        let d = tmp.path();
        write(
            &d.join("bad.yaml"),
            "apiVersion: hangar.dev/v1alpha1\nkind: Space\nmetadata: {name: Bad_Name}\nspec: {image: x}\n",
        );
        let e = discover(d, "local").expect_err("invalid name");
        assert!(e.0.contains("bad.yaml") && e.0.contains("DNS label"), "{e}");
        std::fs::remove_file(d.join("bad.yaml")).expect("rm");
        write(
            &d.join("a.yaml"),
            "apiVersion: hangar.dev/v1alpha1\nkind: Space\nmetadata: {name: x}\nspec: {image: x}\n",
        );
        write(
            &d.join("b.yaml"),
            "apiVersion: hangar.dev/v1alpha1\nkind: Space\nmetadata: {name: x}\nspec: {image: y}\n",
        );
        assert!(discover(d, "local").expect_err("twice").0.contains("twice"));
        std::fs::remove_file(d.join("b.yaml")).expect("rm");
        write(&d.join("c.yaml"), "apiVersion: hangar.dev/v1alpha1\nkind: Space\nmetadata: {name: c}\nspec: {}\n");
        assert!(discover(d, "local").expect_err("no source").0.contains("required"));
    }
}
