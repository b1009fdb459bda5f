// The Go example workload: a small HTTP service. It listens on LISTEN (default :8080),
// asks itself for / over loopback to show that it serves, prints the answer and keeps
// serving. Run with -once it exits after that first answer; as PID 1 it then powers the
// guest off.
package main

import (
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"syscall"
)

func greeting(w http.ResponseWriter, r *http.Request) {
	tsm := "absent"
	if _, err := os.Stat("/sys/kernel/config/tsm"); err == nil {
		tsm = "present"
	}
	fmt.Fprintf(w, "hello from Go in TDX (configfs-tsm: %s)\n", tsm)
}

func main() {
	once := flag.Bool("once", false, "exit after answering the first request to itself")
	flag.Parse()
	addr := os.Getenv("LISTEN")
	if addr == "" {
		addr = ":8080"
	}
	fmt.Println("HELLO-FROM-GO-IN-TDX")
	listener, err := net.Listen("tcp", addr)
	if err != nil {
		fail(err)
	}
	fmt.Printf("GO-LISTENING %s\n", listener.Addr())
	go func() { fail(http.Serve(listener, http.HandlerFunc(greeting))) }()

	port := listener.Addr().(*net.TCPAddr).Port
	response, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/", port))
	if err != nil {
		fail(err)
	}
	body, err := io.ReadAll(response.Body)
	response.Body.Close()
	if err != nil {
		fail(err)
	}
	fmt.Printf("GO-SELF-REQUEST %d %s", response.StatusCode, body)
	fmt.Println("GO-SERVING")
	if *once {
		stop(0)
	}
	select {}
}

func fail(err error) {
	fmt.Println("GO-ERROR", err)
	stop(1)
}

// stop exits, or powers the guest off when this is PID 1 (the kernel panics if init exits).
func stop(code int) {
	if os.Getpid() == 1 {
		syscall.Sync()
		syscall.Reboot(syscall.LINUX_REBOOT_CMD_POWER_OFF)
	}
	os.Exit(code)
}
