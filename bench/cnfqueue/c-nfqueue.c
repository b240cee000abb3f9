/*
 * c-nfqueue: the benchmark's floor for a user-space NFQUEUE reader. The leanest honest
 * accept-all loop over libnetfilter_queue/libmnl: per packet one blocking receive and one
 * verdict, nothing else (no logging, no clock, no batching). Its configuration is what the
 * sluice agent asks of the kernel: packet copy of the first 160 bytes, GSO and FAIL_OPEN flags,
 * a 4096-packet queue, a 4 MiB receive buffer and NETLINK_NO_ENOBUFS. One thread and one
 * socket per queue.
 *
 * Built by the harness (bench/cloop.go) with gcc against Debian's libnetfilter-queue-dev and
 * libmnl-dev, and run like the Go bare loop:
 *   c-nfqueue -queue-num 100 -queues 1
 * It prints {"ready":true} once every queue is bound, and the packet count on SIGTERM/SIGINT.
 */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <arpa/inet.h>
#include <libmnl/libmnl.h>
#include <linux/netfilter.h>
#include <linux/netfilter/nfnetlink.h>
#include <linux/netfilter/nfnetlink_queue.h>
#include <libnetfilter_queue/libnetfilter_queue.h>

#define COPY_RANGE 160
#define MAX_QUEUE_LEN 4096
#define RCVBUF (4 << 20)

static atomic_ulong seen;

struct queue {
	struct mnl_socket *nl;
	unsigned int portid;
	uint16_t num;
	pthread_t thread;
};

static int config(struct queue *q, void (*put)(struct nlmsghdr *, void *), void *arg) {
	char buf[8192];
	struct nlmsghdr *nlh = nfq_nlmsg_put(buf, NFQNL_MSG_CONFIG, q->num);
	nlh->nlmsg_flags |= NLM_F_ACK;
	put(nlh, arg);
	if (mnl_socket_sendto(q->nl, nlh, nlh->nlmsg_len) < 0)
		return -1;
	int n = mnl_socket_recvfrom(q->nl, buf, sizeof buf);
	if (n < 0)
		return -1;
	return mnl_cb_run(buf, n, 0, q->portid, NULL, NULL) < 0 ? -1 : 0;
}

static void put_bind(struct nlmsghdr *nlh, void *arg) {
	(void)arg;
	nfq_nlmsg_cfg_put_cmd(nlh, AF_INET, NFQNL_CFG_CMD_BIND);
}

static void put_params(struct nlmsghdr *nlh, void *arg) {
	(void)arg;
	nfq_nlmsg_cfg_put_params(nlh, NFQNL_COPY_PACKET, COPY_RANGE);
	nfq_nlmsg_cfg_put_qmaxlen(nlh, MAX_QUEUE_LEN);
	uint32_t flags = htonl(NFQA_CFG_F_GSO | NFQA_CFG_F_FAIL_OPEN);
	mnl_attr_put_u32(nlh, NFQA_CFG_FLAGS, flags);
	mnl_attr_put_u32(nlh, NFQA_CFG_MASK, flags);
}

static int open_queue(struct queue *q) {
	q->nl = mnl_socket_open(NETLINK_NETFILTER);
	if (q->nl == NULL)
		return -1;
	if (mnl_socket_bind(q->nl, 0, MNL_SOCKET_AUTOPID) < 0)
		return -1;
	q->portid = mnl_socket_get_portid(q->nl);
	int fd = mnl_socket_get_fd(q->nl), one = 1, size = RCVBUF;
	if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size) < 0)
		setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
	setsockopt(fd, SOL_NETLINK, NETLINK_NO_ENOBUFS, &one, sizeof one);
	if (config(q, put_bind, NULL) < 0 || config(q, put_params, NULL) < 0)
		return -1;
	return 0;
}

static int on_packet(const struct nlmsghdr *nlh, void *data) {
	struct queue *q = data;
	struct nlattr *attr[NFQA_MAX + 1] = {0};
	if (nfq_nlmsg_parse(nlh, attr) < 0 || attr[NFQA_PACKET_HDR] == NULL)
		return MNL_CB_OK;
	struct nfqnl_msg_packet_hdr *ph = mnl_attr_get_payload(attr[NFQA_PACKET_HDR]);
	char buf[256];
	struct nlmsghdr *v = nfq_nlmsg_put(buf, NFQNL_MSG_VERDICT, q->num);
	nfq_nlmsg_verdict_put(v, ntohl(ph->packet_id), NF_ACCEPT);
	mnl_socket_sendto(q->nl, v, v->nlmsg_len);
	atomic_fetch_add_explicit(&seen, 1, memory_order_relaxed);
	return MNL_CB_OK;
}

static void *serve(void *arg) {
	struct queue *q = arg;
	/* A packet message is ~250 bytes at this copy range; the buffer holds any one message. */
	char buf[16384];
	for (;;) {
		int n = mnl_socket_recvfrom(q->nl, buf, sizeof buf);
		if (n < 0) {
			if (errno == ENOBUFS || errno == EINTR)
				continue;
			perror("c-nfqueue: recv");
			return NULL;
		}
		mnl_cb_run(buf, n, 0, q->portid, on_packet, q);
	}
}

int main(int argc, char **argv) {
	long first = 100, count = 1;
	for (int i = 1; i + 1 < argc; i += 2) {
		if (strcmp(argv[i], "-queue-num") == 0)
			first = strtol(argv[i + 1], NULL, 10);
		else if (strcmp(argv[i], "-queues") == 0)
			count = strtol(argv[i + 1], NULL, 10);
	}
	if (first < 0 || first > 65535 || count < 1 || count > 64 || first + count > 65536) {
		fprintf(stderr, "c-nfqueue: bad -queue-num/-queues\n");
		return 2;
	}
	/* The queue threads never see the signals; main waits for them. */
	sigset_t set;
	sigemptyset(&set);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGINT);
	pthread_sigmask(SIG_BLOCK, &set, NULL);
	struct queue *qs = calloc(count, sizeof *qs);
	for (long i = 0; i < count; i++) {
		qs[i].num = first + i;
		if (open_queue(&qs[i]) < 0) {
			fprintf(stderr, "c-nfqueue: open queue %u: %s\n", qs[i].num, strerror(errno));
			return 1;
		}
		if (pthread_create(&qs[i].thread, NULL, serve, &qs[i]) != 0) {
			fprintf(stderr, "c-nfqueue: thread: %s\n", strerror(errno));
			return 1;
		}
	}
	printf("{\"ready\":true}\n");
	fflush(stdout);
	int sig;
	sigwait(&set, &sig);
	fprintf(stderr, "c-nfqueue: %lu packets\n", atomic_load(&seen));
	/* Exiting closes the sockets, which unbinds the queues. */
	return 0;
}
