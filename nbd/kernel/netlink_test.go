package kernel

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"testing"
	"time"

	"github.com/mdlayher/genetlink"
	"github.com/mdlayher/genetlink/genltest"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// attr builds one netlink attribute by hand: u16 length, u16 type, the
// value, zero padding to 4 bytes. It is the reference the encoder is
// checked against.
func attr(typ uint16, value []byte) []byte {
	b := make([]byte, 4, 4+len(value)+3)
	binary.NativeEndian.PutUint16(b[0:2], uint16(4+len(value)))
	binary.NativeEndian.PutUint16(b[2:4], typ)
	b = append(b, value...)
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

func nested(typ uint16, children ...[]byte) []byte {
	return attr(typ|0x8000, bytes.Join(children, nil))
}

func u32(v uint32) []byte { return binary.NativeEndian.AppendUint32(nil, v) }
func u64(v uint64) []byte { return binary.NativeEndian.AppendUint64(nil, v) }
func u8(v uint8) []byte   { return []byte{v} }

func cat(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

func TestEncodeConnectLayout(t *testing.T) {
	c := Config{
		Index:           3,
		Size:            1 << 30,
		BlockSize:       4096,
		ServerFlags:     FlagHasFlags | FlagSendFlush | FlagSendFUA | FlagSendTrim | FlagSendWriteZeroes | FlagCanMultiConn,
		ClientFlags:     DestroyOnDisconnect,
		Timeout:         1500 * time.Millisecond, // rounds up to 2 s
		DeadConnTimeout: time.Minute,
		Backend:         "nbdcache:/dev/vdb",
	}
	got, err := encodeConnect(c, []int{7, 9})
	if err != nil {
		t.Fatal(err)
	}
	want := cat(
		attr(1, u32(3)),
		attr(2, u64(1<<30)),
		attr(3, u64(4096)),
		attr(5, u64(0x16d)),
		attr(4, u64(2)),
		attr(8, u64(60)),
		attr(6, u64(1)),
		attr(10, []byte("nbdcache:/dev/vdb\x00")),
		nested(7,
			nested(1, attr(1, u32(7))),
			nested(1, attr(1, u32(9)))),
	)
	if !bytes.Equal(got, want) {
		t.Fatalf("connect attributes:\n got %x\nwant %x", got, want)
	}
	if uint64(0x16d) != c.ServerFlags {
		t.Fatalf("server flags %#x, want 0x16d", c.ServerFlags)
	}
}

func TestEncodeConnectAnyIndexOmitsIndex(t *testing.T) {
	got, err := encodeConnect(Config{Index: AnyIndex, Size: 1 << 20}, []int{5})
	if err != nil {
		t.Fatal(err)
	}
	want := cat(
		attr(2, u64(1<<20)),
		attr(5, u64(0)),
		attr(4, u64(0)),
		attr(8, u64(0)),
		attr(6, u64(0)),
		nested(7, nested(1, attr(1, u32(5)))),
	)
	if !bytes.Equal(got, want) {
		t.Fatalf("got %x\nwant %x", got, want)
	}
}

func TestEncodeReconfigureLayout(t *testing.T) {
	c := Config{Index: 0, Size: 123, DeadConnTimeout: 30 * time.Second, Backend: "b"}
	got, err := encodeReconfigure(c, []int{4})
	if err != nil {
		t.Fatal(err)
	}
	want := cat(
		attr(1, u32(0)),
		attr(4, u64(0)),
		attr(8, u64(30)),
		attr(6, u64(0)),
		attr(10, []byte("b\x00")),
		nested(7, nested(1, attr(1, u32(4)))),
	)
	if !bytes.Equal(got, want) {
		t.Fatalf("got %x\nwant %x", got, want)
	}
	if _, err := encodeReconfigure(Config{Index: AnyIndex}, nil); !errors.Is(err, ErrInvalid) {
		t.Fatalf("reconfigure without index: %v", err)
	}
}

func TestConfigCheck(t *testing.T) {
	for _, tc := range []struct {
		name string
		c    Config
		ok   bool
	}{
		{"plain", Config{Index: 0, Size: 4096}, true},
		{"any", Config{Index: AnyIndex, Size: 4096, BlockSize: 4096}, true},
		{"zero size", Config{Size: 0}, false},
		{"bad index", Config{Index: -2, Size: 4096}, false},
		{"block 256", Config{Size: 4096, BlockSize: 256}, false},
		{"block 1000", Config{Size: 4000, BlockSize: 1000}, false},
		{"block above page", Config{Size: 1 << 20, BlockSize: 2 * os.Getpagesize()}, false},
		{"unaligned size", Config{Size: 4096 + 512, BlockSize: 4096}, false},
		{"negative timeout", Config{Size: 4096, Timeout: -time.Second}, false},
	} {
		err := tc.c.check()
		if (err == nil) != tc.ok {
			t.Errorf("%s: check() = %v, want ok=%v", tc.name, err, tc.ok)
		}
		if err != nil && !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: %v is not ErrInvalid", tc.name, err)
		}
	}
	if _, err := encodeConnect(Config{Size: 4096}, nil); !errors.Is(err, ErrInvalid) {
		t.Errorf("connect without sockets: %v", err)
	}
}

func TestDecodeStatus(t *testing.T) {
	b := cat(nested(9,
		nested(1, attr(1, u32(0)), attr(2, u8(1))),
		nested(1, attr(1, u32(5)), attr(2, u8(0))),
	))
	got, err := decodeStatus(b)
	if err != nil {
		t.Fatal(err)
	}
	want := []DeviceStatus{{Index: 0, Connected: true}, {Index: 5, Connected: false}}
	if len(got) != len(want) || got[0] != want[0] || got[1] != want[1] {
		t.Fatalf("got %+v, want %+v", got, want)
	}
	if _, err := decodeStatus(nested(9, nested(1, attr(2, u8(1))))); err == nil {
		t.Fatal("entry without an index accepted")
	}
	if idx, err := decodeIndex(attr(1, u32(12))); err != nil || idx != 12 {
		t.Fatalf("decodeIndex = %d, %v", idx, err)
	}
	if _, err := decodeIndex(attr(2, u64(1))); err == nil {
		t.Fatal("reply without an index accepted")
	}
}

var testFamily = genetlink.Family{ID: 0x25, Version: 1, Name: familyName,
	Groups: []genetlink.MulticastGroup{{ID: 7, Name: multicastGroup}}}

// fakeKernel answers like nbd.c: CONNECT replies with an index, errors
// come back as errnos.
func fakeKernel(t *testing.T, fn genltest.Func) *Netlink {
	t.Helper()
	c := genltest.Dial(genltest.ServeFamily(testFamily, fn))
	n, err := newNetlink(c)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	return n
}

func TestNetlinkConnect(t *testing.T) {
	f1, f2 := tempFile(t), tempFile(t)
	var seen genetlink.Message
	var flags netlink.HeaderFlags
	n := fakeKernel(t, func(greq genetlink.Message, nreq netlink.Message) ([]genetlink.Message, error) {
		seen, flags = greq, nreq.Header.Flags
		return []genetlink.Message{{Header: genetlink.Header{Command: cmdConnect, Version: 1}, Data: attr(1, u32(4))}}, nil
	})
	idx, err := n.Connect(Config{Index: AnyIndex, Size: 1 << 20, BlockSize: 512}, []*os.File{f1, f2})
	if err != nil {
		t.Fatal(err)
	}
	if idx != 4 {
		t.Fatalf("index %d, want 4", idx)
	}
	if seen.Header.Command != cmdConnect || seen.Header.Version != 1 {
		t.Fatalf("header %+v", seen.Header)
	}
	if flags&netlink.Request == 0 {
		t.Fatalf("flags %v lack Request", flags)
	}
	want, _ := encodeConnect(Config{Index: AnyIndex, Size: 1 << 20, BlockSize: 512}, []int{int(f1.Fd()), int(f2.Fd())})
	if !bytes.Equal(seen.Data, want) {
		t.Fatalf("sent %x\nwant %x", seen.Data, want)
	}
}

func TestNetlinkErrors(t *testing.T) {
	for _, tc := range []struct {
		errno unix.Errno
		want  error
	}{
		{unix.EBUSY, ErrBusy},
		{unix.EPERM, ErrPermission},
		{unix.EINVAL, ErrInvalid},
	} {
		n := fakeKernel(t, func(genetlink.Message, netlink.Message) ([]genetlink.Message, error) {
			return nil, genltest.Error(int(tc.errno))
		})
		_, err := n.Connect(Config{Index: 0, Size: 4096}, []*os.File{tempFile(t)})
		if !errors.Is(err, tc.want) || !errors.Is(err, tc.errno) {
			t.Errorf("errno %v: got %v, want %v", tc.errno, err, tc.want)
		}
	}
}

func TestNetlinkDisconnectReconfigureStatus(t *testing.T) {
	type call struct {
		cmd   uint8
		data  []byte
		flags netlink.HeaderFlags
	}
	var calls []call
	n := fakeKernel(t, func(greq genetlink.Message, nreq netlink.Message) ([]genetlink.Message, error) {
		calls = append(calls, call{greq.Header.Command, greq.Data, nreq.Header.Flags})
		if greq.Header.Command == cmdStatus {
			return []genetlink.Message{{Header: genetlink.Header{Command: cmdStatus, Version: 1},
				Data: nested(9, nested(1, attr(1, u32(2)), attr(2, u8(1))))}}, nil
		}
		return []genetlink.Message{{}}, nil // the ACK
	})
	if err := n.Disconnect(2); err != nil {
		t.Fatal(err)
	}
	f := tempFile(t)
	if err := n.Reconfigure(Config{Index: 2, Backend: "x"}, []*os.File{f}); err != nil {
		t.Fatal(err)
	}
	st, err := n.Status(AnyIndex)
	if err != nil {
		t.Fatal(err)
	}
	if len(st) != 1 || st[0] != (DeviceStatus{Index: 2, Connected: true}) {
		t.Fatalf("status %+v", st)
	}
	if len(calls) != 3 {
		t.Fatalf("%d calls", len(calls))
	}
	if calls[0].cmd != cmdDisconnect || !bytes.Equal(calls[0].data, attr(1, u32(2))) || calls[0].flags&netlink.Acknowledge == 0 {
		t.Errorf("disconnect sent %+v", calls[0])
	}
	wantRe, _ := encodeReconfigure(Config{Index: 2, Backend: "x"}, []int{int(f.Fd())})
	if calls[1].cmd != cmdReconfigure || !bytes.Equal(calls[1].data, wantRe) || calls[1].flags&netlink.Acknowledge == 0 {
		t.Errorf("reconfigure sent %+v", calls[1])
	}
	if calls[2].cmd != cmdStatus || len(calls[2].data) != 0 {
		t.Errorf("status(any) sent %+v", calls[2])
	}
	if err := n.Disconnect(AnyIndex); !errors.Is(err, ErrInvalid) {
		t.Errorf("disconnect(any): %v", err)
	}
}

func TestNoFamily(t *testing.T) {
	c := genltest.Dial(func(genetlink.Message, netlink.Message) ([]genetlink.Message, error) {
		return nil, genltest.Error(int(unix.ENOENT))
	})
	defer c.Close()
	if _, err := newNetlink(c); !errors.Is(err, ErrNoNetlink) {
		t.Fatalf("got %v, want ErrNoNetlink", err)
	}
}

func tempFile(t *testing.T) *os.File {
	t.Helper()
	f, err := os.CreateTemp(t.TempDir(), "fd")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

func TestIoctlSequence(t *testing.T) {
	steps, err := ioctlSequence(Config{Size: 1 << 20, BlockSize: 4096, ServerFlags: 0x16d, Timeout: 30 * time.Second}, []int{5, 6})
	if err != nil {
		t.Fatal(err)
	}
	want := []ioctlStep{
		{"NBD_SET_BLKSIZE", 0xab01, 4096, false},
		{"NBD_SET_SIZE_BLOCKS", 0xab07, 256, false},
		{"NBD_SET_FLAGS", 0xab0a, 0x16d, true},
		{"NBD_SET_TIMEOUT", 0xab09, 30, false},
		{"NBD_SET_SOCK", 0xab00, 5, false},
		{"NBD_SET_SOCK", 0xab00, 6, false},
	}
	if len(steps) != len(want) {
		t.Fatalf("steps %+v", steps)
	}
	for i := range want {
		if steps[i] != want[i] {
			t.Errorf("step %d: %+v, want %+v", i, steps[i], want[i])
		}
	}
	// Default block size 512; no timeout step without a timeout.
	steps, _ = ioctlSequence(Config{Size: 1 << 20}, []int{3})
	if steps[0].arg != 512 || steps[1].arg != 2048 || len(steps) != 4 {
		t.Errorf("defaults: %+v", steps)
	}
}
