/* The agent injected into the container's root filesystem at /sbin/vm-agent. The
 * image's init mounts the ext4 disk (read-only through dm-verity, with a tmpfs overlay on
 * top), switches root to it and runs this as PID 1: it prints a marker and a file of the
 * container image, writes a file and reads it back, then powers off. */
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
    FILE *w = fopen("/srv/written-by-agent.txt", "w");
    int wrote = w && fputs("written in the guest\n", w) >= 0 && fclose(w) == 0;
    FILE *r = fopen("/srv/written-by-agent.txt", "r");
    if (wrote && r && fgets(line, sizeof line, r))
        printf("agent wrote: %s", line);
    else
        printf("agent could not write /srv/written-by-agent.txt\n");
    if (r)
        fclose(r);
    printf("AGENT-DONE\n");
    fflush(stdout);
    if (getpid() == 1) {
        sync();
        reboot(RB_POWER_OFF);
    }
    return 0;
}
