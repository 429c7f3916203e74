//! The build context: the checkout (without `.git`) plus the plan's generated
//! files, as a tar written to disk and streamed to the engine (a big
//! repository never sits in memory).

use std::fs::File;
use std::io::{self, BufWriter};
use std::path::Path;

use super::plan::{BuildPlan, EXTRA_CA_PATH};
use super::source::relative;

/// Writes the context tar of `checkout` for `plan` to `out`. Entries are
/// normalized (owner root, mtime 0, mode 0644/0755) so the same commit gives
/// the same context. Blocking: call from `spawn_blocking`.
pub fn write_context(checkout: &Path, plan: &BuildPlan, extra_ca: Option<&[u8]>, out: &Path) -> io::Result<()> {
    let mut tar = tar::Builder::new(BufWriter::new(File::create(out)?));
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
    let mut stack = vec![checkout.to_path_buf()];
    let mut entries = Vec::new();
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let path = entry.path();
            let rel = relative(checkout, &path);
            if rel == ".git" || overridden.contains(&rel.as_str()) {
                continue;
            }
            if entry.file_type()?.is_dir() {
                stack.push(path.clone());
            }
            entries.push((rel, path));
        }
    }
    entries.sort();
    for (rel, path) in entries {
        let meta = std::fs::symlink_metadata(&path)?;
        let mut header = tar::Header::new_gnu();
        header.set_metadata_in_mode(&meta, tar::HeaderMode::Deterministic);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&path)?;
            header.set_size(0);
            tar.append_link(&mut header, &rel, target)?;
        } else if meta.is_dir() {
            header.set_size(0);
            tar.append_data(&mut header, &rel, io::empty())?;
        } else {
            tar.append_data(&mut header, &rel, File::open(&path)?)?;
        }
    }
    for (rel, bytes) in generated {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_size(bytes.len() as u64);
        tar.append_data(&mut header, &rel, bytes.as_slice())?;
    }
    tar.into_inner()?.into_inner().map_err(|e| e.into_error())?.sync_all()
}
