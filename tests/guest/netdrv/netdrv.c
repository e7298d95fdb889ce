/*
 * A freestanding virtio-net driver that tests Strata's VMM from inside a guest.
 *
 * It finds the device by probing the virtio-mmio windows for device ID 1, negotiates
 * VERSION_1, MAC, STATUS, MRG_RXBUF, CTRL_VQ and CTRL_RX, sets up the receive, transmit and
 * control queues, turns promiscuous mode off through the control queue, and then:
 *   - sends one UDP broadcast "NETDRV HELLO <mac>" to port 7777 (the host test reads it);
 *   - answers ARP requests and ICMP echo requests for its address;
 *   - as a pinger, resolves a peer's address with ARP and sends it three echo requests;
 *   - counts frames that reach it for another unicast address (the receive filter must stop
 *     them once promiscuous mode is off);
 *   - stops on a UDP datagram "NETDRV STOP" to port 7777, prints its counters and powers off.
 *
 * The MAC address the VMM gives it says who it is: 52:54:00:PP:RR:HH is host HH in 10.77.0.0/24,
 * RR = 1 makes it ping host PP (RR = 0: it only answers). Interrupts come through the I/O APIC;
 * the LAPIC timer (10 ms) wakes the main loop for retries and a 60 s limit. Ring 0 is emulated
 * instruction by instruction on PVM hosts: keep the work per frame small.
 * Built with blkdrv's entry.S and link.ld (tests/build.rs).
 */
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

#define MMIO_BASE 0xd0000000UL
#define MMIO_WINDOWS 8
#define FIRST_GSI 5
#define IOAPIC 0xfec00000UL
#define LAPIC 0xfee00000UL
#define VECTOR 0x40
#define TIMER_VECTOR 0x42
#define QSZ 64
#define NRX 16
#define NTX 16
#define BUFSZ 2048
#define HDR 12
#define PORT 7777

#define F_MAC (1UL << 5)
#define F_MRG_RXBUF (1UL << 15)
#define F_STATUS (1UL << 16)
#define F_CTRL_VQ (1UL << 17)
#define F_CTRL_RX (1UL << 18)
#define F_VERSION_1 (1UL << 32)

struct desc { u64 addr; u32 len; u16 flags; u16 next; };
struct avail { u16 flags; u16 idx; u16 ring[QSZ]; u16 used_event; };
struct used_elem { u32 id; u32 len; };
struct used { u16 flags; u16 idx; struct used_elem ring[QSZ]; u16 avail_event; };
struct ring {
    struct desc desc[QSZ];
    struct avail avail;
    struct used used __attribute__((aligned(4)));
    u16 avail_idx, used_seen;
} __attribute__((aligned(4096)));
struct idt_entry { u16 off0; u16 sel; u8 ist; u8 attr; u16 off1; u32 off2; u32 zero; };
struct idt_ptr { u16 limit; u64 base; } __attribute__((packed));

static struct ring rxq, txq, ctlq;
static u8 rxbuf[NRX][BUFSZ] __attribute__((aligned(4096)));
static u8 txbuf[NTX][BUFSZ] __attribute__((aligned(4096)));
static u8 ctlbuf[16];
static volatile u8 ctlack;
static struct idt_entry idt[256] __attribute__((aligned(16)));

static u64 dev;
static volatile u64 irqs, ticks;
static u8 mac[6], peer_mac[6];
static u8 my_ip[4] = {10, 77, 0, 0}, peer_ip[4] = {10, 77, 0, 0};
static int have_peer_mac, done;
static u64 rx_frames, tx_frames, arp_answered, echo_answered, echo_replies, foreign, failures;
static u32 tx_next;

void isr_virtio(void);
void isr_timer(void);
void isr_ged(void);
void isr_exceptions(void);

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u32 rd(u64 off) { return *(volatile u32 *)(dev + off); }
static inline u8 rd8(u64 off) { return *(volatile u8 *)(dev + off); }
static inline void wr(u64 off, u32 v) { *(volatile u32 *)(dev + off) = v; }
static inline void mb(void) { __asm__ volatile("lock; orl $0, (%%rsp)" ::: "memory", "cc"); }

