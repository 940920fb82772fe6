//! CRIU's page images, just enough to fold a pre-dump round into the first.
//!
//! A pre-dump round's `pagemap-*.img` lists every page of the process:
//! those it dumped (flag PE_PRESENT, their bytes in `pages-<id>.img` in
//! list order) and those unchanged since the round before (PE_PARENT, to be
//! looked up in the `parent` directory). A restore at the end of a long
//! chain reads each page from the newest round holding it: after random
//! writes, thousands of small reads through several images.
//!
//! [`fold_into_base`] copies a later round's pages over their older copies
//! in round 1's own `pages-*.img`, so that round 1 alone holds the newest
//! content and the later round can go: the next round's (or the final
//! dump's) parent is then round 1 itself. This is only possible when every
//! page the later round holds is already in round 1 (no new mappings, no
//! new processes); otherwise nothing is written and the chain stays.
//!
//! Format facts (CRIU's images/pagemap.proto, criu/include/magic.h): a
//! file starts with two little-endian u32 magics, IMG_COMMON_MAGIC then
//! PAGEMAP_MAGIC, followed by entries, each a u32 length and a protobuf
//! message: one `pagemap_head`, then `pagemap_entry`s.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
const PAGEMAP_MAGIC: u32 = 0x5608_4025;
const PAGE_SIZE: u64 = 4096;
/// Flags of `pagemap_entry.flags`.
const PE_PARENT: u32 = 1 << 0;
const PE_PRESENT: u32 = 1 << 2;

#[derive(Debug, thiserror::Error)]
pub enum PagemapError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a CRIU pagemap image: {why}")]
    Malformed { path: PathBuf, why: String },
}

#[derive(Clone, PartialEq, prost::Message)]
struct PagemapHead {
    #[prost(uint32, required, tag = "1")]
    pages_id: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PagemapEntry {
    #[prost(uint64, required, tag = "1")]
    vaddr: u64,
    #[prost(uint32, required, tag = "2")]
    compat_nr_pages: u32,
    #[prost(bool, optional, tag = "3")]
    in_parent: Option<bool>,
    #[prost(uint32, optional, tag = "4")]
    flags: Option<u32>,
    #[prost(uint64, optional, tag = "5")]
    nr_pages: Option<u64>,
}

/// A pagemap image built in memory, for pages that never touch a local
/// file (the page-server relay): the two magics, a head naming the pages
/// file, then one entry per run in the order the pages file holds them.
#[derive(Debug)]
pub struct PagemapImageBuilder {
    bytes: Vec<u8>,
    /// Where the next run may start: entries must be in address order.
    next_vaddr: u64,
}

impl PagemapImageBuilder {
    pub fn new(pages_id: u32) -> Self {
        let mut bytes = Vec::with_capacity(256);
        bytes.extend_from_slice(&IMG_COMMON_MAGIC.to_le_bytes());
        bytes.extend_from_slice(&PAGEMAP_MAGIC.to_le_bytes());
        let mut b = Self { bytes, next_vaddr: 0 };
        b.push_message(&PagemapHead { pages_id });
        b
    }

    /// Adds a run of `pages` pages at `vaddr` with CRIU's `flags`; refuses
    /// a run that is unaligned, overflows or goes back in the address space.
    pub fn push(&mut self, vaddr: u64, pages: u64, flags: u32) -> Result<(), String> {
        let end = pages.checked_mul(PAGE_SIZE).and_then(|len| vaddr.checked_add(len));
        let Some(end) = end.filter(|_| vaddr.is_multiple_of(PAGE_SIZE) && pages > 0) else {
            return Err(format!("pagemap run of {pages} pages at {vaddr:#x} is empty, unaligned or past the address space"));
        };
        if vaddr < self.next_vaddr {
            return Err(format!("pagemap run at {vaddr:#x} goes back below {:#x}", self.next_vaddr));
        }
        self.next_vaddr = end;
        self.push_message(&PagemapEntry { vaddr, compat_nr_pages: 0, in_parent: None, flags: Some(flags), nr_pages: Some(pages) });
        Ok(())
    }

    fn push_message<M: prost::Message>(&mut self, m: &M) {
        self.bytes.extend_from_slice(&(m.encoded_len() as u32).to_le_bytes());
        m.encode(&mut self.bytes).expect("a Vec grows as needed");
    }

