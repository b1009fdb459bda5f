/* The example workload: prints a marker, whether the configfs-tsm interface
 * exists, and which of the bundled TDX modules the kernel has loaded. When it
 * runs as PID 1 (the image's init execs it) it powers the guest off at the end. */
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <sys/reboot.h>
#include <sys/stat.h>

static const char *modules[] = {"configfs", "tsm", "tdx_guest", "vsock",
                                "vmw_vsock_virtio_transport", "vmw_vsock_virtio_transport_common"};

int main(int argc, char **argv)
{
    struct stat st;
    char line[512];
    printf("HELLO-FROM-TDX-GUEST\n");
    for (int i = 1; i < argc; i++)
        printf("arg[%d]=%s\n", i, argv[i]);
    printf("configfs-tsm: %s\n", stat("/sys/kernel/config/tsm", &st) == 0 ? "present" : "absent");
    FILE *f = fopen("/proc/modules", "r");
    while (f && fgets(line, sizeof line, f)) {
        char *space = strchr(line, ' ');
        if (!space)
            continue;
        *space = '\0';
        for (size_t i = 0; i < sizeof modules / sizeof modules[0]; i++)
            if (strcmp(line, modules[i]) == 0)
                printf("module loaded: %s\n", line);
    }
    if (f)
        fclose(f);
    printf("HELLO-DONE\n");
    fflush(stdout);
    if (getpid() == 1) {
        sync();
        reboot(RB_POWER_OFF);
    }
    return 0;
}