static void puts(const char *s) { while (*s) outb(0x3f8, (u8)*s++); }
static void putd(u64 v)
{
    char b[21]; int i = 20; b[i] = 0;
    do { b[--i] = '0' + v % 10; v /= 10; } while (v);
    puts(&b[i]);
}
static void puthex2(u8 v)
{
    char b[3]; const char *h = "0123456789abcdef";
    b[0] = h[v >> 4]; b[1] = h[v & 15]; b[2] = 0; puts(b);
}
static void putmac(const u8 *m)
{
    for (int i = 0; i < 6; i++) { if (i) puts(":"); puthex2(m[i]); }
}

static void poweroff(void)
{
    outb(0x3c0, (5 << 2) | 0x20);
    for (;;) __asm__ volatile("cli; hlt");
}

static void fail(const char *what)
{
    failures++;
    puts("NETTEST FAIL "); puts(what); puts("\n");
}

void on_exception(u64 vector, u64 a, u64 b)
{
    (void)a; (void)b;
    puts("NETTEST FAIL guest exception "); putd(vector); puts("\n");
    poweroff();
}

void on_irq(void)
{
    u32 isr = rd(0x60);
    wr(0x64, isr);
    irqs++;
    *(volatile u32 *)(LAPIC + 0xb0) = 0;
}

void on_timer(void) { ticks++; *(volatile u32 *)(LAPIC + 0xb0) = 0; }
void on_ged(void) { *(volatile u32 *)(LAPIC + 0xb0) = 0; }

static void set_gate(int v, void (*fn)(void))
{
    u64 a = (u64)fn;
    idt[v].off0 = a & 0xffff; idt[v].sel = 0x10; idt[v].ist = 0; idt[v].attr = 0x8e;
    idt[v].off1 = (a >> 16) & 0xffff; idt[v].off2 = a >> 32; idt[v].zero = 0;
}

static void setup_interrupts(u32 gsi)
{
    struct idt_ptr p = { sizeof(idt) - 1, (u64)idt };
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
    for (int v = 0; v < 32; v++) set_gate(v, (void (*)(void))((u64)isr_exceptions + 32 * v));
    set_gate(VECTOR, isr_virtio);
    set_gate(TIMER_VECTOR, isr_timer);
    __asm__ volatile("lidt %0" : : "m"(p));
    *(volatile u32 *)(LAPIC + 0x80) = 0;
    *(volatile u32 *)(LAPIC + 0xf0) = 0x1ff;
    volatile u32 *sel = (volatile u32 *)IOAPIC, *win = (volatile u32 *)(IOAPIC + 0x10);
    *sel = 0x10 + 2 * gsi + 1; *win = 0;
    *sel = 0x10 + 2 * gsi; *win = VECTOR;
    /* LAPIC timer: periodic, divide by 16, 10 ms at KVM's 1 GHz APIC bus. */
    *(volatile u32 *)(LAPIC + 0x3e0) = 0x3;
    *(volatile u32 *)(LAPIC + 0x320) = TIMER_VECTOR | (1 << 17);
    *(volatile u32 *)(LAPIC + 0x380) = 625000;
}

static void memcpy8(u8 *d, const u8 *s, u32 n) { for (u32 i = 0; i < n; i++) d[i] = s[i]; }
static int memeq(const u8 *a, const u8 *b, u32 n) { for (u32 i = 0; i < n; i++) if (a[i] != b[i]) return 0; return 1; }
static u16 be16(const u8 *p) { return (u16)(p[0] << 8 | p[1]); }
static void put16(u8 *p, u16 v) { p[0] = v >> 8; p[1] = v & 0xff; }

static u16 csum(const u8 *p, u32 n)
{
    u32 s = 0;
    for (u32 i = 0; i + 1 < n; i += 2) s += (u32)(p[i] << 8 | p[i + 1]);
    if (n & 1) s += (u32)(p[n - 1] << 8);
    while (s >> 16) s = (s & 0xffff) + (s >> 16);
    return (u16)~s;
}