    /// The image file's bytes.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
}

/// `pagemap_entry.flags` bit: the run's bytes follow in the pages file.
pub const FLAG_PRESENT: u32 = PE_PRESENT;

/// A run of pages whose bytes are in the pages file, at `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PresentRun {
    vaddr: u64,
    pages: u64,
    offset: u64,
}

/// One pagemap image: its pages file's id and the runs that file holds.
#[derive(Debug)]
struct Pagemap {
    pages_id: u32,
    present: Vec<PresentRun>,
}

impl Pagemap {
    fn read(path: &Path) -> Result<Self, PagemapError> {
        let bytes = std::fs::read(path).map_err(|source| PagemapError::Io { path: path.to_path_buf(), source })?;
        let bad = |why: String| PagemapError::Malformed { path: path.to_path_buf(), why };
        let u32_at = |at: usize| bytes.get(at..at + 4).map(|b| u32::from_le_bytes(b.try_into().unwrap()));
        if u32_at(0) != Some(IMG_COMMON_MAGIC) || u32_at(4) != Some(PAGEMAP_MAGIC) {
            return Err(bad("wrong magic".into()));
        }
        let mut at = 8;
        let mut next = || -> Result<Option<&[u8]>, PagemapError> {
            if at == bytes.len() {
                return Ok(None);
            }
            let len = u32_at(at).ok_or_else(|| bad("truncated entry length".into()))? as usize;
            let entry = bytes.get(at + 4..at + 4 + len).ok_or_else(|| bad("truncated entry".into()))?;
            at += 4 + len;
            Ok(Some(entry))
        };
        let head = next()?.ok_or_else(|| bad("no head".into()))?;
        let head = <PagemapHead as prost::Message>::decode(head).map_err(|e| bad(e.to_string()))?;
        let mut present = Vec::new();
        let mut offset = 0u64;
        let mut last_end = 0u64;
        while let Some(entry) = next()? {
            let e = <PagemapEntry as prost::Message>::decode(entry).map_err(|e| bad(e.to_string()))?;
            let pages = e.nr_pages.unwrap_or(e.compat_nr_pages as u64);
            // Images without flags (older CRIU) say it with in_parent.
            let flags = e.flags.unwrap_or(if e.in_parent == Some(true) { PE_PARENT } else { PE_PRESENT });
            let end = pages.checked_mul(PAGE_SIZE).and_then(|len| e.vaddr.checked_add(len));
            let end = end.ok_or_else(|| bad("entry runs past the address space".into()))?;
            if e.vaddr % PAGE_SIZE != 0 || e.vaddr < last_end {
                return Err(bad(format!("entry at {:#x} is unaligned or out of order", e.vaddr)));
            }
            last_end = end;
            if flags & PE_PRESENT != 0 && flags & PE_PARENT == 0 {
                present.push(PresentRun { vaddr: e.vaddr, pages, offset });
                offset += pages * PAGE_SIZE;
            }
        }
        Ok(Pagemap { pages_id: head.pages_id, present })
    }

    /// Where each page of `vaddr..vaddr + pages` is in this image's pages
    /// file, as (offset, page count) pieces; None if any page is not here.
    fn locate(&self, vaddr: u64, pages: u64) -> Option<Vec<(u64, u64)>> {
        let mut pieces = Vec::new();
        let (mut addr, end) = (vaddr, vaddr + pages * PAGE_SIZE);
        while addr < end {
            let i = self.present.partition_point(|r| r.vaddr + r.pages * PAGE_SIZE <= addr);
            let run = self.present.get(i).filter(|r| r.vaddr <= addr)?;
            let run_end = run.vaddr + run.pages * PAGE_SIZE;
            let piece_end = run_end.min(end);
            pieces.push((run.offset + (addr - run.vaddr), (piece_end - addr) / PAGE_SIZE));
            addr = piece_end;
        }
        Some(pieces)
    }
}

/// Bytes to copy from the later round's pages file to round 1's.
struct PageCopy {
    from: u64,
    to: u64,
    len: u64,
}

/// What [`fold_into_base`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Fold {
    /// Round 1's pages now hold the later round's; it is no longer needed.
    Folded { bytes: u64 },
    /// Nothing was written: the later round holds pages round 1 does not.
    NotFoldable(String),
}

