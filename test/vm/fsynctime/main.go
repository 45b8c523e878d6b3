// Command fsynctime is a guest tool of the VM benchmarks: it opens each
// path given, calls fsync on it (on a block device, the kernel sends the
// device a FLUSH) and prints the time the call took in microseconds,
// which busybox cannot measure.
//
//	fsynctime /dev/bcache0
package main

import (
	"fmt"
	"os"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: fsynctime PATH...")
		os.Exit(2)
	}
	for _, p := range os.Args[1:] {
		f, err := os.OpenFile(p, os.O_WRONLY, 0)
		if err != nil {
			fmt.Fprintln(os.Stderr, "fsynctime:", err)
			os.Exit(1)
		}
		start := time.Now()
		err = f.Sync()
		took := time.Since(start)
		f.Close()
		if err != nil {
			fmt.Fprintln(os.Stderr, "fsynctime:", err)
			os.Exit(1)
		}
		fmt.Println(took.Microseconds())
	}
}
