package kernel

// netlink.go: the "nbd" generic netlink family: Config, and connecting,
// reconfiguring, disconnecting and querying devices.

import (
	"errors"
	"fmt"
	"math"
	"os"
	"time"

	"github.com/mdlayher/genetlink"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// The "nbd" generic netlink family (include/uapi/linux/nbd-netlink.h).
const (
	familyName     = "nbd"
	familyVersion  = 1
	multicastGroup = "nbd_mc_group"
)

// Commands.
const (
	cmdConnect     = 1
	cmdDisconnect  = 2
	cmdReconfigure = 3
	cmdLinkDead    = 4 // kernel → user, multicast
	cmdStatus      = 5
)

// Top-level attributes.
const (
	attrIndex           = 1  // u32
	attrSizeBytes       = 2  // u64
	attrBlockSizeBytes  = 3  // u64
	attrTimeout         = 4  // u64, seconds
	attrServerFlags     = 5  // u64, NBD transmission flags
	attrClientFlags     = 6  // u64, ClientFlags
	attrSockets         = 7  // nested: sockItem...
	attrDeadConnTimeout = 8  // u64, seconds
	attrDeviceList      = 9  // nested: deviceItem... (STATUS reply)
	attrBackend         = 10 // NUL-terminated string
)

// Nested attributes.
const (
	sockItem        = 1 // in attrSockets: nested
	sockFD          = 1 // in sockItem: u32
	deviceItem      = 1 // in attrDeviceList: nested
	deviceIndex     = 1 // in deviceItem: u32
	deviceConnected = 2 // in deviceItem: u8
)

// ClientFlags are NBD_ATTR_CLIENT_FLAGS.
type ClientFlags uint64

const (
	// DestroyOnDisconnect removes the device when it is disconnected
	// (for devices the kernel created on demand).
	DestroyOnDisconnect ClientFlags = 1 << 0
	// DisconnectOnClose disconnects when the last opener closes the
	// device.
	DisconnectOnClose ClientFlags = 1 << 1
)

// NBD transmission flags, as the kernel's NBD_ATTR_SERVER_FLAGS and
// NBD_SET_FLAGS take them (the NBD protocol's values).
const (
	FlagHasFlags        = 1 << 0
	FlagReadOnly        = 1 << 1
	FlagSendFlush       = 1 << 2
	FlagSendFUA         = 1 << 3
	FlagRotational      = 1 << 4
	FlagSendTrim        = 1 << 5
	FlagSendWriteZeroes = 1 << 6
	FlagCanMultiConn    = 1 << 8
)

// AnyIndex asks Connect to let the kernel pick (or create) a free device.
const AnyIndex = -1

// Config is what the kernel is told about a device. Connect uses every
// field; Reconfigure uses the timeouts, ClientFlags and Backend.
type Config struct {
	// Index of /dev/nbdN, or AnyIndex.
	Index int
	// Size of the device in bytes; a multiple of BlockSize.
	Size int64
	// BlockSize is the logical (and physical) block size: a power of two
	// from 512 to the page size. 0 leaves the kernel's default (512).
	BlockSize int
	// ServerFlags are the NBD transmission flags (FlagSendFlush, ...).
	ServerFlags uint64
	// ClientFlags (DestroyOnDisconnect, DisconnectOnClose).
	ClientFlags ClientFlags
	// Timeout of one request; whole seconds. When it expires the kernel
	// retries the request on another connection (or after a reconnect),
	// and gives the connection up. 0: the kernel's default of 30 s, after
	// which it only warns when there is one connection.
	Timeout time.Duration
	// DeadConnTimeout is how long requests wait for a reconnect (a
	// Reconfigure with fresh sockets) once every connection is dead,
	// before they fail with EIO; whole seconds. 0: they fail at once.
	DeadConnTimeout time.Duration
	// Backend identifies what is served (shown in
	// /sys/block/nbdN/backend). A Reconfigure must name the same one.
	Backend string
}

// check validates c the way the kernel would, with clearer errors.
func (c Config) check() error {
	if c.Index < AnyIndex || int64(c.Index) > math.MaxInt32 {
		return fmt.Errorf("%w: device index %d", ErrInvalid, c.Index)
	}
	if c.Size <= 0 {
		return fmt.Errorf("%w: size %d", ErrInvalid, c.Size)
	}
	if c.BlockSize != 0 {
		if c.BlockSize < 512 || c.BlockSize > os.Getpagesize() || c.BlockSize&(c.BlockSize-1) != 0 {
			return fmt.Errorf("%w: block size %d: want a power of two from 512 to %d", ErrInvalid, c.BlockSize, os.Getpagesize())
		}
		if c.Size%int64(c.BlockSize) != 0 {
			return fmt.Errorf("%w: size %d is not a multiple of the block size %d", ErrInvalid, c.Size, c.BlockSize)
		}
	}
	if c.Timeout < 0 || c.DeadConnTimeout < 0 {
		return fmt.Errorf("%w: negative timeout", ErrInvalid)
	}
	return nil
}

// seconds rounds a timeout up to whole seconds, as the kernel takes it.
func seconds(d time.Duration) uint64 {
	return uint64((d + time.Second - 1) / time.Second)
}

// encodeConnect builds the attributes of NBD_CMD_CONNECT.
func encodeConnect(c Config, fds []int) ([]byte, error) {
	if err := c.check(); err != nil {
		return nil, err
	}
	if len(fds) == 0 {
		return nil, fmt.Errorf("%w: no sockets", ErrInvalid)
	}
	ae := netlink.NewAttributeEncoder()
	if c.Index != AnyIndex {
		ae.Uint32(attrIndex, uint32(c.Index))
	}
	ae.Uint64(attrSizeBytes, uint64(c.Size))
	if c.BlockSize != 0 {
		ae.Uint64(attrBlockSizeBytes, uint64(c.BlockSize))
	}
	ae.Uint64(attrServerFlags, c.ServerFlags)
	encodeCommon(ae, c)
	encodeSockets(ae, fds)
	return ae.Encode()
}

// encodeReconfigure builds the attributes of NBD_CMD_RECONFIGURE.
func encodeReconfigure(c Config, fds []int) ([]byte, error) {
	if c.Index < 0 {
		return nil, fmt.Errorf("%w: reconfigure needs a device index", ErrInvalid)
	}
	if c.Timeout < 0 || c.DeadConnTimeout < 0 {
		return nil, fmt.Errorf("%w: negative timeout", ErrInvalid)
	}
	ae := netlink.NewAttributeEncoder()
	ae.Uint32(attrIndex, uint32(c.Index))
	encodeCommon(ae, c)
	if len(fds) > 0 {
		encodeSockets(ae, fds)
	}
	return ae.Encode()
}

// encodeCommon adds the attributes Connect and Reconfigure share.
func encodeCommon(ae *netlink.AttributeEncoder, c Config) {
	// The timeout is always sent: on reconfigure 0 resets it, as on
	// connect.
	ae.Uint64(attrTimeout, seconds(c.Timeout))
	ae.Uint64(attrDeadConnTimeout, seconds(c.DeadConnTimeout))
	ae.Uint64(attrClientFlags, uint64(c.ClientFlags))
	if c.Backend != "" {
		ae.String(attrBackend, c.Backend)
	}
}

func encodeSockets(ae *netlink.AttributeEncoder, fds []int) {
	ae.Nested(attrSockets, func(nae *netlink.AttributeEncoder) error {
		for _, fd := range fds {
			nae.Nested(sockItem, func(iae *netlink.AttributeEncoder) error {
				iae.Uint32(sockFD, uint32(fd))
				return nil
			})
		}
		return nil
	})
}

// encodeIndex builds a message that carries only a device index.
func encodeIndex(index int) ([]byte, error) {
	ae := netlink.NewAttributeEncoder()
	if index != AnyIndex {
		if index < 0 || int64(index) > math.MaxInt32 {
			return nil, fmt.Errorf("%w: device index %d", ErrInvalid, index)
		}
		ae.Uint32(attrIndex, uint32(index))
	}
	return ae.Encode()
}

// decodeIndex reads NBD_ATTR_INDEX from a reply (CONNECT, LINK_DEAD).
func decodeIndex(b []byte) (int, error) {
	ad, err := netlink.NewAttributeDecoder(b)
	if err != nil {
		return 0, err
	}
	index := -1
	for ad.Next() {
		if ad.Type() == attrIndex {
			index = int(ad.Uint32())
		}
	}
	if err := ad.Err(); err != nil {
		return 0, err
	}
	if index < 0 {
		return 0, fmt.Errorf("kernel: reply without a device index")
	}
	return index, nil
}

// DeviceStatus is one entry of a STATUS reply.
type DeviceStatus struct {
	Index     int
	Connected bool // the device has a configuration (sockets, live or dead)
}

// decodeStatus reads the device list of a STATUS reply.
func decodeStatus(b []byte) ([]DeviceStatus, error) {
	ad, err := netlink.NewAttributeDecoder(b)
	if err != nil {
		return nil, err
	}
	var out []DeviceStatus
	for ad.Next() {
		if ad.Type() != attrDeviceList {
			continue
		}
		ad.Nested(func(lad *netlink.AttributeDecoder) error {
			for lad.Next() {
				if lad.Type() != deviceItem {
					continue
				}
				lad.Nested(func(iad *netlink.AttributeDecoder) error {
					d := DeviceStatus{Index: -1}
					for iad.Next() {
						switch iad.Type() {
						case deviceIndex:
							d.Index = int(iad.Uint32())
						case deviceConnected:
							d.Connected = iad.Uint8() != 0
						}
					}
					if d.Index < 0 {
						return errors.New("kernel: status entry without an index")
					}
					out = append(out, d)
					return nil
				})
			}
			return nil
		})
	}
	if err := ad.Err(); err != nil {
		return nil, err
	}
	return out, nil
}

// Netlink is a generic netlink connection to the nbd family. It is safe
// for concurrent use.
type Netlink struct {
	c      *genetlink.Conn
	family genetlink.Family
}

// DialNetlink opens a generic netlink socket and looks up the nbd family.
// The family exists once the nbd driver is loaded; without it the error
// is ErrNoNetlink.
func DialNetlink() (*Netlink, error) {
	c, err := genetlink.Dial(nil)
	if err != nil {
		return nil, fmt.Errorf("kernel: generic netlink socket: %w", err)
	}
	n, err := newNetlink(c)
	if err != nil {
		c.Close()
		return nil, err
	}
	return n, nil
}

func newNetlink(c *genetlink.Conn) (*Netlink, error) {
	f, err := c.GetFamily(familyName)
	if err != nil {
		if errors.Is(err, unix.ENOENT) || errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("%w (kernel older than 4.12, or nbd not loaded)", ErrNoNetlink)
		}
		return nil, fmt.Errorf("kernel: looking up the nbd netlink family: %w", err)
	}
	return &Netlink{c: c, family: f}, nil
}

