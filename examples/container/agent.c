/* The agent injected into the container's root filesystem at /sbin/vm-agent. The
 * image's init mounts the ext4 disk, switches root to it and runs this as PID 1:
 * it prints a marker and a file of the container image, then powers off. */
#include <stdio.h>
#include <unistd.h>
#include <sys/reboot.h>

int main(void)
{
    char line[256];
    printf("AGENT-FROM-CONTAINER-ROOTFS\n");
    FILE *f = fopen("/srv/greeting.txt", "r");
    while (f && fgets(line, sizeof line, f))
        printf("container file: %s", line);
    if (f)
        fclose(f);
    printf("AGENT-DONE\n");
    fflush(stdout);
    if (getpid() == 1) {
        sync();
        reboot(RB_POWER_OFF);
    }
    return 0;
}
