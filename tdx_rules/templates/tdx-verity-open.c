/*
 * tdx-verity-open: open a dm-verity device from the parameters on the measured kernel command
 * line, for the /init of a tdx-rules image (busybox has no dmsetup).
 *
 *   tdx-verity-open ROOT,SALT,DATA_BLOCKS,ALGORITHM,DATA_BLOCK_SIZE,HASH_BLOCK_SIZE DATA HASH NAME
 *
 * creates the read-only device-mapper device NAME with one "verity" target (format 1, the
 * hash tree after a one-block superblock in HASH, as tdx_rules/rootfs/verity.py writes it), its
 * node /dev/mapper/NAME, and prints that path. Every parameter comes from the command line the
 * TD measured into RTMR[2]; the superblock of HASH is never read. The device-mapper ioctls and
 * their structures are the kernel's user API (include/uapi/linux/dm-ioctl.h; the table syntax
 * of Documentation/admin-guide/device-mapper/verity.rst), written out here because musl's
 * headers do not carry them. Exit status 1 with one line on stderr when anything is refused.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

struct dm_ioctl {
    uint32_t version[3];
    uint32_t data_size;
    uint32_t data_start;
    uint32_t target_count;
    int32_t open_count;
    uint32_t flags;
    uint32_t event_nr;
    uint32_t padding;
    uint64_t dev;
    char name[128];
    char uuid[129];
    char data[7];
};

struct dm_target_spec {
    uint64_t sector_start;
    uint64_t length;
    int32_t status;
    uint32_t next;
    char target_type[16];
};

#define DM_IOCTL 0xfd
#define DM_DEV_CREATE _IOWR(DM_IOCTL, 3, struct dm_ioctl)
#define DM_DEV_SUSPEND _IOWR(DM_IOCTL, 6, struct dm_ioctl)
#define DM_TABLE_LOAD _IOWR(DM_IOCTL, 9, struct dm_ioctl)
#define DM_READONLY_FLAG (1 << 0)

static int fail(const char *what, const char *detail) {
    fprintf(stderr, "tdx-verity-open: %s%s%s\n", what, detail ? ": " : "", detail ? detail : "");
    return 1;
}

static int is_hex(const char *text, size_t min, size_t max) {
    size_t n = strlen(text);
    if (n < min || n > max || n % 2)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!strchr("0123456789abcdef", text[i]))
            return 0;
    return 1;
}

static int is_number(const char *text) {
    if (!*text || strlen(text) > 19)
        return 0;
    for (const char *c = text; *c; c++)
        if (*c < '0' || *c > '9')
            return 0;
    return 1;
}

static void header(struct dm_ioctl *io, size_t size, const char *name) {
    memset(io, 0, sizeof(*io));
    io->version[0] = 4;
    io->data_size = (uint32_t)size;
    io->data_start = sizeof(*io);
    snprintf(io->name, sizeof(io->name), "%s", name);
}

int main(int argc, char **argv) {
    if (argc != 5)
        return fail("usage: tdx-verity-open ROOT,SALT,BLOCKS,ALGORITHM,DATA_BS,HASH_BS DATA HASH NAME", NULL);
    char params[1024];
    if (strlen(argv[1]) >= sizeof(params))
        return fail("the verity parameters are too long", NULL);
    strcpy(params, argv[1]);
    char *field[6];
    char *rest = params;
    for (int i = 0; i < 6; i++) {
        field[i] = strsep(&rest, ",");
        if (!field[i])
            return fail("the verity parameters need six comma-separated fields", NULL);
    }
    if (rest)
        return fail("the verity parameters have more than six fields", NULL);
    const char *root = field[0], *salt = field[1], *algorithm = field[3];
    size_t digest = strcmp(algorithm, "sha256") == 0 ? 64 : strcmp(algorithm, "sha512") == 0 ? 128 : 0;
    if (!digest)
        return fail("unknown hash algorithm", algorithm);
    if (!is_hex(root, digest, digest))
        return fail("the root hash is not lowercase hex of the algorithm's size", root);
    if (!is_hex(salt, 2, 512))
        return fail("the salt is not lowercase hex", salt);
    if (!is_number(field[2]) || !is_number(field[4]) || !is_number(field[5]))
        return fail("the block count and block sizes must be numbers", NULL);
    unsigned long long blocks = strtoull(field[2], NULL, 10);
    unsigned long data_bs = strtoul(field[4], NULL, 10), hash_bs = strtoul(field[5], NULL, 10);
    if (!blocks || (data_bs != 4096 && data_bs != 512) || (hash_bs != 4096 && hash_bs != 512))
        return fail("unsupported block count or block size", NULL);
    const char *data_dev = argv[2], *hash_dev = argv[3], *name = argv[4];
    if (strlen(name) >= 128 || strchr(name, '/') || !*name)
        return fail("bad device name", name);

    int control = open("/dev/mapper/control", O_RDWR | O_CLOEXEC);
    if (control < 0 && errno == ENOENT) {
        mkdir("/dev/mapper", 0755);
        if (mknod("/dev/mapper/control", S_IFCHR | 0600, makedev(10, 236)) == 0)
            control = open("/dev/mapper/control", O_RDWR | O_CLOEXEC);
    }
    if (control < 0)
        return fail("cannot open /dev/mapper/control (is dm_mod loaded?)", strerror(errno));

    struct dm_ioctl create;
    header(&create, sizeof(create), name);
    if (ioctl(control, DM_DEV_CREATE, &create) < 0)
        return fail("cannot create the device-mapper device", strerror(errno));

    /* The table: one verity target over the whole data device, the tree at hash block 1. */
    char table[1536];
    int length = snprintf(table, sizeof(table), "1 %s %s %lu %lu %llu 1 %s %s %s", data_dev, hash_dev, data_bs,
                          hash_bs, blocks, algorithm, root, salt);
    if (length < 0 || (size_t)length >= sizeof(table))
        return fail("the verity table is too long", NULL);
    size_t spec_size = sizeof(struct dm_target_spec) + (((size_t)length + 1 + 7) & ~(size_t)7);
    size_t total = sizeof(struct dm_ioctl) + spec_size;
    unsigned char *buffer = calloc(1, total);
    if (!buffer)
        return fail("out of memory", NULL);
    struct dm_ioctl *load = (struct dm_ioctl *)buffer;
    header(load, total, name);
    load->target_count = 1;
    load->flags = DM_READONLY_FLAG;
    struct dm_target_spec *spec = (struct dm_target_spec *)(buffer + sizeof(struct dm_ioctl));
    spec->sector_start = 0;
    spec->length = blocks * (data_bs / 512);
    spec->next = (uint32_t)spec_size;
    strcpy(spec->target_type, "verity");
    memcpy(buffer + sizeof(struct dm_ioctl) + sizeof(struct dm_target_spec), table, (size_t)length + 1);
    if (ioctl(control, DM_TABLE_LOAD, load) < 0)
        return fail("the kernel refused the verity table", strerror(errno));

    struct dm_ioctl resume;
    header(&resume, sizeof(resume), name);
    if (ioctl(control, DM_DEV_SUSPEND, &resume) < 0)
        return fail("cannot activate the device", strerror(errno));

    /* dev is the kernel's huge_encode_dev() of the new disk. */
    unsigned int major_number = (unsigned int)((resume.dev & 0xfff00) >> 8);
    unsigned int minor_number = (unsigned int)((resume.dev & 0xff) | ((resume.dev >> 12) & 0xfff00));
    char node[160];
    snprintf(node, sizeof(node), "/dev/mapper/%s", name);
    mkdir("/dev/mapper", 0755);
    if (mknod(node, S_IFBLK | 0600, makedev(major_number, minor_number)) < 0 && errno != EEXIST)
        return fail("cannot create the device node", strerror(errno));
    printf("%s\n", node);
    return 0;
}
