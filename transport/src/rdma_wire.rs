//! The RDMA set-up exchange's wire format, parsed and checked without a device (the device code
//! is in the `rdma` module, built with the `rdma` feature): each side sends a magic, its queue
//! pair's address (number, first packet sequence number, LID, GID, MTU), and the server its
//! page window (address, remote key, pages). Everything read from the peer is checked here, so
//! that a hostile peer's values are refused with an error instead of reaching the verbs or the
//! address arithmetic of one-sided operations.

/// Starts each side's set-up message.
pub(crate) const SETUP_MAGIC: [u8; 8] = *b"MOSARDMA";
/// Wire size of a queue pair's address.
pub(crate) const QP_LEN: usize = 30;
/// Wire size of the set-up message (magic and queue pair).
pub(crate) const SETUP_LEN: usize = 8 + QP_LEN;
/// Wire size of the server's window.
pub(crate) const WINDOW_LEN: usize = 20;

/// A queue pair's address, as the peer told it. `repr(C)`: the C layer (`rdma/shim.c`,
/// `struct mrd_qp_info`) reads and fills it directly.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct QpAddr {
    /// Queue pair number (24 bits).
    pub(crate) qpn: u32,
    /// First packet sequence number (24 bits).
    pub(crate) psn: u32,
    /// Local identifier (InfiniBand; 0 on RoCE).
    pub(crate) lid: u16,
    /// Global identifier.
    pub(crate) gid: [u8; 16],
    /// Path MTU, as `enum ibv_mtu` (1 = 256 bytes .. 5 = 4096 bytes).
    pub(crate) mtu: u32,
}

/// The set-up message for `qp`.
pub(crate) fn encode_setup(qp: &QpAddr) -> [u8; SETUP_LEN] {
    let mut b = [0u8; SETUP_LEN];
    b[..8].copy_from_slice(&SETUP_MAGIC);
    b[8..12].copy_from_slice(&qp.qpn.to_le_bytes());
    b[12..16].copy_from_slice(&qp.psn.to_le_bytes());
    b[16..18].copy_from_slice(&qp.lid.to_le_bytes());
    b[18..34].copy_from_slice(&qp.gid);
    b[34..38].copy_from_slice(&qp.mtu.to_le_bytes());
    b
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[i..i + 8]);
    u64::from_le_bytes(v)
}

/// Parses and checks the peer's set-up message.
pub(crate) fn parse_setup(b: &[u8]) -> Result<QpAddr, String> {
    if b.len() != SETUP_LEN {
        return Err(format!("set-up message of {} bytes, expected {SETUP_LEN}", b.len()));
    }
    if b[..8] != SETUP_MAGIC {
        return Err("not a Mosaic RDMA peer".into());
    }
    let mut gid = [0u8; 16];
    gid.copy_from_slice(&b[18..34]);
    let qp = QpAddr {
        qpn: u32_at(b, 8),
        psn: u32_at(b, 12),
        lid: u16::from_le_bytes([b[16], b[17]]),
        gid,
        mtu: u32_at(b, 34),
    };
    if qp.qpn >= 1 << 24 || qp.psn >= 1 << 24 {
        return Err(format!("queue pair number {:#x} or sequence number {:#x} wider than 24 bits", qp.qpn, qp.psn));
    }
    if !(1..=5).contains(&qp.mtu) {
        return Err(format!("path MTU code {} (valid: 1 to 5)", qp.mtu));
    }
    Ok(qp)
}

/// The server's page window as a client sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RemoteWindow {
    /// Address of its first byte in the server.
    pub(crate) addr: u64,
    /// The remote key of its memory region.
    pub(crate) rkey: u32,
    /// Pages in it (0: none).
    pub(crate) pages: u64,
}

/// The window message.
pub(crate) fn encode_window(w: &RemoteWindow) -> [u8; WINDOW_LEN] {
    let mut b = [0u8; WINDOW_LEN];
    b[..8].copy_from_slice(&w.addr.to_le_bytes());
    b[8..12].copy_from_slice(&w.rkey.to_le_bytes());
    b[12..].copy_from_slice(&w.pages.to_le_bytes());
    b
}

/// Parses and checks the server's window: page-aligned, and its last byte addressable (so that
/// `addr + index * page size` cannot overflow for any index inside it); no more pages than the
/// handshake announced (`announced`).
pub(crate) fn parse_window(b: &[u8], announced: u64) -> Result<RemoteWindow, String> {
    if b.len() != WINDOW_LEN {
        return Err(format!("window message of {} bytes, expected {WINDOW_LEN}", b.len()));
    }
    let w = RemoteWindow { addr: u64_at(b, 0), rkey: u32_at(b, 8), pages: u64_at(b, 12) };
    let page = crate::PAGE_SIZE as u64;
    if w.pages != announced {
        return Err(format!("window of {} pages, the handshake said {announced}", w.pages));
    }
    if w.pages > 0 && (w.addr % page != 0 || w.pages.checked_mul(page).and_then(|l| w.addr.checked_add(l)).is_none()) {
        return Err(format!("window at {:#x} of {} pages is not addressable", w.addr, w.pages));
    }
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setup_and_window_round_trip_and_hostile_values_are_refused() {
        let qp = QpAddr { qpn: 0x12, psn: 0xff_ffff, lid: 3, gid: [7; 16], mtu: 5 };
        assert_eq!(parse_setup(&encode_setup(&qp)), Ok(qp));
        let w = RemoteWindow { addr: 0x7f00_0000_0000, rkey: 9, pages: 16 };
        assert_eq!(parse_window(&encode_window(&w), 16), Ok(w));
        let mut bad = encode_setup(&qp);
        bad[0] = b'X';
        assert!(parse_setup(&bad).unwrap_err().contains("not a Mosaic"));
        for (q, why) in [(QpAddr { qpn: 1 << 24, ..qp }, "24 bits"), (QpAddr { mtu: 0, ..qp }, "MTU")] {
            assert!(parse_setup(&encode_setup(&q)).unwrap_err().contains(why));
        }
        assert!(parse_setup(&[0; 5]).is_err());
        assert!(parse_window(&encode_window(&w), 8).unwrap_err().contains("handshake said"));
        let wrap = RemoteWindow { addr: u64::MAX - 4095, rkey: 1, pages: 2 };
        assert!(parse_window(&encode_window(&wrap), 2).unwrap_err().contains("not addressable"));
        let odd = RemoteWindow { addr: 12, rkey: 1, pages: 1 };
        assert!(parse_window(&encode_window(&odd), 1).is_err());
        assert_eq!(parse_window(&encode_window(&RemoteWindow::default()), 0), Ok(RemoteWindow::default()));
    }
}
