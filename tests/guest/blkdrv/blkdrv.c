/*
 * A freestanding virtio-blk driver that tests Strata's VMM from inside a guest.
 *
 * It finds the device by probing the virtio-mmio windows, negotiates features, sets up one
 * split virtqueue, takes interrupts through the I/O APIC and local APIC (the VMM raises them
 * with an irqfd), and runs: GET_ID, reads of a pattern the host wrote, batches of writes and
 * reads with several requests in flight and one notification, flush, discard, write-zeroes,
 * an out-of-range read (must fail with IOERR), with EVENT_IDX suppressing notifications and
 * interrupts. It reports on the serial port and powers off through the ACPI sleep register.
 *
 * Port 0x80 marks the data phase (1 = start, 2 = end) so that the VMM can count the exits the
 * requests cost. Ring 0 is emulated instruction by instruction on PVM hosts: keep it small.
 * Build flags: -mgeneral-regs-only -mno-sse -mno-popcnt -mno-bmi -mno-bmi2 -ffreestanding
 * -nostdlib -fno-pic (see tests/build.rs).
 */
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

#define MMIO_BASE 0xd0000000UL
#define MMIO_WINDOWS 4
#define FIRST_GSI 5
#define IOAPIC 0xfec00000UL
#define LAPIC 0xfee00000UL
#define VECTOR 0x40
#define QSZ 64
#define INFLIGHT 8
#define BLK 4096

#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_GET_ID 8
#define VIRTIO_BLK_T_DISCARD 11
#define VIRTIO_BLK_T_WRITE_ZEROES 13

#define F_FLUSH (1UL << 9)
#define F_BLK_SIZE (1UL << 6)
#define F_SEG_MAX (1UL << 2)
#define F_DISCARD (1UL << 13)
#define F_WRITE_ZEROES (1UL << 14)
#define F_EVENT_IDX (1UL << 29)
#define F_VERSION_1 (1UL << 32)

struct desc { u64 addr; u32 len; u16 flags; u16 next; };
struct avail { u16 flags; u16 idx; u16 ring[QSZ]; u16 used_event; };
struct used_elem { u32 id; u32 len; };
struct used { u16 flags; u16 idx; struct used_elem ring[QSZ]; u16 avail_event; };
struct req_hdr { u32 type; u32 reserved; u64 sector; };
struct dwz { u64 sector; u32 sectors; u32 flags; };
struct idt_entry { u16 off0; u16 sel; u8 ist; u8 attr; u16 off1; u32 off2; u32 zero; };
struct idt_ptr { u16 limit; u64 base; } __attribute__((packed));

static struct desc descs[QSZ] __attribute__((aligned(4096)));
static struct avail avail __attribute__((aligned(4096)));
static struct used used __attribute__((aligned(4096)));
static struct req_hdr hdrs[INFLIGHT];
static struct dwz dwz_seg;
static volatile u8 statuses[INFLIGHT];
static u8 bufs[INFLIGHT][BLK] __attribute__((aligned(4096)));
static struct idt_entry idt[256] __attribute__((aligned(16)));

static u64 dev;
static u16 avail_idx, used_seen;
static volatile u64 irqs;
static u64 requests, notifies, failures;

void isr_virtio(void);
void isr_exceptions(void);

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u32 rd(u64 off) { return *(volatile u32 *)(dev + off); }
static inline void wr(u64 off, u32 v) { *(volatile u32 *)(dev + off) = v; }
/* A full barrier without SSE2 (mfence is not emulated in ring 0 on PVM hosts). */
static inline void mb(void) { __asm__ volatile("lock; orl $0, (%%rsp)" ::: "memory", "cc"); }
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }

static void puts(const char *s) { while (*s) outb(0x3f8, (u8)*s++); }
static void putx(u64 v)
{
    char b[19]; int i = 18; b[i] = 0;
    do { u8 d = v & 15; b[--i] = d < 10 ? '0' + d : 'a' + d - 10; v >>= 4; } while (v);
    b[--i] = 'x'; b[--i] = '0';
    puts(&b[i]);
}
static void putd(u64 v)
{
    char b[21]; int i = 20; b[i] = 0;
    do { b[--i] = '0' + v % 10; v /= 10; } while (v);
    puts(&b[i]);
}

static void poweroff(void)
{
    outb(0x3c0, (5 << 2) | 0x20); /* SLP_TYP = S5, SLP_EN */
    for (;;) __asm__ volatile("cli; hlt");
}

static void fail(const char *what)
{
    failures++;
    puts("BLKTEST FAIL "); puts(what); puts("\n");
}

/* `a` and `b` are the first two words the CPU pushed: rip (or the error code, then rip). */
void on_exception(u64 vector, u64 a, u64 b)
{
    puts("BLKTEST FAIL guest exception "); putd(vector);
    puts(" at "); putx(a); puts(" / "); putx(b); puts("\n");
    poweroff();
}

