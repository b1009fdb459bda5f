//! The Rust example workload: prints a marker and whether the configfs-tsm interface
//! exists (the guest's way to ask the TDX module for a quote). As PID 1 it powers the
//! guest off at the end through the reboot system call.

use std::path::Path;

fn main() {
    println!("HELLO-FROM-RUST-IN-TDX");
    let tsm = Path::new("/sys/kernel/config/tsm").exists();
    println!("configfs-tsm: {}", if tsm { "present" } else { "absent" });
    println!("RUST-DONE");
    if std::process::id() == 1 {
        power_off();
    }
}

#[cfg(target_os = "linux")]
fn power_off() {
    // reboot(LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2, LINUX_REBOOT_CMD_POWER_OFF): no libc crate needed.
    const SYS_REBOOT: i64 = 169;
    unsafe {
        std::arch::asm!("syscall", inlateout("rax") SYS_REBOOT => _, in("rdi") 0xfee1deadu64,
                        in("rsi") 672274793u64, in("rdx") 0x4321fedcu64,
                        lateout("rcx") _, lateout("r11") _, options(nostack));
    }
}
