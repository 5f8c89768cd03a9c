//! A stopped process as it travels: everything but its anonymous memory's contents, which
//! follow post-copy (see [`super`]).

// Counts, lengths and page numbers: x86-64 only (see the module), where usize is u64, and
// every count is bounded by the image frame (64 MiB).
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

use std::ops::Range;

use super::record::{ThreadRecord, RECORD_MAGIC};
use crate::MigrateError;

/// A file as the destination checks it is the same: its size and modification time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileId {
    /// Bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
}

impl FileId {
    /// The identity of the file at `path` here.
    pub fn of(path: &str) -> std::io::Result<FileId> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)?;
        Ok(FileId { size: m.size(), mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec() })
    }
}

/// What backs a mapping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backing {
    /// Private anonymous memory (heap, stacks, `mmap`s): its pages move post-copy.
    Anonymous,
    /// A file mapped privately: mapped from the same file at the destination, and the pages the
    /// process wrote (its private copies) travel with the image.
    PrivateFile {
        /// Its path.
        path: String,
        /// Offset in the file, bytes.
        offset: u64,
        /// What the destination checks.
        id: FileId,
    },
    /// A file mapped shared and read-only: mapped from the same file.
    SharedFile {
        /// Its path.
        path: String,
        /// Offset in the file, bytes.
        offset: u64,
        /// What the destination checks.
        id: FileId,
    },
    /// A kernel mapping moved to the same place (`[vdso]`, `[vvar]`, `[vvar_vclock]`): the
    /// name as `/proc/PID/maps` shows it.
    Kernel(String),
}

/// One mapping of the process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// Its first byte.
    pub start: u64,
    /// Past its last byte.
    pub end: u64,
    /// `PROT_*`.
    pub prot: u32,
    /// The main thread's stack, which grows down.
    pub grows_down: bool,
    /// What backs it.
    pub backing: Backing,
    /// The byte ranges holding the process's own data (present or swapped, not the zero page,
    /// not a file's page), for the mappings whose pages travel with the image (empty for those
    /// that follow post-copy).
    pub private: Vec<Range<u64>>,
    /// Of a mapping whose pages follow post-copy, the ranges that travel with the image all
    /// the same: the threads' saved contexts, which they resume from before anything can fault
    /// (sorted, within `private`).
    pub early: Vec<Range<u64>>,
    /// The bytes that travel with the image: all of `private`'s for the mappings whose pages
    /// travel with it (private file mappings, anonymous mappings that cannot be read), else
    /// `early`'s; concatenated in order.
    pub eager: Vec<u8>,
}

impl Mapping {
    /// Bytes of the process's own data in this mapping.
    pub fn private_bytes(&self) -> u64 {
        self.private.iter().map(|r| r.end - r.start).sum()
    }

    /// Bytes of `early`.
    pub fn early_bytes(&self) -> u64 {
        self.early.iter().map(|r| r.end - r.start).sum()
    }

    /// The ranges whose bytes are in `eager`.
    pub fn eager_ranges(&self) -> &[Range<u64>] {
        if self.travels_eagerly() {
            &self.private
        } else {
            &self.early
        }
    }

    /// Whether its pages follow post-copy (private anonymous memory that can be read): which
    /// of them hold data is not in the image (`private` is empty), so that stopping the process
    /// costs the same whatever its size.
    pub fn follows_post_copy(&self) -> bool {
        matches!(self.backing, Backing::Anonymous) && !self.travels_eagerly()
    }

    /// Whether its pages travel with the image rather than post-copy.
    pub fn travels_eagerly(&self) -> bool {
        !matches!(self.backing, Backing::Anonymous) || self.prot & libc::PROT_READ as u32 == 0
    }
}