static void setup_queue(u32 idx, struct ring *r)
{
    wr(0x30, idx);
    if (rd(0x34) < QSZ) { fail("queue too small"); poweroff(); }
    wr(0x38, QSZ);
    wr(0x80, (u32)(u64)r->desc); wr(0x84, 0);
    wr(0x90, (u32)(u64)&r->avail); wr(0x94, 0);
    wr(0xa0, (u32)(u64)&r->used); wr(0xa4, 0);
    wr(0x44, 1);
}

static void publish(struct ring *r, u16 head)
{
    r->avail.ring[r->avail_idx % QSZ] = head;
    mb();
    r->avail_idx++;
    r->avail.idx = r->avail_idx;
    mb();
}

static void rx_post(u16 i)
{
    rxq.desc[i].addr = (u64)rxbuf[i]; rxq.desc[i].len = BUFSZ;
    rxq.desc[i].flags = 2; rxq.desc[i].next = 0;
    publish(&rxq, i);
}

/* Sends the frame in txbuf[slot] + HDR of `len` bytes. */
static u8 *tx_frame(void)
{
    /* Wait for a free slot: at most NTX in flight. */
    while ((u16)(txq.avail_idx - txq.used.idx) >= NTX) __asm__ volatile("sti; hlt");
    u8 *b = txbuf[tx_next % NTX];
    for (int i = 0; i < HDR; i++) b[i] = 0;
    return b + HDR;
}

static void tx_send(u32 len)
{
    u16 slot = tx_next % NTX;
    txq.desc[slot].addr = (u64)txbuf[slot]; txq.desc[slot].len = HDR + len;
    txq.desc[slot].flags = 0; txq.desc[slot].next = 0;
    publish(&txq, slot);
    wr(0x50, 1);
    tx_next++;
    tx_frames++;
}

static void eth(u8 *f, const u8 *dst, u16 type)
{
    memcpy8(f, dst, 6); memcpy8(f + 6, mac, 6); put16(f + 12, type);
}

static void ipv4(u8 *ip, u8 proto, const u8 *dst, u16 payload)
{
    ip[0] = 0x45; ip[1] = 0; put16(ip + 2, 20 + payload); put16(ip + 4, 0); put16(ip + 6, 0x4000);
    ip[8] = 64; ip[9] = proto; put16(ip + 10, 0);
    memcpy8(ip + 12, my_ip, 4); memcpy8(ip + 16, dst, 4);
    put16(ip + 10, csum(ip, 20));
}

static void send_hello(void)
{
    static const u8 bcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
    u8 dst[4] = {10, 77, 0, 255};
    u8 *f = tx_frame();
    const char *msg = "NETDRV HELLO ";
    u32 n = 0;
    u8 *p = f + 42;
    while (msg[n]) { p[n] = (u8)msg[n]; n++; }
    for (int i = 0; i < 6; i++) {
        const char *h = "0123456789abcdef";
        p[n++] = (u8)h[mac[i] >> 4]; p[n++] = (u8)h[mac[i] & 15];
        if (i < 5) p[n++] = ':';
    }
    eth(f, bcast, 0x0800);
    ipv4(f + 14, 17, dst, 8 + n);
    put16(f + 34, PORT); put16(f + 36, PORT); put16(f + 38, 8 + n); put16(f + 40, 0);
    tx_send(42 + n);
}

static void send_arp(u16 op, const u8 *tha, const u8 *tpa)
{
    static const u8 bcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
    u8 *f = tx_frame();
    eth(f, op == 1 ? bcast : tha, 0x0806);
    u8 *a = f + 14;
    put16(a, 1); put16(a + 2, 0x0800); a[4] = 6; a[5] = 4; put16(a + 6, op);
    memcpy8(a + 8, mac, 6); memcpy8(a + 14, my_ip, 4);
    memcpy8(a + 18, tha, 6); memcpy8(a + 24, tpa, 4);
    tx_send(42 < 60 ? 60 : 42);
}

static void send_echo(u16 seq)
{
    u8 *f = tx_frame();
    eth(f, peer_mac, 0x0800);
    ipv4(f + 14, 1, peer_ip, 8 + 32);
    u8 *ic = f + 34;
    ic[0] = 8; ic[1] = 0; put16(ic + 2, 0); put16(ic + 4, 0x5354); put16(ic + 6, seq);
    for (int i = 0; i < 32; i++) ic[8 + i] = (u8)i;
    put16(ic + 2, csum(ic, 40));
    tx_send(14 + 20 + 40);
}