void on_irq(void)
{
    u32 isr = rd(0x60);
    wr(0x64, isr);
    irqs++;
    *(volatile u32 *)(LAPIC + 0xb0) = 0; /* EOI */
}

static void set_gate(int v, void (*fn)(void))
{
    u64 a = (u64)fn;
    idt[v].off0 = a & 0xffff; idt[v].sel = 0x10; idt[v].ist = 0; idt[v].attr = 0x8e;
    idt[v].off1 = (a >> 16) & 0xffff; idt[v].off2 = a >> 32; idt[v].zero = 0;
}

static void ioapic_route(u32 gsi, u8 vector)
{
    volatile u32 *sel = (volatile u32 *)IOAPIC, *win = (volatile u32 *)(IOAPIC + 0x10);
    *sel = 0x10 + 2 * gsi + 1; *win = 0;            /* destination: APIC 0 */
    *sel = 0x10 + 2 * gsi; *win = vector;           /* fixed, edge, active high, unmasked */
}

static void setup_interrupts(u32 gsi)
{
    struct idt_ptr p = { sizeof(idt) - 1, (u64)idt };
    /* Mask the legacy 8259 PICs: lines are routed to them too, and an uninitialised PIC would
     * deliver IRQ n as vector n. We use the I/O APIC. */
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
    for (int v = 0; v < 32; v++) set_gate(v, (void (*)(void))((u64)isr_exceptions + 32 * v));
    set_gate(VECTOR, isr_virtio);
    __asm__ volatile("lidt %0" : : "m"(p));
    *(volatile u32 *)(LAPIC + 0x80) = 0;            /* TPR: accept all */
    *(volatile u32 *)(LAPIC + 0xf0) = 0x1ff;        /* SVR: enable, spurious vector 0xff */
    ioapic_route(gsi, VECTOR);
}

/* Virtio's vring_need_event: notify when new_idx passed event since old. */
static int need_event(u16 event, u16 new_idx, u16 old)
{
    return (u16)(new_idx - event - 1) < (u16)(new_idx - old);
}

/* Queues request `slot` as a chain of descriptors slot*3.. (header, optional data, status). */
static void queue_req(int slot, u32 type, u64 sector, void *data, u32 len, int device_writes)
{
    int d = slot * 3, n = 0;
    hdrs[slot].type = type; hdrs[slot].reserved = 0; hdrs[slot].sector = sector;
    statuses[slot] = 0xff;
    descs[d].addr = (u64)&hdrs[slot]; descs[d].len = sizeof(struct req_hdr);
    descs[d].flags = 1; descs[d].next = d + 1; n++;
    if (len) {
        descs[d + n].addr = (u64)data; descs[d + n].len = len;
        descs[d + n].flags = 1 | (device_writes ? 2 : 0); descs[d + n].next = d + n + 1; n++;
    }
    descs[d + n].addr = (u64)&statuses[slot]; descs[d + n].len = 1;
    descs[d + n].flags = 2; descs[d + n].next = 0;
    avail.ring[avail_idx % QSZ] = d;
    barrier();
    avail_idx++;
    requests++;
}

/* Publishes queued requests and notifies the device if it asked for it (EVENT_IDX). */
static void kick(void)
{
    u16 old = avail.idx;
    mb();
    avail.idx = avail_idx;
    mb();
    if (need_event(used.avail_event, avail_idx, old)) {
        wr(0x50, 0);
        notifies++;
    }
}

/* Waits (halting until interrupts) until every request queued so far has completed. */
static void wait_all(void)
{
    for (;;) {
        __asm__ volatile("cli");
        /* Ask for one interrupt once the last outstanding request is used. */
        avail.used_event = (u16)(avail_idx - 1);
        mb();
        if (used.idx == avail_idx) {
            __asm__ volatile("sti");
            break;
        }
        __asm__ volatile("sti; hlt");
    }
    used_seen = avail_idx;
}

static u8 host_pattern(u64 off) { return (u8)((off * 13) ^ (off >> 9) ^ 0x5a); }
static u8 guest_pattern(u64 off) { return (u8)((off * 7) ^ (off >> 11) ^ 0xc3); }

static void fill(u8 *b, u64 disk_off, u32 len, u8 (*pat)(u64))
{
    for (u32 i = 0; i < len; i++) b[i] = pat(disk_off + i);
}

static int check(const u8 *b, u64 disk_off, u32 len, u8 (*pat)(u64))
{
    for (u32 i = 0; i < len; i++)
        if (b[i] != (pat ? pat(disk_off + i) : 0)) return 0;
    return 1;
}

static int all_ok(int n)
{
    for (int i = 0; i < n; i++) if (statuses[i] != 0) return 0;
    return 1;
}