/// Copies the pages `later` (a pre-dump round directory) holds over their
/// copies in `base` (round 1's directory), if `base` has every one of them.
pub fn fold_into_base(base: &Path, later: &Path) -> Result<Fold, PagemapError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PagemapError::Io { path, source }
    };
    // Plan everything before writing anything: copies by (later round's,
    // round 1's) pages file id.
    let mut copies: BTreeMap<(u32, u32), Vec<PageCopy>> = BTreeMap::new();
    for entry in std::fs::read_dir(later).map_err(io(later))? {
        let name = entry.map_err(io(later))?.file_name().to_string_lossy().into_owned();
        if !(name.starts_with("pagemap-") && name.ends_with(".img")) {
            continue;
        }
        let newer = Pagemap::read(&later.join(&name))?;
        if newer.present.is_empty() {
            continue;
        }
        let older_path = base.join(&name);
        if !older_path.exists() {
            return Ok(Fold::NotFoldable(format!("{name} is not in round 1 (a new process or memory object)")));
        }
        let older = Pagemap::read(&older_path)?;
        let plan = copies.entry((newer.pages_id, older.pages_id)).or_default();
        for run in &newer.present {
            let Some(pieces) = older.locate(run.vaddr, run.pages) else {
                return Ok(Fold::NotFoldable(format!("{name}: pages at {:#x} are not in round 1 (new memory)", run.vaddr)));
            };
            let mut from = run.offset;
            for (to, pages) in pieces {
                plan.push(PageCopy { from, to, len: pages * PAGE_SIZE });
                from += pages * PAGE_SIZE;
            }
        }
    }
    let mut bytes = 0;
    let mut buf = vec![0u8; 1 << 20];
    for ((newer_id, older_id), plan) in copies {
        let from_path = later.join(format!("pages-{newer_id}.img"));
        let to_path = base.join(format!("pages-{older_id}.img"));
        let from = File::open(&from_path).map_err(io(&from_path))?;
        let to = std::fs::OpenOptions::new().write(true).open(&to_path).map_err(io(&to_path))?;
        let to_len = to.metadata().map_err(io(&to_path))?.len();
        for PageCopy { from: mut src, to: mut dst, len } in plan {
            if dst + len > to_len {
                return Err(PagemapError::Malformed { path: to_path, why: "shorter than its pagemap says".into() });
            }
            let end = src + len;
            while src < end {
                let n = ((end - src) as usize).min(buf.len());
                from.read_exact_at(&mut buf[..n], src).map_err(io(&from_path))?;
                to.write_all_at(&buf[..n], dst).map_err(io(&to_path))?;
                src += n as u64;
                dst += n as u64;
                bytes += n as u64;
            }
        }
    }
    Ok(Fold::Folded { bytes })
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    /// Writes a pagemap image (entries: vaddr page, pages, flags) and its
    /// pages file, each present page filled with `fill(vaddr)`.
    fn write_round(dir: &Path, pid: u32, pages_id: u32, entries: &[(u64, u64, u32)], fill: impl Fn(u64) -> u8) {
        let mut img = PagemapImageBuilder::new(pages_id);
        let mut pages = Vec::new();
        for &(page, n, flags) in entries {
            let vaddr = page * PAGE_SIZE;
            img.push(vaddr, n, flags).unwrap();
            if flags & PE_PRESENT != 0 {
                for p in 0..n {
                    pages.extend(std::iter::repeat_n(fill(vaddr + p * PAGE_SIZE), PAGE_SIZE as usize));
                }
            }
        }
        std::fs::write(dir.join(format!("pagemap-{pid}.img")), img.into_bytes()).unwrap();
        std::fs::write(dir.join(format!("pages-{pages_id}.img")), pages).unwrap();
    }

    /// The byte each page of `vaddr`s holds in `dir`'s pages file.
    fn page_bytes(dir: &Path, pid: u32) -> Vec<(u64, u8)> {
        let map = Pagemap::read(&dir.join(format!("pagemap-{pid}.img"))).unwrap();
        let data = std::fs::read(dir.join(format!("pages-{}.img", map.pages_id))).unwrap();
        let mut out = Vec::new();
        for run in &map.present {
            for p in 0..run.pages {
                let at = (run.offset + p * PAGE_SIZE) as usize;
                let page = &data[at..at + PAGE_SIZE as usize];
                assert!(page.iter().all(|b| *b == page[0]), "a page is one byte repeated");
                out.push((run.vaddr / PAGE_SIZE + p, page[0]));
            }
        }
        out
    }

    #[test]
    fn later_pages_replace_their_copies_in_round_one() {
        let (base, later) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        // Round 1: pages 16..24 and 100..104, all of value 1.
        write_round(base.path(), 7, 1, &[(16, 8, PE_PRESENT), (100, 4, PE_PRESENT)], |_| 1);
        // Round 2: pages 18-19 and 23..24 + 100 (across two runs) changed;
        // the rest is in the parent. Values differ per page.
        let entries = [(16, 2, PE_PARENT), (18, 2, PE_PRESENT), (20, 3, PE_PARENT), (23, 1, PE_PRESENT), (100, 1, PE_PRESENT), (101, 3, PE_PARENT)];
        write_round(later.path(), 7, 2, &entries, |v| (v / PAGE_SIZE) as u8);
        let fold = fold_into_base(base.path(), later.path()).unwrap();
        assert_eq!(fold, Fold::Folded { bytes: 4 * PAGE_SIZE });
        let got = page_bytes(base.path(), 7);
        let want: Vec<(u64, u8)> = (16..24)
            .chain(100..104)
            .map(|p| (p, if [18, 19, 23, 100].contains(&p) { p as u8 } else { 1 }))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn pages_round_one_lacks_leave_everything_as_it_was() {
        let (base, later) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        write_round(base.path(), 7, 1, &[(16, 8, PE_PRESENT)], |_| 1);
        // Page 18 could be copied, but 30 is new memory: nothing is written.
        write_round(later.path(), 7, 2, &[(18, 1, PE_PRESENT), (30, 1, PE_PRESENT)], |_| 2);
        let before = std::fs::read(base.path().join("pages-1.img")).unwrap();
        assert!(matches!(fold_into_base(base.path(), later.path()).unwrap(), Fold::NotFoldable(why) if why.contains("0x1e000")));
        assert_eq!(std::fs::read(base.path().join("pages-1.img")).unwrap(), before);
        // A process round 1 did not have.
        let later2 = tempfile::tempdir().unwrap();
        write_round(later2.path(), 8, 2, &[(16, 1, PE_PRESENT)], |_| 2);
        assert!(matches!(fold_into_base(base.path(), later2.path()).unwrap(), Fold::NotFoldable(why) if why.contains("pagemap-8.img")));
    }

    #[test]
    fn entries_without_flags_use_in_parent() {
        let dir = tempfile::tempdir().unwrap();
        let mut img = Vec::new();
        img.extend_from_slice(&IMG_COMMON_MAGIC.to_le_bytes());
        img.extend_from_slice(&PAGEMAP_MAGIC.to_le_bytes());
        for m in [
            PagemapHead { pages_id: 3 }.encode_to_vec(),
            PagemapEntry { vaddr: 0x1000, compat_nr_pages: 2, in_parent: Some(true), flags: None, nr_pages: None }.encode_to_vec(),
            PagemapEntry { vaddr: 0x3000, compat_nr_pages: 1, in_parent: None, flags: None, nr_pages: None }.encode_to_vec(),
        ] {
            img.extend_from_slice(&(m.len() as u32).to_le_bytes());
            img.extend_from_slice(&m);
        }
        let path = dir.path().join("pagemap-1.img");
        std::fs::write(&path, &img).unwrap();
        let map = Pagemap::read(&path).unwrap();
        assert_eq!(map.pages_id, 3);
        assert_eq!(map.present, vec![PresentRun { vaddr: 0x3000, pages: 1, offset: 0 }]);
    }

    #[test]
    fn malformed_images_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pagemap-1.img");
        std::fs::write(&path, b"not an image").unwrap();
        assert!(matches!(Pagemap::read(&path), Err(PagemapError::Malformed { .. })));
        // An entry length running past the end.
        let mut img = Vec::new();
        img.extend_from_slice(&IMG_COMMON_MAGIC.to_le_bytes());
        img.extend_from_slice(&PAGEMAP_MAGIC.to_le_bytes());
        img.extend_from_slice(&u32::MAX.to_le_bytes());
        std::fs::write(&path, &img).unwrap();
        assert!(matches!(Pagemap::read(&path), Err(PagemapError::Malformed { why, .. }) if why.contains("truncated")));
        // Entries out of address order.
        let mut builder = PagemapImageBuilder::new(1);
        builder.push(16 * PAGE_SIZE, 1, PE_PRESENT).unwrap();
        assert!(builder.push(8 * PAGE_SIZE, 1, PE_PRESENT).is_err(), "the builder keeps address order");
        builder.next_vaddr = 0;
        builder.push(8 * PAGE_SIZE, 1, PE_PRESENT).unwrap();
        std::fs::write(&path, builder.into_bytes()).unwrap();
        assert!(matches!(Pagemap::read(&path), Err(PagemapError::Malformed { why, .. }) if why.contains("out of order")));
    }
}
