/*
 * Minimal C VMM for the exits-per-second comparison (bench/exits.py).
 * It loads the very machine state guestmem builds (low memory image, sregs,
 * regs: files written by exits.py) into a guest_memfd-backed slot at GPA 0 and
 * runs the same guest, counting KVM_EXIT_IO exits on the tick port.
 *
 * usage: exits MEM_IMAGE SREGS REGS TICK_PORT DONE_PORT
 */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

/* The system's kvm.h predates guest_memfd: the 6.18 uAPI, by hand. */
struct gm_create { uint64_t size, flags, reserved[6]; };
struct gm_region2 {
	uint32_t slot, flags;
	uint64_t guest_phys_addr, memory_size, userspace_addr, guest_memfd_offset;
	uint32_t guest_memfd, pad1;
	uint64_t pad2[14];
};
#define GM_CREATE_GUEST_MEMFD _IOWR(KVMIO, 0xd4, struct gm_create)
#define GM_SET_USER_MEMORY_REGION2 _IOW(KVMIO, 0x49, struct gm_region2)
#define GM_MEM_GUEST_MEMFD (1u << 2)

static void die(const char *what) { perror(what); exit(1); }

static size_t slurp(const char *path, void *buf, size_t max)
{
	int fd = open(path, O_RDONLY);
	if (fd < 0) die(path);
	ssize_t n = read(fd, buf, max);
	if (n < 0) die(path);
	close(fd);
	return (size_t)n;
}

int main(int argc, char **argv)
{
	if (argc != 6) { fprintf(stderr, "usage: %s MEM SREGS REGS TICK DONE\n", argv[0]); return 2; }
	const size_t mem_size = 4 << 20;
	int tick = atoi(argv[4]), done = atoi(argv[5]);
	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0) die("/dev/kvm");
	int vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm < 0) die("KVM_CREATE_VM");
	struct gm_create gc = { .size = mem_size, .flags = 3 /* MMAP | INIT_SHARED */ };
	int gmem = ioctl(vm, GM_CREATE_GUEST_MEMFD, &gc);
	if (gmem < 0) die("KVM_CREATE_GUEST_MEMFD");
	uint8_t *mem = mmap(NULL, mem_size, PROT_READ | PROT_WRITE, MAP_SHARED, gmem, 0);
	if (mem == MAP_FAILED) die("mmap");
	slurp(argv[1], mem, mem_size);
	struct gm_region2 r = { .slot = 0, .flags = GM_MEM_GUEST_MEMFD, .memory_size = mem_size,
				.userspace_addr = (uint64_t)mem, .guest_memfd = (uint32_t)gmem };
	if (ioctl(vm, GM_SET_USER_MEMORY_REGION2, &r) < 0) die("KVM_SET_USER_MEMORY_REGION2");
	int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	if (vcpu < 0) die("KVM_CREATE_VCPU");
	int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED) die("mmap vcpu");
	struct kvm_sregs sregs;
	struct kvm_regs regs;
	if (slurp(argv[2], &sregs, sizeof(sregs)) != sizeof(sregs)) die("short sregs");
	if (slurp(argv[3], &regs, sizeof(regs)) != sizeof(regs)) die("short regs");
	if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0) die("KVM_SET_SREGS");
	if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0) die("KVM_SET_REGS");

	struct timespec t0, t1;
	long exits = 0, ticks = 0;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (;;) {
		if (ioctl(vcpu, KVM_RUN, 0) < 0) die("KVM_RUN");
		exits++;
		if (run->exit_reason != KVM_EXIT_IO) { fprintf(stderr, "exit %u\n", run->exit_reason); return 1; }
		if (run->io.port == tick) ticks++;
		else if (run->io.port == done) break;
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	double s = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
	printf("%ld %ld %.9f\n", exits, ticks, s);
	return 0;
}
