// Package kernel attaches a /dev/nbdN block device to an in-process NBD
// server: it loads the nbd driver, makes socketpairs, hands one end of
// each to the kernel and lets the caller serve the other end.
//
// Its one job is the kernel's side of the NBD client: module loading
// (LoadModule, with pmorjan/kmod), the generic netlink family "nbd"
// (Netlink: Connect, Reconfigure, Disconnect, Status),
// the legacy ioctls as a fallback (ConnectIoctl), and the block-queue
// shape in sysfs (Tune). Attach ties them together. It knows nothing of
// caching, and nothing of the NBD server beyond the request header it
// watches for NBD_CMD_DISC.
//
// # Ordering rules
//
//  1. The driver is loaded before the netlink family is looked up: the
//     family only exists while nbd is loaded.
//  2. The server ends are being served before the kernel gets the other
//     ends: the kernel may read the partition table at once.
//  3. After Connect or Reconfigure our copies of the kernel ends are
//     closed; the kernel holds its own references. The process dying
//     closes the server ends, which the kernel sees as dead connections:
//     requests then wait DeadConnTimeout for a Reconfigure.
//  4. Reconfigure only fills dead slots: a new server can take over only
//     once the old one has closed its ends (died, or released them).
//     Requests the old server had read but not answered are sent again by
//     the kernel after their Timeout (default 30 s) expires.
//  5. The ioctl setup (NBD_SET_* then NBD_DO_IT) runs on one locked OS
//     thread with every signal blocked: the kernel refuses a setup from
//     another thread, and a signal would interrupt NBD_DO_IT and tear
//     the device down.
//  6. Shape (sysfs) is written after the device is connected: the queue
//     limits are reset by the connect.
//
// # Timeouts
//
// Config.Timeout is per request. When it expires the kernel gives the
// connection up and sends the request again on another one (or, with
// every connection dead, waits DeadConnTimeout for a Reconfigure); the
// Attachment then hands it a fresh socket. A short timeout makes a
// restart quick, since requests the dead server had read are only resent
// on expiry; but a request that is merely slow is then executed twice,
// and the first copy may land after a later write to the same blocks.
// The default (0: the kernel's 30 s) is the safe one.
//
// # Invariants
//
//   - A server-side connection counts as closed exactly once; Done is
//     closed when the count reaches zero, never earlier: a replacement
//     connection is counted before the dead one is uncounted.
//   - A connection that saw NBD_CMD_DISC is never replaced.
//
// # Netlink messages
//
// Every attribute is a netlink TLV in host byte order, padded to 4
// bytes. NBD_CMD_CONNECT carries (INDEX absent: the kernel picks):
//
//	+------+-------------------------+------+-----------------------------+
//	| type | name                    | kind | value                       |
//	+------+-------------------------+------+-----------------------------+
//	|    1 | NBD_ATTR_INDEX          | u32  | N of /dev/nbdN (optional)   |
//	|    2 | NBD_ATTR_SIZE_BYTES     | u64  | device size                 |
//	|    3 | NBD_ATTR_BLOCK_SIZE_... | u64  | logical block size          |
//	|    5 | NBD_ATTR_SERVER_FLAGS   | u64  | NBD transmission flags      |
//	|    4 | NBD_ATTR_TIMEOUT        | u64  | request timeout, s          |
//	|    8 | NBD_ATTR_DEAD_CONN_...  | u64  | wait for reconnect, s       |
//	|    6 | NBD_ATTR_CLIENT_FLAGS   | u64  | DESTROY_ON_DISCONNECT, ...  |
//	|   10 | NBD_ATTR_BACKEND_ID...  | str  | NUL-terminated              |
//	|    7 | NBD_ATTR_SOCKETS        | nest | NBD_SOCK_ITEM (1), nested,  |
//	|      |                         |      |   each NBD_SOCK_FD (1) u32  |
//	+------+-------------------------+------+-----------------------------+
//
// NBD_CMD_RECONFIGURE carries INDEX, TIMEOUT, DEAD_CONN_TIMEOUT,
// CLIENT_FLAGS, BACKEND_IDENTIFIER (it must match) and SOCKETS;
// NBD_CMD_DISCONNECT carries INDEX. The STATUS reply nests
// NBD_ATTR_DEVICE_LIST (9) { NBD_DEVICE_ITEM (1) { NBD_DEVICE_INDEX (1)
// u32, NBD_DEVICE_CONNECTED (2) u8 } ... }.
//
// One attribute on the wire:
//
//	+---------+---------+-----------------+---------+
//	| len u16 | type u16| value (len - 4) | pad 0-3 |
//	+---------+---------+-----------------+---------+
//
// (a nested attribute has NLA_F_NESTED, 0x8000, in its type.)
package kernel
