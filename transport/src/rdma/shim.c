/*
 * A thin C layer over libibverbs for Mosaic's rdma back-end.
 *
 * ibv_post_send, ibv_post_recv and ibv_poll_cq are static inline functions in <infiniband/verbs.h>
 * and the verbs structs have unions and provider-specific layouts, so Rust calls these few
 * functions with plain scalars instead of binding the structs. Every function returns 0 or a
 * positive errno; on failure it writes a message into `err`.
 *
 * One mrd_ctx is one RC queue pair with its own completion queues:
 *   send_cq: completions of SEND, RDMA READ and RDMA WRITE (all signalled);
 *   recv_cq: completions of RECV, with a completion channel so a reader can sleep.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <infiniband/verbs.h>

struct mrd_ctx {
    struct ibv_context *ctx;
    struct ibv_pd *pd;
    struct ibv_comp_channel *chan;
    struct ibv_cq *send_cq;
    struct ibv_cq *recv_cq;
    struct ibv_qp *qp;
    uint8_t port;
    int gid_index;
    enum ibv_mtu mtu;
    uint32_t max_rd_atomic;
};

/* What one side tells the other to connect its queue pair (exchanged over TCP). */
struct mrd_qp_info {
    uint32_t qpn;
    uint32_t psn;
    uint16_t lid;
    uint8_t gid[16];
    uint32_t mtu;
};

struct mrd_wc {
    uint64_t wr_id;
    uint32_t status;
    uint32_t opcode;
    uint32_t byte_len;
};

#define FAIL(code, ...) do { snprintf(err, errlen, __VA_ARGS__); return (code); } while (0)

static int err_or(int e) { return e > 0 ? e : EIO; }

void mrd_close(struct mrd_ctx *c)
{
    if (!c) return;
    if (c->qp) ibv_destroy_qp(c->qp);
    if (c->send_cq) ibv_destroy_cq(c->send_cq);
    if (c->recv_cq) ibv_destroy_cq(c->recv_cq);
    if (c->chan) ibv_destroy_comp_channel(c->chan);
    if (c->pd) ibv_dealloc_pd(c->pd);
    if (c->ctx) ibv_close_device(c->ctx);
    free(c);
}

/* Opens `dev_name` (or the first device if NULL or empty) and creates an RC queue pair. */
int mrd_open(const char *dev_name, int gid_index, uint32_t depth, struct mrd_ctx **out, char *err, size_t errlen)
{
    int n = 0;
    struct ibv_device **list = ibv_get_device_list(&n);
    if (!list) FAIL(err_or(errno), "ibv_get_device_list: %s (is an RDMA device or rdma_rxe present?)", strerror(errno));
    struct ibv_device *dev = NULL;
    for (int i = 0; i < n; i++)
        if (!dev_name || !*dev_name || strcmp(ibv_get_device_name(list[i]), dev_name) == 0) { dev = list[i]; break; }
    if (!dev) {
        ibv_free_device_list(list);
        FAIL(ENODEV, "no RDMA device %s (%d devices found)", dev_name && *dev_name ? dev_name : "at all", n);
    }
    struct mrd_ctx *c = calloc(1, sizeof *c);
    if (!c) { ibv_free_device_list(list); FAIL(ENOMEM, "out of memory"); }
    c->ctx = ibv_open_device(dev);
    ibv_free_device_list(list);
    if (!c->ctx) { mrd_close(c); FAIL(err_or(errno), "ibv_open_device: %s", strerror(errno)); }
    c->port = 1;
    c->gid_index = gid_index;
    struct ibv_port_attr pa;
    if (ibv_query_port(c->ctx, c->port, &pa)) { mrd_close(c); FAIL(err_or(errno), "ibv_query_port: %s", strerror(errno)); }
    if (pa.state != IBV_PORT_ACTIVE) { mrd_close(c); FAIL(ENETDOWN, "port %d of the RDMA device is not active", c->port); }
    c->mtu = pa.active_mtu;
    struct ibv_device_attr da;
    if (ibv_query_device(c->ctx, &da)) { mrd_close(c); FAIL(err_or(errno), "ibv_query_device: %s", strerror(errno)); }
    c->max_rd_atomic = da.max_qp_rd_atom < 16 ? (uint32_t)da.max_qp_rd_atom : 16;
    if (c->max_rd_atomic == 0) c->max_rd_atomic = 1;
    if ((int)depth > da.max_qp_wr) depth = (uint32_t)da.max_qp_wr;
    if (!(c->pd = ibv_alloc_pd(c->ctx))) { mrd_close(c); FAIL(err_or(errno), "ibv_alloc_pd: %s", strerror(errno)); }
    if (!(c->chan = ibv_create_comp_channel(c->ctx))) { mrd_close(c); FAIL(err_or(errno), "ibv_create_comp_channel: %s", strerror(errno)); }
    int fl = fcntl(c->chan->fd, F_GETFL);
    if (fl < 0 || fcntl(c->chan->fd, F_SETFL, fl | O_NONBLOCK) < 0) { mrd_close(c); FAIL(err_or(errno), "fcntl: %s", strerror(errno)); }
    c->send_cq = ibv_create_cq(c->ctx, (int)depth, NULL, NULL, 0);
    c->recv_cq = ibv_create_cq(c->ctx, (int)depth, NULL, c->chan, 0);
    if (!c->send_cq || !c->recv_cq) { mrd_close(c); FAIL(err_or(errno), "ibv_create_cq: %s", strerror(errno)); }
    struct ibv_qp_init_attr qa;
    memset(&qa, 0, sizeof qa);
    qa.send_cq = c->send_cq;
    qa.recv_cq = c->recv_cq;
    qa.qp_type = IBV_QPT_RC;
    qa.cap.max_send_wr = depth;
    qa.cap.max_recv_wr = depth;
    qa.cap.max_send_sge = 1;
    qa.cap.max_recv_sge = 1;
    if (!(c->qp = ibv_create_qp(c->pd, &qa))) { mrd_close(c); FAIL(err_or(errno), "ibv_create_qp: %s", strerror(errno)); }
    struct ibv_qp_attr a;
    memset(&a, 0, sizeof a);
    a.qp_state = IBV_QPS_INIT;
    a.pkey_index = 0;
    a.port_num = c->port;
    a.qp_access_flags = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_READ | IBV_ACCESS_REMOTE_WRITE;
    int rc = ibv_modify_qp(c->qp, &a, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS);
    if (rc) { mrd_close(c); FAIL(err_or(rc), "ibv_modify_qp(INIT): %s", strerror(rc)); }
    *out = c;
    return 0;
}

