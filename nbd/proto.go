package nbd

// proto.go: the protocol's constants and the wire form of requests and
// replies.

import (
	"encoding/binary"
	"fmt"
)

// Magic numbers of the fixed newstyle protocol.
const (
	magicNBD          = 0x4e42444d41474943 // "NBDMAGIC"
	magicIHaveOpt     = 0x49484156454f5054 // "IHAVEOPT"
	magicOptReply     = 0x0003e889045565a9
	magicRequest      = 0x25609513
	magicSimpleReply  = 0x67446698
	magicStructReply  = 0x668e33ef
	requestHeaderSize = 28
	simpleReplySize   = 16
	structHeaderSize  = 20
)

// Handshake flags (server) and client flags.
const (
	flagFixedNewstyle   = 1 << 0
	flagNoZeroes        = 1 << 1
	clientFixedNewstyle = 1 << 0
	clientNoZeroes      = 1 << 1
)

// Options.
const (
	optExportName      = 1
	optAbort           = 2
	optList            = 3
	optStartTLS        = 5
	optInfo            = 6
	optGo              = 7
	optStructuredReply = 8
	optListMetaContext = 9
	optSetMetaContext  = 10
)

// Option reply types.
const (
	repAck         = 1
	repServer      = 2
	repInfo        = 3
	repMetaContext = 4
	repErrBit      = 1 << 31
	repErrUnsup    = repErrBit | 1
	repErrPolicy   = repErrBit | 2
	repErrInvalid  = repErrBit | 3
	repErrPlatform = repErrBit | 4
	repErrTLSReqd  = repErrBit | 5
	repErrUnknown  = repErrBit | 6
	repErrShutdown = repErrBit | 7
	repErrTooBig   = repErrBit | 9
)

// Info types.
const (
	infoExport      = 0
	infoName        = 1
	infoDescription = 2
	infoBlockSize   = 3
)

// Transmission flags.
const (
	tflagHasFlags        = 1 << 0
	tflagReadOnly        = 1 << 1
	tflagSendFlush       = 1 << 2
	tflagSendFUA         = 1 << 3
	tflagRotational      = 1 << 4
	tflagSendTrim        = 1 << 5
	tflagSendWriteZeroes = 1 << 6
	tflagSendDF          = 1 << 7
	tflagCanMultiConn    = 1 << 8
	tflagSendCache       = 1 << 10
	tflagSendFastZero    = 1 << 11
)

// Commands.
const (
	cmdRead        = 0
	cmdWrite       = 1
	cmdDisc        = 2
	cmdFlush       = 3
	cmdTrim        = 4
	cmdCache       = 5
	cmdWriteZeroes = 6
	cmdBlockStatus = 7
)

// Command flags.
const (
	cflagFUA      = 1 << 0
	cflagNoHole   = 1 << 1
	cflagDF       = 1 << 2
	cflagReqOne   = 1 << 3
	cflagFastZero = 1 << 4
)

// Structured reply flags and types.
const (
	replyFlagDone        = 1 << 0
	replyTypeNone        = 0
	replyTypeOffsetData  = 1
	replyTypeOffsetHole  = 2
	replyTypeBlockStatus = 5
	replyTypeError       = 1<<15 | 1
)

// NBD error values (the wire numbers; see errno.go for the mapping).
const (
	errPerm     = 1
	errIO       = 5
	errNoMem    = 12
	errInval    = 22
	errNoSpc    = 28
	errOverflow = 75
	errNotSup   = 95
	errShutdown = 108
)

// base:allocation descriptor flags.
const (
	stateHole = 1 << 0
	stateZero = 1 << 1
)

const metaBaseAllocation = "base:allocation"

// metaContextID is the one context id we hand out (base:allocation).
const metaContextID = 1

// request is a decoded transmission request header.
type request struct {
	flags  uint16
	typ    uint16
	cookie uint64
	offset uint64
	length uint32
}

// errBadMagic is returned when a request header does not start with the
// request magic: the stream is out of sync and the connection must close.
type errBadMagic uint32

func (e errBadMagic) Error() string { return fmt.Sprintf("nbd: bad request magic %#x", uint32(e)) }

// parseRequest decodes a 28-byte request header.
func parseRequest(b []byte) (request, error) {
	_ = b[requestHeaderSize-1]
	if m := binary.BigEndian.Uint32(b[0:]); m != magicRequest {
		return request{}, errBadMagic(m)
	}
	return request{
		flags:  binary.BigEndian.Uint16(b[4:]),
		typ:    binary.BigEndian.Uint16(b[6:]),
		cookie: binary.BigEndian.Uint64(b[8:]),
		offset: binary.BigEndian.Uint64(b[16:]),
		length: binary.BigEndian.Uint32(b[24:]),
	}, nil
}

// appendRequest encodes a request header (used by tests and the client side).
func appendRequest(b []byte, r request) []byte {
	b = binary.BigEndian.AppendUint32(b, magicRequest)
	b = binary.BigEndian.AppendUint16(b, r.flags)
	b = binary.BigEndian.AppendUint16(b, r.typ)
	b = binary.BigEndian.AppendUint64(b, r.cookie)
	b = binary.BigEndian.AppendUint64(b, r.offset)
	return binary.BigEndian.AppendUint32(b, r.length)
}

func appendSimpleReply(b []byte, errno uint32, cookie uint64) []byte {
	b = binary.BigEndian.AppendUint32(b, magicSimpleReply)
	b = binary.BigEndian.AppendUint32(b, errno)
	return binary.BigEndian.AppendUint64(b, cookie)
}

func appendStructHeader(b []byte, flags, typ uint16, cookie uint64, length uint32) []byte {
	b = binary.BigEndian.AppendUint32(b, magicStructReply)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, cookie)
	return binary.BigEndian.AppendUint32(b, length)
}

func appendOptReply(b []byte, opt, typ uint32, length uint32) []byte {
	b = binary.BigEndian.AppendUint64(b, magicOptReply)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, typ)
	return binary.BigEndian.AppendUint32(b, length)
}

func cmdName(t uint16) string {
	switch t {
	case cmdRead:
		return "READ"
	case cmdWrite:
		return "WRITE"
	case cmdDisc:
		return "DISC"
	case cmdFlush:
		return "FLUSH"
	case cmdTrim:
		return "TRIM"
	case cmdCache:
		return "CACHE"
	case cmdWriteZeroes:
		return "WRITE_ZEROES"
	case cmdBlockStatus:
		return "BLOCK_STATUS"
	}
	return fmt.Sprintf("CMD(%d)", t)
}
