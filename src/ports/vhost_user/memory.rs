//! Guest memory as a vhost-user frontend shares it: a table of regions,
//! each a file descriptor that ulan maps. The table comes from another
//! process, so every number in it is checked before anything is mapped,
//! and a region must be backed by a file that cannot shrink under ulan
//! (a sealed memfd): touching a page past the end of a file kills the
//! process with SIGBUS, and a frontend could truncate an unsealed file
//! after ulan checked its size.

use std::fs::File;
use std::os::fd::AsRawFd;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// Regions ulan takes in one table (QEMU sends at most 8 with
/// SET_MEM_TABLE; more slots are only used with CONFIGURE_MEM_SLOTS,
/// which ulan does not offer).
pub const MAX_REGIONS: usize = 8;
/// Guest memory ulan maps for one port, at most. A sparse sealed memfd
/// costs a frontend nothing however large, but mapped it takes ulan's
/// address space (128 TiB for the whole daemon): without a bound, one
/// frontend could leave none for other guests, thread stacks or large
/// allocations, and ulan would abort. 1 TiB is far more than a guest of
/// a network lab has.
pub const MAX_GUEST_MEMORY: u64 = 1 << 40;

/// One region as the frontend describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionDesc {
    /// Guest physical address of the region's first byte.
    pub guest_phys_addr: u64,
    pub size: u64,
    /// Where the frontend has it mapped (ring addresses are in these terms).
    pub user_addr: u64,
    /// Where the region starts in its file.
    pub mmap_offset: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("the memory table has no region")]
    Empty,
    #[error("the memory table has {0} regions; ulan takes at most {MAX_REGIONS}")]
    TooManyRegions(usize),
    #[error("the memory table has {regions} regions but {fds} file descriptors came with it")]
    FdCount { regions: usize, fds: usize },
    #[error("the memory table describes {0} bytes; ulan maps at most {MAX_GUEST_MEMORY} per port")]
    TooLarge(u64),
    #[error("region {index} is empty")]
    EmptyRegion { index: usize },
    #[error("region {index}: its addresses overflow")]
    Overflow { index: usize },
    #[error("region {index} overlaps region {other} ({what} addresses)")]
    Overlap {
        index: usize,
        other: usize,
        what: &'static str,
    },
    #[error("region {index}: file offset {offset:#x} is not page-aligned")]
    Unaligned { index: usize, offset: u64 },
    #[error("region {index}: {size} bytes at file offset {offset:#x}, but its file has only {file_len} bytes")]
    PastEndOfFile {
        index: usize,
        size: u64,
        offset: u64,
        file_len: u64,
    },
    #[error("region {index}: its file is not a memfd sealed against shrinking ({why}); give QEMU `-object memory-backend-memfd,share=on` (sealed by default)")]
    NotSealed { index: usize, why: String },
    #[error("region {index}: cannot map it: {reason}")]
    Map { index: usize, reason: String },
}

/// Guest memory mapped into ulan, with the table it came from (to
/// translate the frontend's addresses of the rings).
pub struct GuestMemory {
    pub mem: GuestMemoryMmap,
    regions: Vec<RegionDesc>,
}

impl GuestMemory {
    /// Checks the table and the files, then maps every region.
    pub fn map(table: &[RegionDesc], files: Vec<File>) -> Result<GuestMemory, MemoryError> {
        check_table(table, files.len())?;
        let page = page_size();
        let mut mapped = Vec::with_capacity(table.len());
        for (index, (r, file)) in table.iter().zip(files).enumerate() {
            if r.mmap_offset % page != 0 {
                return Err(MemoryError::Unaligned {
                    index,
                    offset: r.mmap_offset,
                });
            }
            check_file(index, r, &file)?;
            let size = usize::try_from(r.size).map_err(|_| MemoryError::Overflow { index })?;
            let region = MmapRegion::from_file(FileOffset::new(file, r.mmap_offset), size)
                .map_err(|e| MemoryError::Map {
                    index,
                    reason: e.to_string(),
                })?;
            let region = GuestRegionMmap::new(region, GuestAddress(r.guest_phys_addr)).ok_or(
                MemoryError::Map {
                    index,
                    reason: "the region does not fit the guest address space".into(),
                },
            )?;
            mapped.push((r.guest_phys_addr, region));
        }
        mapped.sort_by_key(|(gpa, _)| *gpa);
        let mem = GuestMemoryMmap::from_regions(mapped.into_iter().map(|(_, r)| r).collect())
            .map_err(|e| MemoryError::Map {
                index: 0,
                reason: e.to_string(),
            })?;
        Ok(GuestMemory {
            mem,
            regions: table.to_vec(),
        })
    }