int mrd_local_info(struct mrd_ctx *c, uint32_t psn, struct mrd_qp_info *info, char *err, size_t errlen)
{
    struct ibv_port_attr pa;
    if (ibv_query_port(c->ctx, c->port, &pa)) FAIL(err_or(errno), "ibv_query_port: %s", strerror(errno));
    union ibv_gid gid;
    memset(&gid, 0, sizeof gid);
    if (c->gid_index >= 0 && ibv_query_gid(c->ctx, c->port, c->gid_index, &gid))
        FAIL(err_or(errno), "ibv_query_gid(%d): %s", c->gid_index, strerror(errno));
    info->qpn = c->qp->qp_num;
    info->psn = psn & 0xffffff;
    info->lid = pa.lid;
    memcpy(info->gid, gid.raw, 16);
    info->mtu = (uint32_t)c->mtu;
    return 0;
}

/* Moves the queue pair to RTR and RTS against the peer's `remote` info. */
int mrd_connect(struct mrd_ctx *c, uint32_t my_psn, const struct mrd_qp_info *remote, char *err, size_t errlen)
{
    struct ibv_qp_attr a;
    memset(&a, 0, sizeof a);
    a.qp_state = IBV_QPS_RTR;
    a.path_mtu = remote->mtu < (uint32_t)c->mtu ? (enum ibv_mtu)remote->mtu : c->mtu;
    a.dest_qp_num = remote->qpn;
    a.rq_psn = remote->psn;
    a.max_dest_rd_atomic = (uint8_t)c->max_rd_atomic;
    a.min_rnr_timer = 1; /* 0.01 ms: a receiver out of buffers is retried quickly */
    a.ah_attr.dlid = remote->lid;
    a.ah_attr.port_num = c->port;
    if (c->gid_index >= 0) {
        a.ah_attr.is_global = 1;
        memcpy(a.ah_attr.grh.dgid.raw, remote->gid, 16);
        a.ah_attr.grh.sgid_index = (uint8_t)c->gid_index;
        a.ah_attr.grh.hop_limit = 1;
    }
    int rc = ibv_modify_qp(c->qp, &a, IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN |
                           IBV_QP_RQ_PSN | IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER);
    if (rc) FAIL(err_or(rc), "ibv_modify_qp(RTR): %s", strerror(rc));
    memset(&a, 0, sizeof a);
    a.qp_state = IBV_QPS_RTS;
    a.timeout = 14;   /* 4.096 us * 2^14 = 67 ms per try */
    a.retry_cnt = 7;
    a.rnr_retry = 7;  /* retry forever while the receiver has no buffer posted */
    a.sq_psn = my_psn & 0xffffff;
    a.max_rd_atomic = (uint8_t)c->max_rd_atomic;
    rc = ibv_modify_qp(c->qp, &a, IBV_QP_STATE | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY |
                       IBV_QP_SQ_PSN | IBV_QP_MAX_QP_RD_ATOMIC);
    if (rc) FAIL(err_or(rc), "ibv_modify_qp(RTS): %s", strerror(rc));
    return 0;
}