static void handle(u8 *f, u32 len)
{
    rx_frames++;
    if (len < 14) return;
    if (!(f[0] & 1) && !memeq(f, mac, 6)) foreign++;
    u16 type = be16(f + 12);
    if (type == 0x0806 && len >= 42) {
        u8 *a = f + 14;
        u16 op = be16(a + 6);
        if (op == 1 && memeq(a + 24, my_ip, 4)) {
            u8 sha[6], spa[4];
            memcpy8(sha, a + 8, 6); memcpy8(spa, a + 14, 4);
            send_arp(2, sha, spa);
            arp_answered++;
        } else if (op == 2 && memeq(a + 14, peer_ip, 4)) {
            memcpy8(peer_mac, a + 8, 6);
            have_peer_mac = 1;
        }
        return;
    }
    if (type != 0x0800 || len < 34) return;
    u8 *ip = f + 14;
    u32 ihl = (u32)(ip[0] & 15) * 4;
    u32 total = be16(ip + 2);
    if (ihl < 20 || total < ihl || 14 + total > len) return;
    if (!memeq(ip + 16, my_ip, 4) && !(ip[16] == 10 && ip[17] == 77 && ip[18] == 0 && ip[19] == 255))
        return;
    u8 *l4 = ip + ihl;
    u32 l4len = total - ihl;
    if (ip[9] == 1 && l4len >= 8) {
        if (l4[0] == 8) {
            /* Echo request: answer in place. */
            u8 *r = tx_frame();
            if (14 + total > BUFSZ - HDR) return;
            memcpy8(r, f, 14 + total);
            memcpy8(r, f + 6, 6); memcpy8(r + 6, mac, 6);
            u8 *rip = r + 14;
            memcpy8(rip + 16, ip + 12, 4); memcpy8(rip + 12, my_ip, 4);
            rip[8] = 64; put16(rip + 10, 0); put16(rip + 10, csum(rip, ihl));
            u8 *ric = rip + ihl;
            ric[0] = 0; put16(ric + 2, 0); put16(ric + 2, csum(ric, l4len));
            tx_send(14 + total);
            echo_answered++;
        } else if (l4[0] == 0 && memeq(ip + 12, peer_ip, 4) && be16(l4 + 4) == 0x5354) {
            echo_replies++;
        }
    } else if (ip[9] == 17 && l4len >= 8 + 11 && be16(l4 + 2) == PORT) {
        if (memeq(l4 + 8, (const u8 *)"NETDRV STOP", 11)) done = 1;
    }
}

static void poll(void)
{
    while (rxq.used_seen != rxq.used.idx) {
        struct used_elem *e = &rxq.used.ring[rxq.used_seen % QSZ];
        u16 id = (u16)e->id;
        u32 len = e->len;
        if (id >= NRX || len < HDR || len > BUFSZ) { fail("bad receive used entry"); }
        else {
            u16 nb = (u16)(rxbuf[id][10] | rxbuf[id][11] << 8);
            if (nb != 1) fail("num_buffers is not 1 for a small frame");
            handle(rxbuf[id] + HDR, len - HDR);
        }
        rxq.used_seen++;
        if (id < NRX) rx_post(id);
        wr(0x50, 0);
    }
}

static int probe(void)
{
    for (int i = 0; i < MMIO_WINDOWS; i++) {
        dev = MMIO_BASE + 0x1000UL * i;
        if (rd(0) == 0x74726976 && rd(4) == 2 && rd(8) == 1) return i;
    }
    return -1;
}

/* Sends a control command (class, cmd, one data byte); returns the ack. */
static u8 ctrl(u8 class, u8 cmd, u8 data)
{
    ctlbuf[0] = class; ctlbuf[1] = cmd; ctlbuf[2] = data; ctlack = 0xff;
    ctlq.desc[0].addr = (u64)ctlbuf; ctlq.desc[0].len = 3; ctlq.desc[0].flags = 1; ctlq.desc[0].next = 1;
    ctlq.desc[1].addr = (u64)&ctlack; ctlq.desc[1].len = 1; ctlq.desc[1].flags = 2; ctlq.desc[1].next = 0;
    publish(&ctlq, 0);
    wr(0x50, 2);
    while (ctlq.used.idx != ctlq.avail_idx) __asm__ volatile("sti; hlt");
    ctlq.used_seen = ctlq.used.idx;
    return ctlack;
}