    /// The guest physical address of `len` bytes the frontend has at
    /// `user_addr`, if they lie in one region.
    pub fn translate(&self, user_addr: u64, len: u64) -> Option<u64> {
        translate(&self.regions, user_addr, len)
    }

    /// Bytes of guest memory mapped.
    pub fn mapped_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }
}

pub fn translate(regions: &[RegionDesc], user_addr: u64, len: u64) -> Option<u64> {
    let end = user_addr.checked_add(len)?;
    regions.iter().find_map(|r| {
        let r_end = r.user_addr + r.size; // checked in check_table
        (user_addr >= r.user_addr && end <= r_end)
            .then(|| r.guest_phys_addr + (user_addr - r.user_addr))
    })
}

/// The checks that need no file: counts, sizes, overflow, overlap.
pub fn check_table(table: &[RegionDesc], fds: usize) -> Result<(), MemoryError> {
    if table.is_empty() {
        return Err(MemoryError::Empty);
    }
    if table.len() > MAX_REGIONS {
        return Err(MemoryError::TooManyRegions(table.len()));
    }
    if fds != table.len() {
        return Err(MemoryError::FdCount {
            regions: table.len(),
            fds,
        });
    }
    for (index, r) in table.iter().enumerate() {
        if r.size == 0 {
            return Err(MemoryError::EmptyRegion { index });
        }
        if r.guest_phys_addr.checked_add(r.size).is_none()
            || r.user_addr.checked_add(r.size).is_none()
            || r.mmap_offset.checked_add(r.size).is_none()
            || usize::try_from(r.size).is_err()
        {
            return Err(MemoryError::Overflow { index });
        }
    }
    // No overflow: at most 8 regions, each checked to fit a u64 above.
    let total = table.iter().fold(0u64, |sum, r| sum.saturating_add(r.size));
    if total > MAX_GUEST_MEMORY {
        return Err(MemoryError::TooLarge(total));
    }
    for (index, a) in table.iter().enumerate() {
        for (other, b) in table.iter().enumerate().take(index) {
            if overlaps(a.guest_phys_addr, a.size, b.guest_phys_addr, b.size) {
                return Err(MemoryError::Overlap {
                    index,
                    other,
                    what: "guest physical",
                });
            }
            if overlaps(a.user_addr, a.size, b.user_addr, b.size) {
                return Err(MemoryError::Overlap {
                    index,
                    other,
                    what: "frontend",
                });
            }
        }
    }
    Ok(())
}

fn overlaps(a: u64, a_len: u64, b: u64, b_len: u64) -> bool {
    a < b + b_len && b < a + a_len
}

