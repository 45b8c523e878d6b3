package storage

// IsBlockDev reports whether f was opened on a block device (for the
// external contract tests).
func IsBlockDev(f *File) bool { return f.blockDev }
