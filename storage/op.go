package storage

// op.go: OpKind and Op: the kinds of storage operations, and one operation
// as a Crash hook sees it.

import "strings"

// OpKind names a kind of storage operation. Kinds are bits, so a set of
// kinds (as Fault.Ops takes) is their bitwise OR.
type OpKind uint8

const (
	OpRead OpKind = 1 << iota
	OpWrite
	OpFlush
	OpTrim
	OpZero
	OpExtents

	// OpAll is every kind.
	OpAll = OpRead | OpWrite | OpFlush | OpTrim | OpZero | OpExtents
)

// String returns "write", or "read|write" for a set.
func (k OpKind) String() string {
	if k == 0 {
		return "none"
	}
	var parts []string
	for bit := OpRead; bit <= OpExtents; bit <<= 1 {
		if k&bit == 0 {
			continue
		}
		switch bit {
		case OpRead:
			parts = append(parts, "read")
		case OpWrite:
			parts = append(parts, "write")
		case OpFlush:
			parts = append(parts, "flush")
		case OpTrim:
			parts = append(parts, "trim")
		case OpZero:
			parts = append(parts, "zero")
		case OpExtents:
			parts = append(parts, "extents")
		}
	}
	if k&^OpAll != 0 {
		parts = append(parts, "unknown")
	}
	return strings.Join(parts, "|")
}

// Op describes one storage operation, as a Crash hook sees it.
type Op struct {
	Index  int64 // 0 for the first operation on the device
	Kind   OpKind
	Off    int64 // 0 for Flush
	Length int64 // 0 for Flush
	Flags  Flags
}