// Close closes the socket.
func (n *Netlink) Close() error { return n.c.Close() }

func (n *Netlink) execute(cmd uint8, data []byte, flags netlink.HeaderFlags) ([]genetlink.Message, error) {
	msgs, err := n.c.Execute(genetlink.Message{
		Header: genetlink.Header{Command: cmd, Version: n.family.Version},
		Data:   data,
	}, n.family.ID, flags)
	return msgs, mapErrno(err)
}

// mapErrno turns the kernel's answers into this package's sentinels,
// keeping the errno in the chain.
func mapErrno(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, unix.EPERM), errors.Is(err, unix.EACCES):
		return fmt.Errorf("%w: %w", ErrPermission, err)
	case errors.Is(err, unix.EBUSY):
		return fmt.Errorf("%w: %w", ErrBusy, err)
	case errors.Is(err, unix.EINVAL):
		return fmt.Errorf("%w (see the kernel log, dmesg): %w", ErrInvalid, err)
	}
	return fmt.Errorf("kernel: netlink: %w", err)
}

// fds returns the descriptors of files.
func fds(files []*os.File) []int {
	out := make([]int, len(files))
	for i, f := range files {
		out[i] = int(f.Fd())
	}
	return out
}

// Connect hands socks to the kernel as the connections of a device
// (NBD_CMD_CONNECT) and returns the device index. The kernel takes its
// own reference to each socket: the caller may close its copies.
func (n *Netlink) Connect(c Config, socks []*os.File) (int, error) {
	data, err := encodeConnect(c, fds(socks))
	if err != nil {
		return 0, err
	}
	msgs, err := n.execute(cmdConnect, data, netlink.Request)
	if err != nil {
		return 0, fmt.Errorf("kernel: connect: %w", err)
	}
	for _, m := range msgs {
		if idx, err := decodeIndex(m.Data); err == nil {
			return idx, nil
		}
	}
	if c.Index != AnyIndex {
		return c.Index, nil
	}
	return 0, errors.New("kernel: connect: the kernel did not say which device it used")
}