/// An open descriptor that moves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpenFile {
    /// Standard input, output or error: connected to the job's home at the destination too.
    Stdio(i32),
    /// A file opened again by path at the destination, at the same offset.
    Path {
        /// The descriptor's number.
        fd: i32,
        /// The file's path.
        path: String,
        /// `open` flags as `/proc/PID/fdinfo` has them (access mode, `O_APPEND`, ...).
        flags: u32,
        /// The file offset.
        pos: u64,
        /// What the destination checks (none for character devices such as `/dev/null`).
        id: Option<FileId>,
    },
    /// An end of a pipe whose two ends are both the process's (a self-pipe, as programs use to
    /// wake their own poll loops): made again at the destination, with what was in it.
    Pipe {
        /// The descriptor's number.
        fd: i32,
        /// The pipe (its inode): the descriptors of one pipe share it.
        pipe: u64,
        /// `open` flags (`O_RDONLY` or `O_WRONLY`, `O_NONBLOCK`, `O_CLOEXEC`).
        flags: u32,
        /// Bytes written and not read yet (on one descriptor of the pipe only).
        buffered: Vec<u8>,
    },
}

impl OpenFile {
    /// The descriptor's number.
    pub fn fd(&self) -> i32 {
        match self {
            OpenFile::Stdio(fd) | OpenFile::Path { fd, .. } | OpenFile::Pipe { fd, .. } => *fd,
        }
    }
}

/// The `mm` fields `prctl(PR_SET_MM_MAP)` sets, from `/proc/PID/stat`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct MmFields {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
}

/// User and group ids, as `/proc/PID/status` has them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Credentials {
    /// Real, effective and saved user ids.
    pub uid: [u32; 3],
    /// Real, effective and saved group ids.
    pub gid: [u32; 3],
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

/// A stopped process, ready to be rebuilt elsewhere.
#[derive(Clone, Debug)]
pub struct ProcessImage {
    /// Its pid as it sees it (kept at the destination).
    pub pid: u32,
    /// Its name (`/proc/PID/comm`).
    pub comm: String,
    /// Its executable's path.
    pub exe: String,
    /// Its working directory.
    pub cwd: String,
    /// Its file mode creation mask.
    pub umask: u32,
    /// Who it runs as.
    pub creds: Credentials,
    /// Resource limits: resource, soft, hard.
    pub rlimits: Vec<(u32, u64, u64)>,
    /// The `mm` fields.
    pub mm: MmFields,
    /// Its auxiliary vector (`/proc/PID/auxv`).
    pub auxv: Vec<u8>,
    /// Its threads; the first is the main thread (its tid is the pid).
    pub threads: Vec<(ThreadRecord, String)>,
    /// Its mappings, in address order.
    pub mappings: Vec<Mapping>,
    /// Its open descriptors.
    pub files: Vec<OpenFile>,
    /// Standard input the process had been given and had not read yet (when it ran under a
    /// node agent, whose relay pipe held it): the destination gives it first.
    pub stdin_unread: Vec<u8>,
}

impl ProcessImage {
    /// Bytes of anonymous mappings whose pages follow post-copy (those of their pages that hold
    /// data are learned as they go: see [`super::SourcePages`]).
    pub fn post_copy_bytes(&self) -> u64 {
        self.mappings.iter().filter(|m| m.follows_post_copy()).map(|m| m.end - m.start - m.early_bytes()).sum()
    }