int main(void)
{
    puts("netdrv: start\n");
    int idx = probe();
    if (idx < 0) { fail("no virtio-net device"); poweroff(); }
    wr(0x70, 0);
    wr(0x70, 1);
    wr(0x70, 1 | 2);
    wr(0x14, 0); u64 f = rd(0x10);
    wr(0x14, 1); f |= (u64)rd(0x10) << 32;
    u64 want = F_VERSION_1 | F_MAC | F_STATUS | F_MRG_RXBUF | F_CTRL_VQ | F_CTRL_RX;
    if ((f & want) != want) { fail("device lacks a needed feature"); poweroff(); }
    wr(0x24, 0); wr(0x20, (u32)want);
    wr(0x24, 1); wr(0x20, (u32)(want >> 32));
    wr(0x70, 1 | 2 | 8);
    if (!(rd(0x70) & 8)) { fail("FEATURES_OK not accepted"); poweroff(); }
    for (int i = 0; i < 6; i++) mac[i] = rd8(0x100 + i);
    u16 status = (u16)(rd8(0x106) | rd8(0x107) << 8);
    my_ip[3] = mac[5];
    peer_ip[3] = mac[3];
    int pinger = mac[4] == 1;
    puts("netdrv: mac "); putmac(mac); puts(" ip 10.77.0."); putd(my_ip[3]);
    puts(" link "); puts(status & 1 ? "up" : "down"); puts("\n");
    if (!(status & 1)) fail("link is down");
    setup_queue(0, &rxq);
    setup_queue(1, &txq);
    setup_queue(2, &ctlq);
    setup_interrupts(FIRST_GSI + idx);
    for (u16 i = 0; i < NRX; i++) rx_post(i);
    wr(0x70, 1 | 2 | 8 | 4);
    if (rd(0x70) & 64) { fail("device needs a reset after DRIVER_OK"); poweroff(); }
    wr(0x50, 0);
    __asm__ volatile("sti");
    u8 ack = ctrl(0, 0, 0);            /* RX mode: promiscuous off */
    puts("netdrv: promiscuous off, ack "); putd(ack); puts("\n");
    if (ack != 0) fail("the control queue refused promiscuous off");
    if (ctrl(0, 9, 0) != 1) fail("the control queue accepted an unknown command");
    send_hello();
    outb(0x80, 1);
    u64 last = 0, started = ticks;
    u16 seq = 0;
    int ping_ok = 0;
    while (!done && ticks - started < 6000) {
        poll();
        if (pinger && !ping_ok && ticks - last >= 20) {
            last = ticks;
            if (!have_peer_mac) {
                static const u8 zero[6] = {0};
                send_arp(1, zero, peer_ip);
            } else if (seq < 10) {
                send_echo(seq++);
            }
        }
        if (pinger && !ping_ok && echo_replies >= 3) {
            ping_ok = 1;
            puts("netdrv: PING OK 10.77.0."); putd(peer_ip[3]); puts(" replies "); putd(echo_replies); puts("\n");
        }
        __asm__ volatile("cli");
        if (rxq.used_seen == rxq.used.idx && !done) __asm__ volatile("sti; hlt");
        __asm__ volatile("sti");
    }
    outb(0x80, 2);
    if (!done) fail("no stop datagram within 60 s");
    if (pinger && !ping_ok) fail("the peer did not answer");
    if (foreign) fail("frames for another address got through the receive filter");
    puts("netdrv: done rx "); putd(rx_frames); puts(" tx "); putd(tx_frames);
    puts(" arp "); putd(arp_answered); puts(" echo "); putd(echo_answered);
    puts(" replies "); putd(echo_replies); puts(" foreign "); putd(foreign);
    puts(" interrupts "); putd(irqs); puts("\n");
    if (failures == 0) puts("NETTEST PASS\n");
    wr(0x70, 0);
    poweroff();
    return 0;
}