// Reconfigure changes the timeouts and client flags of a connected
// device and hands it fresh sockets (NBD_CMD_RECONFIGURE). The kernel
// puts a fresh socket only in the place of a dead one, and ignores the
// rest without error: a reconnect works once the old server is gone.
// c.Backend must match the one given at Connect.
func (n *Netlink) Reconfigure(c Config, socks []*os.File) error {
	data, err := encodeReconfigure(c, fds(socks))
	if err != nil {
		return err
	}
	if _, err := n.execute(cmdReconfigure, data, netlink.Request|netlink.Acknowledge); err != nil {
		if errors.Is(err, ErrInvalid) {
			return fmt.Errorf("kernel: reconfigure /dev/nbd%d (not connected, or another backend identifier): %w", c.Index, err)
		}
		return fmt.Errorf("kernel: reconfigure /dev/nbd%d: %w", c.Index, err)
	}
	return nil
}

// Disconnect asks the kernel to disconnect a device
// (NBD_CMD_DISCONNECT): it sends NBD_CMD_DISC on every connection,
// shuts the sockets down and fails the requests still queued.
func (n *Netlink) Disconnect(index int) error {
	if index < 0 {
		return fmt.Errorf("%w: device index %d", ErrInvalid, index)
	}
	data, err := encodeIndex(index)
	if err != nil {
		return err
	}
	if _, err := n.execute(cmdDisconnect, data, netlink.Request|netlink.Acknowledge); err != nil {
		return fmt.Errorf("kernel: disconnect /dev/nbd%d: %w", index, err)
	}
	return nil
}

// Status reports one device, or every device with AnyIndex.
func (n *Netlink) Status(index int) ([]DeviceStatus, error) {
	data, err := encodeIndex(index)
	if err != nil {
		return nil, err
	}
	msgs, err := n.execute(cmdStatus, data, netlink.Request)
	if err != nil {
		return nil, fmt.Errorf("kernel: status: %w", err)
	}
	var out []DeviceStatus
	for _, m := range msgs {
		if m.Header.Command != cmdStatus {
			continue
		}
		d, err := decodeStatus(m.Data)
		if err != nil {
			return nil, fmt.Errorf("kernel: status reply: %w", err)
		}
		out = append(out, d...)
	}
	return out, nil
}
