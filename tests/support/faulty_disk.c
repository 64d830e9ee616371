/*
 * faulty_disk: a FUSE filesystem exposing one read-only file, "disk", whose
 * bytes come from an image file, except that every read request overlapping
 * a configured bad byte range fails with EIO -- a disk with bad sectors.
 *
 *   faulty_disk IMAGE BADRANGES MOUNTPOINT
 *
 * BADRANGES is "POS+SIZE[,POS+SIZE...]" (decimal or 0x hex) or "" for none.
 * Runs in the foreground, single-threaded, until unmounted or signalled.
 *
 * The file is opened with direct_io so the kernel neither caches nor
 * rounds reads up to pages: each read() reaches us with its own offset and
 * size, which is what lets a 512-byte read next to a bad sector succeed.
 */
#define FUSE_USE_VERSION 31
#define _FILE_OFFSET_BITS 64

#include <errno.h>
#include <fcntl.h>
#include <fuse.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define DISK_PATH "/disk"

struct byte_range {
    off_t start;
    off_t end; /* exclusive */
};

static int image_fd;
static off_t image_size;
static struct byte_range *bad_ranges;
static size_t bad_range_count;

static int parse_bad_ranges(const char *text)
{
    size_t capacity = 1;
    for (const char *c = text; *c; c++)
        capacity += *c == ',';
    bad_ranges = calloc(capacity, sizeof *bad_ranges);
    if (!bad_ranges)
        return -1;

    const char *cursor = text;
    while (*cursor) {
        char *after;
        errno = 0;
        unsigned long long start = strtoull(cursor, &after, 0);
        if (errno || after == cursor || *after != '+')
            return -1;
        cursor = after + 1;
        unsigned long long size = strtoull(cursor, &after, 0);
        if (errno || after == cursor || size == 0 || (*after != ',' && *after != '\0'))
            return -1;
        bad_ranges[bad_range_count++] = (struct byte_range){start, start + size};
        cursor = *after == ',' ? after + 1 : after;
    }
    return 0;
}

static int overlaps_bad_range(off_t start, off_t end)
{
    for (size_t i = 0; i < bad_range_count; i++)
        if (start < bad_ranges[i].end && bad_ranges[i].start < end)
            return 1;
    return 0;
}

static int faulty_getattr(const char *path, struct stat *st, struct fuse_file_info *fi)
{
    (void)fi;
    memset(st, 0, sizeof *st);
    if (strcmp(path, "/") == 0) {
        st->st_mode = S_IFDIR | 0555;
        st->st_nlink = 2;
    } else if (strcmp(path, DISK_PATH) == 0) {
        st->st_mode = S_IFREG | 0444;
        st->st_nlink = 1;
        st->st_size = image_size;
    } else {
        return -ENOENT;
    }
    return 0;
}

static int faulty_readdir(const char *path, void *buf, fuse_fill_dir_t filler, off_t offset,
                          struct fuse_file_info *fi, enum fuse_readdir_flags flags)
{
    (void)offset, (void)fi, (void)flags;
    if (strcmp(path, "/") != 0)
        return -ENOENT;
    filler(buf, ".", NULL, 0, 0);
    filler(buf, "..", NULL, 0, 0);
    filler(buf, DISK_PATH + 1, NULL, 0, 0);
    return 0;
}

static int faulty_open(const char *path, struct fuse_file_info *fi)
{
    if (strcmp(path, DISK_PATH) != 0)
        return -ENOENT;
    if ((fi->flags & O_ACCMODE) != O_RDONLY)
        return -EROFS;
    fi->direct_io = 1;
    return 0;
}

static int faulty_read(const char *path, char *buf, size_t size, off_t offset,
                       struct fuse_file_info *fi)
{
    (void)path, (void)fi;
    if (offset >= image_size)
        return 0;
    if ((off_t)size > image_size - offset)
        size = image_size - offset;
    if (overlaps_bad_range(offset, offset + size))
        return -EIO;

    size_t done = 0;
    while (done < size) {
        ssize_t n = pread(image_fd, buf + done, size - done, offset + done);
        if (n < 0)
            return -errno;
        if (n == 0)
            break;
        done += n;
    }
    return done;
}

static const struct fuse_operations faulty_operations = {
    .getattr = faulty_getattr,
    .readdir = faulty_readdir,
    .open = faulty_open,
    .read = faulty_read,
};

int main(int argc, char *argv[])
{
    if (argc != 4) {
        fprintf(stderr, "usage: %s IMAGE BADRANGES MOUNTPOINT\n", argv[0]);
        return 2;
    }
    image_fd = open(argv[1], O_RDONLY);
    if (image_fd < 0) {
        perror(argv[1]);
        return 1;
    }
    struct stat image_stat;
    if (fstat(image_fd, &image_stat) < 0) {
        perror(argv[1]);
        return 1;
    }
    image_size = image_stat.st_size;
    if (parse_bad_ranges(argv[2]) < 0) {
        fprintf(stderr, "%s: bad ranges must look like POS+SIZE[,POS+SIZE...]: '%s'\n",
                argv[0], argv[2]);
        return 2;
    }

    char *fuse_argv[] = {argv[0], "-f", "-s", "-o", "ro,fsname=faulty_disk,subtype=faulty_disk",
                         argv[3], NULL};
    return fuse_main(6, fuse_argv, &faulty_operations, NULL);
}
