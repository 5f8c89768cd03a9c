//! Reports from places that may not allocate or lock (a signal handler, a fault being served),
//! and errors as one line with their causes.

/// An error and its chain of sources on one line (`error: cause: cause of the cause`).
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

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