/* Reads INFLIGHT blocks from `sector` on with one notification, checking against `pat`. */
static void read_batch(u64 sector, u8 (*pat)(u64), const char *what)
{
    for (int i = 0; i < INFLIGHT; i++) queue_req(i, VIRTIO_BLK_T_IN, sector + i * 8, bufs[i], BLK, 1);
    kick();
    wait_all();
    if (!all_ok(INFLIGHT)) { fail(what); return; }
    for (int i = 0; i < INFLIGHT; i++)
        if (!check(bufs[i], (sector + i * 8) * 512, BLK, pat)) { fail(what); return; }
}

static int probe(void)
{
    for (int i = 0; i < MMIO_WINDOWS; i++) {
        dev = MMIO_BASE + 0x1000UL * i;
        if (rd(0) == 0x74726976 && rd(4) == 2 && rd(8) == 2) return i;
    }
    return -1;
}

/* Resets the device at `dev`, negotiates `want`, sets up queue 0 and routes its interrupt
 * (window `idx`); returns the capacity in sectors. Powers off on failure. */
static u64 setup_device(int idx, u64 want)
{
    wr(0x70, 0);                        /* reset */
    wr(0x70, 1);                        /* ACKNOWLEDGE */
    wr(0x70, 1 | 2);                    /* DRIVER */
    wr(0x14, 0); u64 f = rd(0x10);
    wr(0x14, 1); f |= (u64)rd(0x10) << 32;
    if ((f & want) != want) { fail("device lacks a needed feature"); putx(f); poweroff(); }
    wr(0x24, 0); wr(0x20, (u32)want);
    wr(0x24, 1); wr(0x20, (u32)(want >> 32));
    wr(0x70, 1 | 2 | 8);                /* FEATURES_OK */
    if (!(rd(0x70) & 8)) { fail("FEATURES_OK not accepted"); poweroff(); }
    u64 capacity = rd(0x100) | ((u64)rd(0x104) << 32);
    u32 blk_size = rd(0x100 + 20);
    puts("blkdrv: capacity "); putd(capacity); puts(" sectors, blk_size "); putd(blk_size); puts("\n");

    wr(0x30, 0);
    if (rd(0x34) < QSZ) { fail("queue too small"); poweroff(); }
    wr(0x38, QSZ);
    wr(0x80, (u32)(u64)descs); wr(0x84, 0);
    wr(0x90, (u32)(u64)&avail); wr(0x94, 0);
    wr(0xa0, (u32)(u64)&used); wr(0xa4, 0);
    wr(0x44, 1);
    setup_interrupts(FIRST_GSI + idx);
    wr(0x70, 1 | 2 | 8 | 4);            /* DRIVER_OK */
    __asm__ volatile("sti");
    return capacity;
}

#ifndef TICKER
int main(void)
{
    puts("blkdrv: start\n");
    int idx = probe();
    if (idx < 0) { fail("no virtio-blk device"); poweroff(); }
    puts("blkdrv: virtio-blk at "); putx(dev); puts("\n");
    u64 want = F_VERSION_1 | F_EVENT_IDX | F_FLUSH | F_BLK_SIZE | F_SEG_MAX | F_DISCARD | F_WRITE_ZEROES;
    u64 capacity = setup_device(idx, want);

    outb(0x80, 1);                      /* data phase starts */
    u64 irq0 = irqs;

    /* GET_ID */
    queue_req(0, VIRTIO_BLK_T_GET_ID, 0, bufs[0], 20, 1);
    kick(); wait_all();
    bufs[0][20] = 0;
    if (statuses[0] != 0) fail("GET_ID status");
    puts("blkdrv: serial '"); puts((const char *)bufs[0]); puts("'\n");

    /* Reads of the host's pattern: sectors 0..63, eight requests in flight. */
    read_batch(0, host_pattern, "reading the host's pattern");

    /* Writes of our pattern to sectors 64..127, flush, read back. */
    for (int i = 0; i < INFLIGHT; i++) {
        fill(bufs[i], (64 + i * 8) * 512UL, BLK, guest_pattern);
        queue_req(i, VIRTIO_BLK_T_OUT, 64 + i * 8, bufs[i], BLK, 0);
    }
    kick(); wait_all();
    if (!all_ok(INFLIGHT)) fail("writing");
    queue_req(0, VIRTIO_BLK_T_FLUSH, 0, 0, 0, 0);
    kick(); wait_all();
    if (statuses[0] != 0) fail("flush");
    for (int i = 0; i < INFLIGHT; i++) for (int j = 0; j < BLK; j++) bufs[i][j] = 0;
    read_batch(64, guest_pattern, "reading back our writes");

    /* Discard sectors 128..135 and write-zeroes 136..143 (the host filled both). */
    dwz_seg.sector = 128; dwz_seg.sectors = 8; dwz_seg.flags = 0;
    queue_req(0, VIRTIO_BLK_T_DISCARD, 0, &dwz_seg, sizeof(dwz_seg), 0);
    kick(); wait_all();
    if (statuses[0] != 0) fail("discard status");
    dwz_seg.sector = 136; dwz_seg.sectors = 8; dwz_seg.flags = 0;
    queue_req(0, VIRTIO_BLK_T_WRITE_ZEROES, 0, &dwz_seg, sizeof(dwz_seg), 0);
    kick(); wait_all();
    if (statuses[0] != 0) fail("write-zeroes status");
    for (int i = 0; i < 2; i++) {
        for (int j = 0; j < BLK; j++) bufs[i][j] = 0xee;
        queue_req(i, VIRTIO_BLK_T_IN, 128 + i * 8, bufs[i], BLK, 1);
    }
    kick(); wait_all();
    if (!all_ok(2) || !check(bufs[0], 0, BLK, 0)) fail("discarded range does not read as zeros");
    if (!check(bufs[1], 0, BLK, 0)) fail("write-zeroes range does not read as zeros");

    /* A read past the end must fail with IOERR (1), not hang or crash anything. */
    queue_req(0, VIRTIO_BLK_T_IN, capacity - 1, bufs[0], BLK, 1);
    kick(); wait_all();
    if (statuses[0] != 1) fail("out-of-range read did not get IOERR");

    outb(0x80, 2);                      /* data phase ends */
    puts("blkdrv: requests "); putd(requests);
    puts(" notifies "); putd(notifies);
    puts(" interrupts "); putd(irqs - irq0); puts("\n");
    if (irqs == irq0) fail("no interrupt arrived");
    if (failures == 0) puts("BLKTEST PASS\n");
    wr(0x70, 0);                        /* reset the device: workers stop */
    poweroff();
    return 0;
}
#endif

