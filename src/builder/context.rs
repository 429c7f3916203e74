//! The build context: the checkout (without `.git`) plus the plan's generated
//! files, as a tar written to disk and streamed to the engine (a big
//! repository never sits in memory).

use std::fs::File;
use std::io::{self, BufWriter};
use std::path::Path;

use super::plan::{BuildPlan, EXTRA_CA_PATH};
use super::repo_tree::{EntryKind, RepoTree, TreeError};

/// Writes the context tar of `checkout` for `plan` to `out`. Entries are
/// normalized (owner root, mtime 0, mode 0644/0755) so the same commit gives
/// the same context. Symlinks are packed as symlinks, and only those that
/// stay inside the checkout; files are read beneath it (see
/// [`super::repo_tree`]). Blocking: call from `spawn_blocking`.
pub fn write_context(checkout: &Path, plan: &BuildPlan, extra_ca: Option<&[u8]>, out: &Path) -> Result<(), TreeError> {
    let io_err = |source: io::Error| TreeError::Io { path: out.display().to_string(), source };
    let file = File::create(out).map_err(io_err)?;
    let mut tar = tar::Builder::new(BufWriter::new(file));
    tar.follow_symlinks(false);
    let mut generated: Vec<(String, Vec<u8>)> = Vec::new();
    if let Some(d) = &plan.dockerfile {
        generated.push((plan.dockerfile_path.clone(), d.clone().into_bytes()));
    }
    if let Some(ignore) = &plan.dockerignore {
        generated.push((".dockerignore".to_owned(), ignore.clone().into_bytes()));
    }
    if let Some(ca) = extra_ca {
        generated.push((EXTRA_CA_PATH.to_owned(), ca.to_vec()));
    }
    let overridden: Vec<&str> = generated.iter().map(|(p, _)| p.as_str()).collect();
    let tree = RepoTree::open(checkout)?;
    for (rel, kind) in tree.walk(&overridden)? {
        let append = |e: io::Error| TreeError::Io { path: rel.clone(), source: e };
        let mut header = tar::Header::new_gnu();
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        match kind {
            EntryKind::Symlink(target) => {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_mode(0o777);
                header.set_size(0);
                tar.append_link(&mut header, &rel, target).map_err(append)?;
            }
            EntryKind::Dir => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(0o755);
                header.set_size(0);
                tar.append_data(&mut header, &rel, io::empty()).map_err(append)?;
            }
            EntryKind::File => {
                let file = tree.open_file(&rel)?;
                let meta = file.metadata().map_err(append)?;
                header.set_metadata_in_mode(&meta, tar::HeaderMode::Deterministic);
                header.set_uid(0);
                header.set_gid(0);
                header.set_mtime(0);
                tar.append_data(&mut header, &rel, file).map_err(append)?;
            }
        }
    }
    for (rel, bytes) in generated {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_size(bytes.len() as u64);
        tar.append_data(&mut header, &rel, bytes.as_slice()).map_err(io_err)?;
    }
    let file = tar.into_inner().map_err(io_err)?.into_inner().map_err(|e| io_err(e.into_error()))?;
    file.sync_all().map_err(io_err)
}
