//! Reports from places that may not allocate or lock (a signal handler, a fault being served).

/// Writes a report line to standard error without allocating or locking (usable in a signal
/// handler); long reports are cut at 512 bytes.
pub(crate) fn report(args: std::fmt::Arguments<'_>) {
    use std::fmt::Write as _;

    struct Buf {
        b: [u8; 512],
        n: usize,
    }
    impl std::fmt::Write for Buf {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            let take = s.len().min(self.b.len() - self.n);
            self.b[self.n..self.n + take].copy_from_slice(&s.as_bytes()[..take]);
            self.n += take;
            Ok(())
        }
    }
    let mut buf = Buf { b: [0; 512], n: 0 };
    let _ = buf.write_fmt(args);
    // SAFETY: write(2) of our own initialised buffer to standard error.
    let _ = unsafe { libc::write(2, buf.b.as_ptr().cast(), buf.n) };
}