int mrd_reg(struct mrd_ctx *c, void *addr, size_t len, int remote, void **mr, uint32_t *lkey, uint32_t *rkey,
            char *err, size_t errlen)
{
    int access = IBV_ACCESS_LOCAL_WRITE;
    if (remote) access |= IBV_ACCESS_REMOTE_READ | IBV_ACCESS_REMOTE_WRITE;
    struct ibv_mr *m = ibv_reg_mr(c->pd, addr, len, access);
    if (!m) FAIL(err_or(errno), "ibv_reg_mr(%zu bytes): %s", len, strerror(errno));
    *mr = m;
    *lkey = m->lkey;
    *rkey = m->rkey;
    return 0;
}

void mrd_dereg(void *mr) { if (mr) ibv_dereg_mr((struct ibv_mr *)mr); }

int mrd_post_recv(struct mrd_ctx *c, uint64_t wr_id, void *addr, uint32_t len, uint32_t lkey)
{
    struct ibv_sge sge = { .addr = (uintptr_t)addr, .length = len, .lkey = lkey };
    struct ibv_recv_wr wr, *bad = NULL;
    memset(&wr, 0, sizeof wr);
    wr.wr_id = wr_id;
    wr.sg_list = &sge;
    wr.num_sge = 1;
    return ibv_post_recv(c->qp, &wr, &bad);
}

/* op: 0 SEND, 1 RDMA READ, 2 RDMA WRITE. Always signalled. */
int mrd_post(struct mrd_ctx *c, int op, uint64_t wr_id, void *addr, uint32_t len, uint32_t lkey,
             uint64_t raddr, uint32_t rkey)
{
    struct ibv_sge sge = { .addr = (uintptr_t)addr, .length = len, .lkey = lkey };
    struct ibv_send_wr wr, *bad = NULL;
    memset(&wr, 0, sizeof wr);
    wr.wr_id = wr_id;
    wr.sg_list = &sge;
    wr.num_sge = 1;
    wr.send_flags = IBV_SEND_SIGNALED;
    switch (op) {
    case 0: wr.opcode = IBV_WR_SEND; break;
    case 1: wr.opcode = IBV_WR_RDMA_READ; break;
    case 2: wr.opcode = IBV_WR_RDMA_WRITE; break;
    default: return EINVAL;
    }
    if (op != 0) {
        wr.wr.rdma.remote_addr = raddr;
        wr.wr.rdma.rkey = rkey;
    }
    return ibv_post_send(c->qp, &wr, &bad);
}

/* Polls the send (which = 0) or receive (which = 1) queue; returns the count or -1. */
int mrd_poll(struct mrd_ctx *c, int which, struct mrd_wc *out, int max)
{
    struct ibv_wc wc[32];
    if (max > 32) max = 32;
    int n = ibv_poll_cq(which ? c->recv_cq : c->send_cq, max, wc);
    for (int i = 0; i < n; i++) {
        out[i].wr_id = wc[i].wr_id;
        out[i].status = (uint32_t)wc[i].status;
        out[i].opcode = (uint32_t)wc[i].opcode;
        out[i].byte_len = wc[i].byte_len;
    }
    return n;
}

const char *mrd_wc_status_str(uint32_t status) { return ibv_wc_status_str((enum ibv_wc_status)status); }

/* Receive-side sleeping: arm the CQ, and consume the event once the channel fd is readable. */
int mrd_recv_fd(struct mrd_ctx *c) { return c->chan->fd; }
int mrd_arm_recv(struct mrd_ctx *c) { return ibv_req_notify_cq(c->recv_cq, 0); }
int mrd_ack_recv(struct mrd_ctx *c)
{
    struct ibv_cq *cq;
    void *cq_ctx;
    if (ibv_get_cq_event(c->chan, &cq, &cq_ctx)) return errno ? errno : EAGAIN;
    ibv_ack_cq_events(cq, 1);
    return 0;
}