    /// Its encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc(Vec::with_capacity(64 << 10));
        e.u64(IMAGE_MAGIC);
        e.u32(self.pid);
        e.str(&self.comm);
        e.str(&self.exe);
        e.str(&self.cwd);
        e.u32(self.umask);
        self.creds.uid.iter().chain(&self.creds.gid).for_each(|&v| e.u32(v));
        e.u32(self.creds.groups.len() as u32);
        self.creds.groups.iter().for_each(|&g| e.u32(g));
        e.u32(self.rlimits.len() as u32);
        for &(r, s, h) in &self.rlimits {
            e.u32(r);
            e.u64(s);
            e.u64(h);
        }
        for v in mm_words(&self.mm) {
            e.u64(v);
        }
        e.bytes(&self.auxv);
        e.u32(self.threads.len() as u32);
        for (t, comm) in &self.threads {
            e.bytes(t.as_bytes());
            e.str(comm);
        }
        e.u32(self.mappings.len() as u32);
        for m in &self.mappings {
            e.u64(m.start);
            e.u64(m.end);
            e.u32(m.prot);
            e.u8(u8::from(m.grows_down));
            match &m.backing {
                Backing::Anonymous => e.u8(0),
                Backing::PrivateFile { path, offset, id } | Backing::SharedFile { path, offset, id } => {
                    e.u8(if matches!(m.backing, Backing::PrivateFile { .. }) { 1 } else { 2 });
                    e.str(path);
                    e.u64(*offset);
                    e.id(id);
                }
                Backing::Kernel(name) => {
                    e.u8(3);
                    e.str(name);
                }
            }
            for list in [&m.private, &m.early] {
                e.u32(list.len() as u32);
                for r in list {
                    e.u64(r.start);
                    e.u64(r.end);
                }
            }
            e.bytes(&m.eager);
        }
        e.bytes(&self.stdin_unread);
        e.u32(self.files.len() as u32);
        for f in &self.files {
            match f {
                OpenFile::Stdio(fd) => {
                    e.u8(0);
                    e.u32(*fd as u32);
                }
                OpenFile::Path { fd, path, flags, pos, id } => {
                    e.u8(1);
                    e.u32(*fd as u32);
                    e.str(path);
                    e.u32(*flags);
                    e.u64(*pos);
                    e.u8(u8::from(id.is_some()));
                    if let Some(id) = id {
                        e.id(id);
                    }
                }
                OpenFile::Pipe { fd, pipe, flags, buffered } => {
                    e.u8(2);
                    e.u32(*fd as u32);
                    e.u64(*pipe);
                    e.u32(*flags);
                    e.bytes(buffered);
                }
            }
        }
        e.0
    }

    /// The image `b` encodes.
    pub fn decode(b: &[u8]) -> Result<ProcessImage, MigrateError> {
        let mut d = Dec(b);
        if d.u64()? != IMAGE_MAGIC {
            return Err(bad("not a process image"));
        }
        let pid = d.u32()?;
        let (comm, exe, cwd) = (d.str()?, d.str()?, d.str()?);
        let umask = d.u32()?;
        let mut creds = Credentials::default();
        for v in creds.uid.iter_mut().chain(creds.gid.iter_mut()) {
            *v = d.u32()?;
        }
        let n = d.count(4)?;
        creds.groups = (0..n).map(|_| d.u32()).collect::<Result<_, _>>()?;
        let n = d.count(20)?;
        let rlimits = (0..n).map(|_| Ok((d.u32()?, d.u64()?, d.u64()?))).collect::<Result<_, MigrateError>>()?;
        let mut w = [0u64; 11];
        for v in &mut w {
            *v = d.u64()?;
        }
        let mm = MmFields {
            start_code: w[0],
            end_code: w[1],
            start_data: w[2],
            end_data: w[3],
            start_brk: w[4],
            brk: w[5],
            start_stack: w[6],
            arg_start: w[7],
            arg_end: w[8],
            env_start: w[9],
            env_end: w[10],
        };
        let auxv = d.bytes()?.to_vec();
        let n = d.count(size_of::<ThreadRecord>())?;
        let mut threads = Vec::with_capacity(n);
        for _ in 0..n {
            let t = ThreadRecord::from_bytes(d.bytes()?).ok_or_else(|| bad("a thread record"))?;
            threads.push((t, d.str()?));
        }
        let n = d.count(26)?;
        let mut mappings = Vec::with_capacity(n);
        for _ in 0..n {
            let (start, end, prot, grows_down) = (d.u64()?, d.u64()?, d.u32()?, d.u8()? != 0);
            let backing = match d.u8()? {
                0 => Backing::Anonymous,
                k @ (1 | 2) => {
                    let (path, offset, id) = (d.str()?, d.u64()?, d.id()?);
                    if k == 1 {
                        Backing::PrivateFile { path, offset, id }
                    } else {
                        Backing::SharedFile { path, offset, id }
                    }
                }
                3 => Backing::Kernel(d.str()?),
                k => return Err(bad(&format!("mapping kind {k}"))),
            };
            let k = d.count(16)?;
            let private = (0..k).map(|_| Ok(d.u64()?..d.u64()?)).collect::<Result<Vec<_>, MigrateError>>()?;
            let k = d.count(16)?;
            let early = (0..k).map(|_| Ok(d.u64()?..d.u64()?)).collect::<Result<Vec<_>, MigrateError>>()?;
            let eager = d.bytes()?.to_vec();
            if start >= end || start % 4096 != 0 || end % 4096 != 0 || end > USER_END {
                return Err(bad(&format!("mapping {start:#x}-{end:#x}")));
            }
            // Whole pages, in order, apart, inside the mapping: what the destination sizes its
            // tables and copies by.
            let well_formed = |v: &[Range<u64>]| {
                v.iter().all(|r| {
                    r.start >= start && r.end <= end && r.start < r.end && r.start % 4096 == 0 && r.end % 4096 == 0
                }) && v.windows(2).all(|w| w[0].end <= w[1].start)
            };
            if !well_formed(&private) || !well_formed(&early) {
                return Err(bad(&format!("page ranges of mapping {start:#x}-{end:#x} out of order or outside it")));
            }
            let m = Mapping { start, end, prot, grows_down, backing, private, early, eager };
            let want: u64 = m.eager_ranges().iter().map(|r| r.end - r.start).sum();
            if m.eager.len() as u64 != want {
                return Err(bad(&format!("mapping {start:#x}-{end:#x}: its pages are missing")));
            }
            mappings.push(m);
        }
        let stdin_unread = d.bytes()?.to_vec();
        let n = d.count(5)?;
        let mut files = Vec::with_capacity(n);
        for _ in 0..n {
            files.push(match d.u8()? {
                0 => OpenFile::Stdio(d.u32()? as i32),
                1 => {
                    let (fd, path, flags, pos) = (d.u32()? as i32, d.str()?, d.u32()?, d.u64()?);
                    let id = if d.u8()? != 0 { Some(d.id()?) } else { None };
                    OpenFile::Path { fd, path, flags, pos, id }
                }
                2 => OpenFile::Pipe {
                    fd: d.u32()? as i32,
                    pipe: d.u64()?,
                    flags: d.u32()?,
                    buffered: d.bytes()?.to_vec(),
                },
                k => return Err(bad(&format!("file kind {k}"))),
            });
        }
        if mappings.windows(2).any(|w| w[0].end > w[1].start) {
            return Err(bad("mappings out of order or overlapping"));
        }
        if threads.is_empty() || threads[0].0.tid != u64::from(pid) {
            return Err(bad("the first thread is not the main thread"));
        }
        Ok(ProcessImage {
            pid,
            comm,
            exe,
            cwd,
            umask,
            creds,
            rlimits,
            mm,
            auxv,
            threads,
            mappings,
            files,
            stdin_unread,
        })
    }
}