fn check_file(index: usize, r: &RegionDesc, file: &File) -> Result<(), MemoryError> {
    let file_len = file
        .metadata()
        .map_err(|e| MemoryError::Map {
            index,
            reason: format!("fstat: {e}"),
        })?
        .len();
    let end = r.mmap_offset + r.size;
    if end > file_len {
        return Err(MemoryError::PastEndOfFile {
            index,
            size: r.size,
            offset: r.mmap_offset,
            file_len,
        });
    }
    // SAFETY: F_GET_SEALS only reads the fd's seal set.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 {
        let e = std::io::Error::last_os_error();
        return Err(MemoryError::NotSealed {
            index,
            why: format!("not a memfd: {e}"),
        });
    }
    if seals & libc::F_SEAL_SHRINK == 0 {
        return Err(MemoryError::NotSealed {
            index,
            why: "F_SEAL_SHRINK is not set".into(),
        });
    }
    Ok(())
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no side effects.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    /// A memfd of `len` bytes, sealed against shrinking and growing when asked.
    pub fn memfd(len: u64, seal: bool) -> File {
        let name = c"ulan-test";
        // SAFETY: memfd_create with a valid name; the fd is owned by File.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_ALLOW_SEALING) };
        assert!(fd >= 0);
        use std::os::fd::FromRawFd;
        // SAFETY: fd is a fresh descriptor we own.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(len).unwrap();
        if seal {
            // SAFETY: plain fcntl on our own fd.
            let r = unsafe {
                libc::fcntl(
                    f.as_raw_fd(),
                    libc::F_ADD_SEALS,
                    libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
                )
            };
            assert_eq!(r, 0);
        }
        f
    }

    fn region(gpa: u64, size: u64, ua: u64) -> RegionDesc {
        RegionDesc {
            guest_phys_addr: gpa,
            size,
            user_addr: ua,
            mmap_offset: 0,
        }
    }

    #[test]
    fn maps_a_sealed_memfd_and_translates_ring_addresses() {
        let table = [region(0, 1 << 20, 0x7f00_0000_0000)];
        let m = GuestMemory::map(&table, vec![memfd(1 << 20, true)]).unwrap();
        m.mem.write_obj(0xabcdu16, GuestAddress(0x1000)).unwrap();
        assert_eq!(m.mem.read_obj::<u16>(GuestAddress(0x1000)).unwrap(), 0xabcd);
        assert_eq!(m.translate(0x7f00_0000_1000, 16), Some(0x1000));
        assert_eq!(m.translate(0x7f00_0000_0000 + (1 << 20) - 8, 16), None);
        assert_eq!(m.translate(0x1000, 16), None);
        assert_eq!(m.translate(u64::MAX - 4, 16), None);
    }

    #[test]
    fn refuses_tables_that_lie() {
        let big = 1u64 << 20;
        // A region larger than its file.
        let e = GuestMemory::map(&[region(0, 2 * big, 0)], vec![memfd(big, true)]).err();
        assert!(
            matches!(e, Some(MemoryError::PastEndOfFile { .. })),
            "{e:?}"
        );
        // An offset that puts the region past the end.
        let mut r = region(0, big, 0);
        r.mmap_offset = 4096;
        let e = GuestMemory::map(&[r], vec![memfd(big, true)]).err();
        assert!(
            matches!(e, Some(MemoryError::PastEndOfFile { .. })),
            "{e:?}"
        );
        // An unaligned offset.
        r.mmap_offset = 100;
        let e = GuestMemory::map(&[r], vec![memfd(2 * big, true)]).err();
        assert!(matches!(e, Some(MemoryError::Unaligned { .. })), "{e:?}");
        // Unsealed memory could be truncated under ulan.
        let e = GuestMemory::map(&[region(0, big, 0)], vec![memfd(big, false)]).err();
        assert!(matches!(e, Some(MemoryError::NotSealed { .. })), "{e:?}");
        // Not a memfd at all.
        let f = tempfile::tempfile().unwrap();
        f.set_len(big).unwrap();
        let e = GuestMemory::map(&[region(0, big, 0)], vec![f]).err();
        assert!(matches!(e, Some(MemoryError::NotSealed { .. })), "{e:?}");
        // Counts, overflow, overlap, empty.
        let e = GuestMemory::map(&[region(0, big, 0)], vec![]).err();
        assert!(matches!(e, Some(MemoryError::FdCount { .. })), "{e:?}");
        let e = GuestMemory::map(&[], vec![]).err();
        assert!(matches!(e, Some(MemoryError::Empty)), "{e:?}");
        let e = GuestMemory::map(&[region(u64::MAX - 10, big, 0)], vec![memfd(big, true)]).err();
        assert!(matches!(e, Some(MemoryError::Overflow { .. })), "{e:?}");
        let e = GuestMemory::map(&[region(0, 0, 0)], vec![memfd(big, true)]).err();
        assert!(matches!(e, Some(MemoryError::EmptyRegion { .. })), "{e:?}");
        let e = GuestMemory::map(
            &[region(0, big, 0), region(big / 2, big, 4 * big)],
            vec![memfd(big, true), memfd(big, true)],
        )
        .err();
        assert!(matches!(e, Some(MemoryError::Overlap { .. })), "{e:?}");
        let e = GuestMemory::map(
            &[region(0, big, 0), region(4 * big, big, big / 2)],
            vec![memfd(big, true), memfd(big, true)],
        )
        .err();
        assert!(matches!(e, Some(MemoryError::Overlap { .. })), "{e:?}");
        // Honest but too much: sparse memfds cost nothing, mappings do.
        let huge = MAX_GUEST_MEMORY / 2 + 4096;
        let e = check_table(&[region(0, huge, 0), region(huge, huge, huge)], 2).err();
        assert!(matches!(e, Some(MemoryError::TooLarge(_))), "{e:?}");
        assert!(check_table(&[region(0, MAX_GUEST_MEMORY, 0)], 1).is_ok());
        let table: Vec<_> = (0..9).map(|i| region(i * big, big, i * big)).collect();
        let e = check_table(&table, 9).err();
        assert!(matches!(e, Some(MemoryError::TooManyRegions(9))), "{e:?}");
    }
}