#ifdef TICKER
/*
 * The ticker: a guest that keeps running and shows it. Every ~100 ms it writes a counter to
 * the disk (sector TICK_SECTOR: "TICK", then the counter as a little-endian u64), flushes,
 * and prints "tick N" on the serial port. The ACPI power button (the VMM's GED, GSI 3, event
 * register at port 0x3c4) makes it print an acknowledgement, flush and power off through the
 * ACPI sleep register.
 */
#define TICK_SECTOR 1024
#define GED_GSI 3
#define GED_PORT 0x3c4
#define GED_VECTOR 0x41
#define TIMER_VECTOR 0x42

void isr_ged(void);
void isr_timer(void);

static volatile u64 ticks;
static volatile int button;

static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }

void on_ged(void)
{
    if (inb(GED_PORT) & 1) button = 1;
    *(volatile u32 *)(LAPIC + 0xb0) = 0; /* EOI */
}

void on_timer(void)
{
    ticks++;
    *(volatile u32 *)(LAPIC + 0xb0) = 0; /* EOI */
}

static void write_counter(u64 counter)
{
    u8 *b = bufs[0];
    for (int i = 0; i < 512; i++) b[i] = 0;
    b[0] = 'T'; b[1] = 'I'; b[2] = 'C'; b[3] = 'K';
    for (int i = 0; i < 8; i++) b[8 + i] = (u8)(counter >> (8 * i));
    queue_req(0, VIRTIO_BLK_T_OUT, TICK_SECTOR, b, 512, 0);
    queue_req(1, VIRTIO_BLK_T_FLUSH, 0, 0, 0, 0);
    kick(); wait_all();
    if (!all_ok(2)) fail("writing the counter");
}

int main(void)
{
    puts("ticker: start\n");
    int idx = probe();
    if (idx < 0) { fail("no virtio-blk device"); poweroff(); }
    setup_device(idx, F_VERSION_1 | F_EVENT_IDX | F_FLUSH);
    __asm__ volatile("cli");
    set_gate(GED_VECTOR, isr_ged);
    set_gate(TIMER_VECTOR, isr_timer);
    ioapic_route(GED_GSI, GED_VECTOR);
    /* LAPIC timer: periodic, divide by 16; KVM's APIC bus runs at 1 GHz: 625000 = 10 ms. */
    *(volatile u32 *)(LAPIC + 0x3e0) = 0x3;
    *(volatile u32 *)(LAPIC + 0x320) = TIMER_VECTOR | (1 << 17);
    *(volatile u32 *)(LAPIC + 0x380) = 625000;
    __asm__ volatile("sti");
    puts("ticker: running\n");
    for (u64 counter = 1;; counter++) {
        write_counter(counter);
        puts("tick "); putd(counter); puts("\n");
        u64 until = ticks + 10;
        while (ticks < until && !button) __asm__ volatile("sti; hlt");
        if (button) {
            puts("ticker: power button pressed, powering off\n");
            write_counter(counter);
            poweroff();
        }
    }
    return 0;
}
#endif