/// Past the last user address on x86-64 (47 bits).
pub(crate) const USER_END: u64 = 1 << 47;

const IMAGE_MAGIC: u64 = u64::from_le_bytes(*b"MOSIMG01");
const _: () = assert!(RECORD_MAGIC != IMAGE_MAGIC);

fn mm_words(m: &MmFields) -> [u64; 11] {
    [
        m.start_code,
        m.end_code,
        m.start_data,
        m.end_data,
        m.start_brk,
        m.brk,
        m.start_stack,
        m.arg_start,
        m.arg_end,
        m.env_start,
        m.env_end,
    ]
}

fn bad(what: &str) -> MigrateError {
    MigrateError::Protocol(format!("process image: {what}"))
}

struct Enc(Vec<u8>);

impl Enc {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u64(b.len() as u64);
        self.0.extend_from_slice(b);
    }
    fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
    fn id(&mut self, id: &FileId) {
        self.u64(id.size);
        self.u64(id.mtime_ns as u64);
    }
}

struct Dec<'a>(&'a [u8]);

impl<'a> Dec<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], MigrateError> {
        if self.0.len() < n {
            return Err(bad("truncated"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, MigrateError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, MigrateError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, MigrateError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    /// A count of items of at least `each` bytes, checked against what is left.
    fn count(&mut self, each: usize) -> Result<usize, MigrateError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(each) > self.0.len() {
            return Err(bad("a count larger than the image"));
        }
        Ok(n)
    }
    fn bytes(&mut self) -> Result<&'a [u8], MigrateError> {
        let n = usize::try_from(self.u64()?).map_err(|_| bad("length"))?;
        self.take(n)
    }
    fn str(&mut self) -> Result<String, MigrateError> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| bad("a name that is not UTF-8"))
    }
    fn id(&mut self) -> Result<FileId, MigrateError> {
        Ok(FileId { size: self.u64()?, mtime_ns: self.u64()? as i64 })
    }
}
